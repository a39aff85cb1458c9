"""Two evaluations of the same rows compared: the paired difference of each metric, B - A,
with a paired bootstrap 95% percentile interval over rows.

Rows are matched by their text (instruction, context, reference; a preference pair's
prompt, chosen and rejected), not by position. Preference evaluations
(:mod:`fedit.evaluate.preference`) compare their own metrics. The row
indices are resampled once and the same resamples serve every metric; a row whose metric
is missing in either arm (no loss: the prompt fills the cutoff; exact match outside the
short-answer categories) is left out of that metric only, and counted. The verdict comes
from the interval, never from the point estimate: "better" or "worse" when the interval
excludes 0, else "no difference at 95%".

A per-row score of a generated answer (ROUGE-L, similarity, exact match, the judge's
score: ``LENGTH_CONTROLLED``) is also compared at equal answer length, in the manner of
length-controlled AlpacaEval (Dubois et al. 2024, arXiv:2404.04475): over the matched
rows, d = score_B - score_A is regressed by ordinary least squares on
x = log(answer_tokens_B) - log(answer_tokens_A), d = a + b x, and the intercept a is the
difference when both answers have the same length; the same bootstrap resamples (same
seed) give its interval. See :func:`length_controlled`.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedit.errors import DataError
from fedit.evaluate.evaluation import load_eval
from fedit.evaluate.forest import plot_forest as draw
from fedit.evaluate.preference import KIND as PREFERENCE
from fedit.evaluate.tasks import load_task_samples
from fedit.evaluate.verdicts import (
    LENGTH_CONTROLLED,
    METRICS,
    NO_DIFFERENCE,
    PREFERENCE_METRICS,
    RECORD_FIELDS,
    SFT_METRICS,
)
from fedit.io import atomic_write_bytes, atomic_write_json

# eval.json settings that change which rows are scored or what a metric means
SETTING_KEYS = ("rows", "label_field", "template", "cutoff_len", "truncation",
                "min_response_tokens", "train_on_inputs", "fields", "generated",
                "max_new_tokens", "decoding", "exact_match_categories", "similarity_model",
                "beta", "dpo_loss", "label_smoothing")
# recorded since issue 14: an eval.json written before has none, and is not refused for it
LATER_KEYS = ("min_response_tokens", "train_on_inputs", "fields")
SETTING_NAMES = {"template": "data.template", "cutoff_len": "data.cutoff_len",
                 "truncation": "data.truncation", "label_field": "data.label_field",
                 "min_response_tokens": "data.min_response_tokens",
                 "train_on_inputs": "data.train_on_inputs", "fields": "data.fields",
                 "max_new_tokens": "eval.max_new_tokens", "decoding": "eval decoding",
                 "rows": "held-out rows", "generated": "generated answers",
                 "exact_match_categories": "eval.exact_match_categories",
                 "similarity_model": "similarity model", "beta": "dpo.beta",
                 "dpo_loss": "dpo.loss", "label_smoothing": "dpo.label_smoothing"}
JUDGE_RECORDS = "judge.jsonl"  # `fedit judge` single grading, beside answers.jsonl
COMPARE_FILE = "compare.json"
COMPARE_PLOT = "compare.png"  # the forest plot, beside compare.json

Key = tuple[str, str, str, int]


def row_keys(answers: list[dict[str, Any]]) -> list[Key]:
    """Each answer's row key: its instruction, context and reference text, and which
    occurrence of that text it is (so duplicated rows still match one to one)."""
    seen: Counter[tuple[str, str, str]] = Counter()
    keys = []
    for a in answers:
        text = (str(a.get("instruction") or ""), str(a.get("context") or ""),
                str(a.get("reference") or ""))
        if "chosen" in a:  # a preference pair: its (maybe conversational) prompt and answers
            text = (json.dumps(a.get("prompt"), sort_keys=True), str(a["chosen"]),
                    str(a.get("rejected")))
        keys.append((*text, seen[text]))
        seen[text] += 1
    return keys


def check_settings(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Refuse two evaluations whose settings differ, naming the first difference."""
    kinds = [PREFERENCE if s.get("kind") == PREFERENCE else "instruction" for s in (a, b)]
    if kinds[0] != kinds[1]:
        raise DataError(f"cannot compare: {kinds[0]} rows (A) vs {kinds[1]} rows (B); "
                        "evaluate both on the same file (--on)")
    for key in SETTING_KEYS:
        if key in LATER_KEYS and (key not in a or key not in b):
            continue
        if a.get(key) != b.get(key):
            raise DataError(f"cannot compare: {SETTING_NAMES[key]} {_show(a.get(key))} (A) vs "
                            f"{_show(b.get(key))} (B); evaluate both with the same settings "
                            "(fedit eval base:MODEL --like RUN)")


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def match_rows(keys_a: list[Key], keys_b: list[Key]) -> list[tuple[int, int]]:
    """(index in A, index in B) of each row, in A's order; refuse when the rows differ."""
    where_b = {k: j for j, k in enumerate(keys_b)}
    only_a = sum(k not in where_b for k in keys_a)
    only_b = len(set(keys_b) - set(keys_a))
    if only_a or only_b:
        raise DataError(f"cannot compare: the evaluations hold different rows ({only_a} only "
                        f"in A, {only_b} only in B); evaluate both on the same file (--on)")
    return [(i, where_b[k]) for i, k in enumerate(keys_a)]


def metric_values(answers: list[dict[str, Any]], judge: dict[int, float | None] | None,
                  metrics: Sequence[str] = tuple(SFT_METRICS)) -> np.ndarray:
    """Rows x metrics, NaN where a metric is missing (judge: by answer id; a preference
    metric: its record field, ``RECORD_FIELDS``)."""
    out = np.full((len(answers), len(metrics)), np.nan)
    for i, a in enumerate(answers):
        for j, name in enumerate(metrics):
            v = ((judge or {}).get(a.get("id", i)) if name == "judge"
                 else a.get(RECORD_FIELDS.get(name, name)))
            if v is not None:
                out[i, j] = float(v)
    return out


def _centred_mean(d: np.ndarray, axis: int) -> np.ndarray:
    """NaN-mean along ``axis``, computed about the first finite value, so that a constant
    vector's mean is that constant exactly (no rounding from summing it n times)."""
    finite = d[np.isfinite(d)]
    centre = finite[0] if finite.size else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no valid row: NaN
        return np.asarray(centre + np.nanmean(d - centre, axis=axis))


def resample_indices(n: int, resamples: int, seed: int, chunk: int = 250
                     ) -> Iterator[np.ndarray]:
    """The bootstrap's resampled row indices, ``chunk`` resamples at a time (shape
    ``(k, n)``); the same draws for the same seed, so the plain and the length-controlled
    differences are computed on the same resamples; none without rows."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples if n else 0, chunk):
        yield rng.integers(0, n, size=(min(chunk, resamples - start), n))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95, chunk: int = 250) -> list[dict[str, Any]]:
    """Mean difference B - A of each column and its paired bootstrap percentile interval.

    Parameters
    ----------
    a, b : ndarray, shape (rows, metrics)
        The two arms' per-row values, rows matched; NaN = missing (dropped for that column).
    resamples : int
        Bootstrap resamples of the row indices, shared by every column.
    seed : int
        Seed of the ``numpy.random.Generator`` drawing the resamples.
    level : float
        Coverage of the percentile interval.
    chunk : int
        Resamples drawn at a time (bounds memory on many rows).

    Returns
    -------
    list of dict
        Per column: ``rows`` used, ``dropped`` (missing in either arm), ``mean_a``,
        ``mean_b``, ``diff``, ``low``, ``high`` (None without rows).
    """
    d = b - a
    valid = np.isfinite(d)
    n = len(d)
    means = []
    for idx in resample_indices(n, resamples, seed, chunk):
        means.append(np.stack([_centred_mean(d[idx, j], axis=1) for j in range(d.shape[1])],
                              axis=1))
    boot = np.concatenate(means) if means else np.empty((0, d.shape[1]))
    tail = 100 * (1 - level) / 2
    out = []
    for j in range(d.shape[1]):
        col, ok = d[:, j], valid[:, j]
        stats: dict[str, Any] = {"rows": int(ok.sum()), "dropped": int(n - ok.sum()),
                                 "mean_a": None, "mean_b": None, "diff": None, "low": None,
                                 "high": None}
        if ok.any():
            draws = boot[:, j][np.isfinite(boot[:, j])]
            low, high = np.percentile(draws, [tail, 100 - tail])
            stats |= {"mean_a": float(np.mean(a[ok, j])), "mean_b": float(np.mean(b[ok, j])),
                      "diff": float(_centred_mean(col[ok], axis=0)), "low": float(low),
                      "high": float(high)}
        out.append(stats)
    return out


def verdict(low: float | None, high: float | None, higher_is_better: bool | None) -> str:
    """"better" / "worse" (B against A) when the interval excludes 0, else no difference
    (a metric with no better direction, an answer's length: "higher" / "lower")."""
    if low is None or high is None:
        return "no rows"
    if higher_is_better is None and (low > 0 or high < 0):
        return "higher" if low > 0 else "lower"
    if low > 0 or high < 0:
        return "better" if (low > 0) == higher_is_better else "worse"
    return NO_DIFFERENCE


LENGTH = "answer_tokens"  # an answer's length: the new tokens generated for it
TOO_FEW = "fewer than 3 rows: no interval"
NO_SPREAD = "no length variation: the intercept is the mean difference"
FLAT = 1e-18  # a spread of x (sum of squares) below this is none: rounding, not lengths


def ols_line(d: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intercept and slope of ``d = a + b x`` by ordinary least squares, each point
    counted ``w`` times (0: left out), along the last axis (one fit per leading index).

    A fit whose x do not vary has slope NaN and the weighted mean of d as intercept; one
    with no point has both NaN. Centred sums, so a constant d gives that constant exactly.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        count = w.sum(axis=-1)
        x_mean = (w * x).sum(axis=-1) / count
        d_mean = (w * d).sum(axis=-1) / count
        xc = x - x_mean[..., None]
        sxx = (w * xc * xc).sum(axis=-1)
        sxd = (w * xc * (d - d_mean[..., None])).sum(axis=-1)
        spread = sxx > FLAT
        slope = np.where(spread, sxd / np.where(spread, sxx, 1.0), np.nan)
        return d_mean - np.where(spread, slope, 0.0) * x_mean, slope


def length_controlled(a: np.ndarray, b: np.ndarray, len_a: np.ndarray, len_b: np.ndarray,
                      higher_is_better: bool | None = True, *, resamples: int = 2000,
                      seed: int = 0, level: float = 0.95, chunk: int = 250
                      ) -> dict[str, Any] | None:
    """The difference B - A of a per-row score at equal answer length, with its paired
    bootstrap percentile interval.

    For the rows with a score and a length in both arms, d = b - a is fitted by ordinary
    least squares as ``d = diff + slope * x``, x = log(len_b) - log(len_a): ``diff`` (the
    intercept) is the difference where both answers are equally long, ``slope`` the change
    of d per unit of log length ratio (``slope * log 2``: B's answer twice A's). A row with a
    0-token answer in either arm has no log length: it is left out and counted
    (``zero_length``). Without any spread in x the intercept is the mean difference and
    the slope None (``note`` says so). The interval draws the same resamples as
    :func:`paired_bootstrap` with the same ``seed`` and ``chunk``; fewer than 3 rows
    (a line through 2 points has no error to resample) have none.

    Parameters
    ----------
    a, b : ndarray, shape (rows,)
        The two arms' per-row scores, rows matched; NaN = missing.
    len_a, len_b : ndarray, shape (rows,)
        Their answers' lengths in tokens; NaN = not recorded.
    higher_is_better : bool or None
        Which way the verdict reads (:func:`verdict`).

    Returns
    -------
    dict or None
        ``diff``, ``low``, ``high``, ``slope``, ``rows`` (fitted), ``dropped``,
        ``zero_length``, ``verdict`` (and ``note`` without length variation); None when
        neither arm recorded answer lengths.
    """
    has_len = np.isfinite(len_a) & np.isfinite(len_b)
    if not has_len.any():
        return None
    zero = has_len & ((len_a <= 0) | (len_b <= 0))
    valid = np.isfinite(a) & np.isfinite(b) & has_len & ~zero
    n, rows = len(a), int(valid.sum())
    out: dict[str, Any] = {"diff": None, "low": None, "high": None, "slope": None,
                           "rows": rows, "dropped": n - rows, "zero_length": int(zero.sum()),
                           "verdict": "no rows"}
    if not rows:
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log(len_b) - np.log(len_a)
    # about the first row, so that a constant x has no spread and a constant d stays exact
    x0, d0 = x[valid][0], (b - a)[valid][0]
    xs, ds = np.where(valid, x - x0, 0.0), np.where(valid, b - a - d0, 0.0)
    w = valid.astype(float)

    def at_zero(icpt: np.ndarray, slope: np.ndarray) -> np.ndarray:  # back to x = 0
        return d0 + icpt - np.where(np.isfinite(slope), slope, 0.0) * x0

    icpt, slope = ols_line(ds, xs, w)
    out |= {"diff": float(at_zero(icpt, slope)),
            "slope": float(slope) if np.isfinite(slope) else None}
    if out["slope"] is None:
        out["note"] = NO_SPREAD
    if rows < 3:
        return out | {"verdict": TOO_FEW}
    draws = [at_zero(*ols_line(ds[idx], xs[idx], w[idx]))
             for idx in resample_indices(n, resamples, seed, chunk)]
    boot = np.concatenate(draws)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(boot[np.isfinite(boot)], [tail, 100 - tail])
    return out | {"low": float(low), "high": float(high),
                  "verdict": verdict(float(low), float(high), higher_is_better)}


def add_length_controlled(metrics: dict[str, Any], names: Sequence[str], va: np.ndarray,
                          vb: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> None:
    """Give each per-row answer score of ``metrics`` (``LENGTH_CONTROLLED``) its
    ``length_controlled`` entry, in place; ``va``/``vb``: rows x ``names``, the answer
    lengths among them (nothing without them: a preference or an older evaluation)."""
    if LENGTH not in names:
        return
    k = list(names).index(LENGTH)
    for j, name in enumerate(names):
        if name in LENGTH_CONTROLLED and metrics.get(name, {}).get("rows"):
            lc = length_controlled(va[:, j], vb[:, j], va[:, k], vb[:, k], METRICS[name],
                                   resamples=resamples, seed=seed)
            if lc is not None:
                metrics[name]["length_controlled"] = lc


def load_judge_scores(folder: Path) -> dict[int, float | None] | None:
    """Answer id -> judge score from ``judge.jsonl`` (``fedit judge``), None if absent."""
    path = Path(folder) / JUDGE_RECORDS
    if not path.is_file():
        return None
    scores = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                item = json.loads(line)
                scores[item["id"]] = item.get("score")
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}:{n}: not a judge record (needs id and score); run "
                                "fedit judge again") from None
    return scores


def compare_evals(folder_a: Path, folder_b: Path, *, resamples: int = 2000, seed: int = 0
                  ) -> dict[str, Any]:
    """Compare the evaluations in two folders (eval.json + answers.jsonl each); the judge
    score takes part when both folders hold a ``judge.jsonl``."""
    (res_a, ans_a), (res_b, ans_b) = load_eval(folder_a), load_eval(folder_b)
    check_settings(res_a["settings"], res_b["settings"])
    pairs = match_rows(row_keys(ans_a), row_keys(ans_b))
    judge_a, judge_b = load_judge_scores(folder_a), load_judge_scores(folder_b)
    both_judged = judge_a is not None and judge_b is not None
    known = PREFERENCE_METRICS if res_a["settings"].get("kind") == PREFERENCE else SFT_METRICS
    va = metric_values(ans_a, judge_a, list(known))[[i for i, _ in pairs]]
    vb = metric_values(ans_b, judge_b, list(known))[[j for _, j in pairs]]
    stats = paired_bootstrap(va, vb, resamples=resamples, seed=seed)
    metrics = {}
    tasks_only = not pairs and "tasks" in res_a and "tasks" in res_b
    for (name, higher), s in zip(known.items(), stats, strict=True):
        if ((name == "judge" and not both_judged) or (name == LENGTH and not s["rows"])
                or tasks_only):
            continue
        better = "n/a" if higher is None else "higher" if higher else "lower"
        metrics[name] = {**s, "better": better,
                         "verdict": verdict(s["low"], s["high"], higher)}
    add_length_controlled(metrics, list(known), va, vb, resamples=resamples, seed=seed)
    result: dict[str, Any] = {"a": str(folder_a), "b": str(folder_b), "rows": len(pairs),
                              "bootstrap": {"resamples": resamples, "seed": seed,
                                            "level": 0.95, "interval": "percentile",
                                            "paired_over": "rows"},
                              "metrics": metrics}
    if "tasks" in res_a and "tasks" in res_b:  # (one without: the held-out rows alone)
        result["tasks"] = compare_tasks(folder_a, folder_b, res_a, res_b,
                                        resamples=resamples, seed=seed)
        metrics.update(result["tasks"]["metrics"])
    return result


def compare_tasks(folder_a: Path, folder_b: Path, res_a: dict[str, Any], res_b: dict[str, Any],
                  *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The benchmark tasks of two evaluations (eval.json ``"tasks"`` + tasks.jsonl) paired
    document by document: each task's (and group's, its tasks' documents pooled) metrics
    whose value is a mean over documents, named ``task/metric``, B - A with the paired
    bootstrap; a generation task's metrics also at equal answer length
    (:func:`length_controlled`, from each document's ``answer_tokens``). Documents match by
    task, document id, filter and the document's digest."""
    if "tasks" not in res_a or "tasks" not in res_b:
        side = "A" if "tasks" not in res_a else "B"
        raise DataError(f"cannot compare: {side} was evaluated without benchmark tasks; "
                        "run fedit eval --tasks on both")
    ta, tb = res_a["tasks"], res_b["tasks"]
    for key in ("num_fewshot", "limit"):
        if ta["settings"].get(key) != tb["settings"].get(key):
            raise DataError(f"cannot compare: tasks' {key} {ta['settings'].get(key)} (A) vs "
                            f"{tb['settings'].get(key)} (B); evaluate both the same way")
    for task in sorted(set(ta["results"]) & set(tb["results"])):
        for key in ("n_shot", "version"):
            if ta["results"][task].get(key) != tb["results"][task].get(key):
                raise DataError(f"cannot compare: task {task} {key} "
                                f"{ta['results'][task].get(key)} (A) vs "
                                f"{tb['results'][task].get(key)} (B)")
    sa, sb = load_task_samples(folder_a), load_task_samples(folder_b)
    docs_a = {_doc_key(r): r for r in sa}
    docs_b = {_doc_key(r): r for r in sb}
    if set(docs_a) != set(docs_b):
        only_a, only_b = len(set(docs_a) - set(docs_b)), len(set(docs_b) - set(docs_a))
        raise DataError(f"cannot compare: the task documents differ ({only_a} only in A, "
                        f"{only_b} only in B); evaluate both with the same tasks")
    units = {t: [t] for t in ta["results"]}
    units |= {g: ts for g, ts in ta.get("groups", {}).items()
              if g not in units and all(t in ta["results"] for t in ts)}
    metrics: dict[str, Any] = {}
    for unit, tasks in units.items():
        names = [n for n in ta["results"][tasks[0]]["metrics"]
                 if all(ta["results"][t]["metrics"].get(n, {}).get("paired") and
                        tb["results"][t]["metrics"].get(n, {}).get("paired") for t in tasks)]
        keys = [k for k in docs_a if k[0] in tasks]
        if not names or not keys:
            continue
        va = np.array([[_value(docs_a[k], n) for n in names] for k in keys])
        vb = np.array([[_value(docs_b[k], n) for n in names] for k in keys])
        stats = paired_bootstrap(va, vb, resamples=resamples, seed=seed)
        lengths = [np.array([float(d[k].get(LENGTH, np.nan)) for k in keys])
                   for d in (docs_a, docs_b)]
        generated = all(np.isfinite(x).all() for x in lengths)  # generation tasks only
        for j, (name, st) in enumerate(zip(names, stats, strict=True)):
            higher = ta["results"][tasks[0]]["metrics"][name].get("higher_is_better")
            better = "n/a" if higher is None else "higher" if higher else "lower"
            entry = {**st, "better": better, "verdict": verdict(st["low"], st["high"], higher)}
            if generated and st["rows"]:  # a generated answer's score, also at equal length
                lc = length_controlled(va[:, j], vb[:, j], lengths[0], lengths[1], higher,
                                       resamples=resamples, seed=seed)
                if lc is not None:
                    entry["length_controlled"] = lc
            metrics[f"{unit}/{name}"] = entry
    return {"documents": len(docs_a), "metrics": metrics}


def _doc_key(record: dict[str, Any]) -> tuple[str, int, str, str]:
    return (str(record["task"]), int(record["doc_id"]), str(record.get("filter", "none")),
            str(record.get("doc_hash", "")))


def _value(record: dict[str, Any], metric: str) -> float:
    v = record.get("metrics", {}).get(metric)
    return float("nan") if v is None else float(v)


def write_compare(out_dir: Path, result: dict[str, Any]) -> list[Path]:
    """``compare.json`` and, when some metric has rows, its forest plot ``compare.png`` in
    ``out_dir`` (created), each written atomically; returns the paths written."""
    written = [atomic_write_json(Path(out_dir) / COMPARE_FILE, result)]
    png = plot_forest(result)
    if png is not None:
        written.append(atomic_write_bytes(Path(out_dir) / COMPARE_PLOT, png))
    return written


def plot_forest(result: dict[str, Any]) -> bytes | None:
    """The forest plot (:mod:`fedit.evaluate.forest`) of ``compare_evals``' result as PNG
    bytes: a panel per metric with the one pair B - A; None when no metric has rows."""
    a, b = Path(result["a"]).name or result["a"], Path(result["b"]).name or result["b"]
    return draw({"B - A": result["metrics"]}, difference="B - A",
                xlabel="B - A (paired bootstrap 95% interval over rows)",
                title=f"B = {b}  vs  A = {a}")


def _fmt(v: float | None, signed: bool = False) -> str:
    return "-" if v is None else f"{v:+.4f}" if signed else f"{v:.4f}"


def format_compare(result: dict[str, Any]) -> str:
    """The text table: metric | A | B | B-A | 95% CI | verdict (which way is better)."""
    w = max([20, *(len(f"{k} ({m['better']})") + 1 for k, m in result["metrics"].items())])
    head = f"{'metric':<{w}}{'A':>9}{'B':>9}{'B-A':>10}  {'95% CI':<21}{'rows':>6}  verdict"
    lines = [f"A = {result['a']}", f"B = {result['b']}", head, "-" * len(head)]
    for name, m in result["metrics"].items():
        label = f"{name} ({m['better']})"
        ci = f"[{_fmt(m['low'], True)}, {_fmt(m['high'], True)}]" if m["low"] is not None else "-"
        lines.append(f"{label:<{w}}{_fmt(m['mean_a']):>9}{_fmt(m['mean_b']):>9}"
                     f"{_fmt(m['diff'], True):>10}  {ci:<21}{m['rows']:>6}  {m['verdict']}")
    b = result["bootstrap"]
    over = f"{result['rows']} rows"
    if "tasks" in result:
        docs = f"{result['tasks']['documents']} task documents"
        over = f"{over} and {docs}" if result["rows"] else docs
    lines.append(f"paired bootstrap over {over}, {b['resamples']} resamples, seed {b['seed']}; "
                 "a row missing a metric in either arm is left out of it")
    return "\n".join([*lines, *format_length_controlled(result, w)])


def format_length_controlled(result: dict[str, Any], w: int = 20) -> list[str]:
    """The block "at equal length": metric | B-A at equal length | 95% CI | slope | rows
    | verdict; nothing when no metric has one."""
    lcs = {k: m["length_controlled"] for k, m in result["metrics"].items()
           if "length_controlled" in m}
    if not lcs:
        return []
    head = f"{'at equal length':<{w}}{'B-A':>10}  {'95% CI':<21}{'slope':>9}{'rows':>6}  verdict"
    lines = ["", head, "-" * len(head)]
    for name, lc in lcs.items():
        label = f"{name} ({result['metrics'][name]['better']})"
        ci = (f"[{_fmt(lc['low'], True)}, {_fmt(lc['high'], True)}]" if lc["low"] is not None
              else "-")
        lines.append(f"{label:<{w}}{_fmt(lc['diff'], True):>10}  {ci:<21}"
                     f"{_fmt(lc['slope'], True):>9}{lc['rows']:>6}  {lc['verdict']}")
    zero = max(lc["zero_length"] for lc in lcs.values())
    lines += ["B-A at equal length: the intercept a of d = a + b x, least squares over the "
              "rows, d = B - A,",
              "x = log(answer tokens B) - log(answer tokens A); slope = b; the same resamples; "
              f"{zero} rows with a 0-token answer left out"]
    lines += [f"{name}: {lc['note']}" for name, lc in lcs.items() if "note" in lc]
    return lines
