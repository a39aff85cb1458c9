"""Documents of fedit's finance tasks (FlowerTune's finance benchmarks, scored by the
harness as three-way multiple choice): every task's documents become ``instruction``,
``text`` and ``label`` (0 negative, 1 neutral, 2 positive), with FinGPT's prompts and
label rules, which FlowerTune's evaluation uses."""

NEWS = ("What is the sentiment of this news? Please choose an answer from "
        "{negative/neutral/positive}.")
TWEET = ("What is the sentiment of this tweet? Please choose an answer from "
         "{negative/neutral/positive}.")


def fiqa_label(score):
    """FinGPT's rule for FiQA's sentiment score in [-1, 1]."""
    if score < -0.1:
        return 0
    return 1 if score < 0.1 else 2


def fpb_docs(dataset):
    """FPB (sentences_50agree) has one split: FinGPT tests on a seeded 25% of it."""
    test = dataset.train_test_split(test_size=0.25, seed=42)["test"]
    return test.map(lambda d: {"instruction": NEWS, "text": d["sentence"],
                               "label": int(d["label"])})  # 0 neg, 1 neutral, 2 pos


def fiqa_docs(dataset):
    return dataset.map(lambda d: {
        "instruction": TWEET if d.get("format") == "post" else NEWS,
        "text": d["sentence"], "label": fiqa_label(float(d["sentiment_score"]))})


TFNS_LABELS = {0: 0, 1: 2, 2: 1}  # Bearish -> negative, Bullish -> positive, Neutral


def tfns_docs(dataset):
    return dataset.map(lambda d: {"instruction": TWEET, "text": d["text"],
                                  "label": TFNS_LABELS[int(d["label"])]})
