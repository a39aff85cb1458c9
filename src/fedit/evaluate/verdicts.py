"""The metrics a paired comparison knows and the words of its verdicts, shared by
``compare`` (the numbers) and ``forest`` (the plot)."""

#: metric -> True when higher is better (None: neither, a length)
SFT_METRICS: dict[str, bool | None] = {"loss": False, "rouge_l": True, "similarity": True,
                                       "exact_match": True, "judge": True,
                                       "answer_tokens": None}
#: the per-row scores of a generated answer, also compared at equal answer length
#: (``compare.length_controlled``); a benchmark task's per-row score can join them
LENGTH_CONTROLLED = ("rouge_l", "similarity", "exact_match", "judge")
#: those of preference pairs (fedit.evaluate.preference), a record field each
PREFERENCE_METRICS: dict[str, bool | None] = {
    "preference_accuracy": True, "reward_margin": True, "reference_free_accuracy": True,
    "reference_free_margin": True, "dpo_loss": False, "answer_tokens": None}
METRICS = {**SFT_METRICS, **PREFERENCE_METRICS}
#: a preference metric -> the per-pair record field it is the mean of (else its own name)
RECORD_FIELDS = {"preference_accuracy": "correct",
                 "reference_free_accuracy": "reference_free_correct"}
#: the verdict when the paired 95% interval holds zero
NO_DIFFERENCE = "no difference at 95%"
#: the verdicts of a metric with a better side, and of one without (a length)
VERDICTS = ("better", NO_DIFFERENCE, "worse")
DIRECTIONS = ("higher", NO_DIFFERENCE, "lower")


def verdicts_of(metric: str) -> tuple[str, str, str]:
    """The verdicts a metric's paired difference can get: (up, none, down)."""
    return DIRECTIONS if METRICS.get(metric, True) is None else VERDICTS


def better_side(metric: str) -> str:
    """``higher`` / ``lower`` (which side is better), ``n/a`` for a length."""
    side = METRICS.get(metric, True)
    return "n/a" if side is None else "higher" if side else "lower"
