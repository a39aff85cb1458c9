"""LLM judge over any OpenAI-compatible chat endpoint: MT-Bench single-answer grading (1-10)
and pairwise comparison with position swap, with retries, back-off and an on-disk cache.

The endpoint URL is the OpenAI "base URL": the client POSTs to ``{url}/chat/completions``,
so ``http://127.0.0.1:8080/v1`` and ``https://api.openai.com/v1`` work as given. A bare
``http://host:port`` (no path) gets ``/v1`` added; a URL that already ends in
``/chat/completions`` is used as it is.

Replies are cached in SQLite, keyed by a hash of the judge model and the full prompt (not the
URL), so a re-run, or the same answers judged from another folder, makes no request. Only
replies with a verdict are cached: an unparsable item is asked again on the next run.

A judge with a small context (``fedit serve`` of a small model, a local server) answers HTTP
400 "maximum context length" when the prompt and ``max_tokens`` do not fit: that request and
every later one go without ``max_tokens`` (the server gives what fits), and a prompt that
does not fit at all is counted as unparsable (``too_long``), not fatal to the whole run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from fedit.errors import DataError, FeditError
from fedit.evaluate.judge_prompts import (
    PROMPT_NAMES,
    pairwise_messages,
    parse_rating,
    parse_verdict,
    single_messages,
)
from fedit.io import atomic_write_json, atomic_write_jsonl

T = TypeVar("T")
Log = Callable[[str], None]


class JudgeError(FeditError):
    """The judge endpoint cannot be reached or keeps failing; the message says what to do."""


class PromptTooLong(JudgeError):
    """The judge's context cannot hold the prompt: HTTP 400, context length exceeded."""


# ---------------------------------------------------------------- the HTTP client
def chat_endpoint(url: str) -> str:
    """``{url}/chat/completions``; a bare ``http://host:port`` gets ``/v1`` first."""
    url = url.rstrip("/")
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise JudgeError(f"--judge-url {url!r}: give an http:// or https:// URL, e.g. "
                         "http://127.0.0.1:8080/v1")
    if url.endswith("/chat/completions"):
        return url
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url + "/chat/completions"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text}"


@dataclass
class JudgeClient:
    """A chat-completions client that retries what is worth retrying.

    Parameters
    ----------
    url : OpenAI base URL (see :func:`chat_endpoint`).
    model : the judge model name sent in each request.
    api_key : sent as ``Authorization: Bearer``; None sends no header (local servers).
    timeout : seconds for one request.
    retries : extra tries after a timeout, connection error, HTTP 429 or 5xx.
    max_tokens : the reply's budget; None once a server said prompt + budget exceed its
        context (HTTP 400): later requests leave it to the server.
    backoff : first back-off in seconds, doubled each retry (with jitter), capped by
        ``max_backoff``; a 429's ``Retry-After`` is honoured up to that cap.
    """

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 20.0
    max_tokens: int | None = 1024
    requests: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.endpoint = chat_endpoint(self.url)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(timeout=self.timeout, headers=headers)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The reply text for ``messages`` at temperature 0 ("" when the reply has none)."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0}
        if self.max_tokens is not None:
            try:
                return self._post({**body, "max_tokens": self.max_tokens})
            except PromptTooLong:  # prompt + max_tokens over a small context: from now on
                self.max_tokens = None  # the server gives each reply what fits
        return self._post(body)

    def _post(self, body: dict[str, Any]) -> str:
        for attempt in range(self.retries + 1):
            with self._lock:
                self.requests += 1
            try:
                resp = self._http.post(self.endpoint, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if attempt == self.retries:
                    raise self._transport_error(exc) from exc
                self._sleep(attempt)
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                if attempt == self.retries:
                    raise JudgeError(f"judge endpoint {self.endpoint} answered HTTP "
                                     f"{resp.status_code} {attempt + 1} times: "
                                     f"{_snippet(resp.text)}")
                self._sleep(attempt, resp.headers.get("retry-after"))
                continue
            if resp.status_code == 400 and _context_full(resp.text):
                raise PromptTooLong(f"judge endpoint {self.endpoint}: {_snippet(resp.text)}")
            if resp.status_code >= 400:
                raise JudgeError(f"judge endpoint {self.endpoint} refused the request: HTTP "
                                 f"{resp.status_code} {_snippet(resp.text)} (check "
                                 "--judge-model and the API key)")
            return _reply_text(resp)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _sleep(self, attempt: int, retry_after: str | None = None) -> None:
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        delay *= 0.5 + random.random() / 2  # jitter: concurrent callers do not retry in step
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            delay = max(delay, min(self.max_backoff, float(retry_after)))
        time.sleep(delay)

    def _transport_error(self, exc: Exception) -> JudgeError:
        tries = self.retries + 1
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return JudgeError(f"judge endpoint {self.endpoint} gave no answer within "
                              f"{self.timeout:g} s ({tries} tries): raise --timeout or check "
                              "the server")
        return JudgeError(f"judge endpoint {self.endpoint} unreachable ({_one_line(exc)}; "
                          f"{tries} tries): start the server or fix --judge-url")


def _context_full(text: str) -> bool:
    """An HTTP 400 body saying the context is too small (OpenAI, vLLM, fedit serve)."""
    return "context_length_exceeded" in text or "maximum context length" in text


def _snippet(text: str) -> str:
    return " ".join(text.split())[:200] or "(empty body)"


def _reply_text(resp: httpx.Response) -> str:
    """choices[0].message.content, or "" for a reply of any other shape (retried as such)."""
    try:
        content = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


# ---------------------------------------------------------------- the cache
def default_cache_path() -> Path:
    """``$FEDIT_CACHE/judge/replies.sqlite`` (``FEDIT_CACHE`` defaults to ~/.cache/fedit)."""
    root = Path(os.environ.get("FEDIT_CACHE") or Path.home() / ".cache" / "fedit")
    return root.expanduser() / "judge" / "replies.sqlite"


def cache_key(model: str, messages: list[dict[str, str]]) -> str:
    """sha256 of the judge model and the full prompt; the URL is left out on purpose."""
    blob = json.dumps({"model": model, "messages": messages, "temperature": 0},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Judge replies by :func:`cache_key`, in one SQLite file (safe across threads and runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, "
                             "model TEXT, reply TEXT, created REAL)")
        except (OSError, sqlite3.Error) as exc:
            raise JudgeError(f"{path}: cannot open the judge cache ({_one_line(exc)}): point "
                             "--cache or FEDIT_CACHE at a writable place") from exc
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, reply: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)",
                             (key, model, reply, time.time()))

    def close(self) -> None:
        self._db.close()


@dataclass
class Judge:
    """A client, its cache, and how often a reply without a verdict is asked again (at most
    ``parse_retries`` times, and no more once the judge repeats a reply word for word)."""

    client: JudgeClient
    cache: JudgeCache
    parse_retries: int = 2
    cache_hits: int = field(default=0, init=False)
    too_long: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def ask(self, messages: list[dict[str, str]],
            parse: Callable[[str], Any]) -> tuple[str, Any, bool]:
        """(reply, verdict or None, from cache) for one prompt."""
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


# ---------------------------------------------------------------- answers files
def answers_path(path: Path) -> Path:
    """The answers.jsonl a path names: the file itself, or ``answers.jsonl`` in a folder."""
    file = path / "answers.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{file}: no such answers file (write one with `fedit eval`)")
    return file


def load_answers(path: Path) -> list[dict[str, Any]]:
    """Rows of an answers.jsonl (``id``, ``instruction``, ``answer`` required), ids unique."""
    file = answers_path(path)
    rows: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{n}: not JSON ({exc.msg})") from exc
        missing = [k for k in ("id", "instruction", "answer") if k not in row] if isinstance(
            row, dict) else ["id", "instruction", "answer"]
        if missing:
            raise DataError(f"{file}:{n}: missing field(s) {missing} (answers.jsonl of fedit "
                            "eval has id, instruction, answer, reference, category)")
        if not isinstance(row["answer"], str) or not isinstance(row["instruction"], str):
            raise DataError(f"{file}:{n}: 'instruction' and 'answer' must be text")
        if row["id"] in seen:
            raise DataError(f"{file}:{n}: id {row['id']} appears twice")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise DataError(f"{file}: no answers in it")
    return rows


def match_rows(rows: list[dict[str, Any]], other: list[dict[str, Any]], path: Path,
               other_path: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of rows with the same id and instruction; anything else is a clear error."""
    by_id = {r["id"]: r for r in other}
    only_a = [r["id"] for r in rows if r["id"] not in by_id]
    only_b = sorted(set(by_id) - {r["id"] for r in rows}, key=str)
    if only_a or only_b:
        raise DataError(f"{path} and {other_path} hold different rows: ids only in the first "
                        f"{only_a[:5]}, only in the second {only_b[:5]} ({len(only_a)} and "
                        f"{len(only_b)} in all); judge answers to the same test set")
    for r in rows:
        if r["instruction"] != by_id[r["id"]]["instruction"]:
            raise DataError(f"{path} and {other_path}: id {r['id']} has a different "
                            "instruction in each (answers to different test sets?)")
    return [(r, by_id[r["id"]]) for r in rows]


# ---------------------------------------------------------------- judging
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
    """Grade each answer 1-10; ``items`` keep each reply, ``score`` None when unparsable."""
    def one(row: dict[str, Any]) -> dict[str, Any]:
        reply, score, cached = judge.ask(single_messages(row, reference), parse_rating)
        return {"id": row["id"], "category": str(row.get("category") or ""), "score": score,
                "cached": cached, "judgment": reply}

    items = _run_all(one, rows, concurrency, log)
    return _result("single", judge, items, _summary_single)


_WINNER = {("ab", "A"): "win", ("ab", "B"): "loss", ("ba", "A"): "loss", ("ba", "B"): "win"}


def judge_pairwise(pairs: list[tuple[dict[str, Any], dict[str, Any]]], judge: Judge, *,
                   reference: bool = True, concurrency: int = 4,
                   log: Log = print) -> dict[str, Any]:
    """Compare answers to the same rows in both orders: a win or loss only when both orders
    agree; a disagreement is a tie marked ``consistent: false``."""
    tasks = [(p, order) for p in pairs for order in ("ab", "ba")]

    def one(task: tuple[tuple[dict[str, Any], dict[str, Any]], str]) -> tuple[str, bool, str]:
        (row, other), order = task
        a, b = (row, other) if order == "ab" else (other, row)
        messages = pairwise_messages(row, a["answer"], b["answer"], reference)
        reply, verdict, cached = judge.ask(messages, parse_verdict)
        return verdict, cached, reply

    replies = _run_all(one, tasks, concurrency, log)
    items = []
    for i, (row, _) in enumerate(pairs):
        (v_ab, c_ab, r_ab), (v_ba, c_ba, r_ba) = replies[2 * i], replies[2 * i + 1]
        g_ab = "tie" if v_ab == "C" else _WINNER.get(("ab", v_ab))
        g_ba = "tie" if v_ba == "C" else _WINNER.get(("ba", v_ba))
        outcome = None if g_ab is None or g_ba is None else g_ab if g_ab == g_ba else "tie"
        items.append({"id": row["id"], "category": str(row.get("category") or ""),
                      "outcome": outcome,
                      "consistent": None if outcome is None else g_ab == g_ba,
                      "verdict_ab": v_ab, "verdict_ba": v_ba, "cached": c_ab and c_ba,
                      "judgment_ab": r_ab, "judgment_ba": r_ba})
    return _result("pairwise", judge, items, _summary_pairwise)


def _summary_single(items: list[dict[str, Any]]) -> dict[str, Any]:
    scores = [it["score"] for it in items if it["score"] is not None]
    return {"rows": len(items), "judged": len(scores), "unparsable": len(items) - len(scores),
            "mean_score": sum(scores) / len(scores) if scores else None}


def _summary_pairwise(items: list[dict[str, Any]]) -> dict[str, Any]:
    judged = [it for it in items if it["outcome"] is not None]
    counts = {k: sum(it["outcome"] == k for it in judged) for k in ("win", "tie", "loss")}
    rates = {f"{k}_rate": v / len(judged) if judged else None for k, v in counts.items()}
    return {"rows": len(items), "judged": len(judged), "unparsable": len(items) - len(judged),
            **counts, "inconsistent": sum(not it["consistent"] for it in judged), **rates}


def _result(mode: str, judge: Judge, items: list[dict[str, Any]],
            summary: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:
    categories = sorted({it["category"] for it in items})
    by_category = {c: summary([it for it in items if it["category"] == c]) for c in categories}
    return {"mode": mode, "judge_model": judge.client.model, "overall": summary(items),
            "by_category": by_category, "items": items}


# ---------------------------------------------------------------- what the CLI calls
def write_judge(out: Path, result: dict[str, Any]) -> Path:
    """judge.json (items without the judge's text) and, beside it, the full items as JSONL."""
    records = out.with_suffix(".jsonl")
    atomic_write_jsonl(records, result["items"])
    slim = [{k: v for k, v in it.items() if not k.startswith("judgment")}
            for it in result["items"]]
    atomic_write_json(out, {**result, "items": slim})
    return records


def default_out(answers: Path, against: Path | None) -> Path:
    """judge.json beside the answers, or judge-vs-<other>.json for a pairwise comparison."""
    folder = answers if answers.is_dir() else answers.parent
    if against is None:
        return folder / "judge.json"
    other = against if against.is_dir() else against.parent
    return folder / f"judge-vs-{other.name or 'other'}.json"


def run_judge(answers: Path, against: Path | None, *, url: str, model: str,
              key_env: str | None = None, out: Path | None = None, concurrency: int = 4,
              timeout: float = 60.0, retries: int = 4, parse_retries: int = 2,
              reference: bool = True, cache_path: Path | None = None,
              log: Log = print) -> dict[str, Any]:
    """Judge one answers file (single grading) or two (pairwise); write judge.json."""
    if key_env and not os.environ.get(key_env):
        raise JudgeError(f"environment variable {key_env} (--judge-key-env) is not set: "
                         "export the API key in it")
    api_key = os.environ.get(key_env or "OPENAI_API_KEY") or None
    rows = load_answers(answers)
    pairs = match_rows(rows, load_answers(against), answers, against) if against else None
    out = out or default_out(answers, against)
    chat_endpoint(url)  # a bad URL fails before anything is opened
    cache = JudgeCache(cache_path or default_cache_path())
    client = JudgeClient(url, model, api_key, timeout=timeout, retries=retries)
    judge = Judge(client, cache, parse_retries=parse_retries)
    try:
        if pairs is None:
            result = judge_single(rows, judge, reference=reference, concurrency=concurrency,
                                  log=log)
        else:
            result = judge_pairwise(pairs, judge, reference=reference,
                                    concurrency=concurrency, log=log)
    finally:
        client.close()
        cache.close()
    result["settings"] = {
        "answers": str(answers_path(answers)),
        "against": str(answers_path(against)) if against else None,
        "endpoint": client.endpoint, "prompt": PROMPT_NAMES[(result["mode"], reference)],
        "temperature": 0, "requests": client.requests, "cache_hits": judge.cache_hits,
        "too_long": judge.too_long,
        "cache": str(cache.path),
    }
    result["records"] = str(write_judge(out, result))
    result["out"] = str(out)
    return result


def format_judge(result: dict[str, Any]) -> str:
    """A few lines for the terminal: overall and per category, requests, files written."""
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
