"""Local-training throughput: the reference recipe against fedit's trainer, in one process.

    .venv/bin/python bench/train_throughput.py                 # 256 dolly rows, batch 8, cutoff 512
    .venv/bin/python bench/train_throughput.py --rows 64       # quicker
    .venv/bin/python bench/train_throughput.py --rows 64 --baseline db026b5 --pairs 4
                                          # fedit and fedit_hook against fedit at db026b5

Arms, on the same rows, model, LoRA config (r=8 on q/k/v/o), cutoff and batch size:
  reference     FederatedGPT-Shepherd's client: transformers.Trainer + PEFT LoRA +
                DataCollatorForSeq2Seq, fp32, train_on_inputs (loss on every token), random
                batches padded to the longest row
  fedit         fedit's trainer with its defaults (loss on response tokens only)
  fedit_inputs  fedit with train_on_inputs = true: the same work as the reference
  fedit_unfused (not by default) fedit's defaults with train.fused = false: the stock
                PEFT / SDPA / cross-entropy modules in fedit's loop
  fedit_compile (not by default) train.compile = true, which trains unfused (its seconds
                include compiling; first_step_s shows what the first step took)
  fedit_hook    (not by default) fedit with an active trainer hook that changes nothing:
                FedProx's proximal term mu/2 * ||w - w0||^2 over the LoRA weights, mu = 0
                (its forward and backward run every step), so its cost shows
  eval_generate held-out loss (one row at a time with transformers' loss vs fedit's no-grad
                batches of 32) and greedy generation (one prompt at a time vs batches of
                16, left-padded, KV cache), tokens/s of each and the ratio

Before its timed epoch, every arm takes one untimed step on its longest batch and then
restores its LoRA weights (``--no-warmup`` skips it): on these VMs the first touch of
memory costs ~1 ms per MB, so whichever arm ran first would otherwise pay for the process
growing to its peak (~13 s for fedit's first epoch of 64 rows here).

``--baseline REV`` compares trees instead: the fedit arm on ``src/`` of git revision REV
(extracted with ``git archive`` into $TMPDIR; the checkout is untouched) against the fedit
and fedit_hook arms (``--arms``) of this checkout, each in its own process, in rotating
order, ``--pairs`` times; it prints each run, then the median tokens/s of each and the
ratios to the baseline, also per repetition (runs next to each other in time).

Each prints one JSON line: tokens/s over real (non-pad) tokens, seconds, final loss, peak
RSS. Then the ratios to the reference, the machine's measured matmul peaks (2048^3, bf16
and fp32, best of 9), and each arm's MFU: model FLOPs of the work the configuration
requires (2 x matmul params per token forward + the same backward for input gradients,
lm_head only where a label is, LoRA, causal attention) over seconds, against the peak of
the dtype the arm's base weights use (``mfu``) and against the limit of the model's own
matmul shapes at the arm's tokens per batch (``mfu_shapes``, ``limits.shape_limit``: each
product forward and for its input gradient, best of 7; it holds still where the 2048^3
figure moves between runs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from limits import shape_limit, square_peak

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("reference", "fedit", "fedit_inputs", "fedit_unfused", "fedit_compile", "fedit_hook",
        "eval_generate")
SHARED_DOLLY = ROOT.parent / "shared" / "data" / "databricks-dolly-15k.jsonl"


# --- the machine ---------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), platform.processor())
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith("flags")), []))
    return {
        "cpu": model,
        "amx": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512f": "avx512f" in flags,
        "flags": sorted(flags & {"amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2"}),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- work per token --------------------------------------------------------------------


def model_flops(config: Any, lengths: Sequence[int], labelled: Sequence[int], lora_r: int,
                lora_targets: int = 4) -> float:
    """FLOPs a frozen-base LoRA step needs for rows of these lengths and label counts.

    Forward is 2 x params per token; backward computes input gradients only (the base is
    frozen): 2 x params again. lm_head runs only where a label is. LoRA adds forward,
    input- and weight-gradient work (6 x its params). Causal attention: QK^T and AV, half
    the square, three times forward for forward + backward.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    layer_params = 2 * h * h + 2 * h * kv + 3 * h * inter
    lora_params = lora_targets * lora_r * 2 * h  # q/k/v/o: (in + out) * r, ~2h each
    head_params = h * config.vocab_size
    q_width = config.num_attention_heads * head_dim
    total = 0.0
    for n, m in zip(lengths, labelled, strict=True):
        total += 4 * layer_params * layers * n + 4 * head_params * m
        total += 6 * lora_params * layers * n
        total += 3 * 2 * 2 * q_width * (n * (n + 1) / 2) * layers
    return total


# --- the arms --------------------------------------------------------------------------


@contextmanager
def untouched_trainables(model: torch.nn.Module) -> Iterator[None]:
    """Whatever the block does to the trainable (LoRA) weights is undone on exit."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
                    p.grad = None


def longest(items: Sequence[Any], n: int, length: Callable[[Any], int]) -> list[Any]:
    """The ``n`` longest items: one warm-up batch that reaches the arm's peak memory."""
    return sorted(items, key=length)[-n:]


def load_rows(n: int, seed: int) -> list[dict[str, Any]]:
    from fedit.data.load import load_rows as fedit_load

    source = str(SHARED_DOLLY) if SHARED_DOLLY.exists() else "dolly-15k"
    rows = fedit_load(source)
    return random.Random(seed).sample(rows, n)


def run_reference(model_dir: str, rows: list[dict[str, Any]], args: argparse.Namespace
                  ) -> dict[str, Any]:
    """Shepherd's client: Trainer + PEFT + DataCollatorForSeq2Seq, fp32, train_on_inputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from fedit.data.prompts import build_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))

    def tokenize(row: dict[str, Any]) -> dict[str, list[int]]:
        # Shepherd's generate_and_tokenize_prompt with train_on_inputs: labels = input_ids
        out = tok(build_prompt(row) + row["response"], truncation=True,
                  max_length=args.cutoff, padding=False)
        ids = list(out["input_ids"])
        if ids[-1] != tok.eos_token_id and len(ids) < args.cutoff:
            ids.append(tok.eos_token_id)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    data = [tokenize(r) for r in rows]
    targs = TrainingArguments(
        output_dir=str(args.tmp / "reference"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=3e-4,
        logging_steps=1, optim="adamw_torch", save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, seed=args.seed,
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8, return_tensors="pt",
                                      padding=True)
    if args.warmup:  # one untimed step on the longest rows, then the weights as they were
        warm_args = TrainingArguments(**{**targs.to_dict(), "max_steps": 1})
        warm = Trainer(model=model, args=warm_args, data_collator=collator,
                       train_dataset=longest(data, args.batch, lambda d: len(d["input_ids"])))
        warm.remove_callback(PrinterCallback)
        with untouched_trainables(model):
            warm.train()
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # keep stdout to our JSON lines
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    lengths = [len(d["input_ids"]) for d in data]
    return _result("reference", model.config, lengths, [n - 1 for n in lengths], seconds,
                   losses[-1], rss.peak, torch.float32, args.batch)


def proximal_hook(model: torch.nn.Module, mu: float) -> Any:
    """FedProx's proximal term ``mu / 2 * ||w - w0||^2`` over the LoRA weights (``w0``: as
    they are now) as a trainer hook; ``correct`` is not overridden, so the trainer skips it."""
    from fedit.algorithms.contract import TrainHook

    class Proximal(TrainHook):
        def __init__(self, params: list[torch.Tensor]) -> None:
            self.start = [p.detach().clone() for p in params]

        def loss(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
            square = sum(((p - w0) ** 2).sum() for p, w0 in zip(params, self.start, strict=True))
            return mu / 2 * square

    return Proximal([p for p in model.parameters() if p.requires_grad])


def run_fedit(model_dir: str, rows: list[dict[str, Any]], args: argparse.Namespace,
              train_on_inputs: bool, name: str, compile: bool = False, fused: bool = True,
              hook: bool = False) -> dict[str, Any]:
    from fedit.client.trainer import train_adapter
    from fedit.config import TrainConfig
    from fedit.data.batching import tokenize_rows
    from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = attach_lora(load_base_model(model_dir, dtype=args.dtype), LoraSpec(), seed=args.seed)
    dtype = next(p.dtype for n, p in model.named_parameters() if "lora" not in n)
    examples = tokenize_rows(tok, rows, cutoff_len=args.cutoff, train_on_inputs=train_on_inputs)
    cfg = TrainConfig(batch_size=args.batch, micro_batch_size=args.batch, lr=3e-4,
                      compile=compile, fused=fused)
    # Only an arm with a hook passes ``hook=``: the trees before it (--baseline) lack it
    kwargs = {"hook": proximal_hook(model, mu=0.0)} if hook else {}
    last: list[float] = []
    stamps: list[float] = []

    def progress(step: int, total: int, loss: float) -> None:
        last.append(loss)
        stamps.append(time.perf_counter())

    if args.warmup:  # one untimed step on the longest rows, then the weights as they were
        warm = longest(examples, args.batch, lambda e: len(e.input_ids))
        with untouched_trainables(model):
            train_adapter(model, warm, replace(cfg, max_steps=1), pad_id=tok.pad_token_id,
                          **kwargs)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        result = train_adapter(model, examples, cfg, pad_id=tok.pad_token_id, seed=args.seed,
                               progress=progress, **kwargs)
    lengths = [len(e.input_ids) for e in examples]
    labelled = [e.num_labels - (e.labels[0] != -100) for e in examples]
    out = _result(name, model.config, lengths, labelled, result.seconds, last[-1], rss.peak,
                  dtype, args.batch)
    out["first_step_s"] = stamps[0] - t0
    return out


def run_eval_generate(model_dir: str, rows: list[dict[str, Any]], args: argparse.Namespace
                      ) -> dict[str, Any]:
    """Held-out loss and greedy generation, one row at a time against fedit's batching.

    Same model (fedit's dtype) on both sides. Loss: transformers' own loss on each row
    alone, against ``example_losses`` in no-grad batches sorted by length (up to 32 rows
    and its 2,048-position cap). Generation:
    ``generate_answers`` with batch_size 1 against its default (16 prompts a batch, left
    padded, KV cache), ``--gen-rows`` prompts and ``--gen-tokens`` new tokens each."""
    from fedit.client.losses import example_losses
    from fedit.data.batching import tokenize_rows
    from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer
    from fedit.model.generate import generate_answers

    tok = load_tokenizer(model_dir)
    model = attach_lora(load_base_model(model_dir, dtype=args.dtype), LoraSpec(), seed=args.seed)
    examples = tokenize_rows(tok, rows[: args.eval_rows], cutoff_len=args.cutoff)
    tokens = sum(len(e.input_ids) for e in examples)
    out: dict[str, Any] = {"arm": "eval_generate", "eval_rows": len(examples),
                           "eval_tokens": tokens}
    with torch.inference_mode():
        t0 = time.perf_counter()
        for e in examples:
            model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
        one = time.perf_counter() - t0
    t0 = time.perf_counter()
    example_losses(model, examples, batch_size=32, pad_id=tok.pad_token_id)
    batched = time.perf_counter() - t0
    out |= {"eval_tokens_per_s_one_by_one": tokens / one, "eval_tokens_per_s": tokens / batched,
            "eval_speedup": one / batched}
    prompts = rows[: args.gen_rows]
    for name, batch in (("one_by_one", 1), ("batched", 16)):
        t0 = time.perf_counter()
        gen = generate_answers(model, tok, prompts, max_new_tokens=args.gen_tokens,
                               batch_size=batch)
        out[f"gen_tokens_per_s_{name}"] = gen.new_tokens / (time.perf_counter() - t0)
        out[f"gen_new_tokens_{name}"] = gen.new_tokens
    out["gen_speedup"] = out["gen_tokens_per_s_batched"] / out["gen_tokens_per_s_one_by_one"]
    return out


def _result(arm: str, config: Any, lengths: list[int], labelled: list[int], seconds: float,
            loss: float, peak: int, dtype: torch.dtype, batch: int) -> dict[str, Any]:
    batches = -(-len(lengths) // batch)
    return {
        "arm": arm,
        "rows": len(lengths),
        "tokens": sum(lengths),
        "tokens_per_s": sum(lengths) / seconds,
        "seconds": seconds,
        "final_loss": loss,
        "peak_rss_gb": peak / 2**30,
        "dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype],
        "model_tflop": model_flops(config, lengths, labelled, lora_r=8) / 1e12,
        "tokens_per_batch": round(sum(lengths) / batches),
        "labelled_per_batch": round(sum(labelled) / batches),
    }


def arm_table(model_dir: str, rows: list[dict[str, Any]], args: argparse.Namespace
              ) -> dict[str, Callable[[], dict[str, Any]]]:
    return {
        "reference": lambda: run_reference(model_dir, rows, args),
        "fedit": lambda: run_fedit(model_dir, rows, args, False, "fedit"),
        "fedit_inputs": lambda: run_fedit(model_dir, rows, args, True, "fedit_inputs"),
        "fedit_unfused": lambda: run_fedit(model_dir, rows, args, False, "fedit_unfused",
                                           fused=False),
        "fedit_compile": lambda: run_fedit(model_dir, rows, args, False, "fedit_compile",
                                           compile=True),
        "fedit_hook": lambda: run_fedit(model_dir, rows, args, False, "fedit_hook", hook=True),
        "eval_generate": lambda: run_eval_generate(model_dir, rows, args),
    }


class ShapeLimits:
    """``limits.shape_limit`` for an arm's dtype and tokens per batch, measured once each."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(model_dir)
        self.seen: dict[tuple[str, int, int], dict[str, Any]] = {}

    def mfu(self, r: dict[str, Any]) -> dict[str, Any]:
        key = (r["dtype"], r["tokens_per_batch"], r["labelled_per_batch"])
        if key not in self.seen:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[r["dtype"]]
            self.seen[key] = shape_limit(self.config, key[1], key[2], dtype)
            print(json.dumps({"shape_limit": self.seen[key], "dtype": r["dtype"]}), flush=True)
        limit = self.seen[key]["tflops"]
        return {"shape_limit_tflops": limit,
                "mfu_shapes": r["model_tflop"] / r["seconds"] / limit}


# --- --baseline: this checkout against an earlier revision, one process per run ---------


def baseline_src(rev: str, tmp: Path) -> Path:
    """``src/`` of git revision ``rev``, extracted once under ``tmp`` (``git archive``: the
    checkout, its index and its worktree list stay as they are)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    out = tmp / f"src-{sha[:12]}"
    if not (out / "src" / "fedit").is_dir():
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "src"], check=True,
                             capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(out, filter="data")
    return out / "src"


def run_child(args: argparse.Namespace, arm: str, src: Path, model_dir: str, rows_file: Path
              ) -> dict[str, Any]:
    """One arm in a fresh process that imports fedit from ``src``."""
    cmd = [sys.executable, __file__, "--child", "--arms", arm, "--model", model_dir,
           "--rows-file", str(rows_file), "--cutoff", str(args.cutoff), "--batch",
           str(args.batch), "--seed", str(args.seed), "--dtype", args.dtype]
    cmd += [] if args.warmup else ["--no-warmup"]
    path = os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                                                     "PYTHONPATH": path})
    if done.returncode:
        sys.exit(f"{arm} on {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace, model_dir: str, rows: list[dict[str, Any]],
            peaks: dict[str, float]) -> dict[str, Any]:
    """The fedit arm at ``--baseline`` against this checkout's ``--arms``, each run in its
    own process, the order rotating each repetition; tokens/s medians and ratios."""
    args.tmp.mkdir(parents=True, exist_ok=True)
    rows_file = args.tmp / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    base = f"{args.baseline}:fedit"
    runs = [(base, "fedit", baseline_src(args.baseline, args.tmp))]
    runs += [(f"checkout:{arm}", arm, ROOT / "src") for arm in args.arms]
    speed: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for i in range(args.pairs):
        k = i % len(runs)
        for label, arm, src in runs[k:] + runs[:k]:
            r = run_child(args, arm, src, model_dir, rows_file)
            r |= {"run": label, "repetition": i,
                  "mfu": r["model_tflop"] / r["seconds"] / peaks[r["dtype"]]}
            print(json.dumps(r), flush=True)
            speed[label].append(r["tokens_per_s"])
    summary: dict[str, Any] = {
        "baseline": args.baseline, "repetitions": args.pairs,
        "median_tokens_per_s": {label: statistics.median(v) for label, v in speed.items()},
    }
    for label, values in speed.items():
        if label != base:  # per repetition: runs next to each other in time
            summary[f"{label}/{base}"] = {
                "of_medians": statistics.median(values) / statistics.median(speed[base]),
                "per_repetition": [v / b for v, b in zip(values, speed[base], strict=True)],
            }
    if {"checkout:fedit", "checkout:fedit_hook"} <= speed.keys():
        summary["checkout:fedit_hook/checkout:fedit"] = (
            statistics.median(speed["checkout:fedit_hook"])
            / statistics.median(speed["checkout:fedit"]))
    return summary


def child(args: argparse.Namespace) -> None:
    """``--child``: one arm on the rows of ``--rows-file``; its JSON line names the fedit
    it imported."""
    import fedit

    text = Path(args.rows_file).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line]
    (arm,) = args.arms
    r = arm_table(args.model, rows, args)[arm]()
    print(json.dumps(r | {"fedit_src": str(Path(fedit.__file__).parent)}), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--cutoff", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", help="fedit's base weights: auto | bf16 | fp32")
    p.add_argument("--arms", default=None,
                   help="comma-separated, in order, from: " + ", ".join(ARMS) + " (default "
                        "reference,fedit,fedit_inputs,eval_generate; with --baseline "
                        "fedit,fedit_hook)")
    p.add_argument("--eval-rows", type=int, default=64, help="rows for the eval timing")
    p.add_argument("--gen-rows", type=int, default=32, help="prompts for the generation timing")
    p.add_argument("--gen-tokens", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip each arm's untimed warm-up step on its longest batch")
    p.add_argument("--baseline", default="", metavar="REV",
                   help="compare with the fedit arm on src/ of git revision REV (e.g. db026b5)")
    p.add_argument("--pairs", type=int, default=4, help="--baseline: repetitions of all runs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rows-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    default = "fedit,fedit_hook" if args.baseline else "reference,fedit,fedit_inputs,eval_generate"
    args.arms = (args.arms or default).split(",")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    if args.baseline and not set(args.arms) <= {"fedit", "fedit_hook"}:
        p.error("--baseline compares the fedit and fedit_hook arms only")
    args.tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "fedit-bench"
    if args.child:
        child(args)
        return

    from fedit.model.convert import resolve_model

    info = cpu_info()
    peaks = {"bf16": square_peak(torch.bfloat16), "fp32": square_peak(torch.float32)}
    print(json.dumps({"machine": info, "matmul_2048_tflops_best_of_9": peaks}), flush=True)
    model_dir = resolve_model(args.model)
    limits = ShapeLimits(model_dir)
    rows = load_rows(args.rows, args.seed)
    if args.baseline:
        print(json.dumps(compare(args, model_dir, rows, peaks)), flush=True)
        return
    arms = arm_table(model_dir, rows, args)
    results = {}
    for name in args.arms:
        r = arms[name]()
        if name == "eval_generate":
            print(json.dumps(r), flush=True)
            continue
        r["mfu"] = r["model_tflop"] / r["seconds"] / peaks[r["dtype"]]
        r["mfu_vs_best_peak"] = r["model_tflop"] / r["seconds"] / max(peaks.values())
        r |= limits.mfu(r)
        results[name] = r
        print(json.dumps(r), flush=True)
    summary: dict[str, Any] = {"bf16_peak_tflops": peaks["bf16"], "fp32_peak_tflops": peaks["fp32"],
                               "amx": info["amx"], "cpu": info["cpu"]}
    if "reference" in results:
        ref = results["reference"]["tokens_per_s"]
        for name in ("fedit", "fedit_inputs", "fedit_unfused", "fedit_compile", "fedit_hook"):
            if name in results:
                summary[f"{name}/reference"] = results[name]["tokens_per_s"] / ref
    if "fedit" in results and "fedit_hook" in results:
        summary["fedit_hook/fedit"] = (results["fedit_hook"]["tokens_per_s"]
                                       / results["fedit"]["tokens_per_s"])
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
