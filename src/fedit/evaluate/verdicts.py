"""The metrics a paired comparison knows and the words of its verdicts, shared by
``compare`` (the numbers) and ``forest`` (the plot)."""

#: metric -> True when higher is better
METRICS = {"loss": False, "rouge_l": True, "similarity": True, "exact_match": True,
           "judge": True}
#: the verdict when the paired 95% interval holds zero
NO_DIFFERENCE = "no difference at 95%"
