"""What a simulated round costs beyond its clients' training, and memory against client count.

    .venv/bin/python bench/round_overhead.py                  # SmolLM2, 3 clients x 4 steps

1. Overhead: the same K clients, the same seeds and the same steps, timed twice in one
   process: (a) each client's local training alone (``train_adapter`` on a model that
   already holds the global adapter), summed; (b) a whole simulated round (adapter in,
   train, adapter out for each client, FedAvg, checkpoint), the two interleaved ``--reps``
   times. Target: (b) <= 1.05 x (a).
2. Memory: peak RSS of a one-round run with 10 and with 100 clients configured over the
   full corpus (each in a fresh process, 2 clients trained a round). Target: equal within
   10%, since only the sampled clients' data is tokenised and one base model is shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedit.adapter import get_adapter_arrays, save_adapter, set_adapter_arrays
from fedit.client import client_seed
from fedit.config import load_config
from fedit.simulation import Simulation, make_run_dir
from fedit.train import train_adapter


def _config(tmp: str, args: argparse.Namespace, clients: int, max_rows: int) -> Any:
    k = args.clients_per_round
    return load_config(None, [
        f"name=bench-{clients}", f"output_dir={tmp}", f"model.name={args.model}",
        f"data.max_rows={max_rows}", f"data.cutoff_len={args.cutoff}", "data.test_per_label=2",
        "partition.method=iid", f"partition.clients={clients}",
        f"strategy.fraction={k / clients}", f"train.max_steps={args.steps}",
        "train.batch_size=4", "train.micro_batch_size=4", "rounds=1",
    ])


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(tmp, args, clients=10, max_rows=2000)
        sim = Simulation(cfg, make_run_dir(cfg), log=lambda m: None)
        clients = sim.strategy.sample(1, range(len(sim.data.client_rows)))
        for c in clients:
            sim.client_examples(c)  # tokenised once per client, before either timing
        start = get_adapter_arrays(sim.model)
        # Warm-up: the first steps pay one-off costs (allocator, oneDNN primitives)
        train_adapter(sim.model, sim.client_examples(clients[0]), cfg.train,
                      pad_id=sim.pad_id, seed=0)

        def alone() -> float:
            total = 0.0
            for c in clients:
                set_adapter_arrays(sim.model, start)
                r = train_adapter(sim.model, sim.client_examples(c), cfg.train,
                                  pad_id=sim.pad_id, seed=client_seed(cfg.seed, 1, c))
                total += r.seconds
            return total

        def whole_round() -> float:
            t0 = time.perf_counter()
            replies = sim.train_round(1, start)
            new = sim.strategy.aggregate_train(1, start, replies)
            set_adapter_arrays(sim.model, new)
            save_adapter(sim.model, Path(tmp) / "ckpt" / "adapter")
            return time.perf_counter() - t0

        # Interleaved, so a drift in the machine's speed hits both alike
        alone_s, round_s = [], []
        for _ in range(args.reps):
            alone_s.append(alone())
            round_s.append(whole_round())
    a, b = float(np.mean(alone_s)), float(np.mean(round_s))
    return {"clients": clients, "steps": args.steps, "alone_s": alone_s, "round_s": round_s,
            "round/alone": b / a}


def peak_rss_of_run(args: argparse.Namespace, clients: int) -> float:
    """Run one round with ``clients`` configured in a fresh process; its peak RSS in GB."""
    cmd = [sys.executable, __file__, "--rss-child", str(clients), "--model", args.model,
           "--steps", "1", "--cutoff", str(args.cutoff), "--clients-per-round", "2"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_rss_gb"])


def rss_child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(tmp, args, clients=args.rss_child, max_rows=0)
        Simulation(cfg, make_run_dir(cfg), log=lambda m: None).run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_gb": peak / 2**30}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients-per-round", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--reps", type=int, default=4, help="interleaved (alone, round) pairs")
    p.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--skip-rss", action="store_true", help="only the overhead part")
    p.add_argument("--skip-overhead", action="store_true", help="only the memory part")
    args = p.parse_args()
    if args.rss_child:
        rss_child(args)
        return
    if not args.skip_overhead:
        print(json.dumps({"overhead": overhead(args)}), flush=True)
    if not args.skip_rss:
        rss = {n: peak_rss_of_run(args, n) for n in (10, 100)}
        print(json.dumps({"peak_rss_gb": rss, "100/10": rss[100] / rss[10]}), flush=True)


if __name__ == "__main__":
    main()
