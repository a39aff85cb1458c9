"""``lora.init_from``: a run starts from a trained adapter (SFT and DPO); for DPO that
adapter is the reference (a frozen second PEFT adapter, no second base model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fedit.algorithms.contract import ClientState
from fedit.cli import app
from fedit.client.dpo import DPO, pair_batch, reference_logps, reference_table
from fedit.client.fused import fused_training
from fedit.client.load import load_model
from fedit.config import DataConfig, DPOConfig, load_config
from fedit.data.preference_tokens import tokenize_pairs
from fedit.errors import ConfigError
from fedit.federation.rundir import resumed_run
from fedit.model.adapter import get_adapter_arrays, set_adapter_arrays
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer
from fedit.model.init_from import (
    REFERENCE_ADAPTER,
    init_adapter_dir,
    reference_weights,
    set_reference_adapter,
)
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl
from tests.test_dpo import _trl_inputs, make_pairs

WEIGHTS = "adapter_model.safetensors"


def peft_adapter(tiny_model_dir: Path, out: Path, r: int = 8, alpha: int = 16,
                 seed: int = 3) -> Path:
    """A trained-looking adapter (random A and B) saved by PEFT itself (no fedit metadata)."""
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"),
                        LoraSpec(r=r, alpha=alpha, dropout=0.0), seed=seed)
    rng = np.random.default_rng(seed)
    set_adapter_arrays(model, [rng.normal(0, 0.2, a.shape).astype(np.float32)
                               for a in get_adapter_arrays(model)])
    model.save_pretrained(str(out))
    return out


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        return {k: f.get_tensor(k).float().numpy() for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("start") / "adapter")


def sft_config(tmp_path, tiny_model_dir, init_from, **sections):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(24, seed=4))
    return load_config(write_config(tmp_path / "run.toml", tiny_model_dir, data, rounds=1,
                                    lora={"init_from": init_from}, **sections))


# -- SFT: round 0 is the adapter, exactly --------------------------------------------------
def test_sft_run_starts_from_the_adapters_arrays_exactly(tmp_path, tiny_model_dir, adapter):
    cfg = sft_config(tmp_path, tiny_model_dir, str(adapter), train={"max_steps": 1})
    sim = Simulation(cfg, make_run_dir(cfg))
    sim.run()
    start, round0 = read_tensors(adapter), read_tensors(sim.run_dir / "rounds/0000/adapter")
    assert sorted(start) == sorted(round0) and len(start) == 2 * 2 * 4  # A, B; 2 layers; qkvo
    for name, value in start.items():
        np.testing.assert_array_equal(round0[name], value)
    assert REFERENCE_ADAPTER not in sim.model.peft_config  # SFT keeps no reference
    # config.toml records it and a resumed run keeps it
    assert resumed_run(sim.run_dir).lora.init_from == str(adapter)
    # the held-out loss of round 0 is the adapter's, not the base model's
    base = json.loads((sim.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    zero = [np.zeros_like(a) for a in sim.prepared.model.initial]  # A = B = 0: the base
    assert abs(sim.prepared.model.evaluate(zero)[0] - base["eval_loss"]) > 1e-4


def test_a_run_folder_names_its_final_adapter(tmp_path, adapter):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.toml").write_text("rounds = 1\n")
    with pytest.raises(ConfigError, match=r"the run has no final/adapter \(not finished\?\)"):
        init_adapter_dir(str(run))
    (run / "final" / "adapter").symlink_to(adapter, target_is_directory=True)
    assert init_adapter_dir(str(run)) == run / "final" / "adapter"
    assert init_adapter_dir(str(adapter)) == adapter


BAD_PATHS = [
    ("missing", "no such run folder or adapter folder; give a run folder"),
    ("empty", "not a run folder (no config.toml) nor a PEFT adapter folder"),
]


@pytest.mark.parametrize("name,message", BAD_PATHS)
def test_a_bad_path_stops_with_one_line(tmp_path, tiny_model_dir, name, message):
    (tmp_path / "empty").mkdir()
    path = str(tmp_path / name)
    cfg_file = write_config(tmp_path / "run.toml", tiny_model_dir,
                            write_jsonl(tmp_path / "rows.jsonl", make_rows(24)),
                            lora={"init_from": path})
    result = CliRunner().invoke(app, ["train", str(cfg_file)])
    assert result.exit_code != 0
    last = result.stderr.splitlines()[-1]  # after the run folder's line
    assert last.startswith(f"error: lora.init_from = {path!r}: {message}")
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1


def test_a_mismatched_rank_stops_with_one_line_naming_the_key(tmp_path, tiny_model_dir):
    small = peft_adapter(tiny_model_dir, tmp_path / "r4", r=4, alpha=16)
    cfg = sft_config(tmp_path, tiny_model_dir, str(small))
    with pytest.raises(ConfigError) as err:
        load_model(cfg)
    assert str(err.value) == (f"lora.init_from = {str(small)!r}: the adapter differs from the "
                              "run: lora.r = 8 but the adapter has 4 (set lora.r = 4)")
    both = peft_adapter(tiny_model_dir, tmp_path / "r4a8", r=4, alpha=8)
    with pytest.raises(ConfigError, match=r"lora.r = 4\); lora.alpha = 16 but the adapter has "
                                          r"8 \(set lora.alpha = 8\)$"):
        load_model(sft_config(tmp_path, tiny_model_dir, str(both)))


# -- DPO: the starting adapter is the reference ---------------------------------------------
def independent_logps(model, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Each answer's summed log-probability, one unpadded sequence at a time, from logits."""
    out = np.zeros((2, len(pairs)))
    with torch.no_grad():
        for i, p in enumerate(pairs):
            for j, answer in enumerate((p.chosen_ids, p.rejected_ids)):
                ids = torch.tensor([list(p.prompt_ids) + list(answer)])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
                targets = ids[0, 1:]
                rows = torch.arange(len(p.prompt_ids) - 1, ids.shape[1] - 1)
                out[j, i] = float(logp[rows, targets[rows]].sum())
    return out[0], out[1]


def dpo_config(tmp_path, tiny_model_dir, init_from):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(24, seed=6))
    return load_config(write_config(
        tmp_path / "dpo.toml", tiny_model_dir, data, rounds=1, lora={"init_from": init_from,
                                                                      "dropout": 0.0},
        train={"objective": "dpo", "batch_size": 4, "micro_batch_size": 2, "max_steps": 1},
        dpo={"beta": 0.2}, data={"test_per_label": 1, "cutoff_len": 128}))


def test_dpo_reference_is_the_starting_adapter(tmp_path, tiny_model_dir, adapter,
                                                reference_calls):
    from peft import PeftModel

    cfg = dpo_config(tmp_path, tiny_model_dir, str(adapter))
    calls = reference_calls
    sim = Simulation(cfg, make_run_dir(cfg))
    sim.run()
    line0 = json.loads((sim.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line0["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    # Independent: a fresh PeftModel loaded from the adapter folder, log-probs from logits
    fresh = PeftModel.from_pretrained(load_base_model(str(tiny_model_dir), dtype="fp32"),
                                      str(adapter)).eval()
    for c in (0, 1):
        examples = sim.runtime.client_examples(c)
        table = reference_table(sim.runtime.client_state(c))
        want_c, want_r = independent_logps(fresh, examples)
        np.testing.assert_allclose([table[e.key][0] for e in examples], want_c, rtol=1e-6)
        np.testing.assert_allclose([table[e.key][1] for e in examples], want_r, rtol=1e-6)
        with fresh.disable_adapter():  # the reference is not the base model
            assert abs(want_c - independent_logps(fresh, examples)[0]).max() > 1e-3
    assert len(calls) == 3  # once per client and once for the held-out pairs
    # the model holds one base: the reference is a second, frozen adapter of it
    assert set(sim.model.peft_config) == {"default", REFERENCE_ADAPTER}
    assert not any(p.requires_grad for n, p in sim.model.named_parameters()
                   if f".{REFERENCE_ADAPTER}." in n)


def test_dpo_loss_at_the_first_step_is_ln2(tmp_path, tiny_model_dir, adapter):
    cfg = dpo_config(tmp_path, tiny_model_dir, str(adapter))
    tok, model = load_model(cfg)
    pairs, _, _ = tokenize_pairs(tok, make_pairs(4, seed=7), DataConfig(cutoff_len=128), "t")
    objective, state = DPO(DPOConfig(beta=0.2)), ClientState()
    objective.pad_id = tok.pad_token_id
    objective.precompute(model, pairs, state)
    model.train()
    for fused in (False, True):
        with fused_training(model, seed=0, enabled=fused):
            micro = pair_batch(pairs, tok.pad_token_id)
            summed, _ = objective.micro_loss(model, micro, state)
        got = float(summed.detach()) / objective.normaliser([micro])
        assert got == pytest.approx(math.log(2), abs=1e-6)
    assert model.active_adapter == "default"  # the reference pass switched back
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)


def test_without_init_from_the_reference_is_the_base(tiny_model_dir, tok_dir_pairs):
    tok, pairs = tok_dir_pairs
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"), LoraSpec(dropout=0))
    rng = np.random.default_rng(1)
    set_adapter_arrays(model, [rng.normal(0, 0.2, a.shape).astype(np.float32)
                               for a in get_adapter_arrays(model)])
    got = reference_logps(model, pairs, tok.pad_token_id)
    with model.disable_adapter():
        want = independent_logps(model, pairs)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with reference_weights(model):  # no reference adapter: the adapter is disabled
        pass
    assert REFERENCE_ADAPTER not in model.peft_config


@pytest.fixture(scope="module")
def tok_dir_pairs(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _, _ = tokenize_pairs(tok, make_pairs(3, seed=5), DataConfig(cutoff_len=256), "t")
    return tok, pairs


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_and_gradients_equal_trl_with_a_reference_adapter(tmp_path, tiny_model_dir,
                                                               adapter, tok_dir_pairs, loss):
    """TRL, given a PeftModel holding a trained adapter, copies it as its frozen "ref"
    adapter; fedit holds the same starting adapter as "reference". fp32, to 1e-5."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    tok, pairs = tok_dir_pairs
    beta = 0.5
    policy = PeftModel.from_pretrained(load_base_model(str(tiny_model_dir), dtype="fp32"),
                                       str(adapter), is_trainable=True)
    args = TRLConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss],
                     report_to=[], use_cpu=True, bf16=False, max_length=None,
                     precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=policy, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b",
                                                           "rejected": "c"}]))
    model = trainer.model
    assert "ref" in model.peft_config  # TRL's reference: a copy of the starting adapter
    start = get_adapter_arrays(model)
    set_reference_adapter(model, start)  # fedit's, from the same arrays
    rng = np.random.default_rng(0)  # the policy moves off the start, as training would
    set_adapter_arrays(model, [a + rng.normal(0, 0.1, a.shape).astype(np.float32)
                               for a in start])
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all(".default." in n for n, p in model.named_parameters()
                          if p.requires_grad)
    objective, state = DPO(DPOConfig(beta=beta, loss=loss)), ClientState()
    objective.pad_id = tok.pad_token_id
    objective.precompute(model, pairs, state)
    model.train()
    for batch in [[p] for p in pairs] + [pairs]:
        want = trainer._compute_loss(model, _trl_inputs(batch, tok.pad_token_id), False)
        want.backward()
        want_grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        micro = pair_batch(batch, tok.pad_token_id)
        summed, _ = objective.micro_loss(model, micro, state)
        got = summed / objective.normaliser([micro])
        got.backward()
        got_grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        assert abs(float(want) - math.log(2)) > 1e-3
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
