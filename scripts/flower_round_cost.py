"""What a federated round costs on Flower against the in-process simulation, same work.

    .venv/bin/python scripts/flower_round_cost.py [--rounds 2] [--repeat 3] [--model M]

Runs one small config (SmolLM2-135M by default, 2 clients, a few local steps) four ways:
in-process simulation; fedit's default Flower mode, one long-lived ``fedit flower worker``
per node (``--isolation process``: the model and data stay loaded between rounds); the
same with SecAgg+; and Flower's own default subprocess isolation (a new ClientApp process
per message: import torch, load the model, tokenise, every round) for comparison.
Prints each round's seconds and bytes from metrics.jsonl, and the cold start of a
ClientApp process (imports + model load) measured alone. Nothing here is a test: numbers
depend on the machine and its load; compare the ratios within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from fedit.config import load_config
from fedit.runtimes.flower.local import run_local
from fedit.runtimes.inprocess import run_federated

REPO = Path(__file__).resolve().parents[1]
COLD_START = """
import time, sys
t0 = time.perf_counter()
import fedit.client.round
t1 = time.perf_counter()
from fedit.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
fedit.client.round.load_model(cfg)
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f}")
"""


def overrides(out: Path, rounds: int, model: str) -> list[str]:
    return [f"output_dir={json.dumps(str(out))}", f"rounds={rounds}", f"model.name={model}",
            "partition.clients=2", "strategy.fraction=1.0", "data.max_rows=300",
            "data.test_per_label=2", "partition.min_size=20", "train.max_steps=3",
            "flower.round_timeout=1800"]


def rounds_of(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "quickstart.toml")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs") / "round-cost")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each mode, in turns")
    args = parser.parse_args()
    out = args.out.resolve()
    sets = overrides(out, args.rounds, args.model)
    stamp = time.strftime("%H%M%S")
    results: dict[str, dict] = {}
    modes = [("simulation", "", []),
             ("flower default (process + worker)", "process", []),
             ("flower default + SecAgg+", "process",
              ["flower.secure_aggregation=true", "flower.secagg_max_weight=200"]),
             ("flower subprocess (Flower's default)", "subprocess", [])]

    def record(mode: str, run_dir: Path, wall: float) -> None:
        r = results.setdefault(mode, {"wall": [], "rounds": []})
        r["wall"].append(wall)
        r["rounds"].append(rounds_of(run_dir))
        print(f"{mode}: {wall:.0f} s, rounds "
              f"{[round(x['seconds'], 1) for x in r['rounds'][-1]]}", flush=True)

    # The modes take turns, so a change in the machine's load hits them alike
    for rep in range(args.repeat):
        for mode, isolation, extra in modes:
            name = f"{isolation or 'sim'}{'-secagg' if extra else ''}-{stamp}-{rep}"
            t0 = time.perf_counter()
            if not isolation:
                cfg = load_config(args.config, [*sets, f"name={name}"])
                run_dir = Path(run_federated(cfg, log=lambda m: None)["run_dir"])
            else:
                summary = run_local(args.config, nodes=2,
                                    overrides=[*sets, *extra, f"name={name}"],
                                    isolation=isolation, workdir=out / f".flower-{name}",
                                    log=lambda m: None)
                run_dir = Path(summary["run_dir"])
            record(mode, run_dir, time.perf_counter() - t0)
    cold = subprocess.run([sys.executable, "-c", COLD_START, str(args.config), *sets],
                          capture_output=True, text=True, check=True).stdout.split()
    results["cold ClientApp start"] = {"imports": float(cold[0]), "model": float(cold[1])}
    print(f"cold ClientApp process: imports {cold[0]} s, model load {cold[1]} s")
    print(f"\nmedians over {args.repeat} run(s) each")
    print("| mode | wall (s) | " + " | ".join(f"round {i + 1} (s)" for i in range(args.rounds))
          + " | bytes up / round | bytes down / round |")
    print("|---|---|" + "---|" * args.rounds + "---|---|")
    for mode, r in results.items():
        if "rounds" not in r:
            continue
        secs = " | ".join(f"{median([x[i]['seconds'] for x in r['rounds']]):.1f}"
                          for i in range(args.rounds))
        last = r["rounds"][-1][-1]
        print(f"| {mode} | {median(r['wall']):.0f} | {secs} | {last['bytes_up']} | "
              f"{last['bytes_down']} |")
    (out / f"round-cost-{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
