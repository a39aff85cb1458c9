"""Federated DPO's foundation: preference rows, their tokenisation, the DPO objective
against TRL's DPOTrainer, the reference computed once per client, a 2-round run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedit.algorithms.contract import ClientState
from fedit.cli import app
from fedit.client.dpo import DPO, dpo_losses, pair_batch, reference_logps, reference_table
from fedit.client.fused import fused_training
from fedit.client.objective import SFT, objective_for
from fedit.config import DataConfig, DPOConfig, config_from_dict, load_config
from fedit.data.invalid import RowCounts
from fedit.data.load import load_rows
from fedit.data.preference_tokens import tokenize_pair, tokenize_pairs
from fedit.errors import ConfigError, DataError
from fedit.model.adapter import get_adapter_arrays, set_adapter_arrays
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl


def make_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs from the tiny rows: the row's response is chosen, a short wrong one rejected."""
    return [{"prompt": r["instruction"], "chosen": r["response"],
             "rejected": f"No. {r['response'].split()[-1]}", "category": r["category"]}
            for r in make_rows(n, seed)]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def _policy(tiny_model_dir, seed=0):
    """The tiny model with a LoRA adapter (no dropout) far from zero, so policy != base."""
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"),
                        LoraSpec(r=4, alpha=8, dropout=0.0), seed=seed)
    rng = np.random.default_rng(seed)
    set_adapter_arrays(model, [rng.normal(0, 0.3, a.shape).astype(np.float32)
                               for a in get_adapter_arrays(model)])
    return model


# -- the loss: equal to TRL's DPOTrainer -----------------------------------------------------
def _trl_trainer(tiny_model_dir, tok, loss, beta, tmp_path):
    """TRL's DPOTrainer on the tiny model with a fresh LoRA adapter it attaches itself
    (its reference is then the base, the adapter disabled), moved off zero as training
    would; built offline on a one-pair data set (the batches are given to its loss)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    args = TRLConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss],
                     report_to=[], use_cpu=True, bf16=False, max_length=None,
                     precompute_ref_log_probs=False)
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = DPOTrainer(model=load_base_model(str(tiny_model_dir), dtype="fp32"), args=args,
                         train_dataset=data, processing_class=tok, peft_config=lora)
    assert "ref" not in trainer.model.peft_config  # the fresh-adapter case
    rng = np.random.default_rng(0)
    set_adapter_arrays(trainer.model, [rng.normal(0, 0.3, a.shape).astype(np.float32)
                                       for a in get_adapter_arrays(trainer.model)])
    return trainer


def _trl_inputs(pairs, pad_id):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=pad_id)(
        [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
          "rejected_ids": p.rejected_ids} for p in pairs])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_and_lora_gradients_equal_trl_dpo_trainer(tmp_path, tiny_model_dir, tok, loss,
                                                       fused):
    """fp32, to 1e-5; on the fused LoRA path (its own summation order) the gradients to
    1e-4 relative / 5e-5 absolute (measured: 2e-5 at most)."""
    # Prepare: 3 pairs of different lengths, one model, TRL's trainer on it (the
    # reference: the adapter disabled, as fedit's); a beta that makes the loss move
    beta = 0.5
    pairs, _, _ = tokenize_pairs(tok, make_pairs(3, seed=5), DataConfig(cutoff_len=256), "t")
    trainer = _trl_trainer(tiny_model_dir, tok, loss, beta, tmp_path)
    model = trainer.model  # one model: TRL's loss and fedit's objective on the same weights
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    objective, state = DPO(DPOConfig(beta=beta, loss=loss)), ClientState()
    objective.pad_id = tok.pad_token_id
    objective.precompute(model, pairs, state)
    # Execute + Assert: per row, then the 3 rows in one step, loss and gradients
    for batch in [[p] for p in pairs] + [pairs]:
        want = trainer._compute_loss(trainer.model, _trl_inputs(batch, tok.pad_token_id), False)
        want.backward()
        want_grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        with fused_training(model, seed=0, enabled=fused):  # fedit training path: fused LoRA, CE
            summed, _ = objective.micro_loss(model, pair_batch(batch, tok.pad_token_id), state)
            got = summed / objective.normaliser([pair_batch(batch, tok.pad_token_id)])
            got.backward()
        got_grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        assert abs(float(want) - math.log(2)) > 1e-3  # the policy is not the reference
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4 if fused else 1e-5,
                                       atol=5e-5 if fused else 1e-5)


def test_sigmoid_loss_with_label_smoothing_by_hand():
    # pi_c - pi_r = 2, ref_c - ref_r = 0: z = beta * 2 = 0.2
    t = [torch.tensor([x], dtype=torch.float64) for x in (-3.0, -5.0, -4.0, -4.0, 2.0, 4.0)]
    got = dpo_losses(*t, DPOConfig(beta=0.1, label_smoothing=0.2))
    def logsig(x): return -math.log1p(math.exp(-x))  # noqa: E704
    assert float(got) == pytest.approx(-0.8 * logsig(0.2) - 0.2 * logsig(-0.2), abs=1e-12)
    # IPO: (( -3+4)/2 - (-5+4)/4 - 1/(2*0.1))^2 = (0.5 + 0.25 - 5)^2
    got = dpo_losses(*t, DPOConfig(beta=0.1, loss="ipo"))
    assert float(got) == pytest.approx((0.75 - 5) ** 2, abs=1e-12)


# -- the reference: once per client, kept in its state, in a 2-round run ----------------------
def test_two_round_dpo_run_computes_each_clients_reference_once(
        tmp_path, tiny_model_dir, reference_calls):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(40, seed=2))
    cfg = load_config(write_config(
        tmp_path / "dpo.toml", tiny_model_dir, data, name="dpo", rounds=2,
        train={"objective": "dpo", "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3},
        dpo={"beta": 0.2}, data={"test_per_label": 1, "cutoff_len": 128}))
    calls = reference_calls
    sim = Simulation(cfg, make_run_dir(cfg))
    summary = sim.run()
    # Assert: the run went through both rounds with finite DPO losses
    lines = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1, 2]
    assert all(math.isfinite(m["train_loss"]) for m in lines[1:])
    assert lines[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert math.isfinite(summary["final_eval_loss"])
    # One reference computation per client (2 clients, 2 rounds) and one for the held-out
    # pairs, each over all of its pairs
    sizes = [len(sim.runtime.client_examples(c)) for c in (0, 1)]
    assert sorted(calls) == sorted([*sizes, sim.prepared.model.held_out_rows])
    # ... equal to a fresh computation on the base model
    for c in (0, 1):
        examples = sim.runtime.client_examples(c)
        table = reference_table(sim.runtime.client_state(c))
        fresh_c, fresh_r = reference_logps(sim.model, examples, tok_pad(sim))
        np.testing.assert_allclose([table[e.key][0] for e in examples], fresh_c, rtol=1e-6)
        np.testing.assert_allclose([table[e.key][1] for e in examples], fresh_r, rtol=1e-6)
    stats = json.loads((sim.run_dir / "partitions" / "stats.json").read_text())
    assert stats["length"]["total"]["identical"] == 0


def tok_pad(sim):
    return int(sim.tokenizer.pad_token_id)


def test_precompute_fills_only_missing_pairs(tiny_model_dir, tok):
    pairs, _, _ = tokenize_pairs(tok, make_pairs(4, seed=1), DataConfig(cutoff_len=256), "t")
    model, state, objective = _policy(tiny_model_dir), ClientState(), DPO()
    objective.precompute(model, pairs[:2], state)
    first = reference_table(state)
    objective.precompute(model, pairs, state)
    table = reference_table(state)
    assert len(first) == 2 and len(table) == 4
    assert all(table[k] == v for k, v in first.items())  # never recomputed
    chosen, _ = reference_logps(model, pairs, tok.pad_token_id)
    np.testing.assert_allclose([table[p.key][0] for p in pairs], chosen, rtol=1e-6)


def _one_sequence_logp(model, prompt, answer):
    """An answer's summed log-probability from the model's logits on its own sequence."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(answer))


@pytest.mark.parametrize("fused", [False, True])
def test_packed_pairs_give_each_answers_own_sequence_log_probabilities(tiny_model_dir, tok,
                                                                       fused):
    """prompt + chosen + rejected in one row: each answer's log-probability is that of its
    own prompt + answer sequence (the rejected one never sees the chosen one), in a batch of
    pairs of different lengths (padding), on the evaluation path and the fused training
    path (its attention takes the mask)."""
    from fedit.client.dpo import packed_length, sequence_logps

    rows = make_pairs(5, seed=2)
    rows[1]["rejected"] = rows[1]["chosen"] + " and much more than that, more and more."
    rows[3]["prompt"] = rows[3]["prompt"] + " Say it at length, please, in words."
    pairs, _, _ = tokenize_pairs(tok, rows, DataConfig(cutoff_len=256), "t")
    model = _policy(tiny_model_dir, seed=4)
    want = [[_one_sequence_logp(model, p.prompt_ids, getattr(p, name)) for p in pairs]
            for name in ("chosen_ids", "rejected_ids")]
    micro = pair_batch(pairs, tok.pad_token_id)
    assert micro.input_ids.shape == (5, max(packed_length(p) for p in pairs))
    assert micro.num_tokens == sum(packed_length(p) for p in pairs)
    import fedit.client.fused as fu

    calls = []
    real = fu.CausalAttentionFunction.apply

    def counted(*args):
        calls.append(args[-1] is not None)  # the mask reached the fused attention
        return real(*args)

    with fused_training(model, enabled=fused), torch.set_grad_enabled(fused), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(fu.CausalAttentionFunction, "apply", counted)
        logps, counts = sequence_logps(model, micro)
    assert calls == ([True] * 2 if fused else [])  # one a layer on the fused path
    np.testing.assert_allclose(logps[:5].detach().numpy(), want[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(logps[5:].detach().numpy(), want[1], rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [len(p.chosen_ids) for p in pairs] + [
        len(p.rejected_ids) for p in pairs]
    # the chosen answer is really invisible to the rejected one: change it, same rejected
    other = [type(p)(p.prompt_ids, list(reversed(p.chosen_ids)), p.rejected_ids) for p in pairs]
    with torch.no_grad():
        again, _ = sequence_logps(model, pair_batch(other, tok.pad_token_id))
    np.testing.assert_allclose(again[5:].numpy(), logps[5:].detach().numpy(), rtol=1e-5,
                               atol=1e-5)


# -- preference rows: shapes, bad rows, lengths ----------------------------------------------
def test_standard_and_conversational_rows_and_mapped_columns(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"question": "Q?", "good": "A.", "bad": "B.", "category": "x"},
        {"question": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q2?"}],
         "good": [{"role": "assistant", "content": "A2."}],
         "bad": [{"role": "assistant", "content": "B2."}]}])
    rows = load_rows(str(f), {"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert rows[0] == {"prompt": "Q?", "chosen": "A.", "rejected": "B.", "instruction": "Q?",
                       "context": "", "category": "x"}
    assert rows[1]["prompt"][1] == {"role": "user", "content": "Q2?"}
    assert (rows[1]["chosen"], rows[1]["rejected"], rows[1]["instruction"]) == ("A2.", "B2.",
                                                                                 "Q2?")
    assert config_from_dict({"data": {"fields": {"prompt": "q"}}}).data.fields == {"prompt": "q"}


BAD = [
    ({"prompt": "Q", "chosen": "A"}, "p.jsonl:1: field 'rejected' is missing", "missing field"),
    ({"prompt": [{"role": "user", "content": "Q"}], "chosen": "A", "rejected": "B"},
     "p.jsonl:1: field 'chosen' is a string but the prompt is a list of messages",
     "wrong type"),
    ({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "user",
      "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]},
     "p.jsonl:1: field 'chosen' holds a user message", "turn order"),
    ({"prompt": [{"role": "user"}], "chosen": [], "rejected": []},
     "p.jsonl:1: field 'prompt', message 1 (user) has no text content", "bad turn"),
    ({"prompt": [{"role": "assistant", "content": "Q"}], "chosen": [], "rejected": []},
     "p.jsonl:1: field 'prompt', message 1 is a assistant turn", "turn order"),
    ({"prompt": "Q", "chosen": ["A"], "rejected": "B"},
     "p.jsonl:1: field 'chosen' is array: the prompt is a string", "wrong type"),
    ({"prompt": 3, "chosen": "A", "rejected": "B"},
     "p.jsonl:1: field 'prompt' must be a string or a list of messages, got number",
     "wrong type"),
]


@pytest.mark.parametrize("row,message,reason", BAD)
def test_bad_preference_rows_get_one_line_errors_or_counts(tmp_path, row, message, reason):
    f = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_rows(str(f))
    text = str(err.value).replace(str(tmp_path) + "/", "")
    assert text.startswith(message) and "\n" not in text
    # skip: dropped and counted by reason (a good row beside it keeps the file)
    f = write_jsonl(tmp_path / "p.jsonl", [row, {"prompt": "Q", "chosen": "A", "rejected": "B"}])
    counts = RowCounts("skip", 0.9)
    assert len(load_rows(str(f), invalid=counts)) == 1
    assert dict(counts.reasons) == {reason: 1}


def test_identical_answers_and_unfittable_prompts_are_counted(tmp_path, tok):
    rows = [{"prompt": "Tell me about the cat.", "chosen": "The cat.", "rejected": "The cat. "},
            {"prompt": "cat " * 400, "chosen": "The cat sleeps.", "rejected": "No."},
            {"prompt": "Tell me about the dog.", "chosen": "The dog runs far.",
             "rejected": "No."}]
    data = DataConfig(cutoff_len=100, min_response_tokens=4)
    examples, kept, counts = tokenize_pairs(tok, rows, data, "t")
    # the long prompt is shortened (its middle) so each answer keeps >= 4 tokens
    assert kept == [1, 2] and counts == {"rows": 3, "truncated": 1, "skipped": 0,
                                         "identical": 1}
    long = examples[0]
    assert " [...] " in tok.decode(long.prompt_ids)
    assert len(long.prompt_ids) + len(long.chosen_ids) <= 100 and len(long.chosen_ids) >= 4
    assert long.chosen.labels[: len(long.prompt_ids)] == [-100] * len(long.prompt_ids)
    # a prompt whose template alone fills cutoff_len cannot fit: skipped, counted
    short = DataConfig(cutoff_len=40, min_response_tokens=4)
    assert tokenize_pair(tok, rows[2], cutoff_len=40, min_response_tokens=4) is None
    assert tokenize_pairs(tok, rows[1:], short, "t")[2]["skipped"] == 2
    # a client left with no pair at all is an error, not a round of no steps
    from fedit.data.preference_tokens import tokenize_pairs_for_run

    with pytest.raises(DataError, match=r"client 3: none of its 2 pairs is left to train on "
                                        r"\(2 cannot fit data.cutoff_len = 40 .*raise "
                                        r"data.cutoff_len"):
        tokenize_pairs_for_run(tok, rows[1:], short, "client 3", log=None)


def test_conversational_prompt_is_shortened_in_its_longest_turn(tok):
    row = {"prompt": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "dog " * 200}],
           "chosen": "The dog runs.", "rejected": "No."}
    ex = tokenize_pair(tok, row, template="chatml", cutoff_len=60, min_response_tokens=16)
    text = tok.decode(ex.prompt_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and " [...] " in text
    assert text.endswith("<|im_start|>assistant\n") and ex.truncated
    assert tok.decode(ex.chosen_ids) == "The dog runs.<|im_end|>\n"


def test_objectives_refuse_the_other_kind_of_row(tok):
    pairs, rows = make_pairs(2), make_rows(2)
    with pytest.raises(DataError, match=r"^c: the rows are preference pairs .*dpo"):
        SFT().examples(tok, pairs, DataConfig(), "c", None)
    with pytest.raises(DataError, match=r"^c: row 0 is not a preference pair"):
        DPO().examples(tok, rows, DataConfig(), "c", None)


def test_dpo_config_is_checked_and_selects_the_objective():
    cfg = config_from_dict({"train": {"objective": "dpo"}, "dpo": {"beta": 0.3, "loss": "ipo"}})
    objective = objective_for(cfg)
    assert isinstance(objective, DPO) and objective.cfg.beta == 0.3
    for raw, msg in [({"beta": 0}, "dpo.beta: must be > 0"),
                     ({"loss": "hinge"}, "dpo.loss: use one of sigmoid, ipo"),
                     ({"label_smoothing": 0.5}, "dpo.label_smoothing: must be in [0, 0.5)")]:
        with pytest.raises(ConfigError, match=f"^{msg.replace('[', '.').replace(')', '.')}"):
            config_from_dict({"dpo": raw})


def test_data_inspect_reports_pairs(tmp_path, tiny_model_dir):
    rows = make_pairs(6) + [{"prompt": "Q", "chosen": "Same.", "rejected": "Same.",
                             "category": "x"}]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    result = CliRunner().invoke(app, ["data", "inspect", str(f), "--model", str(tiny_model_dir),
                                      "--cutoff-len", "256"])
    assert result.exit_code == 0, result.output
    assert "preference pairs: pairs 7, identical 1, truncated 0, skipped 0" in result.output
    for name in ("prompt", "chosen", "rejected"):
        assert f"{name} (tokens)" in result.output


def test_the_train_summary_names_the_dpo_loss_and_the_start():
    from fedit.cli.train import format_train_summary

    summary = {"base_eval_loss": 0.6931, "final_eval_loss": 0.6, "test_rows": 4, "rounds": 2,
               "clients": 2, "seconds": 3.0, "run_dir": "runs/x", "final_adapter": "a",
               "objective": {"name": "dpo"}, "init_from": "runs/sft"}
    text = format_train_summary(summary)
    assert text.splitlines()[0] == ("held-out DPO loss (per pair) on 4 pairs: starting "
                                    "adapter 0.6931 -> global adapter 0.6000 (-13.4%)")
    summary |= {"objective": {"name": "sft"}, "init_from": None}
    assert format_train_summary(summary).startswith(
        "held-out response loss on 4 rows: base model 0.6931 ->")
