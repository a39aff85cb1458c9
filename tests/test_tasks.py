"""Benchmark tasks through lm-evaluation-harness (``fedit eval --tasks / --task-file /
--suite``), checked against the harness's own CLI, and their paired comparison."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedit.cli import app
from fedit.errors import ConfigError, DataError
from fedit.evaluate import tasks as tasks_mod
from fedit.evaluate.compare import compare_evals, format_compare
from fedit.evaluate.tasks import SUITES, TASKS_FILE, task_spec
from tests.harness_tasks import write_mc_task

WORDS = "red blue green apple river stone cloud seven tiger piano lamp road".split()


def mc_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
                   for _ in range(4)]
        rows.append({"question": question, "choices": choices, "answer": rng.randrange(4)})
    return rows


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter on the tiny model whose B matrices are not zero (so it moves
    every log-likelihood away from the base model's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("task-adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model_dir)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory) -> Path:
    """A 36-question local multiple-choice task in the harness's own format."""
    return write_mc_task(tmp_path_factory.mktemp("tasks"), mc_rows(36), "toy_mc")


def _fedit_eval(*args: str) -> str:
    result = CliRunner().invoke(app, ["eval", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _harness_cli(model_args: str, task: Path, out: Path) -> list[dict]:
    """The harness's own CLI (``lm_eval``) on the task, its per-sample records."""
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           model_args, "--tasks", task.stem, "--include_path", str(task.parent),
           "--device", "cpu", "--log_samples", "--output_path", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    files = list(out.rglob(f"samples_{task.stem}_*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def test_task_file_equals_the_harness_cli_on_an_adapter(tiny_model_dir, adapter_dir, mc_task,
                                                        tmp_path):
    """fedit's per-document log-likelihoods and accuracy equal ``lm_eval --model hf
    --model_args pretrained=...,peft=...,dtype=float32`` on the same adapter, fp32."""
    out = tmp_path / "fedit"
    text = _fedit_eval(str(adapter_dir), "--model", str(tiny_model_dir), "--task-file",
                       str(mc_task), "--out", str(out))
    assert "toy_mc" in text and "acc" in text
    ours = [json.loads(x) for x in (out / TASKS_FILE).read_text().splitlines()]
    theirs = _harness_cli(f"pretrained={tiny_model_dir},peft={adapter_dir},dtype=float32",
                          mc_task, tmp_path / "harness")
    assert len(ours) == len(theirs) == 36
    by_id = {s["doc_id"]: s for s in theirs}
    for record in ours:
        ref = by_id[record["doc_id"]]
        expected = [float(r[0]) for r in ref["filtered_resps"]]
        np.testing.assert_allclose(record["loglikelihoods"], expected, rtol=0, atol=1e-4)
        assert record["metrics"]["acc"] == ref["acc"]
        assert record["metrics"]["acc_norm"] == ref["acc_norm"]
        assert record["doc_hash"] == ref["doc_hash"]
    result = json.loads((out / "eval.json").read_text())
    acc = result["tasks"]["results"]["toy_mc"]["metrics"]["acc"]
    assert acc["value"] == pytest.approx(np.mean([s["acc"] for s in theirs]), abs=1e-12)
    assert acc["paired"] and acc["higher_is_better"] is True
    assert result["tasks"]["settings"]["dtype"] == "float32"
    assert result["settings"]["kind"] == "tasks"  # no held-out rows outside a run


def test_adapter_changes_the_loglikelihoods_and_compare_pairs_documents(
        tiny_model_dir, adapter_dir, mc_task, tmp_path):
    """The base and the adapter are scored on the same documents; ``--compare`` gives each
    task metric's paired difference, equal to the per-document mean computed here."""
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    _fedit_eval(f"base:{tiny_model_dir}", "--out", str(base), "--task-file", str(mc_task))
    _fedit_eval(str(adapter_dir), "--out", str(tuned), "--task-file", str(mc_task))
    a = {r["doc_id"]: r for r in map(json.loads, (base / TASKS_FILE).read_text().splitlines())}
    b = {r["doc_id"]: r for r in map(json.loads, (tuned / TASKS_FILE).read_text().splitlines())}
    assert any(a[i]["loglikelihoods"] != b[i]["loglikelihoods"] for i in a)
    out = CliRunner().invoke(app, ["eval", "--compare", str(base), str(tuned)])
    assert out.exit_code == 0, out.output
    result = json.loads((tuned / "compare.json").read_text())
    m = result["metrics"]["toy_mc/acc"]
    diffs = [b[i]["metrics"]["acc"] - a[i]["metrics"]["acc"] for i in a]
    assert m["diff"] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert m["rows"] == 36 and m["low"] <= m["diff"] <= m["high"]
    assert "loss" not in result["metrics"]  # tasks only: no held-out metric rows
    assert "toy_mc/acc (higher)" in out.output and "36 task documents" in out.output


def _write_eval(folder: Path, records: list[dict], *, fewshot=None, groups=None) -> Path:
    """A hand-written tasks-only evaluation: eval.json + tasks.jsonl."""
    folder.mkdir(parents=True)
    results = {}
    for task in sorted({r["task"] for r in records}):
        values = [r["metrics"]["acc"] for r in records if r["task"] == task]
        results[task] = {"alias": task, "samples": len(values), "n_shot": 0, "version": 1.0,
                         "metrics": {"acc": {"value": float(np.mean(values)), "stderr": None,
                                             "higher_is_better": True, "paired": True}}}
    result = {"overall": {"rows": 0}, "by_category": {}, "settings": {"kind": "tasks",
                                                                      "rows": 0},
              "tasks": {"settings": {"num_fewshot": fewshot, "limit": None},
                        "results": results, "groups": groups or {}}}
    (folder / "eval.json").write_text(json.dumps(result))
    (folder / "answers.jsonl").write_text("")
    (folder / TASKS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _records(task: str, accs: list[int]) -> list[dict]:
    return [{"task": task, "doc_id": i, "filter": "none", "doc_hash": f"{task}-{i}",
             "target": "0", "metrics": {"acc": float(v)}} for i, v in enumerate(accs)]


def test_compare_tasks_against_a_hand_computed_paired_difference(tmp_path):
    """Two adapters' task outputs: the difference per task and for the group (documents
    pooled) is the hand-computed mean, and a one-sided change gets its verdict."""
    a_acc = {"t1": [0, 0, 1, 0, 1, 0, 0, 1, 0, 0] * 3, "t2": [1, 0, 0, 1] * 5}
    b_acc = {"t1": [1, 1, 1, 0, 1, 1, 1, 1, 0, 1] * 3, "t2": [1, 0, 1, 1] * 5}
    groups = {"grp": ["t1", "t2"]}
    a = _write_eval(tmp_path / "a", _records("t1", a_acc["t1"]) + _records("t2", a_acc["t2"]),
                    groups=groups)
    b = _write_eval(tmp_path / "b", _records("t1", b_acc["t1"]) + _records("t2", b_acc["t2"]),
                    groups=groups)
    result = compare_evals(a, b, resamples=500, seed=3)
    m = result["metrics"]
    assert m["t1/acc"]["diff"] == pytest.approx(15 / 30)  # 15 of 30 documents turn right
    assert m["t2/acc"]["diff"] == pytest.approx(5 / 20)
    assert m["grp/acc"]["diff"] == pytest.approx(20 / 50)
    assert m["grp/acc"]["rows"] == 50 and m["t1/acc"]["rows"] == 30
    assert m["t1/acc"]["verdict"] == "better"  # every changed document improved
    assert m["t1/acc"]["low"] > 0
    assert result["tasks"]["documents"] == 50
    assert "t1/acc (higher)" in format_compare(result)


def test_compare_tasks_refuses_different_documents_or_fewshot(tmp_path):
    a = _write_eval(tmp_path / "a", _records("t1", [0, 1, 1]))
    b = _write_eval(tmp_path / "b", _records("t1", [0, 1, 1, 1]))
    with pytest.raises(DataError, match=r"task documents differ \(0 only in A, 1 only in B\)"):
        compare_evals(a, b)
    c = _write_eval(tmp_path / "c", _records("t1", [0, 1, 1]), fewshot=5)
    with pytest.raises(DataError, match="num_fewshot None .A. vs 5 .B."):
        compare_evals(a, c)


def test_task_file_data_is_read_relative_to_the_yaml(tiny_model_dir, tmp_path, monkeypatch):
    """A task folder copied anywhere works: ``data_files`` relative to the YAML, whatever
    the working directory."""
    folder = tmp_path / "mytasks"
    yaml_path = write_mc_task(folder, mc_rows(12, seed=5), "rel_mc")
    text = yaml_path.read_text().replace(str((folder / "rel_mc.jsonl").resolve()),
                                         "rel_mc.jsonl")
    assert "test: rel_mc.jsonl" in text
    yaml_path.write_text(text)
    monkeypatch.chdir(tmp_path)  # not the task's folder
    out = tmp_path / "out"
    _fedit_eval(f"base:{tiny_model_dir}", "--out", str(out), "--task-file", str(folder),
                "--task-limit", "5")
    records = (out / TASKS_FILE).read_text().splitlines()
    assert len(records) == 5  # --task-limit: the first 5 documents
    result = json.loads((out / "eval.json").read_text())
    assert result["tasks"]["settings"]["limit"] == 5


def test_suites_name_harness_tasks():
    """Every suite's task is one the harness (or fedit's own task folder) knows."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(tasks_mod.OWN_TASKS)])
    for suite, names in SUITES.items():
        for name in names:
            assert name in tm.task_index, f"{suite}: {name}"
    assert SUITES["flowertune-general"] == ("mmlu",)
    spec = task_spec("arc_easy", suite="flowertune-medical")
    assert spec.names == ["arc_easy", "pubmedqa", "medmcqa", "medqa_4options", "careqa_en"]
    with pytest.raises(ConfigError, match="--suite flowertune-legal: unknown; choose one of "
                                          "flowertune-general, flowertune-medical"):
        task_spec(suite="flowertune-legal")


def test_a_suite_offline_stops_with_one_line_naming_the_downloads(tiny_model_dir, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))  # nothing cached
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setattr(tasks_mod, "hub_reachable", lambda: False)
    result = CliRunner().invoke(app, ["eval", f"base:{tiny_model_dir}", "--out",
                                      str(tmp_path / "o"), "--suite", "flowertune-medical"])
    assert result.exit_code == 2
    lines = [x for x in result.output.strip().splitlines() if x.startswith("error")]
    assert len(lines) == 1, result.output
    line = lines[0]
    for dataset in ("bigbio/pubmed_qa", "openlifescienceai/medmcqa",
                    "GBaker/MedQA-USMLE-4-options-hf", "HPAI-BSC/CareQA"):
        assert dataset in line
    assert "--suite flowertune-medical" in line and "hf download --repo-type dataset" in line
    assert not (tmp_path / "o" / "eval.json").exists()


def test_finance_documents_follow_fingpt_labels():
    """fedit's finance tasks: FiQA's score thresholds, TFNS's label order, FPB's seeded 25%."""
    import importlib.util

    from datasets import Dataset

    path = tasks_mod.OWN_TASKS / "flowertune_finance" / "utils.py"
    module_spec = importlib.util.spec_from_file_location("finance_utils", path)
    utils = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(utils)
    fiqa = utils.fiqa_docs(Dataset.from_list([
        {"sentence": "s", "sentiment_score": x, "format": f}
        for x, f in [(-0.5, "post"), (-0.1, "headline"), (0.05, "post"), (0.1, "post")]]))
    assert fiqa["label"] == [0, 1, 1, 2]
    assert "tweet" in fiqa["instruction"][0] and "news" in fiqa["instruction"][1]
    tfns = utils.tfns_docs(Dataset.from_list([{"text": "t", "label": x} for x in (0, 1, 2)]))
    assert tfns["label"] == [0, 2, 1]  # Bearish, Bullish, Neutral -> neg, pos, neutral
    fpb = utils.fpb_docs(Dataset.from_list([{"sentence": str(i), "label": i % 3}
                                            for i in range(100)]))
    assert len(fpb) == 25 and fpb["label"] == [int(s) % 3 for s in fpb["text"]]


def test_task_options_fail_cleanly(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["eval", f"base:{tiny_model_dir}", "--out",
                                      str(tmp_path / "o"), "--task-file",
                                      str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "--task-file" in result.output and "no such file" in result.output
    result = CliRunner().invoke(app, ["eval", f"base:{tiny_model_dir}", "--out",
                                      str(tmp_path / "o"), "--no-heldout"])
    assert result.exit_code == 2 and "--no-heldout leaves nothing" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_type: multiple_choice\n")
    result = CliRunner().invoke(app, ["eval", f"base:{tiny_model_dir}", "--out",
                                      str(tmp_path / "o"), "--task-file", str(bad)])
    assert result.exit_code == 2 and "names no task" in result.output


def test_experiment_scores_every_arm_on_the_tasks(tiny_model_dir, tmp_path):
    """``fedit experiment --task-file``: every arm (each local-only client too) is scored on
    the task with the one base model in memory, the pairs get the task metric, and an arm's
    task results equal ``fedit eval`` on the adapter it kept."""
    import fedit.experiment.run as fe
    from tests.conftest import make_rows, write_jsonl

    task = write_mc_task(tmp_path / "tasks", mc_rows(12, seed=7), "exp_mc")
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(80))
    out = tmp_path / "exp"
    loads = []
    real = fe.load_model

    def counting_load(cfg):
        loads.append(cfg.model.name)
        return real(cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_model", counting_load)
        result = CliRunner().invoke(app, [
            "experiment", "fedit-paper", "--scale", "test", "--out", str(out),
            "--set", f"model.name={tiny_model_dir}", "--set", f"data.path={data}",
            "--set", "experiment.generate=false", "--task-file", str(task)])
    assert result.exit_code == 0, result.output
    assert loads == [str(tiny_model_dir)]  # one base model for every arm and the tasks
    summary = json.loads((out / "experiment.json").read_text())
    for arm in ("base", "local-only", "fedit", "centralized"):
        assert 0 <= summary["arms"][arm]["tasks"]["exp_mc/acc"] <= 1
        assert len((out / arm / TASKS_FILE).read_text().splitlines()) == 12
    clients = summary["arms"]["local-only"]["per_client_tasks"]
    assert summary["arms"]["local-only"]["tasks"]["exp_mc/acc"] == pytest.approx(
        np.mean([c["exp_mc/acc"] for c in clients.values()]))
    for pair in summary["paired"]["pairs"].values():
        m = pair["metrics"]["exp_mc/acc"]
        assert m["rows"] == 12 and m["low"] <= m["diff"] <= m["high"]
    assert "exp_mc/acc" in result.output  # the task table under the summary
    page = (out / "report.html").read_text()
    section = page[page.index("<h2>Benchmark tasks</h2>"):]
    assert "<th>exp_mc/acc</th>" in section
    fedit_acc = summary["arms"]["fedit"]["tasks"]["exp_mc/acc"]
    assert "<tr><th>fedit</th><td class=\"num" in section
    assert f"{fedit_acc:.4f}" in section.split("<tr><th>fedit</th>")[1].split("</tr>")[0]
    # the fedit arm's task documents, scored again by fedit eval on its kept adapter
    again = tmp_path / "again"
    _fedit_eval(str(out / "fedit" / "final" / "adapter"), "--task-file", str(task),
                "--no-heldout", "--out", str(again))
    ours = [json.loads(x) for x in (out / "fedit" / TASKS_FILE).read_text().splitlines()]
    theirs = [json.loads(x) for x in (again / TASKS_FILE).read_text().splitlines()]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a["loglikelihoods"], b["loglikelihoods"], atol=1e-4)
        assert a["metrics"] == b["metrics"]


def test_a_generation_tasks_scores_compare_at_equal_length(tmp_path):
    """Documents of a generation task carry answer_tokens: each task metric also gets its
    difference at equal length, here B = A + 0.1 at equal length plus 0.05 per unit of log
    length ratio, so the intercept is 0.1 (the plain difference is not)."""
    rng = np.random.default_rng(0)
    len_a = rng.integers(5, 60, size=30)
    len_b = rng.integers(5, 60, size=30)
    score_a = rng.uniform(0, 1, size=30)
    score_b = score_a + 0.1 + 0.05 * (np.log(len_b) - np.log(len_a))

    def records(scores, lengths):
        return [{"task": "gen", "doc_id": i, "filter": "none", "doc_hash": f"g{i}",
                 "target": "x", "response": "an answer", "answer_tokens": int(n),
                 "metrics": {"acc": float(v)}} for i, (v, n) in
                enumerate(zip(scores, lengths, strict=True))]

    a = _write_eval(tmp_path / "a", records(score_a, len_a))
    b = _write_eval(tmp_path / "b", records(score_b, len_b))
    m = compare_evals(a, b, resamples=300, seed=1)["metrics"]["gen/acc"]
    lc = m["length_controlled"]
    assert lc["diff"] == pytest.approx(0.1, abs=1e-9)
    assert lc["slope"] == pytest.approx(0.05, abs=1e-9)
    assert m["diff"] == pytest.approx(np.mean(score_b - score_a))
    assert abs(m["diff"] - 0.1) > 1e-3  # the lengths differ, so the plain mean is not 0.1
    # a multiple-choice task (no answer lengths) has no equal-length entry
    c = _write_eval(tmp_path / "c", _records("t1", [0, 1, 1]))
    d = _write_eval(tmp_path / "d", _records("t1", [1, 1, 1]))
    assert "length_controlled" not in compare_evals(c, d)["metrics"]["t1/acc"]


def test_a_generation_task_records_each_answer_and_its_length(talking_model_dir, tmp_path):
    """A ``generate_until`` task: each document's greedy answer and its length in tokens
    (the model's tokenizer, counted here independently) are in tasks.jsonl."""
    from transformers import AutoTokenizer

    folder = tmp_path / "gen"
    folder.mkdir()
    rows = [{"question": f"Name {w}.", "answer": w} for w in WORDS[:5]]
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "gen.yaml").write_text(
        "task: gen_words\ndataset_path: json\ndataset_kwargs: {data_files: {test: gen.jsonl}}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs: {until: ['Q:'], max_gen_toks: 6, do_sample: false}\n"
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n")
    out = tmp_path / "out"
    _fedit_eval(f"base:{talking_model_dir}", "--out", str(out), "--task-file",
                str(folder / "gen.yaml"))
    tok = AutoTokenizer.from_pretrained(talking_model_dir)
    records = [json.loads(x) for x in (out / TASKS_FILE).read_text().splitlines()]
    assert len(records) == 5
    for r in records:
        assert isinstance(r["response"], str)
        assert r["answer_tokens"] == len(tok(r["response"], add_special_tokens=False)
                                         ["input_ids"])
        assert r["metrics"]["exact_match"] in (0.0, 1.0)
    assert any(r["answer_tokens"] > 0 for r in records)
