"""Preference rows: a prompt, a preferred (``chosen``) and a dispreferred (``rejected``)
answer, as TRL defines them, validated into canonical rows.

Two shapes, as TRL's preference data sets come:

- standard: ``prompt``, ``chosen`` and ``rejected`` are strings;
- conversational: ``prompt`` is a list of ``{role, content}`` messages (an optional system
  turn, then user and assistant in turn, ending with a user turn), ``chosen`` and
  ``rejected`` each a list holding the one assistant turn that answers it.

``data.fields`` maps other column names to ``prompt`` / ``chosen`` / ``rejected``. A
record is read as a pair when it has a ``chosen`` or ``rejected`` column (or
``data.fields`` names one of the three). Its canonical row holds ``prompt`` (the string,
or the validated messages), ``chosen`` and ``rejected`` (the answers' text), and
``instruction`` (the prompt's last user turn, or the prompt string) and ``context``
(``""``), which prompt keys (held-out duplicates) and labels read, plus the source's
other columns. A bad pair is an invalid row (:class:`~fedit.data.invalid.RowError`, so
``data.invalid_rows = "skip"`` counts it). Tokenisation is in
:mod:`fedit.data.preference_tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedit.data.conversations import ROLE_ALIASES
from fedit.data.invalid import (
    BAD_TURN,
    EMPTY_FIELD,
    MISSING_FIELD,
    TURN_ORDER,
    UNKNOWN_ROLE,
    WRONG_TYPE,
    RowError,
    json_type,
)

PROMPT, CHOSEN, REJECTED = "prompt", "chosen", "rejected"
PREFERENCE_FIELDS = (PROMPT, CHOSEN, REJECTED)
SHAPE_HINT = ("a pair is prompt, chosen, rejected as strings, or prompt as a list of "
              "{role, content} messages and chosen / rejected as a list of one assistant "
              "message (README \"Preference optimisation (DPO)\")")


@dataclass(frozen=True)
class PairColumns:
    """The source columns of a pair's fields; ``named``: ``data.fields`` names one, so
    every record is read as a pair."""

    prompt: str = PROMPT
    chosen: str = CHOSEN
    rejected: str = REJECTED
    named: bool = False

    @classmethod
    def from_fields(cls, fields: Mapping[str, str] | None) -> PairColumns:
        fields = fields or {}
        return cls(fields.get(PROMPT, PROMPT), fields.get(CHOSEN, CHOSEN),
                   fields.get(REJECTED, REJECTED),
                   named=any(name in fields for name in PREFERENCE_FIELDS))

    def columns(self) -> dict[str, str]:
        return {PROMPT: self.prompt, CHOSEN: self.chosen, REJECTED: self.rejected}


def is_preference_record(rec: Mapping[str, Any], cols: PairColumns) -> bool:
    """True when a source record is to be read as a preference pair."""
    return cols.named or cols.chosen in rec or cols.rejected in rec


def is_preference(row: Mapping[str, Any]) -> bool:
    """True for a canonical preference row."""
    return CHOSEN in row and REJECTED in row and PROMPT in row


def canonical_preference(rec: Mapping[str, Any], where: str, cols: PairColumns
                         ) -> dict[str, Any]:
    """A validated pair as canonical fields (see the module docstring).

    Raises
    ------
    RowError
        ``where: ...``, naming the field (and turn) and what to do.
    """
    for name, column in cols.columns().items():
        if column not in rec:
            have = ", ".join(map(str, rec)) or "none"
            how = (f"data.fields.{name} = {column!r} asks for it" if column != name else
                   f"map another column with data.fields.{name} = \"...\"")
            raise RowError(f"{where}: field {column!r} is missing ({how}; a preference row "
                           f"needs prompt, chosen and rejected; columns: {have})",
                           MISSING_FIELD)
    prompt = rec[cols.prompt]
    if isinstance(prompt, str):
        _text_field(prompt, where, cols.prompt)
        answers = [_text_field(rec[c], where, c) for c in (cols.chosen, cols.rejected)]
        instruction = prompt
    elif isinstance(prompt, list):
        prompt = _prompt_messages(prompt, where, cols.prompt)
        answers = [_answer_turn(rec[c], where, c) for c in (cols.chosen, cols.rejected)]
        instruction = prompt[-1]["content"]
    else:
        raise RowError(f"{where}: field {cols.prompt!r} must be a string or a list of "
                       f"messages, got {json_type(prompt)}; {SHAPE_HINT}", WRONG_TYPE)
    return {PROMPT: prompt, CHOSEN: answers[0], REJECTED: answers[1],
            "instruction": instruction, "context": ""}


def _text_field(value: Any, where: str, column: str) -> str:
    """A non-empty string field of a standard pair."""
    if not isinstance(value, str):
        got = json_type(value)
        why = ("the prompt is a string, so the answers must be strings too" if got == "array"
               else "it must be a string")
        raise RowError(f"{where}: field {column!r} is {got}: {why}; {SHAPE_HINT}", WRONG_TYPE)
    if not value.strip():
        raise RowError(f"{where}: field {column!r} is empty; fill it in or remove the row",
                       EMPTY_FIELD)
    return value


def _message(turn: Any, where: str, column: str, n: int) -> dict[str, str]:
    """One ``{role, content}`` message; ``n`` counts from 1."""
    if not isinstance(turn, dict):
        raise RowError(f"{where}: field {column!r}, message {n} must be an object with role "
                       "and content", BAD_TURN)
    got, content = turn.get("role"), turn.get("content")
    role = ROLE_ALIASES.get(str(got)) if got is not None else None
    if role is None:
        raise RowError(f"{where}: field {column!r}, message {n} has role {got!r}; use "
                       "system, user or assistant", UNKNOWN_ROLE if got is not None else BAD_TURN)
    if not isinstance(content, str) or not content.strip():
        raise RowError(f"{where}: field {column!r}, message {n} ({role}) has no text content "
                       "(a non-empty string)", BAD_TURN)
    return {"role": role, "content": content}


def _prompt_messages(value: list[Any], where: str, column: str) -> list[dict[str, str]]:
    """A conversational prompt: optional system turn, user and assistant in turn, ending
    with the user turn the answers reply to."""
    if not value:
        raise RowError(f"{where}: field {column!r} is an empty list; {SHAPE_HINT}", WRONG_TYPE)
    turns = [_message(t, where, column, i + 1) for i, t in enumerate(value)]
    start = int(turns[0]["role"] == "system")
    for i, turn in enumerate(turns[start:], start=start):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if turn["role"] != want:
            raise RowError(f"{where}: field {column!r}, message {i + 1} is a {turn['role']} "
                           f"turn where a {want} turn belongs; the prompt is an optional "
                           "system turn, then user and assistant in turn", TURN_ORDER)
    if len(turns) == start or turns[-1]["role"] != "user":
        raise RowError(f"{where}: field {column!r} must end with a user turn (the one "
                       "chosen and rejected answer)", TURN_ORDER)
    return turns


def _answer_turn(value: Any, where: str, column: str) -> str:
    """The text of a conversational answer: a list of one assistant message."""
    if isinstance(value, str):
        raise RowError(f"{where}: field {column!r} is a string but the prompt is a list of "
                       f"messages; {SHAPE_HINT}", WRONG_TYPE)
    if not isinstance(value, list) or len(value) != 1:
        got = f"{len(value)} messages" if isinstance(value, list) else json_type(value)
        raise RowError(f"{where}: field {column!r} must be a list of one assistant message, "
                       f"got {got}; {SHAPE_HINT}", WRONG_TYPE)
    turn = _message(value[0], where, column, 1)
    if turn["role"] != "assistant":
        raise RowError(f"{where}: field {column!r} holds a {turn['role']} message; it must "
                       "be the assistant's answer", TURN_ORDER)
    return turn["content"]
