"""`fedit eval` and ``evaluate_model`` on the tiny model: losses against a direct torch
computation, answers scored, files read back, run/adapter/base targets, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fedit.cli import app
from fedit.client.losses import evaluate_loss
from fedit.config import load_config, to_toml
from fedit.data.batching import tokenize_rows
from fedit.data.prompts import build_prompt
from fedit.errors import DataError
from fedit.evaluate.evaluation import evaluate_model, load_eval, write_eval
from fedit.evaluate.metrics import exact_match, rouge_l
from fedit.model.adapter import get_adapter_arrays, set_adapter_arrays
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_jsonl

M_KEYS = {"rows", "loss", "perplexity", "rouge_l", "similarity", "exact_match",
          "answer_tokens"}
ANSWER_KEYS = {"id", "category", "instruction", "context", "reference", "answer", "rouge_l",
               "similarity", "exact_match", "answer_tokens", "loss"}
LONG = "open_qa"  # the category of the row whose prompt fills the cutoff


def _cfg(tmp_path, model_dir, **eval_keys):
    text = f'[model]\nname = "{model_dir}"\ndtype = "fp32"\n[data]\ncutoff_len = 256\n'
    text += "[eval]\nbatch_size = 4\nmax_new_tokens = 6\ngenerate_batch_size = 5\n"
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in eval_keys.items())
    path = tmp_path / "eval.toml"
    path.write_text(text)
    return load_config(path)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """The tiny model with a LoRA adapter whose B is not zero (so the adapter matters)."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"), LoraSpec(), seed=0)
    rng = np.random.default_rng(0)
    set_adapter_arrays(model, [rng.normal(0, 0.05, a.shape).astype(np.float32)
                               for a in get_adapter_arrays(model)])
    return tokenizer, model


@pytest.fixture(scope="module")
def rows():
    out = make_rows(24, seed=5)
    long_row = {"instruction": " ".join(["river"] * 300), "context": "",
                "response": "A long question.", "category": LONG}
    return [*out[:7], long_row, *out[7:]]


def _direct(model, tokenizer, row) -> tuple[float, int] | None:
    """Summed cross-entropy of the response tokens (and EOS) and their count, computed with
    one plain forward pass of prompt + response; None when the prompt alone fills 256."""
    prompt = tokenizer(build_prompt(row))["input_ids"]
    full = tokenizer(build_prompt(row) + row["response"])["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) >= 256:
        return None
    assert len(full) <= 256
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].float()
    n = len(prompt)
    # position t predicts token t + 1: the response starts at n, predicted from n - 1
    loss = F.cross_entropy(logits[n - 1 : -1], torch.tensor(full[n:]), reduction="sum")
    return float(loss), len(full) - n


def test_per_category_loss_equals_a_direct_computation(tmp_path, tiny_model_dir, lm, rows):
    tokenizer, model = lm
    cfg = _cfg(tmp_path, tiny_model_dir)
    cfg.data.truncation = "skip"  # the long row keeps no response token (test_truncation.py)
    result, answers = evaluate_model(model, tokenizer, rows, cfg, generate=False, log=print)
    direct = [_direct(model, tokenizer, r) for r in rows]
    assert [d is None for d in direct].count(True) == 1  # the long row
    assert result["settings"]["rows_without_loss"] == 1
    total_s, total_n = 0.0, 0
    for cat in sorted({r["category"] for r in rows}):
        pairs = [d for d, r in zip(direct, rows, strict=True) if r["category"] == cat and d]
        s, n = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        total_s, total_n = total_s + s, total_n + n
        m = result["by_category"][cat]
        assert m["rows"] == sum(r["category"] == cat for r in rows)  # the long row counts
        assert m["loss"] == pytest.approx(s / n, rel=1e-5)
        assert m["perplexity"] == pytest.approx(math.exp(s / n), rel=1e-5)
        assert m["rouge_l"] is m["similarity"] is m["exact_match"] is None  # not generated
        assert m["answer_tokens"] is None
    assert result["overall"]["loss"] == pytest.approx(total_s / total_n, rel=1e-5)
    assert result["overall"]["rows"] == len(rows)
    for a, d in zip(answers, direct, strict=True):
        assert a["loss"] == (None if d is None else pytest.approx(d[0] / d[1], rel=1e-5))
    # The same number as the trainer's held-out loss on the same examples
    examples = tokenize_rows(tokenizer, rows, cutoff_len=256, truncation="skip")
    assert result["overall"]["loss"] == pytest.approx(
        evaluate_loss(model, examples, 3, tokenizer.pad_token_id), rel=1e-6)


def test_answers_are_generated_and_scored(tmp_path, tiny_model_dir, lm, rows):
    tokenizer, model = lm
    cfg = _cfg(tmp_path, tiny_model_dir)
    result, answers = evaluate_model(model, tokenizer, rows, cfg, log=print)
    assert [a["id"] for a in answers] == list(range(len(rows)))
    # data.truncation = context (the default): the long row is shortened, not skipped
    assert result["settings"]["rows_truncated"] == 1
    assert result["settings"]["rows_without_loss"] == 0
    for a, row in zip(answers, rows, strict=True):
        assert set(a) == ANSWER_KEYS
        assert (a["category"], a["instruction"], a["reference"]) == (
            row["category"], row["instruction"], row["response"])
        assert isinstance(a["answer"], str)
        assert a["rouge_l"] == rouge_l(a["answer"], row["response"])
        assert -1.0 <= a["similarity"] <= 1.0 + 1e-6
        if row["category"] in ("classification", "closed_qa"):
            assert a["exact_match"] == exact_match(a["answer"], row["response"])
        else:
            assert a["exact_match"] is None
    for cat, m in result["by_category"].items():
        mine = [a for a in answers if a["category"] == cat]
        assert set(m) == M_KEYS
        assert m["rouge_l"] == pytest.approx(np.mean([a["rouge_l"] for a in mine]))
        assert m["similarity"] == pytest.approx(np.mean([a["similarity"] for a in mine]))
        assert (m["exact_match"] is None) == (cat not in ("classification", "closed_qa"))
        assert m["answer_tokens"] == pytest.approx(np.mean([a["answer_tokens"] for a in mine]))
    short = [a["exact_match"] for a in answers if a["exact_match"] is not None]
    assert result["overall"]["exact_match"] == pytest.approx(np.mean(short))
    s = result["settings"]
    assert s["generated"] and s["max_new_tokens"] == 6 and s["decoding"] == {"do_sample": False}
    assert 0 < s["new_tokens"] <= 6 * len(rows)
    # each answer's length: its new tokens, at most max_new_tokens, adding up to them all
    assert all(isinstance(a["answer_tokens"], int) and 1 <= a["answer_tokens"] <= 6
               for a in answers)
    assert sum(a["answer_tokens"] for a in answers) == s["new_tokens"]
    assert result["overall"]["answer_tokens"] == pytest.approx(s["new_tokens"] / len(rows))
    assert s["similarity_model"] == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize("sample", [False, True])
def test_two_evaluations_give_identical_answers(tmp_path, tiny_model_dir, rows, sample):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"), LoraSpec(), seed=0)
    rng = np.random.default_rng(1)  # large weights: the answers are not all empty
    set_adapter_arrays(model, [rng.normal(0, 0.4, a.shape).astype(np.float32)
                               for a in get_adapter_arrays(model)])
    cfg = _cfg(tmp_path, tiny_model_dir, do_sample=sample, temperature=1.5)
    # Execute: the same adapter twice; then one row at a time (other batches, same seed)
    first = evaluate_model(model, tokenizer, rows, cfg, log=print)[1]
    second = evaluate_model(model, tokenizer, rows, cfg, log=print)[1]
    cfg.eval.generate_batch_size = 1
    alone = evaluate_model(model, tokenizer, rows, cfg, log=print)[1]
    # Assert: greedy answers repeat exactly; seeded sampling repeats whatever the batching
    assert [a["answer"] for a in first] == [a["answer"] for a in second]
    assert [a["answer"] for a in first] == [a["answer"] for a in alone]
    assert len({a["answer"] for a in first}) > 1


def test_exact_match_categories_and_similarity_switch(tmp_path, tiny_model_dir, lm, rows):
    tokenizer, model = lm
    cfg = _cfg(tmp_path, tiny_model_dir, exact_match_categories=["brainstorming"],
               similarity=False)
    result, answers = evaluate_model(model, tokenizer, rows[:8], cfg, log=print)
    assert {a["category"] for a in answers if a["exact_match"] is not None} == {"brainstorming"}
    assert all(a["similarity"] is None for a in answers)
    assert result["overall"]["similarity"] is None
    assert result["by_category"]["closed_qa"]["exact_match"] is None


def test_eval_files_round_trip(tmp_path):
    result = {"overall": {"rows": 1}, "by_category": {}, "settings": {"model": "m"}}
    answers = [{"id": 0, "answer": "ünïcode"}, {"id": 1, "answer": "b"}]
    write_eval(tmp_path / "out", result, answers)
    assert load_eval(tmp_path / "out") == (result, answers)
    with pytest.raises(DataError, match=r"no eval.json \(run fedit eval"):
        load_eval(tmp_path / "elsewhere")
    (tmp_path / "out" / "answers.jsonl").write_text('{"id": 0}\nnot json\n')
    with pytest.raises(DataError, match=r"answers.jsonl:2: not valid JSON"):
        load_eval(tmp_path / "out")


# ---------------------------------------------------------------------------------------
# `fedit eval` end to end on a 1-round tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("eval-run")
    data = write_jsonl(tmp / "rows.jsonl", make_rows(96, seed=3))
    text = f"""
name = "tiny"
output_dir = "{tmp / 'runs'}"
rounds = 1
seed = 1
[model]
name = "{tiny_model_dir}"
dtype = "fp32"
[data]
path = "{data}"
test_per_label = 3
cutoff_len = 256
[partition]
method = "iid"
clients = 2
[train]
batch_size = 8
lr = 3e-3
[strategy]
fraction = 1.0
[eval]
batch_size = 8
"""
    (tmp / "tiny.toml").write_text(text)
    cfg = load_config(tmp / "tiny.toml")
    Simulation(cfg, make_run_dir(cfg)).run()
    return tmp / "runs" / "tiny"


def _invoke(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_has_loss_by_category(run, tiny_model_dir):
    test_rows = [json.loads(x) for x in (run / "test.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    labels = {r["category"]: 0 for r in test_rows}
    for r in test_rows:  # label tokens per category (a label is predicted from position - 1)
        (ex,) = tokenize_rows(tokenizer, [r], cutoff_len=256)
        labels[r["category"]] += sum(x != -100 for x in ex.labels[1:])
    for line in _metrics(run):
        by_cat = line["eval_loss_by_category"]
        assert set(by_cat) == set(labels)
        # token-weighted: the categories put back together give the round's eval_loss
        total = sum(by_cat[c] * n for c, n in labels.items()) / sum(labels.values())
        assert total == pytest.approx(line["eval_loss"], rel=1e-9)


def test_eval_run_folder(run):
    result = _invoke(run, "--set", "eval.max_new_tokens=6")
    assert result.exit_code == 0, result.output
    assert f"wrote {run / 'eval.json'} and {run / 'answers.jsonl'}" in result.output
    assert "overall" in result.output and "closed_qa" in result.output
    ev, answers = load_eval(run)
    assert set(ev) == {"overall", "by_category", "settings"}
    assert set(ev["overall"]) == M_KEYS
    assert all(set(m) == M_KEYS for m in ev["by_category"].values())
    assert len(answers) == ev["overall"]["rows"] == 12
    assert all(set(a) == ANSWER_KEYS for a in answers)
    s = ev["settings"]
    assert s["adapter"] == str(run / "final" / "adapter") and s["run"] == str(run)
    assert s["test_file"] == str(run / "test.jsonl") and s["max_new_tokens"] == 6
    # The adapter reloaded from disk gives the run's own final held-out loss, per category too
    last = _metrics(run)[-1]
    assert ev["overall"]["loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    for cat, loss in last["eval_loss_by_category"].items():
        assert ev["by_category"][cat]["loss"] == pytest.approx(loss, rel=1e-5)


def test_eval_adapter_folder_and_base(run, tiny_model_dir, tmp_path):
    adapter = run / "rounds" / "0001" / "adapter"
    result = _invoke(adapter, "--on", run / "test.jsonl", "--out", tmp_path / "a",
                     "--no-generate")
    assert result.exit_code == 0, result.output
    ev, answers = load_eval(tmp_path / "a")
    assert ev["settings"]["adapter"] == str(adapter) and ev["settings"]["run"] == str(run)
    assert all(a["answer"] is None and a["loss"] is not None for a in answers)
    assert ev["overall"]["loss"] == pytest.approx(_metrics(run)[-1]["eval_loss"], rel=1e-5)
    # The untuned base model, in the run's dtype (auto would be bf16 on a bf16 CPU): the
    # run's round-0 loss
    result = _invoke(f"base:{tiny_model_dir}", "--on", run / "test.jsonl", "--out",
                     tmp_path / "b", "--no-generate", "--set", "model.dtype=fp32")
    assert result.exit_code == 0, result.output
    ev, _ = load_eval(tmp_path / "b")
    assert ev["settings"]["adapter"] is None and ev["settings"]["model"] == str(tiny_model_dir)
    assert ev["overall"]["loss"] == pytest.approx(_metrics(run)[0]["eval_loss"], rel=1e-5)


def test_eval_max_rows(run, tmp_path):
    result = _invoke(run, "--max-rows", 5, "--out", tmp_path, "--no-generate")
    assert result.exit_code == 0, result.output
    ev, answers = load_eval(tmp_path)
    test_rows = [json.loads(x) for x in (run / "test.jsonl").read_text().splitlines()]
    assert ev["settings"]["rows"] == len(answers) == 5
    instructions = [r["instruction"] for r in test_rows]
    picked = [instructions.index(a["instruction"]) for a in answers]
    assert picked == sorted(set(picked))  # distinct rows, in file order


def _one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert message in result.output, result.output


def test_eval_errors(run, tiny_model_dir, tmp_path):
    _one_line_error(_invoke(tmp_path / "nope"), "nope: no such run folder or adapter folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(_invoke(tmp_path / "empty"),
                    "not a run folder (no config.toml) nor an adapter folder "
                    "(no adapter_config.json)")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.toml").write_text((run / "config.toml").read_text())
    _one_line_error(_invoke(unfinished), "run folder has no final/adapter")
    (unfinished / "final" / "adapter").mkdir(parents=True)
    for f in (run / "final" / "adapter").iterdir():
        (unfinished / "final" / "adapter" / f.name).write_bytes(f.read_bytes())
    _one_line_error(_invoke(unfinished), "test.jsonl: the run's held-out file is missing; "
                                         "pass --on FILE")
    base = f"base:{tiny_model_dir}"
    _one_line_error(_invoke(base, "--out", tmp_path / "o"), "no held-out file: pass --on FILE")
    _one_line_error(_invoke(base, "--on", run / "test.jsonl"), "pass --out DIR")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "hi", "category": "x"}])
    _one_line_error(_invoke(base, "--on", bad, "--out", tmp_path / "o"),
                    "bad.jsonl:1: field 'response' is missing")
    _one_line_error(_invoke(run, "--set", "eval.top_p=0"), "eval.top_p: must be in (0, 1]")


def test_eval_config_keys_round_trip(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, do_sample=True, temperature=0.7,
               exact_match_categories=["classification"])
    assert dataclasses.asdict(cfg.eval) == {
        "every": 1, "batch_size": 4, "max_new_tokens": 6, "generate_batch_size": 5,
        "generate_batch_tokens": 8192, "do_sample": True, "temperature": 0.7, "top_p": 1.0,
        "exact_match_categories": ["classification"], "similarity": True,
    }
    (tmp_path / "resolved.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "resolved.toml").eval == cfg.eval


def test_rows_without_a_label_share_one_category(tmp_path, tiny_model_dir, lm, rows):
    tokenizer, model = lm
    unlabelled = [{k: v for k, v in r.items() if k != "category"} for r in rows[:4]]
    cfg = _cfg(tmp_path, tiny_model_dir)
    result, answers = evaluate_model(model, tokenizer, unlabelled, cfg, generate=False)
    assert list(result["by_category"]) == ["(none)"]
    assert result["by_category"]["(none)"]["loss"] == pytest.approx(result["overall"]["loss"])
    assert {a["category"] for a in answers} == {"(none)"}


def test_held_out_file_with_mapped_or_canonical_columns(tmp_path, tiny_model_dir):
    from fedit.evaluate.runner import EvalTarget, load_eval_rows

    cfg = _cfg(tmp_path, tiny_model_dir)
    cfg.data.fields = {"response": "output"}
    target = EvalTarget("base", cfg)
    source = [{"instruction": "hi", "output": "hello", "category": "open_qa"}]
    mapped = write_jsonl(tmp_path / "mapped.jsonl", source)
    rows, where = load_eval_rows(str(mapped), target)
    assert rows[0]["response"] == "hello" and where == str(mapped)
    # a run's test.jsonl is written in canonical columns whatever data.fields mapped
    canonical = write_jsonl(tmp_path / "test.jsonl", [{"instruction": "hi", "context": "",
                                                       "response": "hello"}])
    assert load_eval_rows(str(canonical), target)[0][0]["response"] == "hello"
    neither = write_jsonl(tmp_path / "neither.jsonl", [{"instruction": "hi", "answer": "x"}])
    with pytest.raises(DataError, match=r"neither.jsonl:1: field 'output' is missing"):
        load_eval_rows(str(neither), target)
