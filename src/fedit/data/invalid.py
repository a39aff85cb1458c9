"""Invalid rows under ``data.invalid_rows``: why a row is invalid, and what a load counted.

``error`` (the default): the first invalid row stops the load with its one-line
:class:`RowError`. ``skip``: each invalid row is dropped and counted by its reason (a short
stable key below); the first :data:`NAMED` are kept with their file, line and message for
the log; a file of which more than ``data.max_invalid_fraction`` is invalid still stops
(a wrong column mapping should not train on nothing). Conversations repaired as the
community reads ShareGPT (a leading assistant turn, a trailing unanswered user turn
dropped, :mod:`fedit.data.conversations`) are counted here too.

A :class:`RowCounts` gathers one client's counts (or one source's), over every file it
reads; :func:`invalid_stats` makes the ``"invalid"`` entry of ``partitions/stats.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.errors import DataError
from fedit.io import atomic_write_json

# Reasons: stable keys (stats.json, `fedit data inspect`), one per kind of validation error
NOT_AN_OBJECT = "not an object"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
EMPTY_FIELD = "empty field"
MISSING_LABEL = "missing label"
EMPTY_CONVERSATION = "empty conversation"
BAD_TURN = "bad turn"  # a turn that is not an object, or has no role or no text
UNKNOWN_ROLE = "unknown role"
EMPTY_ANSWER = "empty answer"
TURN_ORDER = "turn order"
NO_EXCHANGE = "no exchange"  # no user turn answered by an assistant turn
# Turns dropped from conversations that are kept (not invalid rows)
LEADING_ASSISTANT = "leading_assistant_turns"
TRAILING_USER = "trailing_user_turns"
DROPPED_TURNS = (LEADING_ASSISTANT, TRAILING_USER)
NAMED = 5  # invalid rows named (file, line, reason) in the log, per client
MAPPING_HINT = "check data.fields / the column mapping"


def json_type(value: Any) -> str:
    """The JSON name of a value's type, which is what a user sees in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, dict):
        return "object"
    return "array" if isinstance(value, list) else type(value).__name__


class RowError(DataError):
    """One row that fails validation; ``reason`` is one of the keys above."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RowCounts:
    """What loading met: rows read, invalid rows by reason, the first few named, and the
    turns dropped from conversations. ``policy`` and ``max_fraction`` are
    ``data.invalid_rows`` and ``data.max_invalid_fraction``."""

    policy: str = "error"
    max_fraction: float = 0.5
    rows: int = 0  # records read, valid or not
    invalid: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    dropped_turns: Counter[str] = field(default_factory=Counter)
    named: list[str] = field(default_factory=list)  # "file:line: message" of the first NAMED

    @classmethod
    def from_config(cls, data: Any) -> RowCounts:
        """Empty counts under a run's ``data`` config section."""
        return cls(data.invalid_rows, data.max_invalid_fraction)

    def fresh(self) -> RowCounts:
        """Empty counts under the same policy (one file's, before they are added)."""
        return RowCounts(self.policy, self.max_fraction)

    def skip(self, error: RowError) -> None:
        """Count an invalid row (``skip``), or raise it (``error``)."""
        if self.policy != "skip":
            raise error
        self.invalid += 1
        self.reasons[error.reason] += 1
        if len(self.named) < NAMED:
            self.named.append(str(error))

    def check_fraction(self, source: str) -> None:
        """Stop when more than ``max_fraction`` of the rows read are invalid.

        Raises
        ------
        DataError
            One line: the fraction, the first invalid row's reason, what to check.
        """
        if self.rows and self.invalid / self.rows > self.max_fraction:
            first = self.named[0] if self.named else "?"
            reason = next(iter(self.reasons))
            raise DataError(
                f"{source}: {self.invalid} of {self.rows} rows ({self.invalid / self.rows:.0%}) "
                f"are invalid, more than data.max_invalid_fraction = {self.max_fraction:g}; "
                f"the first: {reason} ({first.split(': ', 1)[0]}); {MAPPING_HINT}")

    def add(self, other: RowCounts) -> None:
        """Add another file's counts to these."""
        self.rows += other.rows
        self.invalid += other.invalid
        self.reasons.update(other.reasons)
        self.dropped_turns.update(other.dropped_turns)
        self.named += other.named[: max(0, NAMED - len(self.named))]

    def as_dict(self) -> dict[str, Any]:
        """``rows``, ``invalid``, ``reasons`` (reason -> rows) and the dropped turns."""
        return {"rows": self.rows, "invalid": self.invalid,
                "reasons": dict(sorted(self.reasons.items())),
                **{k: self.dropped_turns[k] for k in DROPPED_TURNS}}

    def log_lines(self, who: str) -> list[str]:
        """What to log: the invalid rows skipped (the first few named) and turns dropped."""
        lines = []
        if self.invalid:
            why = ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items()))
            lines.append(f"{who}: {self.invalid} of {self.rows} rows invalid, skipped "
                         f"(data.invalid_rows = \"skip\"): {why}")
            lines += [f"  skipped {m}" for m in self.named]
        lead, trail = (self.dropped_turns[k] for k in DROPPED_TURNS)
        if lead or trail:
            lines.append(f"{who}: dropped {lead} leading assistant and {trail} trailing "
                         "unanswered user turns from conversations (README \"Conversational "
                         "data\")")
        return lines


def format_counts(counts: RowCounts) -> list[str]:
    """``fedit data inspect``'s lines on invalid rows and dropped turns ([] when none)."""
    lines = []
    if counts.invalid:
        lines += ["", f"invalid rows (skipped): {counts.invalid} of {counts.rows}"]
        width = max(len(r) for r in counts.reasons)
        lines += [f"  {r:<{width}}  {n:>8}" for r, n in sorted(counts.reasons.items())]
        lines += [f"  e.g. {m}" for m in counts.named]
    lead, trail = (counts.dropped_turns[k] for k in DROPPED_TURNS)
    if lead or trail:
        lines += ["", f"turns dropped from conversations: {lead} leading assistant, "
                      f"{trail} trailing user"]
    return lines


def invalid_stats(per: Mapping[str, RowCounts]) -> dict[str, Any]:
    """The ``"invalid"`` entry of a run's stats: each ``who``'s counts and their total."""
    total = RowCounts()
    for counts in per.values():
        total.add(counts)
    return {**{who: c.as_dict() for who, c in per.items()}, "total": total.as_dict()}


def record_invalid(path: Path, per: Mapping[str, RowCounts]) -> None:
    """Set the ``"invalid"`` entry of the JSON file ``path`` (``partitions/stats.json``);
    the rest of the file is kept."""
    stats = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    atomic_write_json(path, {**stats, "invalid": invalid_stats(per)})
