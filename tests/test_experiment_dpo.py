"""`fedit experiment fedit-dpo --scale test`: self-play pairs built once, then the four
arms trained with DPO and scored on held-out pairs, with paired differences."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from fedit.cli import app
from fedit.errors import ConfigError
from fedit.evaluate.compare import compare_evals
from fedit.experiment.scales import experiment_config
from tests.conftest import make_rows, write_jsonl
from tests.test_experiment import ARMS, _lines, _read


@pytest.fixture(scope="module")
def dpo_experiment(talking_model_dir, tmp_path_factory):
    import torch

    tmp = tmp_path_factory.mktemp("dpo-exp")
    rows = write_jsonl(tmp / "rows.jsonl", make_rows(80))
    out = tmp / "exp"
    args = ["experiment", "fedit-dpo", "--scale", "test", "--out", str(out),
            "--set", f"model.name={talking_model_dir}", "--set", f"data.path={rows}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FEDIT_CACHE", str(tmp / "cache"))
            result = CliRunner().invoke(app, args)
            again = CliRunner().invoke(app, args)  # every arm done: skipped, pairs cached
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert again.exit_code == 0, again.output
    return out, tmp / "cache", result.output, again.output


def test_pairs_are_built_once_and_split_like_any_data(dpo_experiment):
    out, cache, output, again = dpo_experiment
    built = sorted((cache / "preferences").glob("*.jsonl"))
    assert len(built) == 1
    assert "self-play pairs:" in output and "cached" in again
    assert all(f"[{arm}] done before" in again for arm in ARMS)
    pairs = _lines(built[0])
    test = _lines(out / "test.jsonl")
    # the held-out pairs are some of the built ones, one a category (test_per_label = 1)
    assert {(p["prompt"], p["chosen"], p["rejected"]) for p in test} <= {
        (p["prompt"], p["chosen"], p["rejected"]) for p in pairs}
    assert sorted(p["category"] for p in test) == sorted({p["category"] for p in pairs})
    saved = (out / "config.toml").read_text(encoding="utf-8")
    assert str(built[0]) in saved and "pairs_per_label = 3" in saved


def test_every_arm_is_scored_on_the_held_out_pairs(dpo_experiment):
    out, _, output, _ = dpo_experiment
    summary = _read(out / "experiment.json")
    assert summary["experiment"] == "fedit-dpo" and list(summary["arms"]) == ARMS
    test = _lines(out / "test.jsonl")
    for arm in ARMS:
        result = _read(out / arm / "eval.json")
        assert result["settings"]["kind"] == "preference"
        assert summary["arms"][arm]["overall"] == result["overall"]
        records = _lines(out / arm / "answers.jsonl")
        assert [r["chosen"] for r in records] == [p["chosen"] for p in test]
        assert all(r["answer_tokens"] is not None for r in records)
    # the base arm is the starting adapter (B = 0): its implicit rewards are exactly 0
    base = _read(out / "base" / "eval.json")["overall"]
    assert base["reward_margin"] == 0.0 and base["preference_accuracy"] == 0.0
    assert base["dpo_loss"] == pytest.approx(np.log(2))
    fedit = _read(out / "fedit" / "eval.json")["overall"]
    assert fedit["reward_margin"] != 0.0
    # the round loop's held-out DPO loss of the final round is the arm's evaluation
    metrics = _lines(out / "fedit" / "metrics.jsonl")
    assert metrics[-1]["eval_loss"] == pytest.approx(fedit["dpo_loss"], rel=1e-5)
    assert metrics[0]["eval_loss"] == pytest.approx(np.log(2), rel=1e-6)
    # the local-only arm: the mean of its clients' own evaluations
    folders = sorted((out / "local-only").glob("client_*/eval.json"))
    per_client = [_read(p)["overall"] for p in folders]
    mean = _read(out / "local-only" / "eval.json")["overall"]
    for key in ("preference_accuracy", "reward_margin", "reference_free_margin", "dpo_loss"):
        assert mean[key] == pytest.approx(np.mean([c[key] for c in per_client]))
    for arm in ARMS:
        assert arm in output
    assert "rf_acc" in output and "tokens" in output  # the preference summary table


def test_paired_differences_on_preference_metrics(dpo_experiment):
    out, _, output, _ = dpo_experiment
    paired = _read(out / "experiment.json")["paired"]
    for name, pair in paired["pairs"].items():
        direct = compare_evals(out / pair["a"], out / "fedit", seed=42)
        assert pair["metrics"] == direct["metrics"], name
        assert {"preference_accuracy", "reward_margin", "reference_free_margin"} <= set(
            pair["metrics"])
        m = pair["metrics"]["reward_margin"]
        assert (f"{name}: reward_margin {m['diff']:+.4f} [{m['low']:+.4f}, {m['high']:+.4f}] "
                f"{m['verdict']}") in output
    # against base, fedit's margin difference is fedit's own mean margin (base's is 0)
    fedit = _read(out / "fedit" / "eval.json")["overall"]["reward_margin"]
    assert paired["pairs"]["fedit vs base"]["metrics"]["reward_margin"]["diff"] == \
        pytest.approx(fedit)


def test_budgets_are_the_paper_experiments(dpo_experiment):
    out, _, _, _ = dpo_experiment
    summary = _read(out / "experiment.json")
    assert summary["budget"]["total_steps"] == summary["arms"]["fedit"]["steps"] == \
        summary["arms"]["centralized"]["steps"]
    for steps in summary["arms"]["local-only"]["client_steps"].values():
        assert steps == summary["budget"]["client_steps"]


def test_dpo_scales_and_settings_errors():
    cfg, settings = experiment_config("fedit-dpo", "small")
    assert cfg.train.objective == "dpo" and cfg.data.template == "chatml"
    assert settings.pairs_per_label == 40 and settings.pairs_max_new_tokens == 96
    with pytest.raises(ConfigError,
                       match=r"--scale 'medium': use one of test, small \(fedit-dpo's scales\)"):
        experiment_config("fedit-dpo", "medium")
    with pytest.raises(ConfigError, match="experiment.pairs_per_label: must be >= 1"):
        experiment_config("fedit-dpo", "small", ["experiment.pairs_per_label=0"])
    paper, s = experiment_config("fedit-paper", "small")
    assert "pairs" not in s.recorded("fedit-paper") and "pairs" in s.recorded("fedit-dpo")


def test_answer_length_verdicts_are_counted_as_higher_or_lower(dpo_experiment):
    out, _, output, _ = dpo_experiment
    paired = _read(out / "experiment.json")["paired"]
    counts = paired["fedit_vs_local_only_clients"]["answer_tokens"]
    assert set(counts) == {"higher", "no difference at 95%", "lower"}
    assert sum(counts.values()) == 2  # each local-only client counted once
    assert (f"fedit vs the 2 local-only clients on answer_tokens: higher than "
            f"{counts['higher']}, tied with {counts['no difference at 95%']}, lower than "
            f"{counts['lower']}") in output


def test_seeds_aggregate_the_preference_metrics(talking_model_dir, tmp_path, monkeypatch):
    import torch

    rows = write_jsonl(tmp_path / "rows.jsonl", make_rows(80))
    monkeypatch.setenv("FEDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "seeds"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, [
            "experiment", "fedit-dpo", "--scale", "test", "--seeds", "2", "--out", str(out),
            "--set", f"model.name={talking_model_dir}", "--set", f"data.path={rows}"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    summary = _read(out / "experiment.json")
    assert summary["experiment"] == "fedit-dpo" and summary["seeds"] == [42, 43]
    for arm in ARMS:
        table = summary["arms"][arm]["overall"]
        per_seed = [_read(out / f"seed-{s}" / arm / "eval.json")["overall"] for s in (42, 43)]
        for key in ("preference_accuracy", "reward_margin", "reference_free_margin",
                    "answer_tokens"):
            assert table[key]["values"] == [o[key] for o in per_seed]
            assert table[key]["mean"] == pytest.approx(np.mean(table[key]["values"]))
    tokens = summary["paired"]["fedit vs base"]["answer_tokens"]
    assert tokens["better"] == "n/a" and set(tokens["verdicts"]) == {
        "higher", "no difference at 95%", "lower"}
    assert "rf_margin" in result.output and "answer_tokens" in result.output
    assert (out / "report.html").is_file()
