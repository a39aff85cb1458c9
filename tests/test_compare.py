"""Paired bootstrap comparison of two evaluations (fedit.evaluate.compare): cases whose
answer is known without the bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedit.cli import app
from fedit.config import load_config
from fedit.errors import DataError
from fedit.evaluate.compare import (
    NO_DIFFERENCE,
    compare_evals,
    paired_bootstrap,
    verdict,
)
from fedit.evaluate.evaluation import load_eval, write_eval
from fedit.evaluate.runner import resolve_target
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl

SETTINGS = {"model": "m", "rows": 0, "label_field": "category", "template": "alpaca",
            "cutoff_len": 256, "truncation": "context", "min_response_tokens": 16,
            "train_on_inputs": False, "fields": {}, "generated": True,
            "max_new_tokens": 32, "decoding": {"do_sample": False},
            "exact_match_categories": ["closed_qa"], "similarity_model": "s"}


def _answers(values: dict[str, np.ndarray]) -> list[dict]:
    n = len(next(iter(values.values())))
    return [{"id": i, "category": "closed_qa", "instruction": f"question {i}", "context": "",
             "reference": f"answer {i}", "answer": "x",
             **{k: (None if np.isnan(v[i]) else float(v[i])) for k, v in values.items()}}
            for i in range(n)]


def _write(folder, values, **settings):
    answers = _answers(values)
    result = {"overall": {}, "by_category": {},
              "settings": {**SETTINGS, "rows": len(answers), **settings}}
    write_eval(folder, result, answers)
    return folder


def _arms(tmp_path, a: dict, b: dict, **settings_b):
    return _write(tmp_path / "a", a), _write(tmp_path / "b", b, **settings_b)


def test_constant_difference_gives_exactly_that_interval(tmp_path):
    # Prepare: every row of B is A + d (dyadic numbers: B - A is d exactly)
    rng = np.random.default_rng(1)
    a = {"loss": rng.integers(8, 24, 40) / 8, "rouge_l": rng.integers(0, 4, 40) / 8}
    b = {"loss": a["loss"] + 0.25, "rouge_l": a["rouge_l"] + 0.125}
    # Execute
    result = compare_evals(*_arms(tmp_path, a, b))
    # Assert: loss up by 0.25 (worse: lower is better), ROUGE-L up by 0.125 (better)
    loss, rouge = result["metrics"]["loss"], result["metrics"]["rouge_l"]
    assert (loss["diff"], loss["low"], loss["high"]) == (0.25, 0.25, 0.25)
    assert (rouge["diff"], rouge["low"], rouge["high"]) == (0.125, 0.125, 0.125)
    assert loss["verdict"] == "worse" and loss["better"] == "lower"
    assert rouge["verdict"] == "better" and rouge["better"] == "higher"
    assert result["rows"] == 40 and "judge" not in result["metrics"]


def test_identical_arms_give_zero_and_no_difference(tmp_path):
    rng = np.random.default_rng(2)
    a = {"loss": rng.normal(2, 0.3, 30), "similarity": rng.uniform(0, 1, 30)}
    result = compare_evals(*_arms(tmp_path, a, a))
    for m in result["metrics"].values():
        if m["rows"]:
            assert (m["diff"], m["low"], m["high"]) == (0.0, 0.0, 0.0)
            assert m["verdict"] == NO_DIFFERENCE


def test_interval_matches_the_normal_approximation_on_1000_rows():
    rng = np.random.default_rng(3)
    a = rng.normal(0.5, 0.2, (1000, 1))
    b = a + rng.normal(0.02, 0.1, (1000, 1))
    # more resamples than the default: the percentiles' own Monte Carlo error (about 3% of
    # the half-width at 2,000) stays well inside the 5% asked of the agreement
    (s,) = paired_bootstrap(a, b, resamples=10_000, seed=7)
    d = (b - a)[:, 0]
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert s["diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert s["low"] == pytest.approx(d.mean() - half, abs=0.05 * half)
    assert s["high"] == pytest.approx(d.mean() + half, abs=0.05 * half)


def test_seed_reproduces_the_interval_and_another_seed_moves_it():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(200, 3)), rng.normal(size=(200, 3))
    first = paired_bootstrap(a, b, seed=11)
    assert paired_bootstrap(a, b, seed=11) == first
    assert paired_bootstrap(a, b, seed=12)[0]["low"] != first[0]["low"]


def test_missing_values_are_dropped_per_metric_and_counted():
    a = np.array([[1.0, 0.5], [np.nan, 0.5], [3.0, 0.5], [2.0, np.nan]])
    b = np.array([[2.0, 0.5], [5.0, 0.5], [np.nan, 0.5], [3.0, 0.5]])
    loss, rouge = paired_bootstrap(a, b, resamples=200)
    assert (loss["rows"], loss["dropped"], loss["diff"]) == (2, 2, 1.0)
    assert (loss["low"], loss["high"]) == (1.0, 1.0)
    assert (rouge["rows"], rouge["dropped"], rouge["diff"]) == (3, 1, 0.0)


def test_rows_matched_by_text_not_position(tmp_path):
    a = {"rouge_l": np.arange(10) / 16}
    folder_a, folder_b = _arms(tmp_path, a, {"rouge_l": np.arange(10) / 16 + 0.0625})
    # B's answers in reverse order: still matched row to row
    lines = (folder_b / "answers.jsonl").read_text().splitlines()
    (folder_b / "answers.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    m = compare_evals(folder_a, folder_b)["metrics"]["rouge_l"]
    assert (m["low"], m["high"]) == (0.0625, 0.0625)


def test_different_rows_are_refused(tmp_path):
    a = {"loss": np.ones(5)}
    folder_a, folder_b = _arms(tmp_path, a, a)
    lines = (folder_b / "answers.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace("question 1", "question 99")
    lines[3] = lines[3].replace("answer 3", "answer 33")
    (folder_b / "answers.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"different rows \(2 only in A, 2 only in B\)"):
        compare_evals(folder_a, folder_b)


def test_an_eval_written_before_the_data_settings_were_recorded_still_compares(tmp_path):
    # Prepare: A's eval.json has no min_response_tokens / train_on_inputs / fields
    a = {"loss": np.arange(5, dtype=float)}
    folder_a, folder_b = _arms(tmp_path, a, {"loss": a["loss"] + 1})
    result, answers = load_eval(folder_a)
    for key in ("min_response_tokens", "train_on_inputs", "fields"):
        del result["settings"][key]
    write_eval(folder_a, result, answers)
    # Execute / Assert: compared on the settings both record
    assert compare_evals(folder_a, folder_b)["metrics"]["loss"]["diff"] == 1.0


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("cutoff_len", 512, r"cannot compare: data.cutoff_len 256 \(A\) vs 512 \(B\); evaluate "
                        r"both with the same settings \(fedit eval base:MODEL --like RUN\)"),
    ("template", "chat", r"data.template alpaca \(A\) vs chat \(B\)"),
    ("max_new_tokens", 128, r"eval.max_new_tokens 32 \(A\) vs 128 \(B\)"),
    ("decoding", {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "seed": 1},
     r'eval decoding \{"do_sample": false\} \(A\) vs \{"do_sample": true'),
    ("rows", 6, r"held-out rows 5 \(A\) vs 6 \(B\)"),
    ("min_response_tokens", 8, r"data.min_response_tokens 16 \(A\) vs 8 \(B\)"),
    ("train_on_inputs", True, r"data.train_on_inputs False \(A\) vs True \(B\)"),
    ("fields", {"response": "output"}, r'data.fields \{\} \(A\) vs \{"response": "output"\}'),
])
def test_different_settings_are_refused(tmp_path, setting, value, message):
    a = {"loss": np.ones(5)}
    folder_a = _write(tmp_path / "a", a)
    folder_b = _write(tmp_path / "b", a, **{setting: value})
    with pytest.raises(DataError, match=message):
        compare_evals(folder_a, folder_b)


def test_judge_scores_take_part_when_both_arms_have_them(tmp_path):
    a = {"loss": np.ones(4)}
    folder_a, folder_b = _arms(tmp_path, a, a)
    for folder, scores in ((folder_a, [5, 6, None, 7]), (folder_b, [7, 8, 9, 9])):
        (folder / "judge.jsonl").write_text("".join(
            f'{{"id": {i}, "score": {"null" if s is None else s}}}\n'
            for i, s in enumerate(scores)))
    m = compare_evals(folder_a, folder_b)["metrics"]["judge"]
    assert (m["rows"], m["dropped"], m["diff"], m["verdict"]) == (3, 1, 2.0, "better")


def test_verdict_from_the_interval_only():
    assert verdict(0.1, 0.3, higher_is_better=True) == "better"
    assert verdict(0.1, 0.3, higher_is_better=False) == "worse"
    assert verdict(-0.3, -0.1, higher_is_better=False) == "better"
    assert verdict(-0.01, 0.3, higher_is_better=True) == NO_DIFFERENCE
    assert verdict(None, None, higher_is_better=True) == "no rows"


# ---------------------------------------------------------------------------------------
# fedit eval --compare A B


def _cli(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_cli_compare_prints_the_table_and_writes_compare_json(tmp_path):
    a = {"loss": np.full(20, 2.0), "rouge_l": np.full(20, 0.25)}
    b = {"loss": np.full(20, 1.5), "rouge_l": np.full(20, 0.25)}
    folder_a, folder_b = _arms(tmp_path, a, b)
    result = _cli("--compare", folder_a, folder_b)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "95% CI" in lines[2] and "verdict" in lines[2]
    loss = next(x for x in lines if x.startswith("loss (lower)"))
    assert "-0.5000  [-0.5000, -0.5000]" in loss and loss.endswith("better")
    rouge = next(x for x in lines if x.startswith("rouge_l (higher)"))
    assert rouge.endswith(NO_DIFFERENCE)
    assert f"wrote {folder_b / 'compare.json'}" in result.output
    saved = json.loads((folder_b / "compare.json").read_text())
    assert saved["metrics"]["loss"]["verdict"] == "better"
    assert saved["bootstrap"]["resamples"] == 2000 and saved["rows"] == 20
    # --out puts compare.json elsewhere
    result = _cli("--compare", folder_a, folder_b, "--out", tmp_path / "c", "--seed", 3)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["bootstrap"]["seed"] == 3


def test_cli_compare_refusals_are_one_line(tmp_path):
    a = {"loss": np.ones(5)}
    folder_a = _write(tmp_path / "a", a)
    folder_b = _write(tmp_path / "b", a, cutoff_len=512)
    for args, message in [
        (("--compare", folder_a, folder_b), "cannot compare: data.cutoff_len 256 (A) vs 512 (B)"),
        (("--compare", folder_a, tmp_path / "none"), "no eval.json (run fedit eval"),
        (("run", "--compare", folder_a, folder_a), "--compare A B takes no TARGET"),
        ((), "give a TARGET to evaluate"),
    ]:
        result = _cli(*args)
        assert result.exit_code == 2, result.output
        assert result.output.strip().count("\n") == 0 and message in result.output, result.output
    assert not (folder_b / "compare.json").exists()


# ---------------------------------------------------------------------------------------
# fedit eval base:MODEL --like RUN, then --compare with the run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("compare-run")
    data = write_jsonl(tmp / "rows.jsonl", make_rows(64, seed=5))
    cfg = load_config(write_config(tmp / "tiny.toml", tiny_model_dir, data, rounds=1,
                                   data={"cutoff_len": 256, "test_per_label": 2}))
    run_dir = make_run_dir(cfg)
    Simulation(cfg, run_dir).run()
    return run_dir


def test_like_takes_the_runs_data_settings_and_test_file(run, tiny_model_dir):
    t = resolve_target(f"base:{tiny_model_dir}", like=run)
    run_cfg = load_config(run / "config.toml")
    assert t.kind == "base" and t.adapter is None and t.cfg.model.name == str(tiny_model_dir)
    assert t.cfg.data == run_cfg.data and t.cfg.data.cutoff_len == 256
    assert t.cfg.eval == run_cfg.eval and t.default_test == run / "test.jsonl"
    assert resolve_target(f"base:{tiny_model_dir}").cfg.data.cutoff_len == 512  # no --like


def test_compare_accepts_a_like_base_and_refuses_a_plain_one(run, tiny_model_dir, tmp_path):
    base = f"base:{tiny_model_dir}"
    for args in [(run, "--out", tmp_path / "run"),
                 (base, "--like", run, "--out", tmp_path / "like"),
                 (base, "--on", run / "test.jsonl", "--out", tmp_path / "plain",
                  "--set", "model.dtype=fp32")]:
        result = _cli(*args, "--no-generate")
        assert result.exit_code == 0, result.output
    like, _ = load_eval(tmp_path / "like")
    assert like["settings"]["like"] == str(run) and like["settings"]["cutoff_len"] == 256
    assert like["settings"]["test_file"] == str(run / "test.jsonl")
    data = load_config(run / "config.toml").data  # what else decides rows and labels
    assert (like["settings"]["min_response_tokens"], like["settings"]["train_on_inputs"],
            like["settings"]["fields"]) == (data.min_response_tokens, data.train_on_inputs,
                                            data.fields)
    # the run's own settings and rows (and dtype): the run's round-0 held-out loss
    round0 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert like["overall"]["loss"] == pytest.approx(round0["eval_loss"], rel=1e-5)
    result = _cli("--compare", tmp_path / "like", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "loss (lower)" in result.output
    result = _cli("--compare", tmp_path / "plain", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "cannot compare: data.cutoff_len 512 (A) vs 256 (B)" in result.output


def test_like_errors(run, tiny_model_dir, tmp_path):
    for args, message in [
        ((run, "--like", run, "--out", tmp_path), "--like is only for base"),
        ((f"base:{tiny_model_dir}", "--like", tmp_path, "--out", tmp_path),
         "not a run folder (no config.toml)"),
    ]:
        result = _cli(*args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_forest_plot_is_written_beside_compare_json(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(6)
    a = {"loss": rng.normal(2.5, 0.3, 60), "rouge_l": rng.uniform(0, 0.4, 60),
         "similarity": rng.uniform(0.3, 0.8, 60), "exact_match": np.full(60, np.nan)}
    b = {"loss": a["loss"] - 0.05 + rng.normal(0, 0.02, 60),
         "rouge_l": a["rouge_l"] + rng.normal(0, 0.05, 60),
         "similarity": a["similarity"] - 0.04 + rng.normal(0, 0.02, 60),
         "exact_match": np.full(60, np.nan)}
    folder_a, folder_b = _arms(tmp_path, a, b)
    result = _cli("--compare", folder_a, folder_b)
    assert result.exit_code == 0, result.output
    assert f"and {folder_b / 'compare.png'}" in result.output
    image = matplotlib.image.imread(folder_b / "compare.png")
    # 3 metrics with rows (exact match has none), a panel each of the pair + 1 rows:
    # 10 x (0.9 + 0.42 * 3 * 2) inches at 100 dpi
    assert image.shape == (342, 1000, 4)
    assert image[..., :3].std() > 0.05  # not a blank canvas
