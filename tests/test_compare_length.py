"""Answer scores compared at equal answer length (fedit.evaluate.compare.length_controlled):
the intercept of d = a + b log(len_B / len_A), checked against cases whose answer is known
and against numpy's own least squares."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedit.evaluate.compare import (
    NO_SPREAD,
    TOO_FEW,
    compare_evals,
    format_compare,
    length_controlled,
)
from tests.test_compare import _arms, _cli


def _lengths(rng, n, low, high):
    return rng.integers(low, high, n).astype(float)


def test_a_score_that_only_follows_length_has_zero_difference_at_equal_length(tmp_path):
    # Prepare: score = 0.1 log(tokens) in both arms, B's answers longer
    rng = np.random.default_rng(2)
    len_a, len_b = _lengths(rng, 60, 5, 60), _lengths(rng, 60, 30, 200)
    a = {"rouge_l": 0.1 * np.log(len_a), "answer_tokens": len_a}
    b = {"rouge_l": 0.1 * np.log(len_b), "answer_tokens": len_b}
    # Execute
    m = compare_evals(*_arms(tmp_path, a, b))["metrics"]
    # Assert: the plain difference is clearly better, none is left at equal length
    rouge = m["rouge_l"]
    assert rouge["low"] > 0 and rouge["verdict"] == "better"
    lc = rouge["length_controlled"]
    assert abs(lc["diff"]) < 1e-9 and lc["slope"] == pytest.approx(0.1, abs=1e-12)
    assert lc["low"] <= 1e-9 and lc["high"] >= -1e-9  # holds 0 (up to rounding)
    assert (lc["rows"], lc["dropped"], lc["zero_length"]) == (60, 0, 0)
    # the answers' own length: B's longer, a length has no better side
    assert m["answer_tokens"]["verdict"] == "higher" and m["answer_tokens"]["better"] == "n/a"
    assert m["answer_tokens"]["diff"] == pytest.approx(np.mean(len_b - len_a))


def test_a_constant_gain_at_equal_length_is_the_intercept():
    rng = np.random.default_rng(3)
    len_a, len_b = _lengths(rng, 50, 5, 60), _lengths(rng, 50, 5, 200)
    a = rng.integers(0, 8, 50) / 16  # dyadic: B - A is the gain exactly
    # the same lengths in both arms: no length variation, the mean difference exactly
    lc = length_controlled(a, a + 0.125, len_a, len_a)
    assert (lc["diff"], lc["low"], lc["high"], lc["slope"]) == (0.125, 0.125, 0.125, None)
    assert lc["note"] == NO_SPREAD and lc["verdict"] == "better"
    # B twice as long everywhere: x constant (log 2), still no spread to fit a slope on
    lc = length_controlled(a, a - 0.25, len_a, 2 * len_a, higher_is_better=True)
    assert (lc["diff"], lc["slope"], lc["verdict"]) == (-0.25, None, "worse")
    # lengths that differ, score = 0.1 log(tokens) + 0.25 in B: the intercept is 0.25
    lc = length_controlled(0.1 * np.log(len_a), 0.1 * np.log(len_b) + 0.25, len_a, len_b)
    assert lc["diff"] == pytest.approx(0.25, abs=1e-12)
    assert lc["slope"] == pytest.approx(0.1, abs=1e-12)
    assert lc["low"] == pytest.approx(0.25, abs=1e-9) and lc["verdict"] == "better"


def test_fewer_than_three_rows_have_no_interval_and_zero_lengths_are_dropped():
    a, b = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.2, 0.6, 0.3, np.nan])
    len_a, len_b = np.array([4.0, 8, 0, 4]), np.array([8.0, 32, 5, 4])
    lc = length_controlled(a, b, len_a, len_b)
    # rows 0 and 1 remain (row 2: a 0-token answer, row 3: no score in B): the line through
    # (log 2, 0.1) and (log 4, 0.4) meets x = 0 at -0.2
    assert (lc["rows"], lc["dropped"], lc["zero_length"]) == (2, 2, 1)
    assert lc["diff"] == pytest.approx(-0.2, abs=1e-12)
    assert lc["slope"] == pytest.approx(0.3 / np.log(2), abs=1e-12)
    assert (lc["low"], lc["high"], lc["verdict"]) == (None, None, TOO_FEW)
    # no lengths recorded at all (an evaluation written before them): no entry
    assert length_controlled(a, b, np.full(4, np.nan), np.full(4, np.nan)) is None


def _expected(a, b, len_a, len_b, idx=None):
    """numpy's least squares of d on [1, x] over the usable rows (of resample ``idx``)."""
    d, x = b - a, np.log(len_b) - np.log(len_a)
    idx = np.arange(len(a)) if idx is None else idx
    ok = np.isfinite(d[idx]) & np.isfinite(x[idx])
    design = np.stack([np.ones(ok.sum()), x[idx][ok]], axis=1)
    return np.linalg.lstsq(design, d[idx][ok], rcond=None)[0]


def test_cli_compare_matches_numpys_least_squares_on_hand_written_folders(tmp_path):
    # Prepare: noisy scores, B longer and a little better; one row without a similarity in
    # A, one 0-token answer in B; B's folder holds its rows in another order
    rng = np.random.default_rng(4)
    n = 40
    len_a, len_b = _lengths(rng, n, 10, 80), _lengths(rng, n, 20, 160)
    len_b[7] = 0
    a = {"rouge_l": rng.uniform(0.1, 0.4, n), "similarity": rng.uniform(0.3, 0.7, n),
         "answer_tokens": len_a}
    b = {"rouge_l": a["rouge_l"] + 0.05 * np.log(len_b + 1) - 0.05 * np.log(len_a)
         + rng.normal(0.02, 0.03, n),
         "similarity": a["similarity"] + rng.normal(-0.01, 0.05, n), "answer_tokens": len_b}
    a["similarity"][3] = np.nan
    folder_a, folder_b = _arms(tmp_path, a, b)
    lines = (folder_b / "answers.jsonl").read_text().splitlines()
    (folder_b / "answers.jsonl").write_text("\n".join(lines[::-1]) + "\n")
    # Execute
    result = _cli("--compare", folder_a, folder_b, "--resamples", 300, "--seed", 5)
    assert result.exit_code == 0, result.output
    saved = json.loads((folder_b / "compare.json").read_text())["metrics"]
    # Assert: the point estimate and every resample as numpy's lstsq finds them
    rng_idx = np.random.default_rng(5)
    idx = rng_idx.integers(0, n, size=(300, n))  # the draws of the plain bootstrap
    with np.errstate(divide="ignore"):
        for name, rows in (("rouge_l", n - 1), ("similarity", n - 2)):
            lc = saved[name]["length_controlled"]
            intercept, slope = _expected(a[name], b[name], len_a, len_b)
            assert lc["diff"] == pytest.approx(intercept, abs=1e-9)
            assert lc["slope"] == pytest.approx(slope, abs=1e-9)
            assert (lc["rows"], lc["zero_length"]) == (rows, 1)
            boot = [_expected(a[name], b[name], len_a, len_b, i)[0] for i in idx]
            low, high = np.percentile(boot, [2.5, 97.5])
            assert (lc["low"], lc["high"]) == (pytest.approx(low, abs=1e-9),
                                               pytest.approx(high, abs=1e-9))
    # the printed block: a line per score at equal length
    out = result.output.splitlines()
    head = next(i for i, x in enumerate(out) if x.startswith("at equal length"))
    rouge = next(x for x in out[head:] if x.startswith("rouge_l (higher)"))
    lc = saved["rouge_l"]["length_controlled"]
    assert (f"{lc['diff']:+.4f}  [{lc['low']:+.4f}, {lc['high']:+.4f}]" in rouge
            and f"{lc['slope']:+.4f}" in rouge and rouge.endswith(lc["verdict"]))
    assert "1 rows with a 0-token answer left out" in result.output


def test_no_lengths_no_equal_length_block(tmp_path):
    a = {"rouge_l": np.full(10, 0.25)}
    result = compare_evals(*_arms(tmp_path, a, a))
    assert "length_controlled" not in result["metrics"]["rouge_l"]
    assert "answer_tokens" not in result["metrics"]
    assert "at equal length" not in format_compare(result)
