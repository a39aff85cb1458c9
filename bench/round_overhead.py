"""What a round of the round loop costs beyond its clients' training, and how its memory
and overhead grow with the number of configured clients (10 to 10,000).

    .venv/bin/python bench/round_overhead.py                         # the figures (~10 min)
    .venv/bin/python bench/round_overhead.py --model tiny --steps 1 --reps 2 --scale-rounds 3
                                                                     # smoke test (~1 min)

1. Overhead (``--skip-overhead`` skips it): the same K clients (``--clients-per-round``
   of 10), the same seeds and steps, timed twice in one process, ``--reps`` interleaved
   pairs in alternating order: (a) each client's local training alone (``train_adapter``
   on the global adapter), summed; (b) a whole ``RoundLoop.round`` through the in-process
   runtime: sample, configure, adapter in, train, adapter out, check the replies, FedAvg,
   commit (adapter folder, blobs, metrics line, manifest). No held-out evaluation is due.
   Every round is round 1 again (from the adapter the round before made), after one
   untimed round: the same batches each time, so neither arm meets a new shape (the first
   step at a new length is slow). Target: (b) <= 1.05 x (a).
2. Cross-device scale (``--skip-scale`` skips it): 10, 1,000 and 10,000 clients
   configured (``--scale-clients``), each with ``--rows-per-client`` short synthetic rows
   (iid), on a 2-layer random Llama, 2 clients trained a round (``strategy.fraction =
   2 / clients``, one step each), every configuration a whole run of ``--scale-rounds``
   rounds in a fresh process. Per configuration: the process's peak RSS (``VmHWM``;
   also after set-up, before round 1), and a round's seconds outside training (the
   round's wall time minus its replies' training seconds, the median over rounds), with
   the parts of it that could grow with the clients: listing them
   (``runtime.available()``), sampling, tokenising the sampled clients' rows. Set-up
   (split, partition statistics and plot, model) is reported, not targeted. Targets:
   <= 1.10 x the 10-client figures. The rows grow with the clients (a client has the same
   rows everywhere, so a round does the same work); they are in the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedit.algorithms import payload as P
from fedit.client.round import client_seed
from fedit.client.trainer import train_adapter
from fedit.config import RunConfig, load_config
from fedit.data.federated import split_data, write_split
from fedit.federation.rundir import new_run
from fedit.model.adapter import get_adapter_arrays, set_adapter_arrays
from fedit.runtimes.inprocess import Simulation

OVERHEAD_TARGET, SCALE_TARGET = 1.05, 1.10
CATEGORIES = ["open_qa", "closed_qa", "classification", "brainstorming"]
WORDS = ("red blue green apple river mountain city cloud paper stone music light small "
         "large quick slow bright dark north south east west summer winter garden").split()


def _config(out: str, model: str, clients: int, per_round: int, overrides: list[str]
            ) -> RunConfig:
    return load_config(None, [
        f"name=bench-{clients}", f"output_dir={out}", f"model.name={model}",
        "partition.method=iid", f"partition.clients={clients}",
        f"strategy.fraction={per_round / clients}", "eval.every=0", *overrides,
    ])


def _quiet(message: str) -> None:
    return None


# -- a tiny model and tiny rows (as tests/conftest.py builds them) ---------------------------
def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short instruction rows (~40 tokens with the Alpaca prompt), four categories."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(WORDS, 2)
        rows.append({"instruction": f"Tell me about the {a} and the {b}.", "context": "",
                     "response": f"The {a} goes with the {b}.",
                     "category": CATEGORIES[i % len(CATEGORIES)]})
    return rows


def build_tiny_model(out: Path) -> str:
    """A 2-layer, 64-wide random Llama with a 400-token BPE tokenizer, saved in ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fedit.data.prompts import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, *map(json.dumps, synthetic_rows(200))]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token="<|im_start|>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return str(out)


# -- 1. a round against training alone -------------------------------------------------------
def overhead(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model_name = build_tiny_model(Path(tmp) / "tiny") if args.model == "tiny" else args.model
        cfg = _config(tmp, model_name, 10, args.clients_per_round, [
            "data.max_rows=2000", f"data.cutoff_len={args.cutoff}", "data.test_per_label=2",
            f"train.max_steps={args.steps}", "train.batch_size=4", "train.micro_batch_size=4",
            "rounds=2",  # round 2, the last, would evaluate: only round 1 runs
        ])
        sim = Simulation(*new_run(cfg), log=_quiet)
        model, runtime, loop = sim.model, sim.runtime, sim.loop
        arrays = get_adapter_arrays(model)
        state = sim.pipe.init_state(arrays)
        clients = sim.pipe.sample(1, runtime.available())
        # Every round is round 1 again, from the global adapter the round before made: the
        # same clients, seeds and batches each time, so after the untimed first round no
        # arm meets a new shape (the first step at a new length is slow)
        arrays, state = loop.round(1, arrays, state)

        def alone(given: list[Any]) -> float:
            total = 0.0
            for c in clients:
                set_adapter_arrays(model, given)
                r = train_adapter(model, runtime.client_examples(c), cfg.train,
                                  pad_id=runtime.pad_id, seed=client_seed(cfg.seed, 1, c))
                total += r.seconds
            return total

        # Interleaved, in alternating order: a drift in the machine's speed hits both alike
        alone_s, round_s = [], []
        for rep in range(args.reps):
            given = arrays
            if rep % 2 == 0:
                alone_s.append(alone(given))
            t0 = time.perf_counter()
            arrays, state = loop.round(1, given, state)
            round_s.append(time.perf_counter() - t0)
            if rep % 2 == 1:
                alone_s.append(alone(given))
    ratio = statistics.fmean(round_s) / statistics.fmean(alone_s)
    return {"model": args.model, "clients": clients, "of": 10,
            "steps": args.steps, "alone_s": alone_s, "round_s": round_s,
            "pair_ratios": [r / a for r, a in zip(round_s, alone_s, strict=True)],
            "round/alone": ratio, "target": OVERHEAD_TARGET, "ok": ratio <= OVERHEAD_TARGET}


# -- 2. cross-device scale: one fresh process per configuration -------------------------------
def scale(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny")
        for n in args.scale_clients:
            data = Path(tmp) / f"rows-{n}.jsonl"
            rows = synthetic_rows(n * args.rows_per_client, seed=n)
            data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            cmd = [sys.executable, __file__, "--scale-child", str(n), "--model", model_dir,
                   "--data", str(data), "--scale-rounds", str(args.scale_rounds)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[n] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps({"scale_run": runs[n]}), flush=True)
    base = runs[args.scale_clients[0]]
    ratios = {n: {"peak_rss": r["peak_rss_mb"] / base["peak_rss_mb"],
                  "outside_training": r["median"]["outside_training"]
                  / base["median"]["outside_training"]} for n, r in runs.items()}
    ok = all(v <= SCALE_TARGET for r in ratios.values() for v in r.values())
    return {"vs_clients": args.scale_clients[0], "ratios": ratios, "target": SCALE_TARGET,
            "ok": ok}


def _maxrss_mb() -> float:
    """Peak RSS of this process's own memory (VmHWM). Not ru_maxrss: Linux carries that
    across fork + exec, so a child of the SmolLM2 part (a) reported its parent's ~2.1 GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # KiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def instrument(sim: Simulation) -> list[dict[str, float]]:
    """Time each round and, inside it, the steps that could grow with the client count.

    Returns the list that each finished round appends its seconds to."""
    rounds: list[dict[str, float]] = []
    now: dict[str, float] = {}

    def timed(obj: Any, name: str, after: Any = None) -> None:
        fn = getattr(obj, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            now[name] = now.get(name, 0.0) + time.perf_counter() - t0
            if after is not None:
                after(out)
            return out

        setattr(obj, name, wrapper)  # on the instance: the loop and runtime call it there

    def training(result: Any) -> None:
        now["training"] = sum(r.metrics[P.SECONDS] for r in result.replies)

    def record(_: Any) -> None:
        wall = now.pop("round")
        rounds.append({"wall": wall, **now, "outside_training": wall - now.get("training", 0)})
        now.clear()

    timed(sim.runtime, "available")
    timed(sim.pipe, "sample")
    timed(sim.runtime, "client_examples")  # tokenising, inside the runtime's train
    timed(sim.runtime, "train", training)
    timed(sim.loop, "round", record)
    return rounds


def scale_child(args: argparse.Namespace) -> None:
    """One configuration's whole run; prints its figures as the last JSON line."""
    n = args.scale_child
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(tmp, args.model, n, 2, [
            f"data.path={args.data}", "data.test_per_label=0", "data.cutoff_len=128",
            "model.dtype=fp32", "train.max_steps=1", "train.batch_size=2",
            "train.micro_batch_size=2", f"rounds={args.scale_rounds}",
        ])
        t0 = time.perf_counter()
        data = split_data(cfg)
        split_s = time.perf_counter() - t0
        sim = Simulation(*new_run(cfg), log=_quiet, data=data)  # writes the split
        setup_s = time.perf_counter() - t0
        setup_peak, setup_rss = _maxrss_mb(), _rss_mb()
        rounds = instrument(sim)
        sim.run()
        peak, end_rss = _maxrss_mb(), _rss_mb()
        t0 = time.perf_counter()
        write_split(sim.data, Path(tmp) / "again")  # its cost alone (matplotlib imported)
        write_split_s = time.perf_counter() - t0
    keys = ("wall", "training", "outside_training", "available", "sample", "client_examples")
    median = {k: statistics.median(r.get(k, 0.0) for r in rounds) for k in keys}
    least = min(r["outside_training"] for r in rounds)  # the least disturbed round
    print(json.dumps({
        "clients": n, "rows": sum(len(r) for r in data.client_rows), "rounds": len(rounds),
        "peak_rss_mb": peak, "peak_rss_after_setup_mb": setup_peak,
        "rss_after_setup_mb": setup_rss, "rss_end_mb": end_rss,
        "split_s": split_s, "setup_s": setup_s, "write_split_s": write_split_s,
        "median": median, "min_outside_training": least, "per_round": rounds,
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the overhead part's model; "
                   "'tiny': a 2-layer random Llama (smoke test)")
    p.add_argument("--clients-per-round", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--reps", type=int, default=4, help="interleaved (alone, round) pairs")
    p.add_argument("--scale-clients", type=lambda s: [int(x) for x in s.split(",")],
                   default=[10, 1000, 10000], help="configured clients, the first the base")
    p.add_argument("--rows-per-client", type=int, default=3)
    p.add_argument("--scale-rounds", type=int, default=20, help="rounds of each scale run")
    p.add_argument("--skip-overhead", action="store_true", help="only the scale part")
    p.add_argument("--skip-scale", action="store_true", help="only the overhead part")
    p.add_argument("--scale-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.scale_child:
        scale_child(args)
        return
    summary: dict[str, Any] = {}
    if not args.skip_overhead:
        summary["overhead"] = overhead(args)
        print(json.dumps({"overhead": summary["overhead"]}), flush=True)
    if not args.skip_scale:
        summary["scale"] = scale(args)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
