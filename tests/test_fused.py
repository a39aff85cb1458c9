"""The fused training kernels against the stock PyTorch / PEFT / transformers mathematics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedit.client.fused import (
    CausalAttentionFunction,
    DropoutMasks,
    GatedMLPFunction,
    LabelledCrossEntropyFunction,
    LoraLinearFunction,
    RMSNormFunction,
    fused_training,
)
from fedit.client.losses import token_losses
from fedit.client.trainer import train_adapter
from fedit.config import TrainConfig
from fedit.data.batching import Batch, collate, tokenize_rows
from fedit.model.adapter import get_adapter_arrays
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer
from fedit.model.device import parse_dtype, pick_dtype


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    fn().backward()
    return [t.grad.clone() for t in tensors]


def _close(a, b, rtol=1e-5):
    """Within rtol of b's largest magnitude (elementwise checks fail on near-zero entries)."""
    assert a.shape == b.shape
    assert (a - b).abs().max() <= rtol * b.abs().max(), float((a - b).abs().max())


@pytest.mark.parametrize("length", [7, 130, 300, 513])  # one block; 3, 5 and 9 query blocks
def test_causal_attention_equals_sdpa(length):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, 6, length, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, length, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, length, 16, generator=g, requires_grad=True)
    w = torch.randn(2, length, 6, 16, generator=g)  # a weighting, so every output counts

    def ours():
        return (CausalAttentionFunction.apply(q, k, v, 0.3) * w).sum()

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
        return (out.transpose(1, 2) * w).sum()

    assert ours().item() == pytest.approx(sdpa().item(), rel=1e-5)
    for a, b in zip(_grads(ours, q, k, v), _grads(sdpa, q, k, v), strict=True):
        _close(a, b)


def test_labelled_cross_entropy_equals_f_cross_entropy():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=g, requires_grad=True)  # 3 chunks of 128
    weight = torch.randn(500, 32, generator=g)
    targets = torch.randint(0, 500, (300,), generator=g)
    row_weights = torch.rand(300, generator=g)

    def ours():
        return (LabelledCrossEntropyFunction.apply(hidden, weight, targets) * row_weights).sum()

    def ref():
        losses = F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
        return (losses * row_weights).sum()

    assert ours().item() == pytest.approx(ref().item(), rel=1e-5)
    _close(_grads(ours, hidden)[0], _grads(ref, hidden)[0])
    with torch.inference_mode():  # evaluation: losses only
        losses = LabelledCrossEntropyFunction.apply(hidden, weight, targets)
    _close(losses, F.cross_entropy(hidden.detach() @ weight.t(), targets, reduction="none"))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_equals_its_formula(dropout):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 24, generator=g, requires_grad=True)
    weight = torch.randn(40, 24, generator=g)
    a = torch.randn(4, 24, generator=g, requires_grad=True)
    b = torch.randn(40, 4, generator=g, requires_grad=True)
    keep = DropoutMasks(0).keep(x.shape, dropout, x.dtype, x.device) if dropout else None
    w = torch.randn(3, 50, 40, generator=g)

    def ours():
        return (LoraLinearFunction.apply(x, weight, None, a, b, 2.0, keep) * w).sum()

    def formula():
        dropped = x * keep if keep is not None else x
        return ((x @ weight.t() + 2.0 * (dropped @ a.t()) @ b.t()) * w).sum()

    assert ours().item() == pytest.approx(formula().item(), rel=1e-5)
    for got, want in zip(_grads(ours, x, a, b), _grads(formula, x, a, b), strict=True):
        _close(got, want)


def test_lora_linear_in_bf16_returns_fp32_lora_gradients():
    x = torch.randn(20, 16).bfloat16().requires_grad_()
    weight = torch.randn(8, 16).bfloat16()
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    out = LoraLinearFunction.apply(x, weight, None, a, b, 2.0, None)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert a.grad.dtype == b.grad.dtype == torch.float32
    ref_a = (2.0 * (torch.ones(20, 8) @ b.detach()).t() @ x.detach().float())
    _close(a.grad, ref_a, rtol=2e-2)  # bf16 activations: ~3 significant digits


def test_dropout_masks_are_dropout():
    masks = DropoutMasks(7)
    keep = masks.keep(torch.Size([400, 500]), 0.05, torch.float32, torch.device("cpu"))
    assert torch.unique(keep).tolist() == [0.0, pytest.approx(1 / 0.95)]
    assert (keep == 0).float().mean().item() == pytest.approx(0.05, abs=0.003)
    assert keep.mean().item() == pytest.approx(1.0, abs=0.01)  # expectation preserved
    again = DropoutMasks(7).keep(torch.Size([400, 500]), 0.05, torch.float32, torch.device("cpu"))
    assert torch.equal(keep, again)
    nxt = masks.keep(torch.Size([400, 500]), 0.05, torch.float32, torch.device("cpu"))
    assert not torch.equal(keep, nxt)  # the stream moves on


@pytest.fixture
def tiny_batch(tiny_model_dir, tiny_rows):
    tok = load_tokenizer(str(tiny_model_dir))
    examples = tokenize_rows(tok, tiny_rows[:8], cutoff_len=256, train_on_inputs=False)
    return tok, examples, collate(examples, tok.pad_token_id)


def _lora_model(tiny_model_dir, dropout=0.0, dtype="fp32"):
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype=dtype),
                        LoraSpec(dropout=dropout), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def test_fused_training_gives_the_stock_gradients(tiny_model_dir, tiny_batch):
    _, _, batch = tiny_batch
    model = _lora_model(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        return token_losses(model, batch)[0].mean()

    stock = _grads(loss, *params)
    with fused_training(model):
        ours = _grads(loss, *params)
    assert len(params) == 16
    for a, b in zip(ours, stock, strict=True):
        _close(a, b)


@pytest.mark.parametrize("dtype", ["auto", "fp32", "bf16"])
def test_each_path_gives_the_stock_gradients(tiny_model_dir, tiny_batch, dtype):
    """The path the CPU flags pick (auto: bf16 with AMX or AVX-512-BF16, else fp32), and
    each path forced whatever the CPU (bf16 runs emulated where it has no fast path)."""
    _, _, batch = tiny_batch
    picked = pick_dtype("cpu") if dtype == "auto" else parse_dtype(dtype)
    model = _lora_model(tiny_model_dir, dtype=dtype)
    truth_model = _lora_model(tiny_model_dir)  # the stock path in fp32
    assert next(model.parameters()).dtype in (picked, torch.float32)  # LoRA weights: fp32
    assert {p.dtype for n, p in model.named_parameters() if "lora" not in n} == {picked}
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(m):
        return lambda: token_losses(m, batch)[0].mean()

    truth = _grads(loss(truth_model), *[p for p in truth_model.parameters() if p.requires_grad])
    stock = _grads(loss(model), *params)
    with fused_training(model):
        ours = _grads(loss(model), *params)
    for a, b, t in zip(ours, stock, truth, strict=True):
        if picked == torch.float32:
            _close(a, b)
        else:  # bf16: no further from the fp32 truth than the stock bf16 modules are
            err_ours, err_stock = (a - t).abs().max(), (b - t).abs().max()
            assert err_ours <= 2 * err_stock + 1e-3 * t.abs().max(), (err_ours, err_stock)


def test_fused_training_gives_the_stock_gradients_on_long_rows(tiny_model_dir, monkeypatch):
    # 3 query blocks of attention; rows of different real lengths (right padding)
    calls = {"attention": 0, "lora": 0, "norm": 0, "mlp": 0}
    for fn, key in ((CausalAttentionFunction, "attention"), (LoraLinearFunction, "lora"),
                    (RMSNormFunction, "norm"), (GatedMLPFunction, "mlp")):
        def counted(*args, _apply=fn.apply, _key=key):
            calls[_key] += 1
            return _apply(*args)
        monkeypatch.setattr(fn, "apply", counted)
    model = _lora_model(tiny_model_dir)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 60, (3, 300), generator=g)
    labels = ids.clone()
    labels[:, :100] = -100
    labels[1, 250:] = -100
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        return token_losses(model, batch)[0].mean()

    stock = _grads(loss, *params)
    assert calls == {"attention": 0, "lora": 0, "norm": 0, "mlp": 0}
    with fused_training(model):
        ours = _grads(loss, *params)
    assert calls == {"attention": 2, "lora": 8, "norm": 5, "mlp": 2}  # 2 layers + final norm
    for a, b in zip(ours, stock, strict=True):
        _close(a, b)


def test_fused_training_restores_the_stock_modules(tiny_model_dir):
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _lora_model(tiny_model_dir, dropout=0.05)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(RuntimeError, match="boom"), fused_training(model):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa
        raise RuntimeError("boom")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    assert len(layers) == 8 and len(norms) == 5 and len(mlps) == 2  # 2 norms a layer + 1
    assert all("forward" not in vars(m) for m in layers + norms + mlps)


def test_fused_dropout_is_seeded_and_off_in_eval(tiny_model_dir, tiny_batch):
    _, _, batch = tiny_batch
    model = _lora_model(tiny_model_dir, dropout=0.3)

    def loss(seed):
        with torch.no_grad(), fused_training(model, seed=seed):
            return token_losses(model, batch)[0].mean().item()

    assert loss(0) == loss(0) != loss(1)
    model.eval()  # dropout off: every seed gives the stock loss
    with torch.no_grad():
        stock = token_losses(model, batch)[0].mean().item()
    assert loss(0) == pytest.approx(stock, rel=1e-6) and loss(1) == pytest.approx(stock, rel=1e-6)


def test_fused_and_stock_trainers_give_the_same_adapter(tiny_model_dir, tiny_batch):
    tok, examples, _ = tiny_batch
    model = _lora_model(tiny_model_dir)
    other = copy.deepcopy(model)
    base = dict(batch_size=4, micro_batch_size=4, lr=1e-3, max_steps=2)
    a = train_adapter(model, examples, TrainConfig(**base, fused=True), pad_id=tok.pad_token_id)
    b = train_adapter(other, examples, TrainConfig(**base, fused=False), pad_id=tok.pad_token_id)
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
    for x, y in zip(get_adapter_arrays(model), get_adapter_arrays(other), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_llamas(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 48))
    norm = norm.to(dtype).requires_grad_(False)
    x = (torch.randn(3, 20, 48) * 3).to(dtype).requires_grad_()
    w = torch.randn(3, 20, 48).to(dtype)
    ours = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    stock = norm(x)
    assert ours.dtype == stock.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    _close(ours.float(), stock.float(), rtol=1e-6 if dtype == torch.float32 else 1e-2)
    (got,) = _grads(lambda: (RMSNormFunction.apply(x, norm.weight, 1e-5) * w).float().sum(), x)
    (want,) = _grads(lambda: (norm(x) * w).float().sum(), x)
    _close(got.float(), want.float(), rtol=tol)


def test_gated_mlp_equals_llamas():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=24, intermediate_size=40, num_attention_heads=4)
    mlp = LlamaMLP(config).requires_grad_(False)
    x = torch.randn(2, 30, 24, requires_grad=True)
    w = torch.randn(2, 30, 24)
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])

    def ours():
        return (GatedMLPFunction.apply(x, gate_up, mlp.down_proj.weight) * w).sum()

    def stock():
        return (mlp(x) * w).sum()

    assert ours().item() == pytest.approx(stock().item(), rel=1e-5)
    _close(_grads(ours, x)[0], _grads(stock, x)[0])
