"""``fedit report``: one self-contained HTML page for a run folder or an experiment folder.

The page embeds its PNG plots as base64 (no external file, script or style sheet), so it
can be mailed or attached as it is; the same PNGs are also written beside the HTML.

- experiment folder (``experiment.json``, from ``fedit experiment``): held-out loss per
  round of the FedIT arm with the other arms as horizontal lines, per-category loss and
  ROUGE-L bars of the four arms, the paired differences of fedit against every other arm
  as a forest plot (``experiment.json``'s ``"paired"``), the clients' data heatmap, the
  overall metrics table, sample answers side by side, each arm's ``judge.json`` when there
  is one;
- run folder (``metrics.jsonl``, from ``fedit train``): the loss curves (per category too
  when the rounds recorded it), the heatmap, and ``eval.json`` / ``judge.json`` when
  ``fedit eval`` / ``fedit judge`` have written them.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedit.errors import DataError
from fedit.io import atomic_write_bytes, atomic_write_text

ARM_COLORS = {"base": "#8c8c8c", "local-only": "#dd8452", "fedit": "#4c72b0",
              "centralized": "#55a868", "run": "#4c72b0"}
_METRIC_COLUMNS = [("loss", "loss"), ("perplexity", "perplexity"), ("rouge_l", "ROUGE-L"),
                   ("similarity", "similarity"), ("exact_match", "exact match")]


@dataclass
class Source:
    """What a report is drawn from: one run, or the arms of an experiment."""

    folder: Path
    kind: str  # "experiment" | "run"
    title: str
    facts: list[tuple[str, str]]  # shown under the title
    metrics: list[dict[str, Any]]  # metrics.jsonl lines of the (FedIT) run; may be empty
    evals: dict[str, dict[str, Any]]  # arm -> eval.json
    answers: dict[str, list[dict[str, Any]]]  # arm -> answers.jsonl
    arm_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> steps, time
    judges: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> judge.json
    partitions: Path | None = None  # the folder with stats.json / clients.png
    paired: dict[str, Any] = field(default_factory=dict)  # experiment.json's "paired"


# -- reading ------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); "
                        "re-run the command that wrote it") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _read_arm(folder: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    ev = _read_json(folder / "eval.json") if (folder / "eval.json").is_file() else None
    ans = _read_jsonl(folder / "answers.jsonl") if (folder / "answers.jsonl").is_file() else []
    return ev, ans


def load_source(folder: Path) -> Source:
    """Read an experiment folder or a run folder; a one-line error for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (give a run folder or an experiment folder)")
    if (folder / "experiment.json").is_file():
        return _load_experiment(folder)
    if (folder / "metrics.jsonl").is_file() or (folder / "eval.json").is_file():
        return _load_run(folder)
    raise DataError(f"{folder}: neither an experiment folder (experiment.json) nor a run "
                    "folder (metrics.jsonl); run `fedit experiment` or `fedit train` first")


def _load_experiment(folder: Path) -> Source:
    exp = _read_json(folder / "experiment.json")
    if not isinstance(exp, dict) or not isinstance(exp.get("arms"), dict):
        raise DataError(f"{folder / 'experiment.json'}: no 'arms' table; re-run "
                        "`fedit experiment` to rewrite it")
    if isinstance(exp.get("folders"), dict):  # --seeds: one experiment a seed below
        seeds = ", ".join(exp["folders"])
        raise DataError(f"{folder} holds {len(exp['folders'])} seeds ({seeds}), each with its "
                        f"own report.html: fedit report {folder}/seed-S")
    src = Source(folder, "experiment", f"{exp.get('experiment', 'experiment')} "
                 f"({exp.get('scale') or 'custom'} scale)", [], [], {}, {})
    for arm, info in exp["arms"].items():
        ev, ans = _read_arm(folder / arm)
        src.evals[arm] = ev if ev is not None else {"overall": info.get("overall", {}),
                                                    "by_category": info.get("by_category", {})}
        src.answers[arm] = ans
        src.arm_info[arm] = info
        src.judges |= _read_judges(folder / arm, arm)
    src.paired = exp.get("paired") or {}
    if (folder / "fedit" / "metrics.jsonl").is_file():
        src.metrics = _read_jsonl(folder / "fedit" / "metrics.jsonl")
    budget = exp.get("budget", {})
    src.facts = [
        ("model", str(exp.get("model", "?"))),
        ("clients", str(exp.get("clients", "?"))),
        ("held-out rows", str(exp.get("test_rows", "?"))),
        ("FedIT", f"{budget.get('rounds', '?')} rounds x {budget.get('clients_per_round', '?')}"
                  f" clients x {budget.get('local_steps', '?')} steps"),
        ("steps a client / in all", f"{budget.get('client_steps', '?')} / "
                                    f"{budget.get('total_steps', '?')}"),
        ("local-only clients", ", ".join(map(str, exp.get("local_clients", [])))),
        ("wall time (last command)", _duration(exp.get("seconds"))),
    ]
    src.partitions = _first_dir(folder / "partitions", folder / "fedit" / "partitions")
    return src


def _load_run(folder: Path) -> Source:
    metrics = _read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
    title = f"run {folder.name}" if metrics else folder.name
    src = Source(folder, "run", title, [], metrics, {}, {})
    ev, ans = _read_arm(folder)
    if ev is not None:
        src.evals["run"], src.answers["run"] = ev, ans
    src.judges = _read_judges(folder, "run")
    summary = _read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    trained = [m for m in metrics if m.get("round", 0) > 0]
    rows = summary.get("test_rows", (ev or {}).get("overall", {}).get("rows"))
    facts = [("rounds", len(trained) if metrics else None), ("clients", summary.get("clients")),
             ("held-out rows", rows), ("wall time", summary.get("seconds"))]
    src.facts = [(k, _duration(v) if k == "wall time" else str(v))
                 for k, v in facts if v is not None]  # only what the folder says
    src.partitions = _first_dir(folder / "partitions")
    return src


def _read_judges(folder: Path, arm: str) -> dict[str, dict[str, Any]]:
    """judge.json (single grading) and judge-vs-<other>.json (pairwise) of one model."""
    out = {}
    for path in sorted(folder.glob("judge*.json")):
        label = arm if path.name == "judge.json" else f"{arm} {path.stem.removeprefix('judge-')}"
        judge = _read_json(path)
        if not isinstance(judge, dict) or not isinstance(judge.get("overall"), dict):
            raise DataError(f"{path}: no 'overall' table; re-run `fedit judge` to rewrite it")
        out[label] = judge
    return out


def _first_dir(*folders: Path) -> Path | None:
    return next((f for f in folders if (f / "stats.json").is_file()
                 or (f / "clients.png").is_file()), None)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


# -- plots --------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def plot_loss_curve(src: Source) -> bytes | None:
    """Held-out (and train) loss per round; other arms as horizontal lines."""
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
    for arm in ("base", "local-only", "centralized") if src.kind == "experiment" else ():
        loss = src.evals.get(arm, {}).get("overall", {}).get("loss")
        if loss is not None:
            ax.axhline(loss, color=ARM_COLORS[arm], ls=":", lw=2, label=f"{arm} ({loss:.3f})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("response-token loss")
    ax.set_title("Held-out loss per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _categories(src: Source) -> list[str]:
    cats: list[str] = []
    for ev in src.evals.values():
        cats += [c for c in ev.get("by_category", {}) if c not in cats]
    return sorted(cats)


def plot_category_bars(src: Source) -> bytes | None:
    """Per-category loss and ROUGE-L, one bar a model (arm), side by side."""
    import numpy as np
    from matplotlib.figure import Figure

    cats, arms = _categories(src), list(src.evals)
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
    """An experiment's forest plot (``experiment.json``'s ``"paired"``), else None."""
    from fedit.experiment_paired import plot_paired

    return plot_paired(src.paired) if src.paired.get("pairs") else None


def client_heatmap(src: Source) -> bytes | None:
    """The partition plot: clients.png as written, else drawn again from stats.json."""
    if src.partitions is None:
        return None
    png = src.partitions / "clients.png"
    if png.is_file():
        return png.read_bytes()
    import tempfile

    from fedit.data.partition import plot_partitions

    with tempfile.TemporaryDirectory() as tmp:
        return plot_partitions(_read_json(src.partitions / "stats.json"),
                               Path(tmp) / "clients.png").read_bytes()


# -- HTML ---------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1200px;padding:0 16px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:bold;background:#eef6ee}
.facts td:first-child{color:#666}img{max-width:100%;border:1px solid #eee}
.answers td{max-width:260px}.answers div{max-height:220px;overflow:auto;white-space:pre-wrap}
.muted{color:#777;font-size:13px}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: Any, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else _esc(v)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def metrics_table(src: Source) -> str:
    """Overall metrics, one row a model; the best value of each column in bold."""
    cols = [(k, t) for k, t in _METRIC_COLUMNS
            if any(ev.get("overall", {}).get(k) is not None for ev in src.evals.values())]
    best: dict[str, float] = {}
    for k, _ in cols:
        vals = [ev["overall"][k] for ev in src.evals.values()
                if ev.get("overall", {}).get(k) is not None]
        if len(vals) > 1 and max(vals) > min(vals):  # no "best" when all tie
            best[k] = min(vals) if k in ("loss", "perplexity") else max(vals)
    head = "".join(f"<th>{_esc(t)}</th>" for _, t in cols)
    extra = src.kind == "experiment"
    head += "<th>steps</th><th>train time</th><th>eval time</th>" if extra else ""
    rows = []
    for arm, ev in src.evals.items():
        o = ev.get("overall", {})
        cells = "".join(
            f'<td class="num{" best" if k in best and o.get(k) == best[k] else ""}">'
            f"{_num(o.get(k))}</td>" for k, _ in cols)
        if extra:
            info = src.arm_info.get(arm, {})
            cells += (f'<td class="num">{_esc(info.get("steps", "?"))}</td>'
                      f'<td class="num">{_duration(info.get("train_seconds"))}</td>'
                      f'<td class="num">{_duration(info.get("eval_seconds"))}</td>')
        rows.append(f"<tr><th>{_esc(arm)}</th>{cells}</tr>")
    rows_n = next(iter(src.evals.values()), {}).get("overall", {}).get("rows", "?")
    return (f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"
            f'<p class="muted">{_esc(rows_n)} held-out rows; bold: best of the column.</p>')


def category_table(src: Source, key: str = "loss") -> str:
    cats = _categories(src)
    head = "".join(f"<th>{_esc(a)}</th>" for a in src.evals)
    rows = []
    for c in cats:
        cells = "".join(f'<td class="num">{_num(ev.get("by_category", {}).get(c, {}).get(key))}'
                        "</td>" for ev in src.evals.values())
        rows.append(f"<tr><th>{_esc(c)}</th>{cells}</tr>")
    return f"<table><tr><th>category</th>{head}</tr>{''.join(rows)}</table>"


def per_client_table(src: Source) -> str:
    """Each client's rows and loss on its own held-out rows, global vs personal."""
    rows = src.evals.get("run", {}).get("per_client", [])
    body = "".join(
        f"<tr><td>{_esc(e['client'])} {_esc(e.get('name') or '')}</td>"
        f"<td>{_esc(e['rows'])}</td>"
        f"<td>{_num(e.get('global_loss'))}</td><td>{_num(e.get('personal_loss'))}</td></tr>"
        for e in rows)
    return ("<table><tr><th>client</th><th>held-out rows</th><th>global loss</th>"
            f"<th>personal loss</th></tr>{body}</table>")


def sample_rows(answers: dict[str, list[dict[str, Any]]], n: int) -> list[int]:
    """Ids of up to ``n`` held-out rows: one per category first, then by id."""
    first = next((a for a in answers.values() if a), [])
    picked: list[int] = []
    seen: set[str] = set()
    for a in first:
        if a.get("category") not in seen:
            seen.add(str(a.get("category")))
            picked.append(int(a["id"]))
    picked += [int(a["id"]) for a in first if int(a["id"]) not in picked]
    return sorted(picked[:n])


def _answer_header(src: Source, arm: str) -> str:
    """The arm's name; for local-only, whose client answered (its numbers are a mean)."""
    client = src.evals.get(arm, {}).get("settings", {}).get("answers_from_client")
    return f"{arm} (client {client})" if client is not None else arm


def answers_table(src: Source, n: int = 8) -> str:
    """Instruction, reference and every model's answer, side by side (all escaped)."""
    ids = sample_rows(src.answers, n)
    if not ids:
        return '<p class="muted">No answers.jsonl (run with generation to see answers).</p>'
    by_arm = {arm: {int(a["id"]): a for a in ans} for arm, ans in src.answers.items() if ans}
    ref = next(iter(by_arm.values()))
    head = "".join(f"<th>{_esc(_answer_header(src, arm))}</th>" for arm in by_arm)
    rows = []
    for i in ids:
        r = ref[i]
        prompt = _esc(r.get("instruction", ""))
        if r.get("context"):
            prompt += f'<br><span class="muted">context: {_esc(r["context"])}</span>'
        cells = "".join(
            f"<td><div>{_esc(by_arm[arm].get(i, {}).get('answer', ''))}</div>"
            f'<span class="muted">ROUGE-L {_num(by_arm[arm].get(i, {}).get("rouge_l"), 3)}'
            "</span></td>" for arm in by_arm)
        rows.append(f"<tr><td>{_esc(r.get('category', ''))}</td><td><div>{prompt}</div></td>"
                    f"<td><div>{_esc(r.get('reference', ''))}</div></td>{cells}</tr>")
    return (f'<table class="answers"><tr><th>category</th><th>instruction</th>'
            f"<th>reference</th>{head}</tr>{''.join(rows)}</table>")


def judge_section(src: Source) -> str:
    """One row per judge file: its mode, judge model and overall numbers."""
    keys: list[str] = []
    for judge in src.judges.values():
        keys += [k for k, v in judge["overall"].items()
                 if k not in keys and not isinstance(v, dict | list)]
    head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
    rows = "".join(
        f"<tr><th>{_esc(label)}</th><td>{_esc(j.get('mode', '?'))}</td>"
        f"<td>{_esc(j.get('judge_model', '?'))}</td>"
        + "".join(f'<td class="num">{_num(j["overall"].get(k), 3)}</td>' for k in keys)
        + "</tr>" for label, j in src.judges.items())
    return (f"<table><tr><th>answers</th><th>mode</th><th>judge</th>{head}</tr>{rows}</table>"
            '<p class="muted">single: mean 1-10 grade; pairwise: outcomes of these answers '
            "against the other file's, each pair judged in both orders.</p>")


def paired_note(src: Source) -> str:
    """Under the forest plot: how the intervals were drawn, FedIT's record against the
    local-only clients."""
    b = src.paired.get("bootstrap", {})
    counts = "".join(
        f"<li>{_esc(metric)}: better than {c.get('better', 0)}, tied with "
        f"{c.get('no difference at 95%', 0)}, worse than {c.get('worse', 0)} of "
        f"{sum(c.values())} local-only clients</li>"
        for metric, c in src.paired.get("fedit_vs_local_only_clients", {}).items())
    return (f'<p class="muted">paired bootstrap over the held-out rows, '
            f"{_esc(b.get('resamples', '?'))} resamples, seed {_esc(b.get('seed', '?'))}; "
            "the verdict comes from the interval (better / worse when it excludes 0).</p>"
            + (f"<ul>{counts}</ul>" if counts else ""))


def render_html(src: Source, images: dict[str, bytes]) -> str:
    """The whole page; ``images`` maps a section name to its PNG bytes."""
    facts = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in src.facts)
    body = [f"<h1>fedit report: {_esc(src.title)}</h1>",
            f'<p class="muted">{_esc(src.folder)} · {datetime.now():%Y-%m-%d %H:%M}</p>',
            f'<table class="facts">{facts}</table>']
    if src.evals:
        body += ["<h2>Overall metrics</h2>", metrics_table(src)]
    titles = {"paired": "Paired differences: fedit - other arm, 95% intervals",
              "loss": "Held-out loss per round", "categories": "Per category",
              "category_curves": "Per category per round",
              "per_client": "Per client: global vs personal adapter",
              "clients": "Clients' data (rows per category and client)"}
    for key, title in titles.items():
        if key in images:
            body += [f"<h2>{_esc(title)}</h2>", _img(images[key], title)]
        if key == "categories" and src.evals:
            body += ["<h3>Loss per category</h3>", category_table(src, "loss")]
        if key == "paired" and key in images:
            body.append(paired_note(src))
        if key == "per_client" and key in images:
            body.append(per_client_table(src))
    if src.judges:
        body += ["<h2>LLM judge</h2>", judge_section(src)]
    if any(src.answers.values()):
        body += ["<h2>Sample answers</h2>", answers_table(src)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fedit report: {_esc(src.title)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def build_report(folder: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default ``<folder>/report.html``) and its PNGs beside it."""
    src = load_source(Path(folder))
    out = Path(out) if out is not None else src.folder / "report.html"
    makers = {"loss": plot_loss_curve, "categories": plot_category_bars,
              "category_curves": plot_category_curves, "per_client": plot_per_client,
              "clients": client_heatmap, "paired": plot_paired_differences}
    images = {}
    for key, make in makers.items():
        png = make(src)
        if png is not None:
            images[key] = png
            atomic_write_bytes(out.with_name(f"{out.stem}-{key}.png"), png)
    atomic_write_text(out, render_html(src, images))
    return out
