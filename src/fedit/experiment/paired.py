"""Paired differences between the arms of one experiment, for ``experiment.json``.

Every arm answers the same held-out rows, so each pair is compared row by row with
:func:`fedit.evaluate.compare.compare_evals` (the paired bootstrap, B - A, seeded from the
config's seed). B is always ``fedit``; A is ``base``, each local-only client's own folder
(``local-only/client_NNNN``: the ``local-only`` folder itself holds a mean, not answers of
one model) and ``centralized``. Against the local-only clients the section also counts, per
metric, how many of them FedIT beats, ties or loses to at 95%, and the same at equal answer
length for the answer scores (``length_controlled``: ROUGE-L, similarity, ...).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from fedit.errors import DataError
from fedit.evaluate.compare import NO_DIFFERENCE, compare_evals
from fedit.evaluate.verdicts import VERDICTS, verdicts_of


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
    equal: dict[str, Counter[str]] = {}  # the same at equal answer length
    for a, _ in paired_folders(local_clients):
        pair = pairs[f"fedit vs {a.replace('/', ' ')}"]
        if a.startswith("local-only/"):
            for metric, m in pair.get("metrics", {}).items():
                if m["diff"] is not None:  # a metric without rows (not generated) is no tie
                        counts.setdefault(metric, Counter())[m["verdict"]] += 1
                if (m.get("length_controlled") or {}).get("low") is not None:
                    equal.setdefault(metric, Counter())[m["length_controlled"]["verdict"]] += 1
    return {
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95,
                      "interval": "percentile", "paired_over": "rows", "difference": "B - A"},
        "pairs": pairs,
        "fedit_vs_local_only_clients": {
            metric: {v: c[v] for v in verdicts_of(metric)} for metric, c in counts.items()},
        "fedit_vs_local_only_clients_at_equal_length": {
            metric: {v: c[v] for v in verdicts_of(metric)} for metric, c in equal.items()},
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
            lc = m.get("length_controlled") or {}
            if lc.get("low") is not None:
                slope = "none" if lc["slope"] is None else _num(lc["slope"])
                lines.append(f"{name}: {metric} at equal length {_num(lc['diff'])} "
                             f"[{_num(lc['low'])}, {_num(lc['high'])}] {lc['verdict']} "
                             f"(slope on the log length ratio {slope}, {lc['rows']} rows)")
    for metric, c in paired["fedit_vs_local_only_clients"].items():
        lines.append(_record(metric, c, ""))
    for metric, c in paired.get("fedit_vs_local_only_clients_at_equal_length", {}).items():
        lines.append(_record(metric, c, " at equal length"))
    return lines


def _record(metric: str, c: dict[str, int], what: str) -> str:
    up, _, down = verdicts_of(metric)
    return (f"fedit vs the {sum(c.values())} local-only clients on {metric}{what}: {up} "
            f"than {c[up]}, tied with {c[NO_DIFFERENCE]}, {down} than {c[down]}")


__all__ = ["VERDICTS", "format_paired", "paired_folders", "paired_section"]
