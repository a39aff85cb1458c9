"""The report of an ``fedit experiment ... --seeds N`` folder: one page across the seeds.

Each seed is an ordinary experiment with its own ``report.html`` (written by the
experiment; built here when missing). This page puts next to each other what only the
seeds together show: every arm's metrics as mean ± sd across seeds, every local-only
client, and the paired differences of fedit against the other arms, seed by seed, in one
forest plot, with how many seeds' intervals say better, no difference or worse.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fedit.errors import DataError
from fedit.evaluate.forest import plot_forest
from fedit.evaluate.verdicts import verdicts_of
from fedit.io import atomic_write_bytes, atomic_write_text
from fedit.report.page import METRIC_COLUMNS, build_page, esc, html_page, img, num
from fedit.report.source import duration, read_json

PLOT_TITLE = "Paired differences per seed: fedit - other arm, 95% intervals"


def is_seeds_folder(folder: Path) -> bool:
    """True when ``folder``'s experiment.json is a ``--seeds`` summary (one folder a seed)."""
    path = folder / "experiment.json"
    return path.is_file() and isinstance(read_json(path).get("folders"), dict)


def build_seeds_report(folder: Path, out: Path | None = None) -> Path:
    """Write the page across seeds (default ``<folder>/report.html``), its forest plot
    beside it, and each seed's own report where it is missing."""
    exp = read_json(folder / "experiment.json")
    if not isinstance(exp.get("arms"), dict):
        raise DataError(f"{folder / 'experiment.json'}: no 'arms' table; re-run "
                        "`fedit experiment ... --seeds N` to rewrite it")
    for sub in exp["folders"].values():
        if not (folder / sub / "report.html").is_file():
            build_page(folder / sub)
    out = Path(out) if out is not None else folder / "report.html"
    body = [f"<h1>fedit report: {esc(exp.get('experiment', 'experiment'))} "
            f"({esc(exp.get('scale') or 'custom')} scale), {len(exp['seeds'])} seeds</h1>",
            f'<p class="muted">{esc(folder)} · {datetime.now():%Y-%m-%d %H:%M}</p>',
            _facts(exp, folder, out),
            "<h2>Overall metrics across seeds (mean ± sd)</h2>", arms_table(exp),
            "<h2>Local-only clients, seed by seed</h2>", local_clients_table(exp)]
    png = plot_seeds(exp.get("paired") or {})
    if png is not None:
        atomic_write_bytes(out.with_name(f"{out.stem}-paired.png"), png)
        body += [f"<h2>{esc(PLOT_TITLE)}</h2>", img(png, PLOT_TITLE),
                 "<h3>Verdicts across seeds</h3>", paired_table(exp["paired"])]
    atomic_write_text(out, html_page(f"{exp.get('experiment')} across seeds", body))
    return out


def _facts(exp: dict[str, Any], folder: Path, out: Path) -> str:
    budget = exp.get("budget", {})
    links = " · ".join(
        f'<a href="{esc(_relative(folder / sub / "report.html", out))}">seed {esc(s)}</a>'
        for s, sub in exp["folders"].items())
    rows = [("model", esc(exp.get("model", "?"))), ("seeds", links),
            ("clients", esc(exp.get("clients", "?"))),
            ("held-out rows", esc(", ".join(f"{v}" for v in exp.get("test_rows", {}).values()))),
            ("FedIT", esc(f"{budget.get('rounds', '?')} rounds x "
                          f"{budget.get('clients_per_round', '?')} clients x "
                          f"{budget.get('local_steps', '?')} steps")),
            ("wall time (all seeds)", esc(duration(exp.get("seconds")))),
            ("sd", esc(exp.get("sd", "")))]
    return '<table class="facts">' + "".join(
        f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _relative(target: Path, page: Path) -> str:
    try:
        return str(target.resolve().relative_to(page.resolve().parent))
    except ValueError:  # the page written elsewhere (--out): an absolute link
        return target.resolve().as_uri()


def _mean_sd(m: dict[str, Any] | None) -> str:
    if not m:
        return "–"
    return num(m["mean"]) + ("" if m["sd"] is None else f" ± {num(m['sd'])}")


def arms_table(exp: dict[str, Any]) -> str:
    """Arm x metric, mean ± sd across seeds; a metric no arm has is left out."""
    arms = exp["arms"]
    cols = [(k, t) for k, t in METRIC_COLUMNS if any(k in a["overall"] for a in arms.values())]
    head = "".join(f"<th>{esc(t)}</th>" for _, t in cols)
    rows = "".join(f"<tr><th>{esc(arm)}</th>" + "".join(
        f'<td class="num">{_mean_sd(a["overall"].get(k))}</td>' for k, _ in cols) + "</tr>"
        for arm, a in arms.items())
    return f"<table><tr><th>arm</th>{head}</tr>{rows}</table>"


def local_clients_table(exp: dict[str, Any]) -> str:
    """Every client the local-only arm trained, seed by seed."""
    per_client = exp["arms"].get("local-only", {}).get("per_client", {})
    cols = [(k, t) for k, t in METRIC_COLUMNS if k != "perplexity"]
    head = "".join(f"<th>{esc(t)}</th>" for _, t in cols)
    rows = "".join(f"<tr><td>{esc(seed)}</td><td>{esc(c)}</td>" + "".join(
        f'<td class="num">{num(o.get(k))}</td>' for k, _ in cols) + "</tr>"
        for seed, clients in per_client.items() for c, o in clients.items())
    return f"<table><tr><th>seed</th><th>client</th>{head}</tr>{rows}</table>"


def paired_table(paired: dict[str, Any]) -> str:
    """Compared arm x metric: the seeds' mean difference ± sd and their verdict counts."""
    head = ("<tr><th>pair</th><th>metric</th><th>fedit - other, mean ± sd</th><th>n</th>"
            "<th>better (higher)</th><th>no difference</th><th>worse (lower)</th></tr>")
    rows = "".join(
        f"<tr><td>{esc(kind)}</td><td>{esc(metric)} ({esc(m['better'])} is better)</td>"
        f'<td class="num">{_mean_sd(m["diff"])}</td>'
        f'<td class="num">{len(m["per_seed"])}</td>'
        + "".join(f'<td class="num">{m["verdicts"].get(v, 0)}</td>'
                  for v in verdicts_of(metric)) + "</tr>"
        for kind, metrics in paired.items() for metric, m in metrics.items())
    return (f"<table>{head}{rows}</table><p class=\"muted\">Each seed's verdict comes from its "
            "own paired bootstrap 95% interval over rows; n counts seeds (for the local-only "
            "clients, every client of every seed).</p>")


def plot_seeds(paired: dict[str, Any]) -> bytes | None:
    """The forest plot (:mod:`fedit.evaluate.forest`) with a row per pair and seed."""
    rows: dict[str, dict[str, Any]] = {}
    for metrics in paired.values():
        for metric, m in metrics.items():
            for e in m["per_seed"]:
                other = e["a"].replace("local-only/", "local ")
                label = f"{other} · seed {e['seed']}"
                rows.setdefault(label, {})[metric] = {**e, "better": m["better"]}
    return plot_forest(rows, difference="fedit - other arm",
                       xlabel="fedit - other arm (each seed's paired bootstrap 95% interval)")
