"""Hand-written forward + backward for the hot spots of a LoRA training step on CPU.

Profiled on a 2-core CPU with a bf16 matmul path (SmolLM2-135M, batch 8 x 146, bf16 base;
see docs/performance.md), eager PyTorch + PEFT spent ~13% of a step drawing LoRA dropout
masks (``bernoulli_`` on torch's single-threaded generator), ~20% in SDPA's CPU flash
attention (23 ms a layer for 146 tokens: its backward is slow at head_dim 64), ~9% in the
vocabulary-wide log-softmax backward, and ~10% casting activations to fp32 and back around
every LoRA matmul. The functions below do the same mathematics with fewer passes:

- ``LoraLinearFunction``: ``x W^T + s * drop(x) A^T B^T`` in the activations' dtype (the
  fp32 LoRA weights are cast, not the activations: what bf16 autocast does), the dropout
  mask drawn 16 bits at a time from numpy's PCG64, only ``drop(x)`` and ``drop(x) A^T``
  kept for the backward pass, no weight gradient for the frozen base;
- ``CausalAttentionFunction``: causal GQA attention as batched matmuls with the query heads
  of one KV head stacked (bigger, faster GEMMs), split into query blocks for long
  sequences so that blocks above the diagonal are never computed;
- ``LabelledCrossEntropyFunction``: lm_head + cross-entropy over the labelled positions in
  chunks of rows, the vocabulary-wide gradient ``softmax - onehot`` folded into the
  hidden-state gradient while the chunk's logits are still in cache (logits are never kept);
- ``RMSNormFunction``: Llama's RMSNorm with a frozen weight, its backward written out;
- ``GatedMLPFunction``: the SiLU-gated MLP with gate and up as one GEMM.

``fused_training(model)`` switches LoRA, RMSNorm, MLP and attention on for a CPU model while
it trains; ``labelled_cross_entropy`` is called by the loss itself, on any device.
The mathematics is that of the modules they replace: tests compare every gradient with
the eager path in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedit.model.base import model_type

CE_CHUNK = 128  # rows of logits at a time: 128 x 49,152 bf16 = 12.6 MB, inside the L3 cache
ATTN_BLOCK = 64  # query rows a block beyond 2 blocks (1.5-2x faster than 128 here: L2)


# --- lm_head + cross-entropy -------------------------------------------------------------


class LabelledCrossEntropyFunction(torch.autograd.Function):
    """Per-row cross-entropy of ``hidden @ weight^T`` against ``targets`` (fp32 losses).

    The gradient with respect to ``hidden`` is computed in the forward pass, chunk by chunk
    (``(softmax(logits) - onehot(target)) @ weight``), and only scaled by the incoming
    per-row gradient in the backward pass: the (rows x vocabulary) logits never leave the
    chunk. ``weight`` is frozen (no gradient)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        # One set of chunk buffers, reused: a fresh 25 MB tensor a chunk was page-faulted
        # in each time (glibc hands large blocks back to the kernel), ~10x the kernel itself.
        chunk = min(CE_CHUNK, n_rows)
        logits_buf = hidden.new_empty(chunk, vocab)
        log_probs_buf = torch.empty(chunk, vocab, dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, chunk):
            rows = slice(start, start + chunk)
            target = targets[rows]
            n = target.shape[0]
            logits = torch.mm(hidden[rows], weight.t(), out=logits_buf[:n])
            # fp32 log-softmax from the bf16 logits: one pass, 2x faster than logsumexp here
            log_probs = torch.log_softmax(logits, -1, dtype=torch.float32, out=log_probs_buf[:n])
            losses[rows] = -log_probs.gather(1, target[:, None]).squeeze(1)
            if grad is not None:
                probs = torch.softmax(logits, -1, out=logits)  # fp32 inside, logits' dtype
                probs[torch.arange(n, device=probs.device), target] -= 1
                torch.mm(probs, weight, out=grad[rows])
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        grad_hidden = (grad.float() * grad_losses[:, None]).to(grad.dtype)
        return grad_hidden, None, None


def labelled_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module,
                           targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (fp32, one value per row) of the output projection ``head``."""
    if getattr(head, "bias", None) is not None or not hasattr(head, "weight"):
        logits = head(hidden).float()  # an unusual head: the plain path
        return F.cross_entropy(logits, targets, reduction="none")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return LabelledCrossEntropyFunction.apply(hidden, head.weight, targets)


# --- LoRA linear ---------------------------------------------------------------------------


class DropoutMasks:
    """Dropout keep-masks drawn from numpy's PCG64 (16 random bits per element).

    torch's CPU generator (mt19937, one thread) took 4.4 ms per mask of 1168 x 576 here,
    numpy's PCG64 0.2 ms; 16 bits resolve p to 1/65,536 (0.05 -> 0.050003)."""

    def __init__(self, seed: int) -> None:
        self._bits = np.random.PCG64(seed)

    def keep(self, shape: torch.Size, p: float, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        """A tensor of ``0`` (dropped) and ``1 / (1 - p)`` (kept), like ``nn.Dropout``."""
        n = int(np.prod(shape))
        words = self._bits.random_raw((n + 3) // 4)
        bits = torch.from_numpy(words.view(np.uint16)[:n].view(np.int16)).view(shape)
        threshold = round(p * 65536) - 32768  # keep when the 16-bit value is >= p * 2^16
        keep = (bits >= threshold).to(device=device, dtype=dtype)
        return keep.mul_(1.0 / (1.0 - p))


class LoraLinearFunction(torch.autograd.Function):
    """``y = x W^T (+ bias) + scaling * ((x * keep) A^T) B^T`` with a frozen ``W``.

    Computed in ``x``'s dtype (``A`` and ``B`` are cast to it); their gradients come back
    in their own dtype (fp32). ``keep`` is a dropout mask with its scale, or ``None``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                keep: torch.Tensor | None) -> torch.Tensor:
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        dropped = x2 * keep.reshape(x2.shape) if keep is not None else x2
        low = dropped @ a.t()  # (tokens, r)
        out = F.linear(x2, weight, bias)
        out.addmm_(low, b.t(), alpha=scaling)
        ctx.save_for_backward(dropped, low, weight, a, b, keep)
        ctx.scaling, ctx.lora_dtypes = scaling, (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        dropped, low, weight, a, b, keep = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_low = (g @ b).mul_(ctx.scaling)  # (tokens, r)
        grad_a = (grad_low.t() @ dropped).to(ctx.lora_dtypes[0])
        grad_b = (g.t() @ low).mul_(ctx.scaling).to(ctx.lora_dtypes[1])
        grad_x = g @ weight
        if keep is None:
            grad_x.addmm_(grad_low, a)
        else:
            grad_x.add_((grad_low @ a).mul_(keep.reshape(grad_x.shape)))
        grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, grad_a, grad_b, None, None


def _fused_lora_forward(layer: Any, masks: DropoutMasks) -> Any:
    """A ``forward`` for one PEFT ``lora.Linear`` that takes ``LoraLinearFunction``
    whenever the layer is in plain single-adapter LoRA use, PEFT's own forward otherwise."""
    peft_forward = layer.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = layer.active_adapters
        if (args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1
                or active[0] not in layer.lora_A or active[0] in layer.lora_variant):
            return peft_forward(x, *args, **kwargs)
        name = active[0]
        dropout = layer.lora_dropout[name]
        p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
        keep = masks.keep(x.shape, p, x.dtype, x.device) if p > 0 else None
        base = layer.base_layer
        return LoraLinearFunction.apply(x, base.weight, base.bias, layer.lora_A[name].weight,
                                        layer.lora_B[name].weight, layer.scaling[name], keep)

    return forward


# --- RMSNorm --------------------------------------------------------------------------------

# RMSNorms that compute exactly ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``
RMSNORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class RMSNormFunction(torch.autograd.Function):
    """Llama's RMSNorm with a frozen weight: statistics in fp32, output in ``x``'s dtype.

    Keeps only ``x`` and the per-row ``rsqrt`` for the backward pass, which is written out
    (``dx = rstd * (g w - x_hat * mean(g w x_hat))``) instead of replayed op by op."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
        rstd = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, weight, rstd = ctx.saved_tensors
        gw = (grad_out * weight).float()
        x_hat = x.float() * rstd
        dot = (gw * x_hat).mean(-1, keepdim=True)
        grad_x = gw.sub_(x_hat.mul_(dot)).mul_(rstd)
        return grad_x.to(x.dtype), None, None


def _fused_rmsnorm_forward(norm: Any) -> Any:
    stock = norm.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if norm.weight.requires_grad or not torch.is_grad_enabled():
            return stock(x)
        return RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)

    return forward


# --- MLP ------------------------------------------------------------------------------------

# MLPs that compute exactly ``down(silu(gate(x)) * up(x))`` with bias-free linears
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


class GatedMLPFunction(torch.autograd.Function):
    """``down(silu(x Wg^T) * x Wu^T)`` with frozen weights, gate and up in one GEMM.

    ``gate_up`` is ``cat([Wg, Wu])``: one (tokens x 2I) product instead of two, and one
    (tokens x 2I) @ (2I x h) product for the input gradient instead of two and an add.
    Only that product is kept for the backward pass (the activation is recomputed)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        gu = x2 @ gate_up.t()
        inter = gate_up.shape[0] // 2
        gate, up = gu[:, :inter], gu[:, inter:]
        out = (F.silu(gate).mul_(up)) @ down.t()
        ctx.save_for_backward(gu, gate_up, down)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        gu, gate_up, down = ctx.saved_tensors
        inter = gate_up.shape[0] // 2
        gate, up = gu[:, :inter], gu[:, inter:]
        grad_h = grad_out.reshape(-1, grad_out.shape[-1]) @ down
        grad_gu = torch.empty_like(gu)
        torch.ops.aten.silu_backward(grad_h * up, gate, grad_input=grad_gu[:, :inter])
        torch.mul(grad_h, F.silu(gate), out=grad_gu[:, inter:])
        grad_x = grad_gu @ gate_up
        return grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]), None, None


def _plain_mlp(mlp: Any) -> bool:
    projections = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    silu = type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
    return (type(mlp).__name__ in MLP_CLASSES and silu
            and all(type(p) is torch.nn.Linear and p.bias is None
                    and not p.weight.requires_grad for p in projections))


def _fused_mlp_forward(mlp: Any) -> Any:
    stock = mlp.forward
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return stock(x)
        return GatedMLPFunction.apply(x, gate_up, mlp.down_proj.weight)

    return forward


# --- causal attention ----------------------------------------------------------------------


class CausalAttentionFunction(torch.autograd.Function):
    """Causal attention of ``q`` (B, H, L, D) over ``k``, ``v`` (B, KV, L, D), H = G x KV.

    Returns (B, L, H, D), as transformers' attention functions do. Queries are processed in
    blocks of ``ATTN_BLOCK`` rows once ``L`` exceeds two blocks; each block only meets the
    keys up to its last row. The G query heads of a KV head form one matrix, so each
    product is one GEMM of G x block rows. ``allowed`` (B, 1, L, L) bool, optional: where
    a query may attend a key, on top of causality (DPO's packed pairs); it must leave each
    query at least one key. A masked score's probability is 0, so the backward needs no
    mask."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scaling: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
        batch, heads, length, dim = q.shape
        kv = k.shape[1]
        groups = heads // kv
        v = v.contiguous()  # transformers hands a transposed view
        out = q.new_empty(batch, length, heads, dim)
        saved: list[torch.Tensor] = []
        for start, end in _blocks(length):
            n = end - start
            qb = (q[:, :, start:end] * scaling).reshape(batch, kv, groups * n, dim)
            scores = qb @ k[:, :, :end].transpose(-1, -2)  # (B, KV, G n, end)
            # only the block's own (diagonal) columns hold keys after some of its queries
            above = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
            scores.view(batch, kv, groups, n, end)[..., start:].masked_fill_(above, float("-inf"))
            if allowed is not None:
                block = allowed[:, :, start:end, :end].unsqueeze(2)  # (B, 1, 1, n, end)
                scores.view(batch, kv, groups, n, end).masked_fill_(~block, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            ob = probs @ v[:, :, :end]  # (B, KV, G n, D)
            out[:, start:end] = ob.view(batch, heads, n, dim).transpose(1, 2)
            saved += [qb, probs]
        ctx.save_for_backward(k, v, *saved)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        k, v, *saved = ctx.saved_tensors
        batch, length, heads, dim = grad_out.shape
        kv = k.shape[1]
        groups = heads // kv
        grad_q = grad_out.new_empty(batch, heads, length, dim)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for i, (start, end) in enumerate(_blocks(length)):
            qb, probs = saved[2 * i], saved[2 * i + 1]
            n = end - start
            gob = grad_out[:, start:end].transpose(1, 2).reshape(batch, kv, groups * n, dim)
            grad_v[:, :, :end] += probs.transpose(-1, -2) @ gob
            grad_probs = gob @ v[:, :, :end].transpose(-1, -2)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_q[:, :, start:end] = (grad_scores @ k[:, :, :end]).mul_(ctx.scaling).view(
                batch, heads, n, dim)
            grad_k[:, :, :end] += grad_scores.transpose(-1, -2) @ qb
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


def _blocks(length: int) -> list[tuple[int, int]]:
    if length <= 2 * ATTN_BLOCK:
        return [(0, length)]
    return [(s, min(s + ATTN_BLOCK, length)) for s in range(0, length, ATTN_BLOCK)]


def _fused_attention(sdpa: Any) -> Any:
    """An attention function for transformers' registry: ``CausalAttentionFunction`` for a
    causal training forward with no mask (or a boolean (B, 1, L, L) one: DPO's packed
    pairs), no dropout and no cache; ``sdpa`` otherwise."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None,
                  dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
        mask = attention_mask
        square = (mask is not None and mask.dtype == torch.bool and mask.dim() == 4
                  and mask.shape[1] == 1 and mask.shape[2] == mask.shape[3] == query.shape[2])
        plain = ((mask is None or square) and dropout == 0.0 and query.shape[2] > 1
                 and query.shape[2] == key.shape[2] and getattr(module, "is_causal", True)
                 and query.shape[1] % key.shape[1] == 0 and torch.is_grad_enabled()
                 and not kwargs.get("output_attentions") and kwargs.get("softcap") is None
                 and kwargs.get("sliding_window") is None)
        if not plain:
            return sdpa(module, query, key, value, attention_mask, dropout=dropout,
                        scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return CausalAttentionFunction.apply(query, key, value, scale, mask), None

    return attention


# --- switching them on ---------------------------------------------------------------------

#: architectures (``config.model_type``) whose modules the kernels above reproduce
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def fused_supported(model: torch.nn.Module) -> bool:
    """Whether ``fused_training`` applies to the model: Llama-like architectures only."""
    return model_type(model) in FUSED_MODEL_TYPES


def fused_note(model: torch.nn.Module) -> str | None:
    """The line a log says once when the fused kernels cannot apply (None when they can)."""
    if fused_supported(model):
        return None
    return (f"fused kernels: off for {model_type(model)} (only llama-like models: "
            f"{', '.join(sorted(FUSED_MODEL_TYPES))}); stock PyTorch path")



@contextmanager
def fused_training(model: torch.nn.Module, seed: int = 0, enabled: bool = True
                   ) -> Iterator[None]:
    """Inside the block, PEFT LoRA linears, Llama-style RMSNorms and gated MLPs, and the
    model's SDPA attention run fused.

    LoRA dropout masks come from ``DropoutMasks(seed)``. Only a causal forward with
    gradients and no attention mask takes the fused attention (training); evaluation,
    generation and anything unusual (merged or several adapters, DoRA, masks, caches) take
    the stock path. Everything is restored on exit. CPU only: on other devices the block
    changes nothing (``labelled_cross_entropy`` serves every device)."""
    if not enabled or next(model.parameters()).device.type != "cpu":
        yield  # on CUDA, SDPA's flash kernels and the device's own RNG are the fast path
        return
    if not fused_supported(model):
        yield  # GPT-2's Conv1D, fused QKV, LayerNorm...: the stock modules know their own
        return
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    masks = DropoutMasks(seed)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    norms = [m for m in model.modules() if type(m).__name__ in RMSNORM_CLASSES]
    mlps = [m for m in model.modules() if _plain_mlp(m)]  # a LoRA on gate/up/down: stock
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    try:
        for layer in layers:
            layer.forward = _fused_lora_forward(layer, masks)  # type: ignore[method-assign]
        for norm in norms:
            norm.forward = _fused_rmsnorm_forward(norm)
        for mlp in mlps:
            mlp.forward = _fused_mlp_forward(mlp)
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _fused_attention(sdpa)
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        for module in layers + norms + mlps:
            module.__dict__.pop("forward", None)
