"""The answers the LLM judge grades: ``answers.jsonl`` files of ``fedit eval``, read and
checked, and two of them paired row by row for a pairwise comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedit.errors import DataError

_REQUIRED = ("id", "instruction", "answer")


def answers_path(path: Path) -> Path:
    """Return the answers.jsonl a path names.

    Parameters
    ----------
    path : Path
        The file itself, or a folder holding ``answers.jsonl``.

    Returns
    -------
    Path
        The file.

    Raises
    ------
    DataError
        There is no such file.
    """
    file = path / "answers.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{file}: no such answers file (write one with `fedit eval`)")
    return file


def load_answers(path: Path) -> list[dict[str, Any]]:
    """Return the rows of an answers.jsonl.

    Parameters
    ----------
    path : Path
        The file, or its folder (see :func:`answers_path`).

    Returns
    -------
    list of dict
        One row a non-blank line; each has ``id``, ``instruction`` and ``answer`` (text),
        ids unique.

    Raises
    ------
    DataError
        No file, a line that is not JSON or lacks a field, a repeated id, or no rows; the
        message names the file and line.
    """
    file = answers_path(path)
    rows: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = _row(line, f"{file}:{n}")
        if row["id"] in seen:
            raise DataError(f"{file}:{n}: id {row['id']} appears twice")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise DataError(f"{file}: no answers in it")
    return rows


def _row(line: str, where: str) -> dict[str, Any]:
    """One line of an answers file, checked; ``where`` (file:line) starts each error."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc.msg})") from exc
    missing = [k for k in _REQUIRED if k not in row] if isinstance(row, dict) else [*_REQUIRED]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} (answers.jsonl of fedit "
                        "eval has id, instruction, answer, reference, category)")
    if not isinstance(row["answer"], str) or not isinstance(row["instruction"], str):
        raise DataError(f"{where}: 'instruction' and 'answer' must be text")
    return row


def match_rows(rows: list[dict[str, Any]], other: list[dict[str, Any]], path: Path,
               other_path: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pair the rows of two answers files by id.

    Parameters
    ----------
    rows, other : list of dict
        Rows of :func:`load_answers`.
    path, other_path : Path
        Where each came from, for the messages.

    Returns
    -------
    list of tuple
        ``(row, other row)`` with the same id, in the order of ``rows``.

    Raises
    ------
    DataError
        The ids differ, or one id has a different instruction in each.
    """
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
