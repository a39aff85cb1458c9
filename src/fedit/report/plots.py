"""The report's plots, each a function of a :class:`~fedit.report.source.Source` returning
PNG bytes, or None when the folder has nothing to draw."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fedit.data.partition import plot_partitions
from fedit.evaluate.forest import plot_forest
from fedit.report.source import Source, read_json

ARM_COLORS = {"base": "#8c8c8c", "local-only": "#dd8452", "fedit": "#4c72b0",
              "centralized": "#55a868", "run": "#4c72b0"}



def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _dpo(src: Source) -> bool:
    """A DPO run or experiment: its rounds (or arms) were scored on preference pairs."""
    return any("preference_accuracy" in m for m in src.metrics) or any(
        "preference_accuracy" in ev.get("overall", {}) for ev in src.evals.values())


def _arm_lines(ax: Any, src: Source, key: str) -> None:
    """The experiment's other arms' ``key`` as horizontal lines (not in a plain run)."""
    for arm in ("base", "local-only", "centralized") if src.kind == "experiment" else ():
        value = src.evals.get(arm, {}).get("overall", {}).get(key)
        if value is not None:
            ax.axhline(value, color=ARM_COLORS[arm], ls=":", lw=2, label=f"{arm} ({value:.3f})")


def plot_loss_curve(src: Source) -> bytes | None:
    """Held-out (and train) loss per round (a DPO run's: the DPO loss per pair); other arms
    as horizontal lines."""
    from matplotlib.figure import Figure

    evals = [(m["round"], m["eval_loss"]) for m in src.metrics
             if m.get("eval_loss") is not None]
    trains = [(m["round"], m["train_loss"]) for m in src.metrics
              if m.get("train_loss") is not None]
    if not evals and not trains:
        return None
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    label = "FedIT held-out" if src.kind == "experiment" else "held-out"
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", color=ARM_COLORS["fedit"], label=label)
    if trains:
        ax.plot(*zip(*trains, strict=True), marker=".", ls="--", color="#c44e52", alpha=0.7,
                label="train (clients of the round)")
    dpo = _dpo(src)
    _arm_lines(ax, src, "dpo_loss" if dpo else "loss")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = the starting adapter)" if dpo else "round (0 = base model)")
    ax.set_ylabel("DPO loss per pair" if dpo else "response-token loss")
    ax.set_title("Held-out DPO loss per round" if dpo else "Held-out loss per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_preference_curve(src: Source) -> bytes | None:
    """A DPO run's held-out preference accuracy and reward margin per round (the metrics
    line's ``preference_accuracy`` / ``reward_margin``), or None when no round has them."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(key, title, [(m["round"], m[key]) for m in src.metrics
                            if m.get(key) is not None])
              for key, title in (("preference_accuracy", "preference accuracy"),
                                 ("reward_margin", "mean implicit reward margin"))]
    if not any(pts for _, _, pts in panels):
        return None
    fig = Figure(figsize=(8, 5.6), layout="constrained")
    label = "FedIT" if src.kind == "experiment" else "held-out"
    for ax, (key, title, pts) in zip(fig.subplots(2, 1, sharex=True), panels, strict=True):
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=ARM_COLORS["fedit"], label=label)
        _arm_lines(ax, src, key)
        if src.kind == "experiment":
            ax.legend(fontsize=8)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = the reference: accuracy 0, margin 0)")
    fig.suptitle("Held-out preference pairs per round (higher is better)")
    return _png(fig)


def categories(src: Source) -> list[str]:
    cats: list[str] = []
    for ev in src.evals.values():
        cats += [c for c in ev.get("by_category", {}) if c not in cats]
    return sorted(cats)


def plot_category_bars(src: Source) -> bytes | None:
    """Per-category loss and ROUGE-L, one bar a model (arm), side by side."""
    import numpy as np
    from matplotlib.figure import Figure

    cats, arms = categories(src), list(src.evals)
    if not cats:
        return None
    metrics = [("loss", "response-token loss (lower is better)"),
               ("rouge_l", "ROUGE-L (higher is better)")]
    metrics = [(k, t) for k, t in metrics if any(
        ev.get("by_category", {}).get(c, {}).get(k) is not None
        for ev in src.evals.values() for c in cats)]
    if not metrics:
        return None
    fig = Figure(figsize=(10, 3.6 * len(metrics)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(metrics), 1))
    x, width = np.arange(len(cats)), 0.8 / max(1, len(arms))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for i, arm in enumerate(arms):
            by = src.evals[arm].get("by_category", {})
            vals = [by.get(c, {}).get(key) for c in cats]
            ax.bar(x + (i - (len(arms) - 1) / 2) * width,
                   [np.nan if v is None else v for v in vals], width,
                   label=arm, color=ARM_COLORS.get(arm))
        ax.set_xticks(x, cats, rotation=20, ha="right", fontsize=9)
        values = [v for ev in src.evals.values() for v in
                  (ev.get("by_category", {}).get(c, {}).get(key) for c in cats) if v is not None]
        # Arms' losses differ by a few percent: start the axis near them, unless some
        # category's loss is far below the others (then a cut axis would mislead)
        close = bool(values) and min(values) > 0.6 * max(values)
        low = 0.9 * min(values) if key == "loss" and close else 0.0
        ax.set_ylim(bottom=low, top=max(1e-3, max(values, default=0) * 1.05))
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncols=len(arms))
    return _png(fig)


def plot_category_curves(src: Source) -> bytes | None:
    """Held-out loss per category per round, when the rounds recorded it."""
    from matplotlib.figure import Figure

    lines = [m for m in src.metrics if isinstance(m.get("eval_loss_by_category"), dict)]
    if not lines:
        return None
    cats = sorted({c for m in lines for c in m["eval_loss_by_category"]})
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    for c in cats:
        pts = [(m["round"], m["eval_loss_by_category"][c]) for m in lines
               if m["eval_loss_by_category"].get(c) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=c)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("response-token loss")
    ax.set_title("Held-out loss per category per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    return _png(fig)


def plot_per_client(src: Source) -> bytes | None:
    """Each client's loss on its own held-out rows: global vs personal adapter, grouped
    bars (``per_client`` of a run's eval.json, from ``fedit eval`` on a run whose clients
    hold out rows of their own)."""
    import numpy as np
    from matplotlib.figure import Figure

    rows = [e for e in src.evals.get("run", {}).get("per_client", [])
            if e.get("global_loss") is not None]
    if not rows:
        return None
    x, width = np.arange(len(rows)), 0.4
    fig = Figure(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (key, label, color) in enumerate((("global_loss", "global adapter", "#4c72b0"),
                                             ("personal_loss", "personal adapter", "#dd8452"))):
        vals = [np.nan if e.get(key) is None else e[key] for e in rows]
        if not all(np.isnan(vals)):
            bars = ax.bar(x + (i - 0.5) * width, vals, width, label=label, color=color)
            if len(rows) <= 12:
                ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    values = [e[k] for e in rows for k in ("global_loss", "personal_loss")
              if e.get(k) is not None]
    # The two adapters differ by a few percent: start the axis near them (as the
    # per-category bars do) unless a loss is far below the others
    low = 0.9 * min(values) if min(values) > 0.6 * max(values) else 0.0
    ax.set_ylim(bottom=low, top=max(values) * 1.04)
    ax.set_xticks(x, [f"{e['client']}\n{e['name']}" if e.get("name") else str(e["client"])
                      for e in rows], fontsize=9)
    ax.set_xlabel("client")
    ax.set_ylabel("response-token loss (lower is better)")
    ax.set_title("Each client's own held-out rows: global vs personal adapter")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize=8, ncols=2, loc="outside lower center")
    return _png(fig)


def plot_paired_differences(src: Source) -> bytes | None:
    """An experiment's forest plot (``experiment.json``'s ``"paired"``: a panel per metric,
    a row per pair), else None (no pair has a metric with rows)."""
    if not src.paired.get("pairs"):
        return None
    return plot_forest({name.removeprefix("fedit vs "): p["metrics"]
                        for name, p in src.paired["pairs"].items() if "metrics" in p},
                       difference="fedit - other arm",
                       xlabel="fedit - other arm (paired bootstrap 95% interval over rows)")


def client_heatmap(src: Source) -> bytes | None:
    """The partition plot: clients.png as written, else drawn again from stats.json."""
    if src.partitions is None:
        return None
    png = src.partitions / "clients.png"
    if png.is_file():
        return png.read_bytes()
    import tempfile


    with tempfile.TemporaryDirectory() as tmp:
        return plot_partitions(read_json(src.partitions / "stats.json"),
                               Path(tmp) / "clients.png").read_bytes()
