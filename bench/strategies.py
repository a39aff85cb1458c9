"""Every algorithm, aggregation rule, privacy mode, LoRA rank method and compression on one
non-IID federation: the table of docs/strategies.md and its plot.

    .venv/bin/python bench/strategies.py                  # SmolLM2 on dolly (~60 min)
    .venv/bin/python bench/strategies.py --fast           # tiny random model (~2 min)
    .venv/bin/python bench/strategies.py --only fedavg,fedadam --no-write

One federation for all: databricks-dolly-15k, Dirichlet alpha = 0.1 over category, 20
clients, 5 sampled a round, the same seed, rounds and optimizer steps per client. Each arm
is a whole run through ``Simulation`` on the one model in memory (its adapter reset to the
same initial one). DP's clip norm C is the median update norm of the FedAvg arm's first
round (read from its metrics), so the noise is on the scale of real updates. The
``--top`` best arms (and FedAvg) are run again on ``--other-seeds`` other seeds (another
split, sampling, LoRA init and batches) to show which differences are within noise.

Prints the table and, unless --no-write, writes docs/strategies.md's measured section
(between the markers), docs/strategies.png and bench/results/strategies.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from round_overhead import build_tiny_model, synthetic_rows  # noqa: E402

from fedit.client.load import load_model  # noqa: E402
from fedit.config import RunConfig, load_config  # noqa: E402
from fedit.data.federated import split_data  # noqa: E402
from fedit.model.adapter import get_adapter_arrays, set_adapter_arrays  # noqa: E402
from fedit.runtimes.inprocess import Simulation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench/strategies.py: begin -->", "<!-- bench/strategies.py: end -->"
CLIP = "CLIP"  # placeholder in an arm's overrides: the measured clip norm

#: (arm, what it is, overrides on top of the common config)
ARMS: list[tuple[str, str, list[str]]] = [
    ("fedavg", "FedAvg (FedIT's rule)", []),
    ("fedavgm", "FedAvgM, server momentum 0.9", ["strategy.name=fedavgm"]),
    ("fedadagrad", "FedAdagrad", ["strategy.name=fedadagrad"]),
    ("fedadam", "FedAdam", ["strategy.name=fedadam"]),
    ("fedyogi", "FedYogi", ["strategy.name=fedyogi"]),
    ("fedprox", "FedProx, mu 0.01", ["strategy.name=fedprox"]),
    ("scaffold", "SCAFFOLD (option II)", ["strategy.name=scaffold"]),
    ("median", "coordinate-wise median", ["strategy.aggregator=median"]),
    ("trimmed_mean", "trimmed mean, beta 0.2", ["strategy.aggregator=trimmed_mean",
                                                "strategy.trim_fraction=0.2"]),
    ("krum", "Krum, f 1", ["strategy.aggregator=krum"]),
    ("multikrum", "Multi-Krum, f 1, m 3", ["strategy.aggregator=multikrum",
                                           "strategy.krum_m=3"]),
    ("dp-central", "DP-FedAvg central, sigma 1.0", ["privacy.mode=central",
                                                    f"privacy.clip={CLIP}"]),
    ("dp-central-s0.3", "DP-FedAvg central, sigma 0.3", [
        "privacy.mode=central", f"privacy.clip={CLIP}", "privacy.noise_multiplier=0.3"]),
    ("dp-adaptive", "DP-FedAvg central, adaptive clip", [
        "privacy.mode=central", f"privacy.clip={CLIP}", "privacy.adaptive=true",
        "privacy.count_stddev=1.0"]),
    ("dp-local", "DP local, sigma 1.0", ["privacy.mode=local", f"privacy.clip={CLIP}"]),
    ("flexlora", "ranks 2/4/8, FlexLoRA (exact mean + SVD)",
     ["lora.client_ranks=RANKS", "lora.rank_aggregation=flexlora"]),
    ("hetlora", "ranks 2/4/8, HetLoRA zero-padding", ["lora.client_ranks=RANKS",
                                                      "lora.rank_aggregation=hetlora"]),
    ("ffa", "FFA-LoRA (A frozen, B sent)", ["lora.freeze_a=true"]),
    ("delta", "upload deltas, fp32", ["compress.method=delta"]),
    ("fp16", "deltas in fp16", ["compress.method=fp16"]),
    ("bf16", "deltas in bf16", ["compress.method=bf16"]),
    ("int8", "deltas in int8 per row", ["compress.method=int8"]),
    ("topk", "top-1% + error feedback", ["compress.method=topk"]),
    ("topk-noef", "top-1%, no error feedback", ["compress.method=topk",
                                                "compress.error_feedback=false"]),
]


def common_config(args: argparse.Namespace, model: str, data: str, out: Path,
                  seed: int) -> list[str]:
    """The federation every arm shares."""
    return [
        f"output_dir={json.dumps(str(out))}", f"seed={seed}", f"rounds={args.rounds}",
        f"model.name={json.dumps(model)}", f"data.path={json.dumps(data)}",
        f"data.cutoff_len={args.cutoff}", f"data.test_per_label={args.test_per_label}",
        "partition.method=dirichlet", f"partition.clients={args.clients}",
        f"partition.alpha={args.alpha}", f"partition.min_size={2 if args.fast else 10}",
        f"strategy.fraction={args.per_round / args.clients}",
        f"train.max_steps={args.steps}", f"train.local_epochs={args.steps}",
        f"train.batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
        "eval.every=1",
    ]


def arm_config(args: argparse.Namespace, base: list[str], arm: str, overrides: list[str],
               clip: float, seed: int) -> RunConfig:
    ranks = [(2, 4, 8)[i % 3] for i in range(args.clients)]
    sets = [o.replace(CLIP, f"{clip:.6g}").replace("RANKS", json.dumps(ranks))
            for o in overrides]
    return load_config(None, [*base, f"name={arm}-seed{seed}", *sets])


def run_arm(cfg: RunConfig, loaded: tuple[Any, Any], initial: list[Any], data: Any
            ) -> dict[str, Any]:
    set_adapter_arrays(loaded[1], initial)
    run_dir = Path(cfg.output_dir) / cfg.name
    t0 = time.perf_counter()
    summary = Simulation(cfg, run_dir, _quiet, loaded=loaded, data=data).run()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = lines[1:]
    return {
        "base_loss": lines[0]["eval_loss"], "final_loss": summary["final_eval_loss"],
        "losses": [m["eval_loss"] for m in lines],
        "epsilon": summary.get("epsilon"),
        "bytes_up": statistics.mean(m["bytes_up"] for m in rounds),
        "bytes_down": statistics.mean(m["bytes_down"] for m in rounds),
        "seconds": time.perf_counter() - t0,
        "median_update_norm": statistics.median(
            v for m in rounds[:1] for v in m.get("update_norms", {}).values() or [0.0]),
    }


def _quiet(message: str) -> None:
    if message.startswith(("round ", "resumed", "base model")):
        print("   ", message, file=sys.stderr, flush=True)


def run_seed(args: argparse.Namespace, model: str, data_path: str, out: Path, seed: int,
             arms: list[tuple[str, str, list[str]]], loaded: tuple[Any, Any],
             clip: float | None) -> tuple[dict[str, dict[str, Any]], float]:
    base = common_config(args, model, data_path, out, seed)
    data = split_data(load_config(None, base))
    initial = get_adapter_arrays(loaded[1])
    results: dict[str, dict[str, Any]] = {}
    for arm, _, overrides in arms:
        if clip is None and any(CLIP in o for o in overrides):
            raise SystemExit("the fedavg arm measures DP's clip norm: run it first")
        print(f"== {arm} (seed {seed})", file=sys.stderr, flush=True)
        cfg = arm_config(args, base, arm, overrides, clip or 1.0, seed)
        try:
            results[arm] = run_arm(cfg, loaded, initial, data)
        except Exception as e:  # one broken arm must not lose the others' hour
            print(f"!! {arm} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        (out / "progress.json").write_text(json.dumps(results))
        if arm == "fedavg" and clip is None:
            clip = results[arm]["median_update_norm"] or 1.0
    set_adapter_arrays(loaded[1], initial)
    return results, clip or 1.0


def table(results: dict[str, dict[str, Any]], extra: dict[str, list[float]],
          labels: dict[str, str]) -> str:
    ref = results["fedavg"]["bytes_up"] if "fedavg" in results else None
    rows = ["| arm | what | final held-out loss | vs base | other seeds | epsilon "
            "(delta 1e-5) | bytes up / round | up vs fedavg | bytes down / round | seconds |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for arm, r in results.items():
        change = 100 * (r["final_loss"] - r["base_loss"]) / r["base_loss"]
        seeds = ", ".join(f"{x:.4f}" for x in extra.get(arm, [])) or "-"
        eps = f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "-"
        ratio = f"{r['bytes_up'] / ref:.3f}" if ref else "-"
        rows.append(f"| {arm} | {labels[arm]} | {r['final_loss']:.4f} | {change:+.2f}% | "
                    f"{seeds} | {eps} | {r['bytes_up']:,.0f} | {ratio} | "
                    f"{r['bytes_down']:,.0f} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: the arms that stay near the base model (zoomed); right: every arm (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (near, every) = plt.subplots(1, 2, figsize=(14, 6))
    for arm, r in results.items():
        style = "-" if arm in ("fedavg", "fedavgm", "median", "krum", "flexlora") else "--"
        if r["final_loss"] < 1.1 * r["base_loss"]:
            near.plot(range(len(r["losses"])), r["losses"], style, marker=".", label=arm)
        every.plot(range(len(r["losses"])), r["losses"], style, marker=".", label=arm)
    near.set_title("arms within 10% of the base model (zoomed)")
    every.set_title("every arm (log scale): the DP arms at 5 clients a round")
    every.set_yscale("log")
    for ax in (near, every):
        ax.set_xlabel("round")
        ax.set_ylabel("held-out loss (response tokens)")
        ax.grid(alpha=0.3)
    near.legend(fontsize=7, ncol=3)
    every.legend(fontsize=6, ncol=3)
    fig.suptitle("held-out loss per round, one non-IID federation (Dirichlet 0.1, 20 clients)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


def write_doc(text: str, doc: Path) -> None:
    old = doc.read_text(encoding="utf-8") if doc.is_file() else f"{BEGIN}\n{END}\n"
    head, _, rest = old.partition(BEGIN)
    _, _, tail = rest.partition(END)
    tmp = doc.with_suffix(".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")
    tmp.replace(doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="tiny random model, synthetic rows")
    p.add_argument("--only", default="", help="comma-separated arms (fedavg is always run)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per client round")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--test-per-label", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--top", type=int, default=3, help="the best arms (and fedavg) run again")
    p.add_argument("--other-seeds", type=int, default=1, help="... on this many other seeds")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    only = set(filter(None, args.only.split(",")))
    arms = [a for a in ARMS if not only or a[0] in only or a[0] == "fedavg"]
    labels = {a: what for a, what, _ in ARMS}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.fast:
            model = build_tiny_model(out / "tiny")
            data_path = str(out / "rows.jsonl")
            Path(data_path).write_text("".join(json.dumps(r) + "\n"
                                               for r in synthetic_rows(1200)))
        else:
            model, data_path = "smollm2-135m", "dolly-15k"
        cfg0 = load_config(None, common_config(args, model, data_path, out, args.seed))
        loaded = load_model(cfg0)
        results, clip = run_seed(args, model, data_path, out, args.seed, arms, loaded, None)
        best = sorted((r["final_loss"], a) for a, r in results.items())[:args.top]
        top = [a for _, a in best] + (["fedavg"] if "fedavg" not in [a for _, a in best]
                                      else [])
        extra: dict[str, list[float]] = {}
        for seed in range(args.seed + 1, args.seed + 1 + args.other_seeds):
            again, _ = run_seed(args, model, data_path, out, seed,
                                [a for a in ARMS if a[0] in top], loaded, clip)
            for arm, r in again.items():
                extra.setdefault(arm, []).append(r["final_loss"])
    minutes = (time.perf_counter() - t0) / 60
    text = table(results, extra, labels)
    what = ("tiny random Llama, synthetic rows" if args.fast
            else "SmolLM2-135M-Instruct, databricks-dolly-15k")
    setup = (f"Setup: {what}; "
             f"Dirichlet alpha = {args.alpha} over category, {args.clients} clients, "
             f"{args.per_round} a round, {args.rounds} rounds, {args.steps} steps of "
             f"{args.batch} rows per client round, cutoff {args.cutoff}, "
             f"{args.test_per_label} held-out rows per category, seed {args.seed}; DP clip "
             f"C = {clip:.4g} (median update norm of FedAvg's round 1). Whole run "
             f"{minutes:.0f} min.")
    print(text)
    print(setup)
    if args.no_write:
        return
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    json_path = ROOT / "bench" / "results" / ("strategies-fast.json" if args.fast
                                              else "strategies.json")
    json_path.write_text(json.dumps({"args": vars(args), "clip": clip, "results": results,
                                     "other_seeds": extra}, indent=1))
    if not args.fast:
        plot(results, ROOT / "docs" / "strategies.png")
        write_doc(f"{text}\n\n{setup}", ROOT / "docs" / "strategies.md")


if __name__ == "__main__":
    main()
