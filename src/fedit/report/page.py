"""The report's HTML page: tables, sections and the page itself, plots embedded."""

from __future__ import annotations

import base64
import html
from datetime import datetime
from pathlib import Path
from typing import Any

from fedit.evaluate.verdicts import verdicts_of
from fedit.io import atomic_write_bytes, atomic_write_text
from fedit.report.plots import (
    categories,
    client_heatmap,
    plot_category_bars,
    plot_category_curves,
    plot_loss_curve,
    plot_paired_differences,
    plot_per_client,
    plot_preference_curve,
)
from fedit.report.source import Source, duration, load_source

METRIC_COLUMNS = [("loss", "loss"), ("perplexity", "perplexity"), ("rouge_l", "ROUGE-L"),
                   ("similarity", "similarity"), ("exact_match", "exact match"),
                   ("preference_accuracy", "preference accuracy"),
                   ("reward_margin", "reward margin"), ("answer_tokens", "answer tokens")]
NO_BEST = ("answer_tokens",)  # a length: neither side is better


CSS = """
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


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(v: Any, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else esc(v)


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def metrics_table(src: Source) -> str:
    """Overall metrics, one row a model; the best value of each column in bold."""
    cols = [(k, t) for k, t in METRIC_COLUMNS
            if any(ev.get("overall", {}).get(k) is not None for ev in src.evals.values())]
    best: dict[str, float] = {}
    for k, _ in cols:
        vals = [ev["overall"][k] for ev in src.evals.values()
                if ev.get("overall", {}).get(k) is not None]
        if len(vals) > 1 and max(vals) > min(vals) and k not in NO_BEST:  # none when all tie
            best[k] = min(vals) if k in ("loss", "perplexity") else max(vals)
    head = "".join(f"<th>{esc(t)}</th>" for _, t in cols)
    extra = src.kind == "experiment"
    head += "<th>steps</th><th>train time</th><th>eval time</th>" if extra else ""
    rows = []
    for arm, ev in src.evals.items():
        o = ev.get("overall", {})
        cells = "".join(
            f'<td class="num{" best" if k in best and o.get(k) == best[k] else ""}">'
            f"{num(o.get(k))}</td>" for k, _ in cols)
        if extra:
            info = src.arm_info.get(arm, {})
            cells += (f'<td class="num">{esc(info.get("steps", "?"))}</td>'
                      f'<td class="num">{duration(info.get("train_seconds"))}</td>'
                      f'<td class="num">{duration(info.get("eval_seconds"))}</td>')
        rows.append(f"<tr><th>{esc(arm)}</th>{cells}</tr>")
    rows_n = next(iter(src.evals.values()), {}).get("overall", {}).get("rows", "?")
    tokens = ("; answer tokens: mean length of the generated answers"
              if any(k == "answer_tokens" for k, _ in cols) else "")
    return (f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"
            f'<p class="muted">{esc(rows_n)} held-out rows; bold: best of the column'
            f"{tokens}.</p>")


def tasks_table(src: Source) -> str:
    """Benchmark task metrics (eval.json ``tasks``), one row a model, one column a
    ``task/metric``; the best value of each column in bold; "" when no model has tasks."""
    values: dict[str, dict[str, dict[str, Any]]] = {}
    for arm, ev in src.evals.items():
        for task, res in ev.get("tasks", {}).get("results", {}).items():
            for name, m in res["metrics"].items():
                values.setdefault(arm, {})[f"{task}/{name}"] = m
    if not values:
        return ""
    cols = list(dict.fromkeys(k for per in values.values() for k in per))
    best: dict[str, float] = {}
    for col in cols:
        ms = [per[col] for per in values.values() if col in per]
        vals = [m["value"] for m in ms]
        higher = ms[0].get("higher_is_better")
        if len(vals) > 1 and max(vals) > min(vals) and higher is not None:
            best[col] = max(vals) if higher else min(vals)
    rows = []
    for arm, per in values.items():
        cells = []
        for col in cols:
            m = per.get(col)
            se = "" if not m or m.get("stderr") is None else f" ± {m['stderr']:.4f}"
            bold = " best" if m and col in best and m["value"] == best[col] else ""
            cells.append(f'<td class="num{bold}">{num(m and m["value"])}{esc(se)}</td>')
        rows.append(f"<tr><th>{esc(arm)}</th>{''.join(cells)}</tr>")
    docs = {res["samples"] for ev in src.evals.values()
            for res in ev.get("tasks", {}).get("results", {}).values()}
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    counts = esc(", ".join(map(str, sorted(docs))))
    return (f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"
            f'<p class="muted">lm-evaluation-harness tasks ({counts} documents a task); '
            "± its standard error; bold: best of the column; the paired differences below "
            "include each task metric.</p>")


def category_table(src: Source, key: str = "loss") -> str:
    cats = categories(src)
    head = "".join(f"<th>{esc(a)}</th>" for a in src.evals)
    rows = []
    for c in cats:
        cells = "".join(f'<td class="num">{num(ev.get("by_category", {}).get(c, {}).get(key))}'
                        "</td>" for ev in src.evals.values())
        rows.append(f"<tr><th>{esc(c)}</th>{cells}</tr>")
    return f"<table><tr><th>category</th>{head}</tr>{''.join(rows)}</table>"


def per_client_table(src: Source) -> str:
    """Each client's rows and loss on its own held-out rows, global vs personal."""
    rows = src.evals.get("run", {}).get("per_client", [])
    body = "".join(
        f"<tr><td>{esc(e['client'])} {esc(e.get('name') or '')}</td>"
        f"<td>{esc(e['rows'])}</td>"
        f"<td>{num(e.get('global_loss'))}</td><td>{num(e.get('personal_loss'))}</td></tr>"
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
    head = "".join(f"<th>{esc(_answer_header(src, arm))}</th>" for arm in by_arm)
    rows = []
    for i in ids:
        r = ref[i]
        prompt = esc(r.get("instruction", ""))
        if r.get("context"):
            prompt += f'<br><span class="muted">context: {esc(r["context"])}</span>'
        cells = "".join(
            f"<td><div>{esc(by_arm[arm].get(i, {}).get('answer', ''))}</div>"
            f'<span class="muted">ROUGE-L {num(by_arm[arm].get(i, {}).get("rouge_l"), 3)}'
            "</span></td>" for arm in by_arm)
        rows.append(f"<tr><td>{esc(r.get('category', ''))}</td><td><div>{prompt}</div></td>"
                    f"<td><div>{esc(r.get('reference', ''))}</div></td>{cells}</tr>")
    return (f'<table class="answers"><tr><th>category</th><th>instruction</th>'
            f"<th>reference</th>{head}</tr>{''.join(rows)}</table>")


def judge_section(src: Source) -> str:
    """One row per judge file: its mode, judge model and overall numbers."""
    keys: list[str] = []
    for judge in src.judges.values():
        keys += [k for k, v in judge["overall"].items()
                 if k not in keys and not isinstance(v, dict | list)]
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    rows = "".join(
        f"<tr><th>{esc(label)}</th><td>{esc(j.get('mode', '?'))}</td>"
        f"<td>{esc(j.get('judge_model', '?'))}</td>"
        + "".join(f'<td class="num">{num(j["overall"].get(k), 3)}</td>' for k in keys)
        + "</tr>" for label, j in src.judges.items())
    return (f"<table><tr><th>answers</th><th>mode</th><th>judge</th>{head}</tr>{rows}</table>"
            '<p class="muted">single: mean 1-10 grade; pairwise: outcomes of these answers '
            "against the other file's, each pair judged in both orders.</p>")


def paired_note(src: Source) -> str:
    """Under the forest plot: how the intervals were drawn, FedIT's record against the
    local-only clients."""
    b = src.paired.get("bootstrap", {})
    def line(metric: str, c: dict[str, int]) -> str:
        up, tie, down = verdicts_of(metric)
        return (f"<li>{esc(metric)}: {up} than {c.get(up, 0)}, tied with {c.get(tie, 0)}, "
                f"{down} than {c.get(down, 0)} of {sum(c.values())} local-only clients</li>")

    counts = "".join(line(metric, c) for metric, c in
                     src.paired.get("fedit_vs_local_only_clients", {}).items())
    counts += "".join(line(f"{metric} at equal length", c) for metric, c in
                      src.paired.get("fedit_vs_local_only_clients_at_equal_length", {}).items())
    return (f'<p class="muted">paired bootstrap over the held-out rows, '
            f"{esc(b.get('resamples', '?'))} resamples, seed {esc(b.get('seed', '?'))}; "
            "the verdict comes from the interval (better / worse when it excludes 0).</p>"
            + (f"<ul>{counts}</ul>" if counts else ""))


def _interval(m: dict[str, Any]) -> str:
    if m.get("low") is None:
        return "–"
    return f"{m['diff']:+.4f} [{m['low']:+.4f}, {m['high']:+.4f}] {esc(m['verdict'])}"


def equal_length_table(src: Source) -> str:
    """Each pair's answer scores as they differ and at equal answer length (the intercept of
    the score difference regressed on the log ratio of the answers' lengths), with the
    slope; empty when no pair has one."""
    rows = []
    for name, pair in src.paired.get("pairs", {}).items():
        for metric, m in pair.get("metrics", {}).items():
            lc = m.get("length_controlled")
            if lc and lc.get("diff") is not None:
                rows.append(f"<tr><th>{esc(name.removeprefix('fedit vs '))}</th>"
                            f"<td>{esc(metric)}</td><td class=\"num\">{_interval(m)}</td>"
                            f'<td class="num">{_interval(lc)}</td>'
                            f'<td class="num">{num(lc.get("slope"))}</td>'
                            f'<td class="num">{esc(lc["rows"])}</td></tr>')
    if not rows:
        return ""
    return ("<h3>At equal answer length</h3><table><tr><th>fedit vs</th><th>metric</th>"
            "<th>difference, 95% interval</th><th>at equal length, 95% interval</th>"
            f"<th>slope</th><th>rows</th></tr>{''.join(rows)}</table>"
            '<p class="muted">at equal length: the intercept a of d = a + b·x fitted by '
            "least squares over the rows, d = fedit - other arm, x = log(fedit's answer "
            "tokens) - log(the other's) (rows with a 0-token answer left out); slope = b; "
            "the interval from the same bootstrap resamples. The hollow diamonds of the "
            "plot.</p>")


def render_html(src: Source, images: dict[str, bytes]) -> str:
    """The whole page; ``images`` maps a section name to its PNG bytes."""
    facts = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in src.facts)
    body = [f"<h1>fedit report: {esc(src.title)}</h1>",
            f'<p class="muted">{esc(src.folder)} · {datetime.now():%Y-%m-%d %H:%M}</p>',
            f'<table class="facts">{facts}</table>']
    if src.evals:
        body += ["<h2>Overall metrics</h2>", metrics_table(src)]
    tasks = tasks_table(src)
    if tasks:
        body += ["<h2>Benchmark tasks</h2>", tasks]
    titles = {"paired": "Paired differences: fedit - other arm, 95% intervals",
              "loss": "Held-out loss per round",
              "preference": "Held-out preference accuracy and reward margin per round",
              "categories": "Per category",
              "category_curves": "Per category per round",
              "per_client": "Per client: global vs personal adapter",
              "clients": "Clients' data (rows per category and client)"}
    for key, title in titles.items():
        if key in images:
            body += [f"<h2>{esc(title)}</h2>", img(images[key], title)]
        if key == "categories" and src.evals:
            body += ["<h3>Loss per category</h3>", category_table(src, "loss")]
        if key == "paired" and key in images:
            body += [paired_note(src), equal_length_table(src)]
        if key == "per_client" and key in images:
            body.append(per_client_table(src))
    if src.judges:
        body += ["<h2>LLM judge</h2>", judge_section(src)]
    if any(src.answers.values()):
        body += ["<h2>Sample answers</h2>", answers_table(src)]
    return html_page(src.title, body)


def html_page(title: str, body: list[str]) -> str:
    """The self-contained page around ``body``: title, style, no external file."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fedit report: {esc(title)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def build_page(folder: Path, out: Path | None = None) -> Path:
    """Write a run's or an experiment's page ``out`` (default ``<folder>/report.html``)
    and its PNGs beside it."""
    src = load_source(Path(folder))
    out = Path(out) if out is not None else src.folder / "report.html"
    makers = {"loss": plot_loss_curve, "preference": plot_preference_curve,
              "categories": plot_category_bars,
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
