"""DPO training throughput: fedit's DPO objective against TRL's DPOTrainer, in one process.

    .venv/bin/python bench/dpo_throughput.py                  # 24 pairs, 4 a step, cutoff 384
    .venv/bin/python bench/dpo_throughput.py --pairs 32       # ~14 min on 2 AVX2 cores
    .venv/bin/python bench/dpo_throughput.py --pairs 8        # quicker
    .venv/bin/python bench/dpo_throughput.py --arms fedit_dpo,fedit_sft

A throughput benchmark: the pairs are built offline from dolly rows and what they mean
does not matter. Prompt = the row's instruction (+ its context), chosen = its human
response, rejected = the response of another row of the same category.

Arms, on the same pairs, model (SmolLM2-135M), LoRA (r=8, alpha 16, dropout 0.05 on
q/k/v/o), cutoff, pairs per optimizer step (``--batch``), learning rate, beta 0.1, one epoch:
  fedit_dpo    fedit's trainer (``train_adapter``) with the ``DPO`` objective (a pair is
               one packed row, prompt + chosen + rejected: the prompt is computed once);
               timed: ``DPO.precompute`` (the reference log-probabilities, the adapter
               disabled) + the epoch
  fedit_sft    fedit's SFT on the chosen sequences only, ``--batch`` of them a step (its
               peak RSS is the yardstick of fedit_dpo's: goal <= 1.3x)
  trl_best     TRL's DPOTrainer on a PEFT model at its best settings for this CPU:
               ``precompute_ref_log_probs=True``, gradient checkpointing off, bf16 only
               where ``fedit.model.device.pick_dtype("cpu")`` says the CPU has a bf16 path;
               timed: the trainer's construction (TRL computes the reference there) +
               ``trainer.train()``
  trl_default  DPOTrainer on the PEFT model at its defaults (gradient checkpointing on,
               the reference computed every step, the adapter disabled); timed: its
               ``trainer.train()``

TRL is given the text of fedit's tokenised pairs (prompt rendered with fedit's alpaca
template, answers as fedit fitted them to the cutoff) and ``max_length = --cutoff``. Every
DPO arm is credited with the same work: the real (non-pad) tokens of the chosen and the
rejected sequences, the prompt counted in each (fedit_dpo computes fewer, the prompt once
a pair; its tokens/s is the rate at which it gets through the same pairs). Before its
timed run every arm takes one untimed step on its longest batch and then restores its
LoRA weights (``--no-warmup`` skips it; see bench/train_throughput.py).

Each arm prints one JSON line (tokens/s, seconds, final loss, peak RSS); then a summary line
with the ratios against the goals: fedit_dpo/trl_best >= 2x, fedit_dpo/trl_default >= 5x
tokens/s, fedit_dpo/fedit_sft peak RSS <= 1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from train_throughput import PeakRSS, cpu_info, load_rows, longest, untouched_trainables

ARMS = ("fedit_dpo", "fedit_sft", "trl_best", "trl_default")
GOALS = {"fedit_dpo/trl_best": 2.0, "fedit_dpo/trl_default": 5.0}
RSS_GOAL = 1.3  # fedit_dpo / fedit_sft peak RSS, at most
BETA = 0.1


# --- the pairs -------------------------------------------------------------------------


def dolly_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` preference rows: a dolly row's response as chosen, another row's of the same
    category as rejected (meaningless as preferences; a throughput benchmark)."""
    rows = [r for r in load_rows(4 * n + 64, seed) if r["response"].strip()]
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_category[r["category"]].append(r)
    rng = random.Random(seed)
    out = []
    for r in rows:
        others = [o for o in by_category[r["category"]]
                  if o["response"].strip() != r["response"].strip()]
        if not others:
            continue
        prompt = r["instruction"] + (f"\n\n{r['context']}" if r["context"].strip() else "")
        out.append({"prompt": prompt, "chosen": r["response"],
                    "rejected": rng.choice(others)["response"], "category": r["category"]})
    return out


def tokenized_pairs(tok: Any, n: int, args: argparse.Namespace) -> list[Any]:
    """fedit's tokenised pairs (alpaca template, fitted to ``--cutoff``), the first ``n``."""
    from fedit.config import DataConfig
    from fedit.data.preference_tokens import tokenize_pairs

    pairs, _, _ = tokenize_pairs(tok, dolly_pairs(n, args.seed),
                                 DataConfig(cutoff_len=args.cutoff), "bench")
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} of {n} pairs fit the cutoff")
    return pairs[:n]


def pair_tokens(pairs: Sequence[Any]) -> int:
    return sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)


# --- fedit ---------------------------------------------------------------------------


def fedit_model(model_dir: str, args: argparse.Namespace) -> tuple[Any, Any]:
    from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    return tok, attach_lora(load_base_model(model_dir, dtype=args.dtype), LoraSpec(),
                            seed=args.seed)


def run_fedit_dpo(model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    from fedit.algorithms.contract import ClientState
    from fedit.client.dpo import DPO, packed_length
    from fedit.client.trainer import train_adapter
    from fedit.config import DPOConfig, TrainConfig

    tok, model = fedit_model(model_dir, args)
    pairs = tokenized_pairs(tok, args.pairs, args)
    cfg = TrainConfig(batch_size=args.batch, micro_batch_size=args.batch, lr=args.lr)
    objective = DPO(DPOConfig(beta=BETA))
    objective.pad_id = int(tok.pad_token_id or 0)
    last: list[float] = []
    if args.warmup:  # the reference and one step on the longest pairs, weights restored
        warm, warm_state = longest(pairs, args.batch, packed_length), ClientState()
        with untouched_trainables(model):
            objective.precompute(model, warm, warm_state)
            train_adapter(model, warm, replace(cfg, max_steps=1), pad_id=objective.pad_id,
                          objective=objective, state=warm_state)
    state = ClientState()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        objective.precompute(model, pairs, state)
        reference_s = time.perf_counter() - t0
        result = train_adapter(model, pairs, cfg, pad_id=objective.pad_id, seed=args.seed,
                               progress=lambda step, total, loss: last.append(loss),
                               objective=objective, state=state)
        seconds = time.perf_counter() - t0
    return _result("fedit_dpo", len(pairs), pair_tokens(pairs), seconds, last[-1], rss.peak,
                   model, reference_s=reference_s, steps=result.steps)


def run_fedit_sft(model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    from fedit.client.trainer import train_adapter
    from fedit.config import TrainConfig

    tok, model = fedit_model(model_dir, args)
    examples = [p.chosen for p in tokenized_pairs(tok, args.pairs, args)]
    cfg = TrainConfig(batch_size=args.batch, micro_batch_size=args.batch, lr=args.lr)
    last: list[float] = []
    if args.warmup:
        warm = longest(examples, args.batch, lambda e: len(e.input_ids))
        with untouched_trainables(model):
            train_adapter(model, warm, replace(cfg, max_steps=1), pad_id=tok.pad_token_id)
    with PeakRSS() as rss:
        result = train_adapter(model, examples, cfg, pad_id=tok.pad_token_id, seed=args.seed,
                               progress=lambda step, total, loss: last.append(loss))
    tokens = sum(len(e.input_ids) for e in examples)
    return _result("fedit_sft", len(examples), tokens, result.seconds, last[-1], rss.peak, model,
                   steps=result.steps)


# --- TRL -----------------------------------------------------------------------------


def run_trl(model_dir: str, args: argparse.Namespace, best: bool) -> dict[str, Any]:
    """TRL's DPOTrainer on a PEFT model (its reference: the adapter disabled)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from fedit.model.base import load_tokenizer
    from fedit.model.device import pick_dtype

    name = "trl_best" if best else "trl_default"
    tok = load_tokenizer(model_dir)
    pairs = tokenized_pairs(tok, args.pairs, args)
    bf16 = best and pick_dtype("cpu") == torch.bfloat16

    def text(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    rows = [{"prompt": text(p.prompt_ids), "chosen": text(p.chosen_ids),
             "rejected": text(p.rejected_ids)} for p in pairs]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    tmp = Path(tempfile.mkdtemp(prefix=f"fedit-bench-{name}-"))
    settings: dict[str, Any] = {}
    if best:
        settings = {"precompute_ref_log_probs": True, "gradient_checkpointing": False,
                    "bf16": bf16}
    else:
        settings = {"bf16": False}  # TRL's default bf16=True: emulated (slower) on this CPU

    def trainer_for(data: list[dict[str, Any]], **extra: Any) -> Any:
        targs = DPOConfig(
            output_dir=str(tmp), per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=args.lr,
            beta=BETA, max_length=args.cutoff, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, dataloader_num_workers=0, seed=args.seed,
            disable_tqdm=True, **settings, **extra)
        trainer = DPOTrainer(model=base, args=targs, train_dataset=Dataset.from_list(data),
                             processing_class=tok, peft_config=lora)
        trainer.remove_callback(PrinterCallback)
        return trainer

    if args.warmup:  # one untimed step on the longest pairs, then the adapter removed
        by_length = sorted(range(len(rows)), key=lambda i: len(pairs[i]))[-args.batch:]
        warm = trainer_for([rows[i] for i in by_length], max_steps=1)
        warm.train()
        base = warm.model.unload()  # the base model as it was: TRL attaches a fresh adapter
        del warm
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        trainer = trainer_for(rows)  # precompute_ref_log_probs: computed here
        built_s = time.perf_counter() - t0
        trainer.train()
        seconds = time.perf_counter() - t0
    data = trainer.train_dataset
    tokens = sum(min(len(p) + len(a), args.cutoff) for p, c, r in
                 zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True)
                 for a in (c, r))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _result(name, len(rows), tokens, seconds, losses[-1], rss.peak, trainer.model,
                   construct_s=built_s, bf16=bf16,
                   gradient_checkpointing=trainer.args.gradient_checkpointing,
                   precompute_ref_log_probs=trainer.args.precompute_ref_log_probs,
                   fedit_tokens=pair_tokens(pairs))


def _result(arm: str, rows: int, tokens: int, seconds: float, loss: float, peak: int,
            model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
    dtype = next(p.dtype for n, p in model.named_parameters() if "lora" not in n)
    return {"arm": arm, "rows": rows, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "seconds": seconds, "final_loss": loss, "peak_rss_gb": peak / 2**30,
            "dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]} | extra


def arm_table(model_dir: str, args: argparse.Namespace
              ) -> dict[str, Callable[[], dict[str, Any]]]:
    return {
        "fedit_dpo": lambda: run_fedit_dpo(model_dir, args),
        "fedit_sft": lambda: run_fedit_sft(model_dir, args),
        "trl_best": lambda: run_trl(model_dir, args, best=True),
        "trl_default": lambda: run_trl(model_dir, args, best=False),
    }


def summary(results: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": info["cpu"], "flags": info["flags"],
                           "threads": info["threads"]}
    speed = {k: r["tokens_per_s"] for k, r in results.items()}
    if "fedit_dpo" in speed:
        for key, goal in GOALS.items():
            other = key.split("/")[1]
            if other in speed:
                ratio = speed["fedit_dpo"] / speed[other]
                out[key] = ratio
                out[f"{key}_goal_met"] = ratio >= goal
    if {"fedit_dpo", "fedit_sft"} <= results.keys():
        ratio = results["fedit_dpo"]["peak_rss_gb"] / results["fedit_sft"]["peak_rss_gb"]
        out["rss_fedit_dpo/fedit_sft"] = ratio
        out["rss_goal_met"] = ratio <= RSS_GOAL
    out["peak_rss_gb"] = {k: r["peak_rss_gb"] for k, r in results.items()}
    out["final_loss"] = {k: r["final_loss"] for k, r in results.items()}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--cutoff", type=int, default=384)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", help="fedit's base weights: auto | bf16 | fp32")
    p.add_argument("--arms", default=",".join(ARMS),
                   help="comma-separated, in order, from: " + ", ".join(ARMS))
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip each arm's untimed warm-up step on its longest batch")
    args = p.parse_args(argv)
    args.arms = args.arms.split(",")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars: stdout keeps to JSON lines
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    from fedit.model.convert import resolve_model

    info = cpu_info()
    print(json.dumps({"machine": info}), flush=True)
    model_dir = resolve_model(args.model)
    arms = arm_table(model_dir, args)
    results = {}
    for name in args.arms:
        results[name] = arms[name]()
        print(json.dumps(results[name]), flush=True)
    print(json.dumps(summary(results, info)), flush=True)


if __name__ == "__main__":
    main()
