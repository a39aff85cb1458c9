"""Paired differences between the arms of one experiment, for ``experiment.json``.

Every arm answers the same held-out rows, so each pair is compared row by row with
:func:`fedit.evaluate.compare.compare_evals` (the paired bootstrap, B - A, seeded from the
config's seed). B is always ``fedit``; A is ``base``, each local-only client's own folder
(``local-only/client_NNNN``: the ``local-only`` folder itself holds a mean, not answers of
one model) and ``centralized``. Against the local-only clients the section also counts, per
metric, how many of them FedIT beats, ties or loses to at 95%.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

from fedit.errors import DataError
from fedit.evaluate.compare import METRICS, NO_DIFFERENCE, compare_evals

VERDICTS = ("better", NO_DIFFERENCE, "worse")  # fedit against the other arm


def paired_folders(local_clients: list[int]) -> list[tuple[str, str]]:
    """(A, B) folders, relative to the experiment folder, of each compared pair."""
    others = ["base", *(f"local-only/client_{c:04d}" for c in local_clients), "centralized"]
    return [(a, "fedit") for a in others]


def paired_section(out: Path, local_clients: list[int], seed: int,
                   resamples: int = 2000) -> dict[str, Any]:
    """``experiment.json``'s ``"paired"``: each pair's per-metric difference, 95% interval,
    rows and verdict, and FedIT's wins / ties / losses against the local-only clients."""
    pairs: dict[str, Any] = {}
    for a, b in paired_folders(local_clients):
        name = f"{b} vs {a.replace('/', ' ')}"
        try:
            result = compare_evals(out / a, out / b, resamples=resamples, seed=seed)
        except DataError as e:  # a pair that cannot be compared must not lose the summary
            pairs[name] = {"a": a, "b": b, "error": str(e)}
            continue
        pairs[name] = {"a": a, "b": b, "rows": result["rows"], "metrics": result["metrics"]}
    counts: dict[str, Counter[str]] = {}
    for a, _ in paired_folders(local_clients):
        pair = pairs[f"fedit vs {a.replace('/', ' ')}"]
        if a.startswith("local-only/"):
            for metric, m in pair.get("metrics", {}).items():
                if m["diff"] is not None:  # a metric without rows (not generated) is no tie
                        counts.setdefault(metric, Counter())[m["verdict"]] += 1
    return {
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95,
                      "interval": "percentile", "paired_over": "rows", "difference": "B - A"},
        "pairs": pairs,
        "fedit_vs_local_only_clients": {
            metric: {v: c[v] for v in VERDICTS} for metric, c in counts.items()},
    }


def _num(v: float) -> str:
    return f"{v:+.4f}"


def format_paired(paired: dict[str, Any]) -> list[str]:
    """One line a pair and metric with rows, e.g.
    ``fedit vs local-only client_0003: loss -0.0310 [-0.0500, -0.0100] better``, then
    FedIT's wins / ties / losses against the local-only clients."""
    b = paired["bootstrap"]
    lines = [f"paired differences, fedit - other arm, 95% interval (paired bootstrap over "
             f"rows, {b['resamples']} resamples, seed {b['seed']}):"]
    for name, pair in paired["pairs"].items():
        if "error" in pair:
            lines.append(f"{name}: {pair['error']}")
        for metric, m in pair.get("metrics", {}).items():
            if m["diff"] is not None:
                lines.append(f"{name}: {metric} {_num(m['diff'])} [{_num(m['low'])}, "
                             f"{_num(m['high'])}] {m['verdict']} ({m['rows']} rows)")
    for metric, c in paired["fedit_vs_local_only_clients"].items():
        lines.append(f"fedit vs the {sum(c.values())} local-only clients on {metric}: better "
                     f"than {c['better']}, tied with {c[NO_DIFFERENCE]}, worse than {c['worse']}")
    return lines


def plot_paired(paired: dict[str, Any]) -> bytes | None:
    """The forest plot of ``paired_section``'s pairs as PNG bytes: one panel per metric
    (each on its own scale), one row per pair: the difference as a point, its 95% interval
    as a bar, the zero line and the verdict; None when no pair has a metric with rows."""
    from matplotlib.figure import Figure

    panels = {metric: [(name, p["metrics"][metric]) for name, p in paired["pairs"].items()
                       if p.get("metrics", {}).get(metric, {}).get("diff") is not None]
              for metric in METRICS}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    heights = [len(rows) + 1 for rows in panels.values()]
    fig = Figure(figsize=(10, 0.9 + 0.42 * sum(heights)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    colors = {"better": "#55a868", "worse": "#c44e52", NO_DIFFERENCE: "#4c72b0"}
    for ax, (metric, rows) in zip(axes, panels.items(), strict=True):
        for y, (_, m) in enumerate(rows):
            ax.errorbar([m["diff"]], [y], xerr=[[m["diff"] - m["low"]], [m["high"] - m["diff"]]],
                        fmt="o", color=colors.get(m["verdict"], "#4c72b0"), capsize=4, lw=2)
        ax.axvline(0, color="black", lw=1, ls="--")
        # all intervals [0, 0] (identical answers): a readable axis rather than +-1e-9
        reach = max(max(abs(m["low"]), abs(m["high"])) for _, m in rows) * 1.3 or 0.01
        ax.set_xlim(-reach, reach)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # the first pair on top
        ax.set_yticks(range(len(rows)), [name.removeprefix("fedit vs ") for name, _ in rows],
                      fontsize=8)
        right = ax.secondary_yaxis("right")
        right.set_yticks(range(len(rows)), [f"{m['diff']:+.4f} [{m['low']:+.4f}, "
                                            f"{m['high']:+.4f}]  {m['verdict']}"
                                            for _, m in rows], fontsize=8)
        right.tick_params(length=0)
        ax.set_title(f"{metric} ({rows[0][1]['better']} is better): fedit - other arm",
                     fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("fedit - other arm (paired bootstrap 95% interval over rows)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


__all__ = ["format_paired", "paired_folders", "paired_section", "plot_paired"]
