"""Prompt keys: which rows ask the same thing, so that no held-out prompt is trained on.

A row's *prompt key* is what the model is asked, normalised (whitespace runs collapsed to
one space and trimmed, case folded): an instruction row's instruction and context; a
conversation's turns up to its first assistant turn (the optional system turn and the
first user turn), each with its role. Its *prompt hash* is the sha256 hex digest of the
key's UTF-8 text: stable across processes and machines, so a Flower server can tell the
nodes which prompts are held out without sending a prompt.

The rule (``remove_held_out``): a prompt that is both held out and in some client's
training rows stays on the held-out side only; every training copy of it is removed and
counted per client. The held-out rows never change, so which rows are scored is the same
with or without duplicates in the data; only training loses the copies.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from fedit.data.conversations import is_conversation

Row = Mapping[str, Any]


def normalise(text: Any) -> str:
    """``text`` with whitespace runs collapsed to one space, trimmed, and case folded."""
    return " ".join(str(text or "").split()).casefold()


def _prompt_parts(row: Row, norm: Callable[[Any], str]) -> list[Any]:
    if is_conversation(row):
        head = []
        for turn in row["messages"]:
            if turn.get("role") == "assistant":
                break
            head.append([str(turn.get("role")), norm(turn.get("content"))])
        return ["messages", head]
    return ["instruction", norm(row.get("instruction")), norm(row.get("context"))]


def prompt_key(row: Row, normalised: bool = True) -> str:
    """The row's prompt as one text (JSON): normalised unless ``normalised=False``."""
    norm = normalise if normalised else (lambda t: str(t or ""))
    return json.dumps(_prompt_parts(row, norm), ensure_ascii=False)


def prompt_hash(row: Row) -> str:
    """sha256 hex digest of the row's normalised prompt key."""
    return hashlib.sha256(prompt_key(row).encode("utf-8")).hexdigest()


def prompt_hashes(rows: Iterable[Row]) -> set[str]:
    """The prompt hashes of ``rows``."""
    return {prompt_hash(r) for r in rows}


def duplicate_groups(rows: Sequence[Row]) -> dict[str, dict[str, int]]:
    """Prompts asked more than once: ``{"exact": {"groups", "extra"}, "normalised": ...}``,
    ``groups`` the prompts that occur twice or more, ``extra`` their copies beyond the
    first (rows that would go if each prompt were kept once)."""
    out = {}
    for name, normalised in (("exact", False), ("normalised", True)):
        counts = Counter(prompt_key(r, normalised) for r in rows)
        repeated = [n for n in counts.values() if n > 1]
        out[name] = {"groups": len(repeated), "extra": sum(n - 1 for n in repeated)}
    return out


def remove_held_out(
    train_rows: Sequence[dict[str, Any]], parts: Sequence[Sequence[int]], held: set[str],
) -> tuple[list[dict[str, Any]], list[list[int]], list[int]]:
    """Drop the training rows whose prompt hash is in ``held``.

    Parameters
    ----------
    train_rows : sequence of dict
        Every client's training rows; ``parts[c]`` are client ``c``'s indices into them.
    parts : sequence of sequences of int
        Each client's row indices (every row in at most one client).
    held : set of str
        Prompt hashes of the held-out rows (:func:`prompt_hashes`).

    Returns
    -------
    (rows, parts, removed)
        The rows kept (in their order), each client's indices into them (order kept), and
        how many rows each client lost.
    """
    keep = [prompt_hash(r) not in held for r in train_rows] if held else [True] * len(train_rows)
    new_index, n = [], 0
    for k in keep:
        new_index.append(n)
        n += k
    new_parts = [[new_index[i] for i in part if keep[i]] for part in parts]
    removed = [len(part) - len(new) for part, new in zip(parts, new_parts, strict=True)]
    return [r for r, k in zip(train_rows, keep, strict=True) if k], new_parts, removed


def drop_held_out(rows: Sequence[dict[str, Any]], held: set[str]
                  ) -> tuple[list[dict[str, Any]], int]:
    """One client's rows without those whose prompt hash is in ``held``, and how many went."""
    kept, _, removed = remove_held_out(rows, [range(len(rows))], held)
    return kept, removed[0]


def duplicates_stats(removed: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """``stats.json``'s ``held_out_duplicates``: the rows removed in all and per client
    (by name; clients that lost none are left out)."""
    return {"removed": int(sum(removed)),
            "per_client": {str(name): int(n) for name, n in zip(names, removed, strict=True)
                           if n}}
