"""Any causal LM: a tiny random GPT-NeoX (not Llama) trains, federates and evaluates; LoRA
targets are found for its architecture, and a model matching nothing is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from fedit.cli import app
from fedit.client.fused import fused_note, fused_supported
from fedit.client.load import model_notes
from fedit.config import load_config
from fedit.errors import ModelError
from fedit.model.base import (
    DEFAULT_TARGETS,
    LoraSpec,
    attach_lora,
    linear_module_names,
    load_base_model,
    lora_targets,
)
from fedit.runtimes.inprocess import Simulation
from tests.conftest import _build_tokenizer, make_rows, make_run_dir, write_config, write_jsonl


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random GPT-NeoX + the tiny tokenizer, as a local folder."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    out = tmp_path_factory.mktemp("tiny-neox")
    tok = _build_tokenizer()
    config = GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_default_targets_absent_pick_the_architectures_attention(neox_dir):
    base = load_base_model(str(neox_dir), dtype="fp32")
    assert lora_targets(base, DEFAULT_TARGETS) == ("query_key_value",)
    model = attach_lora(base, LoraSpec())
    assert sorted(model.peft_config["default"].target_modules) == ["query_key_value"]
    notes = model_notes(model, DEFAULT_TARGETS, fused=True)
    assert notes[0] == ("lora: this gpt_neox model has no q_proj, k_proj, v_proj, o_proj; "
                        "LoRA on query_key_value (PEFT's attention projections for it)")
    assert notes[1].startswith("fused kernels: off for gpt_neox (only llama-like models")
    assert notes[1].endswith("; stock PyTorch path")
    assert model_notes(model, DEFAULT_TARGETS, fused=False) == notes[:1]
    assert not fused_supported(model)


def test_llama_keeps_its_targets_and_fused_kernels(tiny_model_dir):
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"), LoraSpec())
    assert fused_supported(model) and fused_note(model) is None
    assert model_notes(model, DEFAULT_TARGETS, fused=True) == []


class _Mystery(torch.nn.Module):
    """An architecture PEFT has no default for, with its own layer names."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery")
        self.wq, self.wk = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 4)


def test_a_model_matching_nothing_lists_its_linear_layers():
    model = _Mystery()
    assert linear_module_names(model) == ["wk", "wq"]
    with pytest.raises(ModelError) as err:
        attach_lora(model, LoraSpec())
    msg = str(err.value)
    assert "no layer of this mystery model has those names" in msg
    assert msg.endswith("set lora.target_modules to some of its linear layers: wk, wq")
    assert lora_targets(model, ["wq"]) == ("wq",)  # named by the user: used as given


def test_user_targets_that_match_nothing_are_not_replaced(neox_dir):
    base = load_base_model(str(neox_dir), dtype="fp32")
    with pytest.raises(ModelError, match=r"\['q_proj'\].*gpt_neox.*: dense, dense_4h_to_h, "
                                         r"dense_h_to_4h, query_key_value"):
        lora_targets(base, ["q_proj"])


def _clients(root: Path) -> Path:
    folder = root / "clients"
    folder.mkdir()
    rows = make_rows(72, seed=5)
    write_jsonl(folder / "north.jsonl", rows[:40])
    write_jsonl(folder / "south.jsonl", rows[40:])
    return folder


def test_two_round_federation_on_gpt_neox_from_a_client_folder(tmp_path, neox_dir):
    folder = _clients(tmp_path)
    path = write_config(tmp_path / "neox.toml", neox_dir, tmp_path / "unused.jsonl",
                        name="neox", data={"clients_dir": folder, "test_per_label": 1,
                                           "test_per_client": 2, "cutoff_len": 128},
                        train={"max_steps": 3})
    cfg = load_config(path)
    assert cfg.partition.clients == 2
    lines: list[str] = []
    summary = Simulation(cfg, make_run_dir(cfg), log=lines.append).run()
    assert sum(line.startswith("fused kernels: off for gpt_neox") for line in lines) == 1
    assert sum(line.startswith("lora: this gpt_neox model") for line in lines) == 1
    run = tmp_path / "runs" / "neox"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(m["clients"] == [0, 1] for m in metrics[1:])
    assert metrics[2]["eval_loss"] < metrics[0]["eval_loss"]
    assert summary["final_eval_loss"] == metrics[2]["eval_loss"]
    adapter = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["query_key_value"]
    assert sorted(p.name for p in (run / "client_test").iterdir()) == [
        "client_0000.jsonl", "client_0001.jsonl"]
    # fedit eval on the run: the base is loaded again, the adapter on its own targets
    result = CliRunner().invoke(app, ["eval", str(run), "--set", "eval.max_new_tokens=8",
                                      "--set", "eval.similarity=false"])
    assert result.exit_code == 0, result.output
    overall = json.loads((run / "eval.json").read_text())["overall"]
    assert overall["rows"] == 4 and overall["loss"] == pytest.approx(summary["final_eval_loss"])
    answers = (run / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 4


def test_flower_local_runs_gpt_neox_from_a_client_folder(tmp_path, neox_dir):
    pytest.importorskip("flwr")
    folder = _clients(tmp_path)
    path = write_config(tmp_path / "neox.toml", neox_dir, tmp_path / "unused.jsonl",
                        name="neox-flower", rounds=1,
                        data={"clients_dir": folder, "test_per_label": 1, "cutoff_len": 128},
                        train={"max_steps": 2}, flower={"round_timeout": 120, "node_timeout": 90})
    result = CliRunner().invoke(app, ["flower", "local", str(path), "--nodes", "2",
                                      "--timeout", "300"])
    assert result.exit_code == 0, result.output
    assert "clients: 2 files in" in result.output
    assert "lora: this gpt_neox model has no q_proj" in result.output
    run = tmp_path / "runs" / "neox-flower"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1] and metrics[1]["clients"] == [0, 1]
    adapter = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["query_key_value"]


def test_gpt2_conv1d_gets_lora_on_c_attn_and_trains(tmp_path):
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    from fedit.client.losses import token_losses

    tok = _build_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fan_in_fan_out warning from PEFT
        model = attach_lora(GPT2LMHeadModel(config), LoraSpec())
    assert model.peft_config["default"].target_modules == {"c_attn"}
    assert model.peft_config["default"].fan_in_fan_out
    ids = torch.randint(0, len(tok), (2, 12))
    batch = SimpleNamespace(input_ids=ids, labels=ids.clone())
    losses, _ = token_losses(model.train(), batch)
    losses.mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A: 0 while B = 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
