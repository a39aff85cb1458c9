"""A quick look at a data set: fields, labels, and how long rows are in chars and tokens.

Percentiles are observed values (numpy's ``inverted_cdf``): "p90 = 412 tokens" means 90% of
rows need at most 412 tokens, which is what choosing ``cutoff_len`` asks.

Conversation rows (``messages``) count the whole conversation as their text, and add turns
per row and chars (tokens, given a tokenizer) per turn of each role.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedit.data.conversations import chat_template_of, is_conversation, render
from fedit.data.prompts import adds_special_tokens, build_prompt

PERCENTILES = (50, 90, 99)
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
    rows: Sequence[dict[str, Any]],
    label_field: str | None = "category",
    tokenizer: Any = None,
    template: str = "alpaca",
) -> dict[str, Any]:
    """Summarise rows loaded by :func:`fedit.data.load.load_rows`.

    Parameters
    ----------
    rows : sequence of dict
        Canonical rows (``instruction``, ``context``, ``response`` and any other columns).
    label_field : str, optional
        The column whose values are counted, when some row has it.
    tokenizer : optional
        A transformers tokenizer; when given, token lengths of prompt + response are
        reported as the trainer sees them (before truncation, EOS included).
    template : str
        Prompt template, as in :func:`fedit.data.prompts.build_prompt`.

    Returns
    -------
    dict
        ``rows``; ``fields`` (column -> rows where it is non-empty); ``labels`` (value ->
        rows, most common first, or None); ``chars`` (per canonical field and ``text``, the
        prompt + response, each ``{p50, p90, p99, max}``); ``tokens`` (the same for the
        text, or None without a tokenizer); ``conversations`` (None, or ``rows``,
        ``turns`` per row, ``turns_by_role`` and the percentiles of each role's turns in
        ``chars_by_role`` and ``tokens_by_role``).
    """
    fields: Counter[str] = Counter()
    for row in rows:
        fields.update(k for k, v in row.items() if _non_empty(v))
    labels = None
    if label_field is not None and any(label_field in row for row in rows):
        counts = Counter(str(row.get(label_field)) for row in rows)
        labels = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    if tokenizer is None and template != "chatml":  # conversations: ChatML for the chars
        template = "chatml" if any(is_conversation(r) for r in rows) else template
    texts = [_text(row, template, tokenizer) for row in rows]
    chars = {f: percentiles([len(row.get(f) or "") for row in rows]) for f in LENGTH_FIELDS}
    chars["text"] = percentiles([len(t) for t in texts])
    return {
        "rows": len(rows),
        "fields": dict(sorted(fields.items())),
        "labels": labels,
        "label_field": label_field if labels is not None else None,
        "chars": chars,
        "tokens": (_token_lengths(tokenizer, rows, texts, template)
                   if tokenizer is not None else None),
        "conversations": _conversations(rows, tokenizer),
    }


def _text(row: dict[str, Any], template: str, tokenizer: Any) -> str:
    """What a row trains on: prompt + response, or the whole conversation."""
    if is_conversation(row):
        return render(tokenizer, row["messages"], chat_template_of(row, template), False)
    return build_prompt(row, template, tokenizer) + row["response"]


def _token_lengths(tokenizer: Any, rows: Sequence[dict[str, Any]], texts: list[str],
                   template: str) -> dict[str, int]:
    """Percentiles of the tokens each text needs, counted as ``tokenize_row`` counts them
    (an instruction row gets EOS; a conversation ends with its template's end marker)."""
    eos = tokenizer.eos_token_id
    out = []
    for row, text in zip(rows, texts, strict=True):
        x = tokenizer(text, add_special_tokens=adds_special_tokens(row, template))["input_ids"]
        adds_eos = not is_conversation(row) and eos is not None and (not x or x[-1] != eos)
        out.append(len(x) + int(adds_eos))
    return percentiles(out)


def _conversations(rows: Sequence[dict[str, Any]], tokenizer: Any) -> dict[str, Any] | None:
    """Turns per conversation row and, per role, its turns' lengths in chars (and tokens,
    each turn's content alone); None when no row is a conversation."""
    chats = [r["messages"] for r in rows if is_conversation(r)]
    if not chats:
        return None
    turns = [t for chat in chats for t in chat]
    roles = sorted({t["role"] for t in turns})
    per_role = {r: [t["content"] for t in turns if t["role"] == r] for r in roles}
    tokens = None
    if tokenizer is not None:
        tokens = {r: percentiles([len(tokenizer(c, add_special_tokens=False)["input_ids"])
                                  for c in texts]) for r, texts in per_role.items()}
    return {"rows": len(chats), "turns": percentiles([len(c) for c in chats]),
            "turns_by_role": {r: len(texts) for r, texts in per_role.items()},
            "chars_by_role": {r: percentiles([len(c) for c in t]) for r, t in per_role.items()},
            "tokens_by_role": tokens}


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
    lengths = {f"{k} (chars)": v for k, v in report["chars"].items()}
    if report["tokens"] is not None:
        lengths["text (tokens)"] = report["tokens"]
    conv = report.get("conversations")
    if conv is not None:
        lines += ["", f"conversations: {conv['rows']} rows; turns: " + ", ".join(
            f"{r} {n}" for r, n in conv["turns_by_role"].items())]
        lengths["turns per row"] = conv["turns"]
        for unit in ("chars", "tokens"):
            for role, p in (conv[f"{unit}_by_role"] or {}).items():
                lengths[f"{role} turn ({unit})"] = p
    width = max(len(k) for k in lengths)
    head = "".join(f"{c:>8}" for c in ["p50", "p90", "p99", "max"])
    lines += ["", f"lengths{' ' * (width - 5)}{head}"]
    for name, p in lengths.items():
        cells = "".join(f"{p[c]:>8}" for c in ["p50", "p90", "p99", "max"])
        lines.append(f"  {name:<{width}}{cells}")
    return "\n".join(lines)
