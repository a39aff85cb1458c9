"""The forest plot of paired differences, drawn once for ``fedit eval --compare`` (one pair)
and for an experiment's report (every pair against fedit).

One panel per metric, each on its own scale (a loss and a ROUGE-L differ in size), one
row per pair: the difference as a point, its 95% interval as a bar coloured by its
verdict, the zero line, and the numbers with the verdict on the right. A metric compared
at equal answer length (``length_controlled``) has a second, hollow diamond just below
its point: the difference at equal length and its interval.
"""

from __future__ import annotations

import io
from typing import Any

from fedit.evaluate.verdicts import METRICS, NO_DIFFERENCE

COLORS = {"better": "#55a868", "worse": "#c44e52", NO_DIFFERENCE: "#4c72b0"}
WIDTH_IN, ROW_IN, MARGIN_IN = 10.0, 0.42, 0.9  # figure size: MARGIN + ROW per pair and panel
EQUAL_SHIFT = 0.28  # the equal-length marker, this far below its pair's point (rows are 1)


def plot_forest(pairs: dict[str, dict[str, Any]], *, difference: str, xlabel: str,
                title: str | None = None) -> bytes | None:
    """PNG bytes of the forest plot, or None when no pair has a metric with rows.

    Parameters
    ----------
    pairs : dict
        Row label -> that pair's ``metrics`` (as :func:`fedit.evaluate.compare.compare_evals`
        returns them: ``diff``, ``low``, ``high``, ``verdict``, ``better`` per metric).
    difference : str
        What a difference is, for the panel titles (``"B - A"``).
    xlabel : str
        The bottom axis' label.
    title : str, optional
        A title over the whole figure.
    """
    from matplotlib.figure import Figure

    panels = {metric: [(label, ms[metric]) for label, ms in pairs.items()
                       if ms.get(metric, {}).get("diff") is not None]
              for metric in METRICS}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    heights = [len(rows) + 1 for rows in panels.values()]
    fig = Figure(figsize=(WIDTH_IN, MARGIN_IN + ROW_IN * sum(heights)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (metric, rows) in zip(axes, panels.items(), strict=True):
        _panel(ax, rows)
        better = rows[0][1]["better"]
        which = f" ({better} is better)" if better in ("higher", "lower") else ""
        ax.set_title(f"{metric}{which}: {difference}", fontsize=9, loc="left")
    if any((m.get("length_controlled") or {}).get("low") is not None
           for rows in panels.values() for _, m in rows):
        xlabel += "\nhollow diamond under a point: the difference at equal answer length"
    axes[-1].set_xlabel(xlabel)
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _panel(ax: Any, rows: list[tuple[str, dict[str, Any]]]) -> None:
    """One metric's rows: points, 95% bars, the zero line, labels left, numbers right."""
    equal = [(y, m["length_controlled"]) for y, (_, m) in enumerate(rows)
             if (m.get("length_controlled") or {}).get("low") is not None]
    for y, (_, m) in enumerate(rows):
        ax.errorbar([m["diff"]], [y], xerr=[[m["diff"] - m["low"]], [m["high"] - m["diff"]]],
                    fmt="o", color=COLORS.get(m["verdict"], COLORS[NO_DIFFERENCE]), capsize=4,
                    lw=2)
    for y, lc in equal:
        ax.errorbar([lc["diff"]], [y + EQUAL_SHIFT],
                    xerr=[[lc["diff"] - lc["low"]], [lc["high"] - lc["diff"]]], fmt="D",
                    mfc="white", color=COLORS.get(lc["verdict"], COLORS[NO_DIFFERENCE]),
                    capsize=3, lw=1, ms=5)
    ax.axvline(0, color="black", lw=1, ls="--")
    # all intervals [0, 0] (identical answers): a readable axis rather than +-1e-9
    reach = max(max(abs(m["low"]), abs(m["high"])) for _, m in
                [*rows, *(("", lc) for _, lc in equal)]) * 1.3 or 0.01
    ax.set_xlim(-reach, reach)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first pair on top
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(len(rows)), [f"{m['diff']:+.4f} [{m['low']:+.4f}, {m['high']:+.4f}]"
                                        f"  {m['verdict']} ({m['rows']} rows)"
                                        for _, m in rows], fontsize=8)
    right.tick_params(length=0)
    ax.grid(axis="x", alpha=0.3)
