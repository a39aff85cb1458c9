"""What this CPU's matmuls can do: the 2048^3 peak and a limit on the model's own shapes.

A 2048^3 product is the usual peak, but a LoRA step on a 135M model never runs one: its
products are (tokens x 576) by this model's 576 x 576, 576 x 192, 576 x 1536 and
576 x 49,152 weights, forward and transposed for the input gradients, and their speed
differs from the square's (on an AMX Xeon 2.3-2.7 TFLOP/s against 1.8-1.9 for 2048^3; the
lm_head's 0.94). ``shape_limit`` times each of those products at the run's tokens per
batch, best of ``reps``, and weighs them by how often a step runs each: the TFLOP/s a
step's matmul work could reach on this machine if nothing else took time. MFU against it
holds still between runs where the 2048^3 figure moves (best of several, too).

Used by ``train_throughput.py`` and ``profile_step.py``; run alone it prints both limits:

    .venv/bin/python bench/limits.py --tokens 1536 --labelled 1000
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

SLOW_PATH_TFLOPS = 0.01  # below this a dtype has no fast path here (bf16 without AVX-512)


def _best_seconds(fn: Any, reps: int) -> float:
    fn()  # warm-up: first touch of the output's memory, oneDNN's kernel choice
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def square_peak(dtype: torch.dtype, n: int = 2048, reps: int = 9) -> float:
    """Best TFLOP/s of an n^3 matmul in ``dtype`` over ``reps`` repetitions.

    A dtype with no fast path here (bf16 without AVX-512-BF16 or AMX ran at ~0.0003
    TFLOP/s: a 2048^3 product would take a minute) is measured once at 512^3."""
    small = 2 * 512**3 / _best_seconds(_product(512, 512, 512, dtype), 1) / 1e12
    if small < SLOW_PATH_TFLOPS:
        return small
    return 2 * n**3 / _best_seconds(_product(n, n, n, dtype), reps) / 1e12


def _product(m: int, k: int, n: int, dtype: torch.dtype, forward: bool = True) -> Any:
    """(m x k) @ (k x n) with the weight stored as a Linear stores it: forward ``x W^T``
    (W is n x k), input gradient ``dy W`` (W is k x n, untransposed)."""
    a = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k).to(dtype) if forward else torch.randn(k, n).to(dtype)
    b = w.t() if forward else w
    out = torch.empty(m, n, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


@dataclass(frozen=True)
class Gemm:
    """One product a training step runs: (rows x k) @ (k x n), ``count`` times a step."""

    name: str
    rows: int
    k: int
    n: int
    count: int
    forward: bool = True

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.k * self.n


def model_gemms(config: Any, tokens: int, labelled: int) -> list[Gemm]:
    """The frozen base's products in one step of ``tokens`` positions (``labelled`` of them
    reach the lm_head): each weight forward (x W^T) and for the input gradient (dy W)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    out: list[Gemm] = []
    for name, d_in, d_out, per_layer in (("q/o", h, q, 2), ("k/v", h, kv, 2),
                                         ("mlp gate/up", h, inter, 2), ("mlp down", inter, h, 1)):
        out.append(Gemm(f"{name} forward", tokens, d_in, d_out, per_layer * layers))
        out.append(Gemm(f"{name} input grad", tokens, d_out, d_in, per_layer * layers, False))
    if labelled:
        out.append(Gemm("lm_head forward", labelled, h, config.vocab_size, 1))
        out.append(Gemm("lm_head input grad", labelled, config.vocab_size, h, 1, False))
    return out


def shape_limit(config: Any, tokens: int, labelled: int, dtype: torch.dtype,
                reps: int = 7) -> dict[str, Any]:
    """The step's matmul FLOPs over the best seconds of its products at these shapes."""
    gemms = model_gemms(config, tokens, labelled)
    shapes: dict[str, float] = {}
    flops = seconds = 0.0
    for g in gemms:
        best = _best_seconds(_product(g.rows, g.k, g.n, dtype, g.forward), reps)
        shapes[f"{g.name} ({g.rows}x{g.k}x{g.n})"] = g.flops / best / 1e12
        flops += g.count * g.flops
        seconds += g.count * best
    return {"tflops": flops / seconds / 1e12, "tokens": tokens, "labelled": labelled,
            "step_matmul_s": seconds, "shapes_tflops": shapes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=1536, help="positions a batch")
    p.add_argument("--labelled", type=int, default=1000, help="of them with a label")
    p.add_argument("--dtype", default="fp32", help="bf16 | fp32")
    args = p.parse_args()
    from transformers import AutoConfig

    from fedit.model.convert import resolve_model

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    config = AutoConfig.from_pretrained(resolve_model(args.model))
    print(json.dumps({"square_2048_tflops": square_peak(dtype),
                      "shape_limit": shape_limit(config, args.tokens, args.labelled, dtype)}))


if __name__ == "__main__":
    main()
