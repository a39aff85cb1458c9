"""`fedit export`: a merged transformers folder and a clean PEFT folder, both giving the
run's adapter's logits; the model card's numbers read from the run; one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedit.cli import app
from fedit.config import load_config
from fedit.export.card import CardFacts, model_card
from fedit.model.adapter import load_adapter_arrays
from fedit.runtimes.inprocess import run_federated
from tests.conftest import CHAT_TEMPLATE, make_rows, write_config, write_jsonl

SEQUENCES = [[5, 17, 42, 99, 7], [3, 250, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 200, 300]]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """A 2-round tiny run; lr 3e-2 and 2 steps a round so the adapter moves the logits."""
    tmp = tmp_path_factory.mktemp("export-run")
    data = write_jsonl(tmp / "rows.jsonl", make_rows(64, seed=2))
    path = write_config(tmp / "tiny.toml", tiny_model_dir, data, name="tiny",
                        train={"lr": 3e-2, "max_steps": 2})
    summary = run_federated(load_config(path), log=lambda m: None)
    return tmp / "runs" / "tiny", summary


def _export(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logits(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).logits[0].float() for s in SEQUENCES]


def _base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _peft_logits(tiny_model_dir, adapter) -> list[torch.Tensor]:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(_base(tiny_model_dir), str(adapter)).eval())


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_merged_folder_gives_the_adapters_logits_without_peft(run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = run
    out = tmp_path / "merged"
    result = _export(run_dir, "--merged", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    # a plain transformers folder: no adapter, no PEFT needed
    assert not (out / "adapter_config.json").exists()
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    assert config["use_cache"] is True and "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in merged.state_dict())
    expected = _peft_logits(tiny_model_dir, run_dir / "final" / "adapter")
    base = _logits(_base(tiny_model_dir))
    for got, want, before in zip(_logits(merged), expected, base, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (want - before).abs().max() > 1e-2  # the adapter does change the logits
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert _front_matter((out / "README.md").read_text())["library_name"] == "transformers"


def test_merged_in_bf16_is_the_fp32_merge_rounded_once(run, tmp_path):
    run_dir, _ = run
    assert _export(run_dir, "--merged", tmp_path / "fp32").exit_code == 0
    result = _export(run_dir, "--merged", tmp_path / "bf16", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    fp32 = load_file(tmp_path / "fp32" / "model.safetensors")
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    assert fp32.keys() == bf16.keys()
    for key, w in fp32.items():
        assert bf16[key].dtype == torch.bfloat16
        assert torch.equal(bf16[key], w.to(torch.bfloat16)), key
    assert "saved in bf16" in (tmp_path / "bf16" / "README.md").read_text()


def test_adapter_folder_loads_with_peft(run, tiny_model_dir, tmp_path):
    run_dir, _ = run
    source = run_dir / "final" / "adapter"
    out = tmp_path / "adapter"
    result = _export(run_dir, "--adapter", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"adapter_config.json",
                                               "adapter_model.safetensors", "README.md"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    arrays, original = load_adapter_arrays(out), load_adapter_arrays(source)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, original, strict=True))
    for got, want in zip(_peft_logits(tiny_model_dir, out),
                         _peft_logits(tiny_model_dir, source), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    card = (out / "README.md").read_text()
    assert _front_matter(card)["library_name"] == "peft"
    assert "PeftModel.from_pretrained(base, \"adapter\")" in card


def test_model_card_reads_the_run(run, tiny_model_dir, tmp_path):
    run_dir, summary = run
    out = tmp_path / "adapter"
    assert _export(run_dir, "--adapter", out).exit_code == 0
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert "base_model" not in meta  # a local folder has no Hub repo id: no path written
    assert f"`{tiny_model_dir}`: a local folder on the machine that trained it" in card
    assert meta["license"] == "other" and meta["datasets"] == ["rows.jsonl"]
    assert meta["tags"] == ["fedit", "federated-learning", "lora"]
    metrics = _metrics(run_dir)
    final, base = metrics[-1]["eval_loss"], metrics[0]["eval_loss"]
    assert final == summary["final_eval_loss"] and final != base
    assert f"base {base:.4f}, this adapter {final:.4f} (after round 2)" in card
    assert f"| 2 | {final:.4f} |" in card
    for text in ["- strategy: fedavg", "- rounds: 2, clients per round: 2 of 2",
                 "LoRA: r = 8, alpha = 16", "on k_proj, o_proj, q_proj, v_proj",
                 "batch 4, lr 0.03", "- partition: 2 clients, iid", "alpaca template",
                 "fedit does not know the licence of `rows.jsonl`", "## How to load it"]:
        assert text in card, text


def test_card_of_a_rounds_adapter_stops_at_its_round(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "r1"
    assert _export(run_dir / "rounds" / "0001" / "adapter", "--adapter", out).exit_code == 0
    card = (out / "README.md").read_text()
    loss = _metrics(run_dir)[1]["eval_loss"]
    assert f"this adapter {loss:.4f} (after round 1)" in card and "| 2 |" not in card
    assert "run `tiny`, `rounds/0001/adapter`" in card


def test_adapter_outside_a_run_gets_a_shorter_card_with_its_eval(run, tiny_model_dir,
                                                                  tmp_path):
    run_dir, _ = run
    lone = shutil.copytree(run_dir / "final" / "adapter", tmp_path / "lone")
    ev = {"overall": {"rows": 7, "loss": 1.23456, "perplexity": 3.4368, "rouge_l": 0.25,
                      "similarity": 0.5}, "settings": {"test_file": "/x/held.jsonl"}}
    (lone / "eval.json").write_text(json.dumps(ev))
    out = tmp_path / "out"
    result = _export(lone, "--adapter", out)
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert "base_model" not in meta and meta["license"] == "other"
    assert f"`{tiny_model_dir}`: a local folder" in card
    assert "datasets" not in meta
    assert "Not recorded: this adapter is not inside a fedit run folder" in card
    assert "LoRA: r = 8, alpha = 16" in card and "not recorded (no run folder)" in card
    assert ("`fedit eval` (adapter folder, 7 rows of `held.jsonl`): loss 1.2346, perplexity "
            "3.4368, ROUGE-L 0.2500, similarity 0.5000.") in card
    assert "Unknown: the training data is not recorded" in card


def test_card_of_a_dolly_run_names_its_licence_and_the_alias():
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj"]}
    card = model_card(CardFacts(kind="adapter", base_model="smollm2-135m", folder="out",
                                lora=lora, cfg=load_config(None)))
    meta = _front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the alias's repo id
    assert meta["license"] == "cc-by-sa-3.0"
    assert meta["datasets"] == ["databricks/databricks-dolly-15k"]
    assert "CC BY-SA 3.0" in card and "Databricks" in card
    assert 'from_pretrained(resolve_model("smollm2-135m"))' in card
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card


@pytest.mark.parametrize(("base", "repo"), [
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),  # a hub id as it is
    ("/models/my-llama", None), ("./my-llama", None), ("~/m.gguf", None),
])
def test_card_base_model_is_a_hub_repo_id_or_left_out(base, repo):
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj"]}
    card = model_card(CardFacts(kind="adapter", base_model=base, folder="out", lora=lora))
    assert _front_matter(card).get("base_model") == repo
    assert f"`{base}`: " in card  # the body still names the base as it was loaded


def _one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert message in result.output, result.output


def test_bad_exports_are_refused_in_one_line(run, tiny_model_dir, tmp_path):
    run_dir, _ = run
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    _one_line_error(_export(run_dir, "--adapter", full),
                    f"{full} exists and is not empty: choose another folder, or pass --force")
    assert (full / "keep.txt").read_text() == "mine"
    _one_line_error(_export(run_dir), "give one of --merged OUT")
    _one_line_error(_export(run_dir, "--merged", tmp_path / "a", "--adapter", tmp_path / "b"),
                    "give one of --merged OUT")
    _one_line_error(_export(f"base:{tiny_model_dir}", "--merged", tmp_path / "a"),
                    "the untuned base model has no adapter to export")
    _one_line_error(_export(run_dir, "--adapter", run_dir, "--force"),
                    f"{run_dir} holds the adapter being exported")
    _one_line_error(_export(run_dir, "--adapter", tmp_path / "a", "--dtype", "bf16"),
                    "--dtype is for --merged")
    _one_line_error(_export(run_dir, "--merged", tmp_path / "a", "--dtype", "int8"),
                    "--dtype int8: use one of fp32, bf16, fp16")
    _one_line_error(_export(tmp_path / "nope", "--adapter", tmp_path / "a"),
                    "no such run folder or adapter folder")
    assert not (tmp_path / "a").exists()
    # --force replaces OUT whole
    result = _export(run_dir, "--adapter", full, "--force")
    assert result.exit_code == 0, result.output
    assert not (full / "keep.txt").exists() and (full / "adapter_config.json").is_file()


@pytest.mark.slow
def test_merged_smollm2_alias_is_a_plain_transformers_folder(smollm2_cache, monkeypatch,
                                                             tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedit.model.adapter import get_adapter_arrays, save_adapter, set_adapter_arrays
    from fedit.model.base import LoraSpec, attach_lora, load_base_model

    # Prepare: an adapter with random B on the converted GGUF alias
    cache, _ = smollm2_cache
    monkeypatch.setenv("FEDIT_CACHE", str(cache))
    model = attach_lora(load_base_model("smollm2-135m", dtype="fp32"), LoraSpec(), seed=0)
    rng = np.random.default_rng(0)
    set_adapter_arrays(model, [rng.normal(0, 0.02, a.shape).astype(np.float32)
                               for a in get_adapter_arrays(model)])
    save_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([[1, 504, 3131, 314, 253, 1345, 30, 2]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    del model
    # Execute
    result = _export(tmp_path / "adapter", "--merged", tmp_path / "merged")
    # Assert: loads with transformers alone, the same logits, the GGUF's chat template
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not isinstance(merged, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    meta = _front_matter((tmp_path / "merged" / "README.md").read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
