"""Where a training step's time goes: torch.profiler over fedit's trainer, by category.

    .venv/bin/python bench/profile_step.py                  # 48 dolly rows, batch 8, cutoff 512
    .venv/bin/python bench/profile_step.py --rows 96 --dtype fp32

Trains SmolLM2-135M with LoRA (fedit's defaults, the fused path) on ``--rows`` rows after
one untimed warm-up step, under ``torch.profiler``, and sums each operator's own time into:

  matmul q/o, k/v, MLP, lm_head   the frozen base's products, forward and input gradient,
                                  told apart by the weight's shape
  LoRA                            the rank-r products, dropout masks, casts and adds
  attention                       the score / softmax / value products and their backward
  norms & activations             RMSNorm, SiLU gate, residual adds inside those kernels
  loss                            the vocabulary-wide softmax of the cross-entropy
  optimizer                       AdamW's step and zeroing the gradients
  conversions & copies            dtype casts, copies and layouts outside the kernels above
  other operators                 embedding, rotary, residual adds, gradient clipping, ...
  Python & dispatch               the step's wall time that no operator accounts for

The fused kernels (``fedit.client.fused``) are labelled for the profile only, by wrapping
their forward and backward in ``record_function`` here; fedit itself is unchanged. Prints
a Markdown table (ms a step and share) and one JSON line. The profiler adds a little time
to each operator; shares are what to read, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
SHARED_DOLLY = ROOT.parent / "shared" / "data" / "databricks-dolly-15k.jsonl"
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
COPIES = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"}
LABELS = {  # fused kernel -> category of its operators other than the base matmuls
    "LabelledCrossEntropyFunction": "loss",
    "CausalAttentionFunction": "attention",
    "RMSNormFunction": "norms & activations",
    "GatedMLPFunction": "norms & activations",
    "LoraLinearFunction": "LoRA",
}
ORDER = ["matmul q/o", "matmul k/v", "matmul MLP", "matmul lm_head", "LoRA", "attention",
         "norms & activations", "loss", "optimizer", "conversions & copies",
         "other operators", "Python & dispatch"]


def label_kernels() -> None:
    """Wrap each fused kernel's forward and backward (and the dropout masks) in a
    ``record_function`` range named ``fedit::<kernel>``."""
    from fedit.client import fused

    def wrap(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            with record_function(f"fedit::{name}"):
                return fn(*args)
        return run

    for name in LABELS:
        cls = getattr(fused, name)
        cls.forward = staticmethod(wrap(cls.forward, name))
        cls.backward = staticmethod(wrap(cls.backward, name))
    fused.DropoutMasks.keep = wrap(fused.DropoutMasks.keep, "LoraLinearFunction")


def _label(event: Any) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("fedit::"):
            return LABELS[parent.name.removeprefix("fedit::")]
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        parent = parent.cpu_parent
    return None


def _matmul_kind(event: Any, config: Any, rank: int) -> str | None:
    shapes = [s for s in event.input_shapes if len(s) >= 2]
    if len(shapes) < 2:
        return None
    dims = {shapes[0][-1], shapes[1][-1], shapes[1][-2]}
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None)
                                       or h // config.num_attention_heads)
    if rank in dims:
        return "LoRA"
    if config.vocab_size in dims:
        return "matmul lm_head"
    if inter in dims or 2 * inter in dims:
        return "matmul MLP"
    if kv in dims and kv != h:
        return "matmul k/v"
    if dims == {h}:
        return "matmul q/o"
    return None


def categorise(events: Any, config: Any, rank: int) -> dict[str, float]:
    """Microseconds of operator self time per category (Python & dispatch not included)."""
    out: dict[str, float] = defaultdict(float)
    for ev in events:
        if not ev.name.startswith("aten::"):
            continue
        label = _label(ev)
        kind = _matmul_kind(ev, config, rank) if ev.name in MATMULS else None
        if kind is None:
            if label is not None:
                kind = label
            elif ev.name in COPIES:
                kind = "conversions & copies"
            else:
                kind = "other operators"
        out[kind] += ev.self_cpu_time_total
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cutoff", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", help="base weights: auto | bf16 | fp32")
    args = p.parse_args()

    from fedit.client.trainer import train_adapter
    from fedit.config import TrainConfig
    from fedit.data.batching import tokenize_rows
    from fedit.data.load import load_rows
    from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer
    from fedit.model.convert import resolve_model

    label_kernels()
    model_dir = resolve_model(args.model)
    source = str(SHARED_DOLLY) if SHARED_DOLLY.exists() else "dolly-15k"
    rows = random.Random(args.seed).sample(load_rows(source), args.rows + args.batch)
    tok = load_tokenizer(model_dir)
    model = attach_lora(load_base_model(model_dir, dtype=args.dtype), LoraSpec(), seed=args.seed)
    dtype = next(p.dtype for n, p in model.named_parameters() if "lora" not in n)
    examples = tokenize_rows(tok, rows, cutoff_len=args.cutoff)
    warm, timed = examples[: args.batch], examples[args.batch:]
    cfg = TrainConfig(batch_size=args.batch, micro_batch_size=args.batch, lr=3e-4)
    train_adapter(model, warm, cfg, pad_id=tok.pad_token_id, seed=args.seed)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        result = train_adapter(model, timed, cfg, pad_id=tok.pad_token_id, seed=args.seed)
        wall = time.perf_counter() - t0
    micros = categorise(prof.events(), model.config, LoraSpec().r)
    micros["Python & dispatch"] = max(0.0, wall * 1e6 - sum(micros.values()))
    steps = result.steps
    print(f"{steps} steps of batch {args.batch}, {result.tokens} tokens, {wall:.1f} s "
          f"({result.tokens / wall:.0f} tokens/s under the profiler), base weights "
          f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads\n")
    print("| where | ms a step | share |\n|---|---:|---:|")
    for name in ORDER:
        if micros.get(name):
            print(f"| {name} | {micros[name] / 1e3 / steps:.0f} | "
                  f"{micros[name] / (wall * 1e6):.1%} |")
    print(json.dumps({"steps": steps, "tokens": result.tokens, "seconds": wall,
                      "dtype": str(dtype), "ms_per_step": {k: v / 1e3 / steps
                                                           for k, v in micros.items()}}))


if __name__ == "__main__":
    main()
