"""A quick look at a data set: fields, labels, and how long rows are in chars and tokens.

Percentiles are observed values (numpy's ``inverted_cdf``): "p90 = 412 tokens" means 90% of
rows need at most 412 tokens, which is what choosing ``cutoff_len`` asks.

Conversation rows (``messages``) count the whole conversation as their text, and add turns
per row and chars (tokens, given a tokenizer) per turn of each role.

Rows are read once, as they come (``fedit data inspect`` passes
:func:`fedit.data.load.iter_rows`): what is kept is counters and a few bytes a row
(lengths, 64-bit digests of the prompts), never the rows, so a file of millions of rows
needs little memory. The time is mostly the tokenizer's (a batch of rows a call).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from fedit.data.conversations import chat_template_of, is_conversation, render
from fedit.data.dedup import prompt_key
from fedit.data.preference_tokens import split_pair, tokenize_pairs
from fedit.data.preferences import CHOSEN, PROMPT, REJECTED, is_preference
from fedit.data.prompts import adds_special_tokens, build_prompt

PERCENTILES = (50, 90, 99)
BATCH = 256  # rows tokenized in one call (and held at once)
LENGTH_FIELDS = ("instruction", "context", "response")


def percentiles(values: Sequence[int]) -> dict[str, int]:
    """``{"p50", "p90", "p99", "max"}`` of ``values`` (all 0 when there are none)."""
    if len(values) == 0:
        return {**{f"p{q}": 0 for q in PERCENTILES}, "max": 0}
    arr = np.asarray(values)
    out = {f"p{q}": int(np.percentile(arr, q, method="inverted_cdf")) for q in PERCENTILES}
    return {**out, "max": int(arr.max())}


def _non_empty(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def inspect_rows(
    rows: Iterable[dict[str, Any]],
    label_field: str | None = "category",
    tokenizer: Any = None,
    template: str = "alpaca",
    cutoff_len: int = 512,
    min_response_tokens: int = 16,
) -> dict[str, Any]:
    """Summarise rows loaded by :func:`fedit.data.load.load_rows`.

    Parameters
    ----------
    rows : iterable of dict
        Canonical rows (``instruction``, ``context``, ``response`` and any other columns),
        read once: a stream (:func:`fedit.data.load.iter_rows`) is never held whole.
    label_field : str, optional
        The column whose values are counted, when some row has it.
    tokenizer : optional
        A transformers tokenizer; when given, token lengths of prompt + response are
        reported as the trainer sees them (before truncation, EOS included).
    template : str
        Prompt template, as in :func:`fedit.data.prompts.build_prompt`.
    cutoff_len, min_response_tokens : int
        Preference pairs: what their counts (shortened, skipped) are fitted to.

    Returns
    -------
    dict
        ``rows``; ``fields`` (column -> rows where it is non-empty); ``labels`` (value ->
        rows, most common first, or None); ``chars`` (per canonical field and ``text``, the
        prompt + response, each ``{p50, p90, p99, max}``); ``tokens`` (the same for the
        text, or None without a tokenizer); ``conversations`` (None, or ``rows``,
        ``turns`` per row, ``turns_by_role`` and the percentiles of each role's turns in
        ``chars_by_role`` and ``tokens_by_role``); ``duplicates`` (prompts asked more than
        once, ``exact`` and ``normalised``: ``groups`` and ``extra`` copies,
        :func:`fedit.data.dedup.duplicate_groups`); ``pairs`` (None, or preference pairs'
        count, token lengths and counts: :class:`~fedit.data.preference_tokens.PairLengths`).
    """
    summary = _Summary(label_field, tokenizer, template)
    summary.pairs = PairLengths(tokenizer, template, cutoff_len, min_response_tokens)
    size = BATCH if tokenizer is not None else 1  # a batch is for the tokenizer's sake
    batch: list[dict[str, Any]] = []
    for row in rows:  # a stream: only counts and lengths are kept, never the rows
        batch.append(row)
        if len(batch) == size:
            summary.add(batch)
            batch = []
    summary.add(batch)
    return summary.report()


class _Summary:
    """What :func:`inspect_rows` reports, gathered a batch of rows at a time: counters,
    and one int32 array a length (4 bytes a row, where a row's text takes hundreds)."""

    def __init__(self, label_field: str | None, tokenizer: Any, template: str) -> None:
        self.label_field, self.tokenizer, self.template = label_field, tokenizer, template
        self.rows, self.has_label = 0, False
        self.fields: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.chars = {f: array("i") for f in (*LENGTH_FIELDS, "text")}
        self.tokens = array("i")
        self.prompts = {"exact": array("q"), "normalised": array("q")}
        self.turns = array("i")
        self.turns_by_role: dict[str, dict[str, array[int]]] = {}
        self.pairs = PairLengths(tokenizer, template)

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows += len(rows)
        for row in rows:
            self.fields.update(k for k, v in row.items() if _non_empty(v))
            if self.label_field is not None:
                self.has_label = self.has_label or self.label_field in row
                self.labels[str(row.get(self.label_field))] += 1
            for f in LENGTH_FIELDS if not is_preference(row) else ():
                self.chars[f].append(len(row.get(f) or ""))
            for kind, normalised in (("exact", False), ("normalised", True)):
                self.prompts[kind].append(_hash64(prompt_key(row, normalised)))
            if is_conversation(row):
                self._add_turns(row["messages"])
        self.pairs.add([r for r in rows if is_preference(r)])  # their text is not one text
        rows = [r for r in rows if not is_preference(r)]
        texts = [_text(row, self.template, self.tokenizer) for row in rows]
        self.chars["text"].extend(len(t) for t in texts)
        if self.tokenizer is not None and rows:
            self.tokens.extend(_token_lengths(self.tokenizer, rows, texts, self.template))

    def _add_turns(self, messages: list[dict[str, str]]) -> None:
        self.turns.append(len(messages))
        for turn in messages:
            role = self.turns_by_role.setdefault(turn["role"], {"chars": array("i"),
                                                                "tokens": array("i")})
            role["chars"].append(len(turn["content"]))
        if self.tokenizer is not None:
            for turn in messages:  # each turn's content alone
                ids = self.tokenizer(turn["content"], add_special_tokens=False)["input_ids"]
                self.turns_by_role[turn["role"]]["tokens"].append(len(ids))

    def report(self) -> dict[str, Any]:
        labels = None
        if self.has_label:
            labels = dict(sorted(self.labels.items(), key=lambda kv: (-kv[1], kv[0])))
        return {
            "rows": self.rows,
            "fields": dict(sorted(self.fields.items())),
            "labels": labels,
            "label_field": self.label_field if labels is not None else None,
            "chars": {f: percentiles(v) for f, v in self.chars.items()},
            "tokens": percentiles(self.tokens) if self.tokenizer is not None else None,
            "conversations": self._conversations(),
            "duplicates": {k: _repeats(v) for k, v in self.prompts.items()},
            "pairs": self.pairs.report(),
        }

    def _conversations(self) -> dict[str, Any] | None:
        """Turns per conversation row and, per role, its turns' lengths in chars (and
        tokens); None when no row is a conversation."""
        if not self.turns:
            return None
        roles = sorted(self.turns_by_role.items())
        return {"rows": len(self.turns), "turns": percentiles(self.turns),
                "turns_by_role": {r: len(v["chars"]) for r, v in roles},
                "chars_by_role": {r: percentiles(v["chars"]) for r, v in roles},
                "tokens_by_role": ({r: percentiles(v["tokens"]) for r, v in roles}
                                   if self.tokenizer is not None else None)}


class PairLengths:
    """Preference pairs in a data set: how many, the token lengths of prompt, chosen and
    rejected (before fitting), and what a run's tokenisation would count (pairs
    ``truncated`` and ``skipped`` at ``cutoff_len``, ``identical`` answers dropped)."""

    def __init__(self, tokenizer: Any, template: str, cutoff_len: int = 512,
                 min_response_tokens: int = 16) -> None:
        self.tokenizer, self.template = tokenizer, template
        self.data = SimpleNamespace(template=template, cutoff_len=cutoff_len,
                                    truncation="context",
                                    min_response_tokens=min_response_tokens)
        self.rows, self.identical = 0, 0
        self.counts: Counter[str] = Counter()
        self.tokens = {k: array("i") for k in (PROMPT, CHOSEN, REJECTED)}

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows += len(rows)
        self.identical += sum(r[CHOSEN].strip() == r[REJECTED].strip() for r in rows)
        if self.tokenizer is None or not rows:
            return
        for row in rows:
            for name, ids in zip(self.tokens, split_pair(self.tokenizer, row, self.template),
                                 strict=True):
                self.tokens[name].append(len(ids))
        self.counts.update(tokenize_pairs(self.tokenizer, rows, self.data, "inspect")[2])

    def report(self) -> dict[str, Any] | None:
        if not self.rows:
            return None
        tokenized = self.tokenizer is not None
        return {"pairs": self.rows, "identical": self.identical,
                "truncated": self.counts["truncated"] if tokenized else None,
                "skipped": self.counts["skipped"] if tokenized else None,
                "tokens": ({k: percentiles(v) for k, v in self.tokens.items()} if tokenized
                           else None)}


def _hash64(text: str) -> int:
    """A signed 64-bit digest of ``text``: prompts are counted by these, not kept."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _repeats(hashes: array[int]) -> dict[str, int]:
    """``groups`` (values seen twice or more) and ``extra`` (their copies beyond the
    first), as :func:`fedit.data.dedup.duplicate_groups` counts prompts."""
    _, counts = np.unique(np.asarray(hashes, dtype=np.int64), return_counts=True)
    repeated = counts[counts > 1]
    return {"groups": int(repeated.size), "extra": int((repeated - 1).sum())}


def _text(row: dict[str, Any], template: str, tokenizer: Any) -> str:
    """What a row trains on: prompt + response, or the whole conversation (in ChatML
    when no tokenizer is given: its characters stand for any template's)."""
    if is_conversation(row):
        chat = "chatml" if tokenizer is None else chat_template_of(row, template)
        return render(tokenizer, row["messages"], chat, False)
    return build_prompt(row, template, tokenizer) + row["response"]


def _token_lengths(tokenizer: Any, rows: Sequence[dict[str, Any]], texts: list[str],
                   template: str) -> list[int]:
    """The tokens each text needs, counted as ``tokenize_row`` counts them (an
    instruction row gets EOS; a conversation ends with its template's end marker); one
    tokenizer call a batch of rows that add special tokens alike."""
    eos = tokenizer.eos_token_id
    out = [0] * len(rows)
    for special in (True, False):
        idx = [i for i, r in enumerate(rows) if adds_special_tokens(r, template) == special]
        if not idx:
            continue
        ids = tokenizer([texts[i] for i in idx], add_special_tokens=special)["input_ids"]
        for i, x in zip(idx, ids, strict=True):
            adds_eos = not is_conversation(rows[i]) and eos is not None and (not x or x[-1] != eos)
            out[i] = len(x) + int(adds_eos)
    return out


def format_inspect(report: dict[str, Any]) -> str:
    """A compact plain-text table of an :func:`inspect_rows` report."""
    lines = [f"rows: {report['rows']}", "", "fields (non-empty rows):"]
    width = max((len(k) for k in report["fields"]), default=0)
    lines += [f"  {k:<{width}}  {v:>8}" for k, v in report["fields"].items()]
    if report["labels"] is not None:
        lines += ["", f"labels ({report['label_field']}):"]
        width = max((len(k) for k in report["labels"]), default=0)
        total = max(report["rows"], 1)
        lines += [
            f"  {k:<{width}}  {v:>8}  {100 * v / total:5.1f}%" for k, v in report["labels"].items()
        ]
    pairs = report.get("pairs")
    only_pairs = pairs is not None and pairs["pairs"] == report["rows"]
    lengths = {} if only_pairs else {f"{k} (chars)": v for k, v in report["chars"].items()}
    if report["tokens"] is not None and not only_pairs:
        lengths["text (tokens)"] = report["tokens"]
    conv = report.get("conversations")
    if conv is not None:
        lines += ["", f"conversations: {conv['rows']} rows; turns: " + ", ".join(
            f"{r} {n}" for r, n in conv["turns_by_role"].items())]
        lengths["turns per row"] = conv["turns"]
        for unit in ("chars", "tokens"):
            for role, p in (conv[f"{unit}_by_role"] or {}).items():
                lengths[f"{role} turn ({unit})"] = p
    if pairs is not None:
        lines += ["", "preference pairs: " + ", ".join(
            f"{k} {v}" for k, v in pairs.items() if k != "tokens" and v is not None)]
        lengths.update({f"{k} (tokens)": v for k, v in (pairs["tokens"] or {}).items()})
    dup = report.get("duplicates")
    if dup is not None:
        lines += ["", "duplicate prompts (instruction + context, or the turns before the "
                  "first answer):"] + [
            f"  {kind:<10}  {d['groups']:>8} groups  {d['extra']:>8} extra copies"
            for kind, d in dup.items()]
    if not lengths:  # pairs without a tokenizer: nothing is measured in tokens
        return "\n".join(lines)
    width = max(len(k) for k in lengths)
    head = "".join(f"{c:>8}" for c in ["p50", "p90", "p99", "max"])
    lines += ["", f"lengths{' ' * (width - 5)}{head}"]
    for name, p in lengths.items():
        cells = "".join(f"{p[c]:>8}" for c in ["p50", "p90", "p99", "max"])
        lines.append(f"  {name:<{width}}{cells}")
    return "\n".join(lines)
