"""LLM judge over any OpenAI-compatible chat endpoint: MT-Bench single-answer grading (1-10)
and pairwise comparison with position swap; ``run_judge`` and ``format_judge`` are what
``fedit judge`` calls.

The pieces live beside this module: the HTTP client with its retries and back-off in
``judge_client``, the on-disk reply cache in ``judge_cache``, reading and pairing the
answers files in ``judge_answers``, the prompts and verdict parsers in ``judge_prompts``.
Their public names are importable from here too.

Only replies with a verdict are cached: an unparsable item is asked again on the next run.
A prompt too long for the judge's context is counted as unparsable (``too_long``), not
fatal to the whole run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedit.evaluate.judge_answers import answers_path, load_answers, match_rows
from fedit.evaluate.judge_cache import JudgeCache, cache_key, default_cache_path
from fedit.evaluate.judge_client import JudgeClient, JudgeError, PromptTooLong, chat_endpoint
from fedit.evaluate.judge_prompts import (
    PROMPT_NAMES,
    pairwise_messages,
    parse_rating,
    parse_verdict,
    single_messages,
)
from fedit.io import atomic_write_json, atomic_write_jsonl

__all__ = [
    "Judge", "JudgeCache", "JudgeClient", "JudgeError", "PromptTooLong", "answers_path",
    "cache_key", "chat_endpoint", "default_cache_path", "default_out", "format_judge",
    "judge_pairwise", "judge_single", "load_answers", "match_rows", "run_judge", "write_judge",
]

T = TypeVar("T")
Log = Callable[[str], None]
Pair = tuple[dict[str, Any], dict[str, Any]]


@dataclass
class Judge:
    """A client, its cache, and how often a reply without a verdict is asked again.

    Parameters
    ----------
    client : JudgeClient
        Sends the prompts.
    cache : JudgeCache
        Replies with a verdict, kept across runs.
    parse_retries : int
        Extra tries for a reply without a verdict; none once the judge repeats a reply
        word for word.

    Attributes
    ----------
    cache_hits : int
        Prompts answered from the cache.
    too_long : int
        Prompts the judge's context could not hold (counted as unparsable).
    """

    client: JudgeClient
    cache: JudgeCache
    parse_retries: int = 2
    cache_hits: int = field(default=0, init=False)
    too_long: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def ask(self, messages: list[dict[str, str]],
            parse: Callable[[str], Any]) -> tuple[str, Any, bool]:
        """Return (reply, verdict or None, from cache) for one prompt.

        Parameters
        ----------
        messages : list of dict
            The prompt.
        parse : callable
            The reply's verdict, None when it has none.

        Returns
        -------
        tuple
            The last reply (a "(not judged: ...)" note for a prompt too long), its verdict
            or None, and whether it came from the cache.
        """
        key = cache_key(self.client.model, messages)
        cached = self.cache.get(key)
        if cached is not None and parse(cached) is not None:
            with self._lock:
                self.cache_hits += 1
            return cached, parse(cached), True
        reply, replies = "", set()
        for _ in range(self.parse_retries + 1):
            try:
                reply = self.client.chat(messages)
            except PromptTooLong as exc:  # asking again cannot help: counted as unparsable
                with self._lock:
                    self.too_long += 1
                return f"(not judged: {exc})", None, False
            verdict = parse(reply)
            if verdict is not None:
                self.cache.put(key, self.client.model, reply)
                return reply, verdict, False
            if reply in replies:  # a deterministic judge at temperature 0 would only repeat it
                break
            replies.add(reply)
        return reply, None, False


def _run_all(fn: Callable[[Any], T], tasks: Sequence[Any], concurrency: int,
             log: Log) -> list[T]:
    """``fn`` over ``tasks`` on ``concurrency`` threads, in order; the first error stops all."""
    results: list[Any] = [None] * len(tasks)
    step = max(1, len(tasks) // 10)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
        try:
            for done, fut in enumerate(as_completed(futures), 1):
                results[futures[fut]] = fut.result()
                if done % step == 0 or done == len(tasks):
                    log(f"judge: {done}/{len(tasks)} prompts")
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def judge_single(rows: list[dict[str, Any]], judge: Judge, *, reference: bool = True,
                 concurrency: int = 4, log: Log = print) -> dict[str, Any]:
    """Grade each answer 1-10.

    Parameters
    ----------
    rows : list of dict
        Rows of an answers file.
    judge : Judge
        Asks the prompts.
    reference : bool
        Show the judge the reference answer (MT-Bench single-math-v1) or not (single-v1).
    concurrency : int
        Prompts in flight at once.
    log : callable
        Progress lines.

    Returns
    -------
    dict
        ``mode``, ``judge_model``, ``overall`` and ``by_category`` summaries, and ``items``
        keeping each reply, ``score`` None when unparsable.
    """
    def one(row: dict[str, Any]) -> dict[str, Any]:
        reply, score, cached = judge.ask(single_messages(row, reference), parse_rating)
        return {"id": row["id"], "category": str(row.get("category") or ""), "score": score,
                "cached": cached, "judgment": reply}

    items = _run_all(one, rows, concurrency, log)
    return _result("single", judge, items, _summary_single)


_WINNER = {("ab", "A"): "win", ("ab", "B"): "loss", ("ba", "A"): "loss", ("ba", "B"): "win"}


def judge_pairwise(pairs: list[Pair], judge: Judge, *, reference: bool = True,
                   concurrency: int = 4, log: Log = print) -> dict[str, Any]:
    """Compare answers to the same rows in both orders.

    Parameters
    ----------
    pairs : list of tuple
        ``(row, other row)`` of :func:`match_rows`; a win is the first row's.
    judge, reference, concurrency, log
        As for :func:`judge_single` (pair-math-v1 with the reference, pair-v2 without).

    Returns
    -------
    dict
        As :func:`judge_single`'s; each item's ``outcome`` is a win or loss only when both
        orders agree, a disagreement is a tie marked ``consistent: false``.
    """
    tasks = [(p, order) for p in pairs for order in ("ab", "ba")]

    def one(task: tuple[Pair, str]) -> tuple[str, bool, str]:
        (row, other), order = task
        a, b = (row, other) if order == "ab" else (other, row)
        messages = pairwise_messages(row, a["answer"], b["answer"], reference)
        reply, verdict, cached = judge.ask(messages, parse_verdict)
        return verdict, cached, reply

    replies = _run_all(one, tasks, concurrency, log)
    items = [_pair_item(row, replies[2 * i], replies[2 * i + 1])
             for i, (row, _) in enumerate(pairs)]
    return _result("pairwise", judge, items, _summary_pairwise)


def _pair_item(row: dict[str, Any], ab: tuple[str, bool, str],
               ba: tuple[str, bool, str]) -> dict[str, Any]:
    """One row's item from its (verdict, cached, reply) in each order."""
    (v_ab, c_ab, r_ab), (v_ba, c_ba, r_ba) = ab, ba
    g_ab = "tie" if v_ab == "C" else _WINNER.get(("ab", v_ab))
    g_ba = "tie" if v_ba == "C" else _WINNER.get(("ba", v_ba))
    outcome = None if g_ab is None or g_ba is None else g_ab if g_ab == g_ba else "tie"
    return {"id": row["id"], "category": str(row.get("category") or ""), "outcome": outcome,
            "consistent": None if outcome is None else g_ab == g_ba,
            "verdict_ab": v_ab, "verdict_ba": v_ba, "cached": c_ab and c_ba,
            "judgment_ab": r_ab, "judgment_ba": r_ba}


def _summary_single(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows, judged, unparsable and the mean score of single-grading items."""
    scores = [it["score"] for it in items if it["score"] is not None]
    return {"rows": len(items), "judged": len(scores), "unparsable": len(items) - len(scores),
            "mean_score": sum(scores) / len(scores) if scores else None}


def _summary_pairwise(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows, judged, unparsable, win/tie/loss counts and rates of pairwise items."""
    judged = [it for it in items if it["outcome"] is not None]
    counts = {k: sum(it["outcome"] == k for it in judged) for k in ("win", "tie", "loss")}
    rates = {f"{k}_rate": v / len(judged) if judged else None for k, v in counts.items()}
    return {"rows": len(items), "judged": len(judged), "unparsable": len(items) - len(judged),
            **counts, "inconsistent": sum(not it["consistent"] for it in judged), **rates}


def _result(mode: str, judge: Judge, items: list[dict[str, Any]],
            summary: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:
    """The result of a judging: the items, summarised overall and per category."""
    categories = sorted({it["category"] for it in items})
    by_category = {c: summary([it for it in items if it["category"] == c]) for c in categories}
    return {"mode": mode, "judge_model": judge.client.model, "overall": summary(items),
            "by_category": by_category, "items": items}


# ---------------------------------------------------------------- what the CLI calls
def write_judge(out: Path, result: dict[str, Any]) -> Path:
    """Write judge.json (items without the judge's text) and, beside it, the full items.

    Parameters
    ----------
    out : Path
        The judge.json to write.
    result : dict
        What :func:`run_judge` returns.

    Returns
    -------
    Path
        The JSONL of the full items (``out`` with the suffix ``.jsonl``).
    """
    records = out.with_suffix(".jsonl")
    atomic_write_jsonl(records, result["items"])
    slim = [{k: v for k, v in it.items() if not k.startswith("judgment")}
            for it in result["items"]]
    atomic_write_json(out, {**result, "items": slim})
    return records


def default_out(answers: Path, against: Path | None) -> Path:
    """Return judge.json beside the answers, or judge-vs-<other>.json for a comparison."""
    folder = answers if answers.is_dir() else answers.parent
    if against is None:
        return folder / "judge.json"
    other = against if against.is_dir() else against.parent
    return folder / f"judge-vs-{other.name or 'other'}.json"


def _api_key(key_env: str | None) -> str | None:
    """The API key from ``key_env`` (which must be set) or ``OPENAI_API_KEY``, else None."""
    if key_env and not os.environ.get(key_env):
        raise JudgeError(f"environment variable {key_env} (--judge-key-env) is not set: "
                         "export the API key in it")
    return os.environ.get(key_env or "OPENAI_API_KEY") or None


def run_judge(answers: Path, against: Path | None, *, url: str, model: str,
              key_env: str | None = None, out: Path | None = None, concurrency: int = 4,
              timeout: float = 60.0, retries: int = 4, parse_retries: int = 2,
              reference: bool = True, cache_path: Path | None = None,
              log: Log = print) -> dict[str, Any]:
    """Judge one answers file (single grading) or two (pairwise); write judge.json.

    Parameters
    ----------
    answers : Path
        The answers file, or its folder; a win in a comparison is this one's.
    against : Path or None
        The other answers for a pairwise comparison, None for single grading.
    url, model : str
        The judge's OpenAI base URL and model name.
    key_env : str or None
        The environment variable holding the API key (default ``OPENAI_API_KEY``, and
        none is needed then).
    out : Path or None
        The judge.json to write (default :func:`default_out`).
    concurrency, timeout, retries, parse_retries : int or float
        Prompts in flight, seconds per request, retries per request and per reply
        without a verdict.
    reference : bool
        Show the judge the reference answers.
    cache_path : Path or None
        The reply cache (default :func:`default_cache_path`).
    log : callable
        Progress lines.

    Returns
    -------
    dict
        The result of :func:`judge_single` or :func:`judge_pairwise`, with ``settings``,
        ``out`` and ``records`` (the files written).
    """
    api_key = _api_key(key_env)
    rows = load_answers(answers)
    pairs = match_rows(rows, load_answers(against), answers, against) if against else None
    out = out or default_out(answers, against)
    chat_endpoint(url)  # a bad URL fails before anything is opened
    cache = JudgeCache(cache_path or default_cache_path())
    client = JudgeClient(url, model, api_key, timeout=timeout, retries=retries)
    judge = Judge(client, cache, parse_retries=parse_retries)
    kw: dict[str, Any] = {"reference": reference, "concurrency": concurrency, "log": log}
    try:
        result = (judge_single(rows, judge, **kw) if pairs is None
                  else judge_pairwise(pairs, judge, **kw))
    finally:
        client.close()
        cache.close()
    result["settings"] = {
        "answers": str(answers_path(answers)),
        "against": str(answers_path(against)) if against else None,
        "endpoint": client.endpoint, "prompt": PROMPT_NAMES[(result["mode"], reference)],
        "temperature": 0, "requests": client.requests, "cache_hits": judge.cache_hits,
        "too_long": judge.too_long, "cache": str(cache.path),
    }
    result["records"] = str(write_judge(out, result))
    result["out"] = str(out)
    return result


def format_judge(result: dict[str, Any]) -> str:
    """Return a few lines for the terminal: overall and per category, requests, files."""
    lines = []
    for name, m in [("overall", result["overall"]), *result["by_category"].items()]:
        if result["mode"] == "single":
            mean = "-" if m["mean_score"] is None else f"{m['mean_score']:.2f}"
            lines.append(f"{name:<24} mean score {mean:>5} / 10  ({m['judged']} judged, "
                         f"{m['unparsable']} unparsable)")
        else:
            rates = "  ".join("-" if m[f"{k}_rate"] is None else f"{k} {m[f'{k}_rate']:.0%}"
                              for k in ("win", "tie", "loss"))
            lines.append(f"{name:<24} {rates}  ({m['judged']} judged, {m['inconsistent']} ties "
                         f"from order disagreement, {m['unparsable']} unparsable)")
    s = result["settings"]
    head = (f"{s['answers']} judged by {result['judge_model']}" if s["against"] is None else
            f"{s['answers']} (win = this) against {s['against']}, judged by "
            f"{result['judge_model']} in both orders")
    long = (f", {s['too_long']} prompts too long for the judge's context (unparsable)"
            if s.get("too_long") else "")
    return "\n".join([head, *lines, f"{s['requests']} requests, {s['cache_hits']} replies from "
                      f"the cache{long}\nwrote {result['out']} and {result['records']}"])
