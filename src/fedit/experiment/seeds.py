"""``fedit experiment ... --seeds N``: the four arms repeated with seeds ``seed .. seed+N-1``.

Everything random follows ``cfg.seed``: the row subset and held-out split, the Dirichlet
partition, client sampling, the LoRA init and the batches. Seed ``s`` runs as an ordinary
experiment in ``<out>/seed-<s>/`` (so a killed run resumes seed by seed, arm by arm), and
``<out>/experiment.json`` gives, for each arm and metric, the per-seed values with their
mean and sample standard deviation (ddof = 1), every local-only client's metrics, and
``"paired"``: each seed's paired differences (fedit against base, centralized and the
local-only clients) side by side, their mean ± sd across seeds and how many seeds' 95%
intervals say better, no difference or worse. The local-only clients differ from seed to
seed (a seeded draw), so they are pooled: one entry per (seed, client).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from fedit.errors import ConfigError
from fedit.evaluate.tasks import TaskSpec
from fedit.evaluate.verdicts import NO_DIFFERENCE, better_side, verdicts_of
from fedit.experiment.run import (
    ARMS,
    Experiment,
    preference_pairs,
    prepare_experiment_tasks,
    summary_columns,
)
from fedit.experiment.scales import experiment_config, plan_budget
from fedit.federation.loop import Log
from fedit.io import atomic_write_json


def seed_folder(out: Path, seed: int) -> Path:
    """Where seed ``seed`` of an experiment lives."""
    return out / f"seed-{seed}"


def mean_sd(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof = 1; None for one value) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "values": values}


def _metric_table(overalls: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd of each metric every overall has a number for."""
    table = {}
    for key, first in overalls[0].items():
        values = [o.get(key) for o in overalls]
        if key in ("rows", "pairs_scored") or isinstance(first, bool):
            continue
        if all(isinstance(v, (int, float)) for v in values):
            table[key] = mean_sd([float(v) for v in values])  # type: ignore[arg-type]
    return table


LOCAL_ONLY_CLIENTS = "fedit vs local-only clients"  # every (seed, client) pair pooled


def aggregate_paired(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per compared arm and metric: each seed's difference, interval and verdict, the
    differences' mean ± sd across seeds, and the count of each verdict."""
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for s in sorted(summaries):
        for name, pair in summaries[s].get("paired", {}).get("pairs", {}).items():
            kind = LOCAL_ONLY_CLIENTS if pair["a"].startswith("local-only/") else name
            for metric, m in pair.get("metrics", {}).items():
                if m["diff"] is not None:
                    found.setdefault(kind, {}).setdefault(metric, []).append(
                        {"seed": s, "a": pair["a"], "rows": m["rows"], "diff": m["diff"],
                         "low": m["low"], "high": m["high"], "verdict": m["verdict"]})
    return {kind: {metric: {"diff": mean_sd([e["diff"] for e in entries]),
                            "better": better_side(metric),
                            "verdicts": {v: sum(e["verdict"] == v for e in entries)
                                         for v in verdicts_of(metric)},
                            "per_seed": entries}
                   for metric, entries in metrics.items()}
            for kind, metrics in found.items()}


def aggregate_seeds(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """experiment.json of a multi-seed experiment from each seed's own summary."""
    seeds = sorted(summaries)
    first = summaries[seeds[0]]
    arms = {}
    for arm in ARMS:
        overalls = [summaries[s]["arms"][arm]["overall"] for s in seeds]
        arms[arm] = {"overall": _metric_table(overalls),
                     "steps": [summaries[s]["arms"][arm]["steps"] for s in seeds]}
    arms["local-only"]["per_client"] = {
        str(s): summaries[s]["arms"]["local-only"]["per_client"] for s in seeds}
    return {
        "experiment": first["experiment"], "scale": first["scale"],
        "out": str(Path(first["out"]).parent), "model": first["model"],
        "seeds": seeds, "folders": {str(s): f"seed-{s}" for s in seeds},
        "sd": "sample standard deviation across seeds (ddof = 1)",
        "clients": first["clients"], "budget": first["budget"],
        "test_rows": {str(s): summaries[s]["test_rows"] for s in seeds},
        "local_clients": {str(s): summaries[s]["local_clients"] for s in seeds},
        "arms": arms,
        "paired": aggregate_paired(summaries),
        "seconds": sum(summaries[s]["seconds"] for s in seeds),
    }


def run_seeds(name: str, scale: str, seeds: int, out: Path | None = None,
              overrides: list[str] | None = None, log: Log = print,
              tasks: TaskSpec | None = None) -> dict[str, Any]:
    """Run the experiment once a seed, each in ``seed-<s>/``; write the aggregate."""
    if seeds < 2:
        raise ConfigError(f"--seeds {seeds}: give 2 or more")
    cfg, settings = experiment_config(name, scale, overrides)
    out = Path(out) if out is not None else Path(cfg.output_dir) / cfg.name
    if (out / "config.toml").is_file():
        raise ConfigError(f"{out} holds a one-seed experiment; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if name == "fedit-dpo":
        cfg = preference_pairs(cfg, settings, log)  # the same pairs for every seed
    prepared = prepare_experiment_tasks(cfg, tasks)
    log(f"experiment folder {out}; seeds {cfg.seed}..{cfg.seed + seeds - 1}; "
        f"budget {plan_budget(cfg).as_dict()}")
    summaries = {}
    for seed in range(cfg.seed, cfg.seed + seeds):
        log(f"== seed {seed}")
        one = dataclasses.replace(cfg, seed=seed)
        summaries[seed] = Experiment(one, settings, seed_folder(out, seed), scale, log,
                                     name, prepared).run()
    result = aggregate_seeds(summaries)
    atomic_write_json(out / "experiment.json", result)
    return result


def format_seeds(summary: dict[str, Any]) -> str:
    """Each arm's overall metrics as mean ± sd across seeds, then the local-only clients."""
    def f(m: dict[str, Any] | None) -> str:
        if m is None:
            return "-"
        return f"{m['mean']:.4f}" + ("" if m["sd"] is None else f" ± {m['sd']:.4f}")

    seeds = ", ".join(str(s) for s in summary["seeds"])
    columns = [(h, key) for h, key, _ in summary_columns(summary)
               if key not in ("perplexity", "dpo_loss")]
    lines = [f"{len(summary['seeds'])} seeds ({seeds}): mean ± sd",
             f"{'arm':<12} " + " ".join(f"{h:>17}" for h, _ in columns)]
    for arm, info in summary["arms"].items():
        o = info["overall"]
        lines.append(f"{arm:<12} " + " ".join(f"{f(o.get(key)):>17}" for _, key in columns))
    head, key = columns[0]
    for seed, clients in summary["arms"]["local-only"]["per_client"].items():
        for c, o in clients.items():
            lines.append(f"  seed {seed} local-only client {c}: {head} {o[key]:.4f}")
    return "\n".join(lines + format_paired_seeds(summary.get("paired", {})))


def format_paired_seeds(paired: dict[str, Any]) -> list[str]:
    """A line per compared arm and metric: the mean ± sd of the seeds' paired differences
    and how many seeds' 95% intervals gave each verdict."""
    lines = ["paired differences, fedit - other arm, across seeds (each seed's own 95% "
             "paired bootstrap interval decides its verdict):"] if paired else []
    for kind, metrics in paired.items():
        for metric, m in metrics.items():
            d, v = m["diff"], m["verdicts"]
            up, _, down = verdicts_of(metric)
            sd = "" if d["sd"] is None else f" ± {d['sd']:.4f}"
            lines.append(f"{kind}: {metric} {d['mean']:+.4f}{sd} over {len(d['values'])}: "
                         f"{up} {v[up]}, no difference {v[NO_DIFFERENCE]}, {down} {v[down]}")
    return lines
