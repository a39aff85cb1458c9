"""The text table ``fedit eval`` prints: one line a category, a rule, then the overall line.

Shared by the instruction-row evaluation (``evaluation.format_table``) and the preference
one (``preference.format_preference_table``), which differ only in their columns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fmt(value: float | None, digits: int = 3) -> str:
    """A metric as the table shows it: ``-`` when there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


def metric_lines(head: str, result: dict[str, Any],
                 row: Callable[[str, dict[str, Any]], str]) -> list[str]:
    """``head``, a rule, ``row(name, metrics)`` per category, a rule, the overall row."""
    rule = "-" * len(head)
    lines = [head, rule]
    lines += [row(name, m) for name, m in result["by_category"].items()]
    return [*lines, rule, row("overall", result["overall"])]
