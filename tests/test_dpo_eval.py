"""``fedit eval`` on preference pairs: preference accuracy, reward margins (implicit and
reference-free), DPO loss and answer length against a hand computation on the tiny model;
``--compare`` on the per-pair records; a DPO run's metrics line and report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedit.cli import app
from fedit.config import DataConfig, DPOConfig, RunConfig, load_config
from fedit.data.preference_tokens import tokenize_pairs
from fedit.errors import DataError
from fedit.evaluate.evaluation import load_eval
from fedit.evaluate.preference import evaluate_preferences
from fedit.evaluate.runner import run_eval
from fedit.model.adapter import get_adapter_arrays, save_adapter, set_adapter_arrays
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer
from fedit.report.page import build_page
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl
from tests.test_dpo import make_pairs

BETA = 0.5


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def _policy(tiny_model_dir, seed):
    """The tiny model with a LoRA adapter far from zero (policy != reference)."""
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"),
                        LoraSpec(r=4, alpha=8, dropout=0.0), seed=seed)
    rng = np.random.default_rng(seed)
    set_adapter_arrays(model, [rng.normal(0, 0.3, a.shape).astype(np.float32)
                               for a in get_adapter_arrays(model)])
    return model.eval()


def _cfg(tiny_model_dir, **data):
    cfg = RunConfig()
    cfg.model.name, cfg.model.dtype = str(tiny_model_dir), "fp32"
    cfg.data = DataConfig(cutoff_len=128, **data)
    cfg.dpo = DPOConfig(beta=BETA)
    cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.similarity = 12, 3, False
    return cfg


@torch.no_grad()
def _logp(model, prompt_ids, answer_ids):
    """Summed log-probability of the answer after the prompt, one unpadded sequence."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids).logits[0, :-1].double()
    logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1:].sum())


def _by_hand(model, pairs, reference=None):
    """Per pair: implicit margin, reference-free margin and sigmoid DPO loss; the
    reference: ``reference`` (a model), else ``model`` with its adapter disabled."""
    out = []
    for p in pairs:
        pc, pr = _logp(model, p.prompt_ids, p.chosen_ids), _logp(model, p.prompt_ids,
                                                                   p.rejected_ids)
        if reference is not None:
            rc, rr = (_logp(reference, p.prompt_ids, a) for a in (p.chosen_ids,
                                                                   p.rejected_ids))
        else:
            with model.disable_adapter():
                rc, rr = (_logp(model, p.prompt_ids, a) for a in (p.chosen_ids,
                                                                   p.rejected_ids))
        margin = BETA * ((pc - rc) - (pr - rr))
        free = pc / len(p.chosen_ids) - pr / len(p.rejected_ids)
        out.append((margin, free, math.log1p(math.exp(-margin))))
    return np.asarray(out)


def test_preference_metrics_equal_a_hand_computation(tiny_model_dir, tok):
    # Prepare: 6 pairs of 3 labels, a policy far from the base
    rows = make_pairs(6, seed=3)
    model, cfg = _policy(tiny_model_dir, seed=1), _cfg(tiny_model_dir)
    pairs, kept, _ = tokenize_pairs(tok, rows, cfg.data, "t")
    assert kept == list(range(6))
    hand = _by_hand(model, pairs)
    # Execute
    result, records = evaluate_preferences(model, tok, rows, cfg, log=lambda _: None)
    # Assert: each record, then the means per label and overall
    got = np.asarray([[r["reward_margin"], r["reference_free_margin"], r["dpo_loss"]]
                      for r in records])
    np.testing.assert_allclose(got, hand, rtol=1e-4, atol=1e-5)
    assert [r["correct"] for r in records] == [bool(m > 0) for m in hand[:, 0]]
    assert [r["reference_free_correct"] for r in records] == [bool(m > 0) for m in hand[:, 1]]
    labels = [r["category"] for r in rows]
    for label in [*sorted(set(labels)), "overall"]:
        mask = np.asarray([label in ("overall", x) for x in labels])
        m = result["overall"] if label == "overall" else result["by_category"][label]
        assert m["rows"] == mask.sum()
        assert m["preference_accuracy"] == pytest.approx(np.mean(hand[mask, 0] > 0))
        assert m["reward_margin"] == pytest.approx(hand[mask, 0].mean(), rel=1e-4, abs=1e-5)
        assert m["reference_free_accuracy"] == pytest.approx(np.mean(hand[mask, 1] > 0))
        assert m["reference_free_margin"] == pytest.approx(hand[mask, 1].mean(), rel=1e-4)
        assert m["dpo_loss"] == pytest.approx(hand[mask, 2].mean(), rel=1e-4)
    # the answers: one per pair, their lengths the tokens generated
    lengths = [r["answer_tokens"] for r in records]
    assert all(isinstance(r["answer"], str) for r in records)
    assert sum(lengths) == result["settings"]["new_tokens"] and 0 < max(lengths) <= 12
    assert result["overall"]["answer_tokens"] == pytest.approx(np.mean(lengths))
    assert result["settings"]["kind"] == "preference" and result["settings"]["beta"] == BETA


def test_the_reference_is_the_lora_init_from_adapter_when_the_config_has_one(
        tmp_path, tiny_model_dir, tok):
    # Prepare: a policy adapter and a starting adapter, saved; 4 pairs
    rows = make_pairs(4, seed=6)
    policy, start = _policy(tiny_model_dir, seed=1), _policy(tiny_model_dir, seed=2)
    folder = save_adapter(policy, tmp_path / "policy", base_model=str(tiny_model_dir))
    init = save_adapter(start, tmp_path / "start", base_model=str(tiny_model_dir))
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = _cfg(tiny_model_dir)
    hand = _by_hand(policy, tokenize_pairs(tok, rows, cfg.data, "t")[0], reference=start)
    # Execute: the adapter evaluated with lora.init_from = the starting adapter
    result, records, _ = run_eval(str(folder), on=str(pairs_file), generate=False,
                                  overrides=[f"lora.init_from={init}", f"dpo.beta={BETA}",
                                             "data.cutoff_len=128"], log=lambda _: None)
    # Assert: the margins against the starting adapter, not the base model
    np.testing.assert_allclose([r["reward_margin"] for r in records], hand[:, 0], rtol=1e-4,
                               atol=1e-5)
    assert result["settings"]["reference"] == f"the starting adapter (lora.init_from = {init})"
    base_ref = _by_hand(policy, tokenize_pairs(tok, rows, cfg.data, "t")[0])
    assert not np.allclose(base_ref[:, 0], hand[:, 0], rtol=1e-2)
    assert result["overall"]["answer_tokens"] is None  # --no-generate


def test_base_model_has_zero_implicit_margin_and_finite_reference_free_metrics(
        tmp_path, tiny_model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(5, seed=4))
    result = CliRunner().invoke(app, ["eval", f"base:{tiny_model_dir}", "--on", str(pairs),
                                      "--out", str(tmp_path / "base"), "--set",
                                      "eval.max_new_tokens=8", "--set", "eval.similarity=false"])
    assert result.exit_code == 0, result.output
    assert "dpo loss" in result.output and "reference: the model itself" in result.output
    ev, records = load_eval(tmp_path / "base")
    assert len(records) == 5
    assert all(r["reward_margin"] == 0.0 and r["correct"] is False for r in records)
    assert all(r["dpo_loss"] == pytest.approx(math.log(2), abs=1e-12) for r in records)
    o = ev["overall"]
    assert (o["preference_accuracy"], o["reward_margin"]) == (0.0, 0.0)
    assert all(math.isfinite(r["reference_free_margin"]) for r in records)
    assert math.isfinite(o["reference_free_margin"]) and 0 <= o["reference_free_accuracy"] <= 1
    assert o["answer_tokens"] is not None and o["answer_tokens"] > 0


def test_a_file_mixing_pairs_and_instruction_rows_is_refused(tmp_path, tiny_model_dir):
    f = write_jsonl(tmp_path / "mixed.jsonl", make_pairs(2) + make_rows(1))
    with pytest.raises(DataError) as err:
        run_eval(f"base:{tiny_model_dir}", on=str(f), out=tmp_path / "o", log=lambda _: None)
    text = str(err.value)
    assert text.startswith(f"{f}: mixes preference pairs (row 1") and "row 3" in text
    assert "\n" not in text


def test_compare_of_two_adapters_is_the_paired_mean_difference(tmp_path, tiny_model_dir):
    # Prepare: two adapters evaluated on the same pairs
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8, seed=5))
    folders = []
    for seed in (1, 2):
        folder = save_adapter(_policy(tiny_model_dir, seed), tmp_path / f"a{seed}",
                              base_model=str(tiny_model_dir))
        run_eval(str(folder), on=str(pairs), overrides=["eval.max_new_tokens=8",
                 "eval.similarity=false", f"dpo.beta={BETA}"], log=lambda _: None)
        folders.append(folder)
    # Execute
    result = CliRunner().invoke(app, ["eval", "--compare", *map(str, folders),
                                      "--resamples", "200"])
    assert result.exit_code == 0, result.output
    saved = json.loads((folders[1] / "compare.json").read_text())
    # Assert: B - A of each metric is the mean of the per-pair differences, read back
    (_, a), (_, b) = load_eval(folders[0]), load_eval(folders[1])
    fields = {"preference_accuracy": "correct", "reward_margin": "reward_margin",
              "reference_free_accuracy": "reference_free_correct",
              "reference_free_margin": "reference_free_margin", "dpo_loss": "dpo_loss",
              "answer_tokens": "answer_tokens"}
    assert set(saved["metrics"]) == set(fields) and saved["rows"] == 8
    for metric, field in fields.items():
        diff = np.mean([float(y[field]) - float(x[field]) for x, y in zip(a, b, strict=True)])
        m = saved["metrics"][metric]
        assert m["diff"] == pytest.approx(diff, abs=1e-12), metric
        assert m["low"] <= m["diff"] <= m["high"] and m["rows"] == 8
    assert saved["metrics"]["reward_margin"]["better"] == "higher"
    assert saved["metrics"]["answer_tokens"]["better"] == "n/a"
    assert "reference_free_accuracy (higher)" in result.output


def test_a_dpo_runs_metrics_line_carries_preference_accuracy_and_margin(tmp_path,
                                                                         tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(24, seed=2))
    cfg = load_config(write_config(
        tmp_path / "dpo.toml", tiny_model_dir, data, name="dpo", rounds=1,
        train={"objective": "dpo", "batch_size": 4, "micro_batch_size": 2, "lr": 3e-2},
        dpo={"beta": BETA}, data={"test_per_label": 1, "cutoff_len": 128}))
    sim = Simulation(cfg, make_run_dir(cfg))
    sim.run()
    lines = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    # round 0: the policy is the reference, margins exactly 0
    assert (lines[0]["preference_accuracy"], lines[0]["reward_margin"]) == (0.0, 0.0)
    last = lines[1]
    assert 0.0 <= last["preference_accuracy"] <= 1.0 and last["reward_margin"] != 0.0
    assert math.isfinite(last["reward_margin"]) and last["eval_loss"] is not None
    # fedit eval RUN scores the run's own held-out pairs: the same numbers as the last line
    result, records, _ = run_eval(str(sim.run_dir), generate=False, log=lambda _: None)
    assert len(records) == sim.prepared.model.held_out_rows == result["overall"]["rows"]
    assert result["overall"]["reward_margin"] == pytest.approx(last["reward_margin"], rel=1e-5)
    assert result["overall"]["preference_accuracy"] == last["preference_accuracy"]
    assert result["overall"]["dpo_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    # the report draws them per round
    page = build_page(sim.run_dir)
    assert page.with_name("report-preference.png").is_file()
    assert "preference accuracy and reward margin per round" in page.read_text()
