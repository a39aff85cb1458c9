"""`fedit experiment fedit-paper --scale test`: four arms on a tiny model, budgets checked
from what the run recorded, resume, and the config errors."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedit.cli import app
from fedit.errors import ConfigError
from fedit.evaluate.compare import compare_evals
from fedit.experiment.scales import experiment_config, local_only_clients, plan_budget
from fedit.model.adapter import load_adapter_arrays
from tests.conftest import make_rows, write_jsonl

ARMS = ["base", "local-only", "fedit", "centralized"]


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def experiment(tiny_model_dir, tmp_path_factory):
    """One test-scale experiment (CLI), shared by the tests of this module."""
    import fedit.experiment.run as fe
    import fedit.runtimes.inprocess as fs

    tmp = tmp_path_factory.mktemp("exp")
    data = write_jsonl(tmp / "rows.jsonl", make_rows(80))
    out = tmp / "exp"
    args = ["experiment", "fedit-paper", "--scale", "test", "--out", str(out),
            "--set", f"model.name={tiny_model_dir}", "--set", f"data.path={data}"]
    loads = []
    real = fs.load_model

    def counting_load(cfg):
        loads.append(cfg.model.name)
        return real(cfg)

    import torch

    threads = torch.get_num_threads()
    # One thread: a 64-wide model gains nothing from two, and loses a lot on a busy machine
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:  # count base-model loads, wherever they happen
            mp.setattr(fs, "load_model", counting_load)
            mp.setattr(fe, "load_model", counting_load)
            result = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return out, args, result.output, loads


def test_every_arm_writes_its_eval_and_the_summary(experiment):
    out, _, output, loads = experiment
    assert loads == [loads[0]]  # the base model is loaded once for all four arms
    summary = _read(out / "experiment.json")
    assert list(summary["arms"]) == ARMS
    for arm in ARMS:
        result = _read(out / arm / "eval.json")
        assert summary["arms"][arm]["overall"] == result["overall"]
        assert summary["arms"][arm]["by_category"] == result["by_category"]
        assert {"loss", "perplexity", "rouge_l", "similarity"} <= set(result["overall"])
        assert np.isclose(result["overall"]["perplexity"], np.exp(result["overall"]["loss"]))
    # every arm answered the same held-out rows, those of test.jsonl
    test_rows = _lines(out / "test.jsonl")
    for arm in ARMS:
        answers = _lines(out / arm / "answers.jsonl")
        assert [a["instruction"] for a in answers] == [r["instruction"] for r in test_rows]
        # each answer's length, and its mean in the arm's eval.json (a local-only mean aside)
        assert all(isinstance(a["answer_tokens"], int) and a["answer_tokens"] >= 1
                   for a in answers)
        if arm != "local-only":
            assert summary["arms"][arm]["overall"]["answer_tokens"] == pytest.approx(
                np.mean([a["answer_tokens"] for a in answers]))
    assert (out / "partitions" / "stats.json").is_file()
    assert "report:" in output
    report = (out / "report.html").read_text(encoding="utf-8")
    png = base64.b64decode(re.findall(r'src="data:image/png;base64,([^"]+)"', report)[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert all(f"<th>{arm}</th>" in report for arm in ARMS)
    for arm in ARMS:
        assert arm in output  # the summary table
    # paired differences: fedit against base, each local-only client, centralized; the
    # numbers are compare.py's on the two folders, seeded from the config's seed (42)
    paired = summary["paired"]
    clients = [f"local-only/client_{c:04d}" for c in summary["local_clients"]]
    assert paired["bootstrap"]["seed"] == 42
    assert [(p["a"], p["b"]) for p in paired["pairs"].values()] == [
        (a, "fedit") for a in ["base", *clients, "centralized"]]
    for name, pair in paired["pairs"].items():
        direct = compare_evals(out / pair["a"], out / "fedit", seed=42)
        assert pair["metrics"] == direct["metrics"], name
        assert pair["rows"] == direct["rows"] == len(test_rows)
        assert set(pair["metrics"]) >= {"loss", "rouge_l"}
        m = pair["metrics"]["loss"]
        assert (f"{name}: loss {m['diff']:+.4f} [{m['low']:+.4f}, {m['high']:+.4f}] "
                f"{m['verdict']} ({m['rows']} rows)") in output
    counts = paired["fedit_vs_local_only_clients"]["loss"]
    verdicts = [paired["pairs"][f"fedit vs {c.replace('/', ' ')}"]["metrics"]["loss"]["verdict"]
                for c in clients]
    assert counts == {v: verdicts.count(v) for v in ["better", "no difference at 95%", "worse"]}
    assert "fedit vs the 2 local-only clients on loss: better than " in output
    # the summary table shows the mean answer length; the answer scores at equal length
    head = next(line for line in output.splitlines() if line.startswith("arm "))
    assert head.split()[-1] == "tokens"
    fedit_row = next(line for line in output.splitlines() if line.startswith("fedit "))
    assert fedit_row.split()[-1] == f"{summary['arms']['fedit']['overall']['answer_tokens']:.1f}"
    for name, pair in paired["pairs"].items():
        lc = pair["metrics"]["rouge_l"]["length_controlled"]
        assert lc["rows"] == len(test_rows) and lc["low"] is not None
        assert (f"{name}: rouge_l at equal length {lc['diff']:+.4f} [{lc['low']:+.4f}, "
                f"{lc['high']:+.4f}] {lc['verdict']} (slope on the log length ratio ") in output
    equal = paired["fedit_vs_local_only_clients_at_equal_length"]["rouge_l"]
    verdicts = [paired["pairs"][f"fedit vs {c.replace('/', ' ')}"]["metrics"]["rouge_l"][
        "length_controlled"]["verdict"] for c in clients]
    assert equal == {v: verdicts.count(v) for v in ["better", "no difference at 95%", "worse"]}
    assert "fedit vs the 2 local-only clients on rouge_l at equal length: better than " in output


def test_the_report_shows_the_paired_differences_as_a_forest_plot(experiment):
    from matplotlib.image import imread

    out, _, _, _ = experiment
    report = (out / "report.html").read_text(encoding="utf-8")
    title = "Paired differences: fedit - other arm, 95% intervals"
    assert f"<h2>{title}</h2>" in report
    embedded = re.findall(rf'<img alt="{title}" src="data:image/png;base64,([^"]+)"', report)
    png = (out / "report-paired.png").read_bytes()  # written beside the page
    assert [base64.b64decode(embedded[0])] == [png]
    image = imread(io.BytesIO(png), format="png")
    assert image.shape[0] > 200 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not blank: points, bars, labels
    summary = _read(out / "experiment.json")["paired"]
    records = [*summary["fedit_vs_local_only_clients"],
               *summary["fedit_vs_local_only_clients_at_equal_length"]]
    assert {"loss", "rouge_l", "exact_match", "answer_tokens"} <= set(records)
    assert report.count(" of 2 local-only clients</li>") == len(records)
    # the table of the answer scores at equal length: a row a pair and score
    assert "<h3>At equal answer length</h3>" in report
    for name, pair in summary["pairs"].items():
        lc = pair["metrics"]["rouge_l"]["length_controlled"]
        cell = f"{lc['diff']:+.4f} [{lc['low']:+.4f}, {lc['high']:+.4f}] {lc['verdict']}"
        assert (f"<th>{name.removeprefix('fedit vs ')}</th><td>rouge_l</td>" in report
                and cell in report), name


def test_compute_budgets_from_what_each_arm_recorded(experiment):
    out, _, _, _ = experiment
    cfg = _read(out / "experiment.json")
    rounds, per_round, local = 2, 2, 1  # test scale: 2 rounds, 4 clients x 0.5, 1 step
    assert cfg["budget"] == {"rounds": rounds, "clients_per_round": per_round,
                             "local_steps": local, "client_steps": rounds * local,
                             "total_steps": rounds * per_round * local}
    # FedIT: what each sampled client did, round by round (the simulation's metrics)
    metrics = _lines(out / "fedit" / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    fedit_steps = 0
    for m in metrics[1:]:
        assert len(m["clients"]) == per_round
        assert m["client_steps"] == [local] * per_round
        fedit_steps += sum(m["client_steps"])
    assert fedit_steps == rounds * per_round * local == _read(out / "fedit" / "arm.json")["steps"]
    # local-only: each client trained alone as many steps as one client over all rounds
    local_arm = _read(out / "local-only" / "arm.json")
    assert len(local_arm["client_steps"]) == 2
    for c, steps in local_arm["client_steps"].items():
        assert steps == rounds * local
        assert _read(out / "local-only" / f"client_{int(c):04d}" / "train.json")["steps"] == steps
    # centralized: the same total as FedIT, on the union of every client's rows
    central = _read(out / "centralized" / "arm.json")
    assert central["steps"] == fedit_steps
    stats = _read(out / "partitions" / "stats.json")
    assert central["rows"] == stats["num_rows"]
    assert _read(out / "base" / "arm.json")["steps"] == 0


def test_arms_evaluate_the_adapter_they_trained(experiment):
    out, _, _, _ = experiment
    metrics = _lines(out / "fedit" / "metrics.jsonl")
    base = _read(out / "base" / "eval.json")["overall"]["loss"]
    fedit = _read(out / "fedit" / "eval.json")["overall"]["loss"]
    # round 0 of the simulation is the untuned base; its last round is the final adapter
    assert base == pytest.approx(metrics[0]["eval_loss"], rel=1e-5)
    assert fedit == pytest.approx(metrics[-1]["eval_loss"], rel=1e-5)
    assert fedit != pytest.approx(base, rel=1e-7)
    # the local-only arm is the mean of its clients, category by category
    clients = sorted((out / "local-only").glob("client_*/eval.json"))
    per_client = [_read(p) for p in clients]
    mean = _read(out / "local-only" / "eval.json")
    assert len(clients) == 2
    assert mean["overall"]["loss"] == pytest.approx(
        np.mean([r["overall"]["loss"] for r in per_client]))
    for cat, m in mean["by_category"].items():
        assert m["loss"] == pytest.approx(np.mean([r["by_category"][cat]["loss"]
                                                   for r in per_client]))
    assert per_client[0]["overall"]["loss"] != pytest.approx(per_client[1]["overall"]["loss"])


def _arm_adapters(out: Path) -> dict[str, Path]:
    """Each arm's adapter folder (a local-only arm: one per client), from its arm.json."""
    found = {}
    for arm in ARMS:
        named = _read(out / arm / "arm.json")["adapter"]
        for rel in named if isinstance(named, list) else [named]:
            found[f"{arm}/{rel}"] = out / arm / rel
    return found


def _lora(folder: Path, part: str) -> list[np.ndarray]:
    from safetensors.numpy import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    return [v for k, v in sorted(tensors.items()) if part in k]


def test_every_arm_keeps_its_adapter(experiment):
    out, _, _, _ = experiment
    local = sorted(int(c) for c in _read(out / "local-only" / "arm.json")["client_steps"])
    adapters = _arm_adapters(out)
    assert sorted(adapters) == sorted(["base/adapter", "fedit/final/adapter",
                                       "centralized/adapter",
                                       *(f"local-only/client_{c:04d}/adapter" for c in local)])
    arrays = {name: load_adapter_arrays(path) for name, path in adapters.items()}
    assert len({len(a) for a in arrays.values()}) == 1  # the same tensors in every arm
    # base: the initial adapter, B = 0 (exactly the base model); A is the seeded draw
    base = adapters["base/adapter"]
    assert all(not b.any() for b in _lora(base, "lora_B"))
    assert all(a.any() for a in _lora(base, "lora_A"))
    # every trained arm moved B away from zero, each to its own values
    trained = [n for n in adapters if n != "base/adapter"]
    for name in trained:
        assert any(b.any() for b in _lora(adapters[name], "lora_B")), name
    for i, one in enumerate(trained):
        for other in trained[i + 1:]:
            assert any(not np.array_equal(x, y) for x, y in
                       zip(arrays[one], arrays[other], strict=True)), (one, other)


def test_an_arms_adapter_gives_the_arms_eval_loss(experiment, tmp_path):
    out, _, _, _ = experiment
    for name, adapter in _arm_adapters(out).items():
        if name == "fedit/final/adapter":
            own = out / "fedit" / "eval.json"
        else:
            own = adapter.parent / "eval.json"  # base/, centralized/, local-only/client_N/
        result = CliRunner().invoke(app, [
            "eval", str(adapter), "--on", str(out / "test.jsonl"), "--no-generate",
            "--out", str(tmp_path / name), "--set", "data.cutoff_len=256"])
        assert result.exit_code == 0, result.output
        loss = _read(tmp_path / name / "eval.json")["overall"]["loss"]
        assert loss == pytest.approx(_read(own)["overall"]["loss"], rel=1e-5), name


def test_a_second_run_skips_finished_arms(experiment):
    out, args, _, _ = experiment
    before = {arm: (out / arm / "eval.json").stat().st_mtime_ns for arm in ARMS}
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for arm in ARMS:
        assert f"[{arm}] done before (eval.json exists): skipped" in result.output
        assert (out / arm / "eval.json").stat().st_mtime_ns == before[arm]


def test_another_config_in_the_same_folder_is_refused(experiment):
    out, args, _, _ = experiment
    result = CliRunner().invoke(app, [*args, "--set", "train.lr=0.1"])
    assert result.exit_code == 2
    assert f"{out} holds an experiment with another config" in result.output


def test_a_killed_experiment_resumes_with_the_same_numbers(experiment):
    out, args, _, _ = experiment
    before = {arm: _read(out / arm / "eval.json")["overall"]["loss"] for arm in ARMS}
    # killed after FedIT trained but before it was evaluated; centralized never started
    (out / "fedit" / "eval.json").unlink()
    (out / "fedit" / "arm.json").unlink()
    shutil.rmtree(out / "centralized")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "[fedit] trained before: evaluating its final adapter" in result.output
    assert "[centralized] starting" in result.output
    after = {arm: _read(out / arm / "eval.json")["overall"]["loss"] for arm in ARMS}
    assert after == pytest.approx(before, rel=1e-6)  # seeded: the same adapter again
    assert _read(out / "fedit" / "arm.json")["steps"] == 4
    assert _read(out / "centralized" / "arm.json")["adapter"] == "adapter"
    assert (out / "centralized" / "adapter" / "adapter_model.safetensors").is_file()


def test_small_scale_budget_is_the_documented_arithmetic():
    cfg, settings = experiment_config("fedit-paper", "small")
    budget = plan_budget(cfg)
    assert (budget.rounds, budget.clients_per_round, budget.local_steps) == (4, 4, 10)
    assert budget.client_steps == 40 and budget.total_steps == 160
    assert settings.local_clients == 2
    total = budget.total_steps * 2 + settings.local_clients * budget.client_steps
    assert total == 400  # the docstring's 400 optimizer steps
    assert (cfg.data.cutoff_len, cfg.train.batch_size, cfg.model.name) == (
        256, 8, "smollm2-135m")
    assert cfg.partition.method == "dirichlet" and cfg.partition.alpha == 0.5


def test_medium_scale_budget_is_the_documented_arithmetic():
    cfg, settings = experiment_config("fedit-paper", "medium")
    budget = plan_budget(cfg)
    assert (budget.rounds, budget.clients_per_round, budget.local_steps) == (10, 4, 10)
    assert budget.client_steps == 100 and budget.total_steps == 400
    assert settings.local_clients == 3
    total = budget.total_steps * 2 + settings.local_clients * budget.client_steps
    assert total == 1100  # the docstring's 1,100 optimizer steps
    assert (cfg.data.test_per_label, cfg.eval.max_new_tokens, cfg.eval.generate_batch_size) \
        == (20, 128, 16)
    assert (cfg.data.cutoff_len, cfg.train.batch_size, cfg.model.name) == (
        256, 8, "smollm2-135m")


@pytest.mark.parametrize("scale", ["test", "small", "medium", "full"])
def test_every_scale_config_loads(scale):
    cfg, settings = experiment_config("fedit-paper", scale)
    assert cfg.name == f"fedit-paper-{scale}" and plan_budget(cfg).total_steps > 0
    assert settings.local_clients <= cfg.partition.clients


def test_full_scale_is_shepherds_published_setting():
    cfg, settings = experiment_config("fedit-paper", "full")
    budget = plan_budget(cfg)
    assert (cfg.partition.clients, cfg.rounds, cfg.strategy.fraction) == (10, 10, 0.1)
    assert (cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.lr) == (64, 32, 3e-4)
    assert (cfg.lora.r, cfg.data.cutoff_len, cfg.data.test_per_label) == (8, 512, 10)
    assert (budget.clients_per_round, budget.client_steps, budget.total_steps) == (1, 500, 500)


def test_local_only_clients_are_seeded_and_distinct():
    cfg, _ = experiment_config("fedit-paper", "small")
    picked = local_only_clients(cfg, 5)
    assert picked == local_only_clients(cfg, 5) and len(set(picked)) == 5
    assert all(0 <= c < cfg.partition.clients for c in picked)


@pytest.mark.parametrize(
    ("name", "scale", "sets", "message"),
    [
        ("fedit-papr", "small", [], "unknown experiment 'fedit-papr'; use one of fedit-paper"),
        ("fedit-paper", "huge", [], "--scale 'huge': use one of test, small, medium, full"),
        ("fedit-paper", "small", ["experiment.local_client=3"],
         "--set: unknown key 'experiment.local_client'; use one of experiment.generate, "
         "experiment.local_clients"),
        ("fedit-paper", "small", ["experiment.local_clients=0"],
         "--set: experiment.local_clients: must be >= 1"),
        ("fedit-paper", "small", ["experiment.local_clients=2.5"],
         "--set: experiment.local_clients: expected int, got 2.5"),
        ("fedit-paper", "small", ["experiment.generate=yes"],
         "--set: experiment.generate: expected true or false, got 'yes'"),
        ("fedit-paper", "small", ["train.max_steps=0"],
         "--set: train.max_steps: the experiment needs a step budget"),
        ("fedit-paper", "small", ["train.lrr=1"], "--set: unknown key 'train.lrr'"),
    ],
)
def test_bad_settings_name_the_key(name, scale, sets, message):
    with pytest.raises(ConfigError) as e:
        experiment_config(name, scale, sets)
    assert str(e.value).startswith(message)


def test_more_local_clients_than_clients_is_refused():
    cfg, _ = experiment_config("fedit-paper", "test")
    with pytest.raises(ConfigError, match="experiment.local_clients = 9 but partition.clients"):
        local_only_clients(cfg, 9)


def test_cli_reports_a_bad_scale_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["experiment", "fedit-paper", "--scale", "huge",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "error: --scale 'huge': use one of test, small, medium, full" in result.output
