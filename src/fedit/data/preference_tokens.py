"""Tokenisation of preference pairs (:mod:`fedit.data.preferences`) into :class:`PairExample`.

The prompt is rendered as an instruction row's is: with ``alpaca`` the prompt string is
the instruction; with ``chat`` / ``chatml`` (and for a conversational prompt, always a
chat template, as a conversation row) it is the user turn(s), ready for the answer. Each
answer is the tokens of prompt + answer past the prompt's (as TRL tokenises pairs: where
the two diverge); a string answer gets EOS, a conversational one ends with the template's
end-of-turn marker.

Length: with ``truncation = "context"`` the prompt is shortened first (its longest part
loses its middle, :data:`~fedit.data.conversations.TRUNCATION_MARKER` joins start and
end) so that each answer keeps at least ``min_response_tokens`` (or all of it, when
shorter); then each answer is cut at ``cutoff_len`` (a cut answer loses its EOS). A pair
that still cannot fit is skipped, a pair whose answers are the same is dropped: both are
counted (``partitions/stats.json``' ``"length"`` entry, as SFT's rows are).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedit.data.conversations import TRUNCATION_MARKER, render
from fedit.data.preferences import CHOSEN, PROMPT, REJECTED, is_preference
from fedit.data.prompts import (
    IGNORE_INDEX,
    Example,
    build_prompt,
    fit_prompt,
    record_length_counts,
)
from fedit.errors import DataError


@dataclass(frozen=True)
class PairExample:
    """One tokenised preference pair: the prompt's ids and each answer's."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False  # the prompt was shortened or an answer cut

    def _example(self, answer: list[int]) -> Example:
        return Example(input_ids=self.prompt_ids + answer,
                       labels=[IGNORE_INDEX] * len(self.prompt_ids) + answer,
                       truncated=self.truncated)

    @property
    def chosen(self) -> Example:
        """Prompt + chosen answer, labels on the answer only."""
        return self._example(self.chosen_ids)

    @property
    def rejected(self) -> Example:
        """Prompt + rejected answer, labels on the answer only."""
        return self._example(self.rejected_ids)

    @property
    def key(self) -> int:
        """A stable 63-bit id of the pair's tokens (the same in every process)."""
        h = hashlib.blake2b(digest_size=8)
        for ids in (self.prompt_ids, self.chosen_ids, self.rejected_ids):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(b"".join(int(i).to_bytes(4, "little") for i in ids))
        return int.from_bytes(h.digest(), "little") >> 1

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _chat(template: str) -> str:
    """The template a conversational prompt is rendered with (as a conversation row's)."""
    return "chatml" if template == "chatml" else "chat"


def _texts(tokenizer: Any, prompt: Any, answer: str, template: str) -> tuple[str, str, bool]:
    """``(prompt text, prompt + answer text, special)`` for one answer."""
    if isinstance(prompt, list):
        chat = _chat(template)
        turn = [{"role": "assistant", "content": answer}]
        return (render(tokenizer, prompt, chat, True),
                render(tokenizer, [*prompt, *turn], chat, False), chat != "chat")
    text = build_prompt({"instruction": prompt, "context": ""}, template, tokenizer)
    return text, text + answer, template != "chat"


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def split_pair(tokenizer: Any, row: Mapping[str, Any], template: str
               ) -> tuple[list[int], list[int], list[int]]:
    """A pair's prompt, chosen and rejected ids as rendered, before any fitting."""
    return _split(tokenizer, row, row[PROMPT], template)


def _split(tokenizer: Any, row: Mapping[str, Any], prompt: Any, template: str
           ) -> tuple[list[int], list[int], list[int]]:
    """Prompt ids and each answer's ids (whole, EOS included for a string prompt)."""
    eos = tokenizer.eos_token_id
    whole, prompt_ids = [], []
    for name in (CHOSEN, REJECTED):
        text, full, special = _texts(tokenizer, prompt, row[name], template)
        prompt_ids, ids = _ids(tokenizer, text, special), _ids(tokenizer, full, special)
        if not isinstance(prompt, list) and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        whole.append(ids)
    # where prompt and prompt + answer diverge (tokens may merge across the boundary)
    start = min(_common(prompt_ids, ids) for ids in whole)
    return prompt_ids[:start], whole[0][start:], whole[1][start:]


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer: Any, row: Mapping[str, Any], *, template: str = "alpaca",
                  cutoff_len: int = 512, truncation: str = "context",
                  min_response_tokens: int = 16) -> PairExample | None:
    """One pair fitted to ``cutoff_len`` (see the module docstring); None when it cannot
    fit (the prompt leaves no answer token, or cannot be shortened enough)."""
    prompt = row[PROMPT]
    prompt_ids, chosen, rejected = _split(tokenizer, row, prompt, template)
    need = max(min(min_response_tokens, len(chosen)), min(min_response_tokens, len(rejected)))
    shortened = False
    if truncation == "context" and len(prompt_ids) + need > cutoff_len:
        fitted = _shorten_prompt(tokenizer, prompt, template, cutoff_len - need)
        if fitted is None:
            return None
        prompt_ids, chosen, rejected = _split(tokenizer, row, fitted, template)
        shortened = True
    room = cutoff_len - len(prompt_ids)
    if room < 1 or (truncation == "context" and room < need):
        return None
    cut = len(chosen) > room or len(rejected) > room
    return PairExample(prompt_ids, chosen[:room], rejected[:room], shortened or cut)


def _shorten_prompt(tokenizer: Any, prompt: Any, template: str, max_tokens: int) -> Any:
    """The prompt with its longest part cut in the middle so that it takes at most
    ``max_tokens`` tokens; None when it cannot."""
    if max_tokens < 1:
        return None
    if not isinstance(prompt, list):
        fitted = fit_prompt(tokenizer, {"instruction": prompt, "context": ""}, template,
                            max_tokens)
        return None if fitted is None else fitted["instruction"]
    chat = _chat(template)

    def length(turns: list[dict[str, str]]) -> int:
        return len(_ids(tokenizer, render(tokenizer, turns, chat, True), chat != "chat"))

    turns = [dict(m) for m in prompt]
    sizes = [_ids(tokenizer, m["content"], False) for m in turns]
    longest = max(range(len(turns)), key=lambda i: (len(sizes[i]), i))
    ids = sizes[longest]
    keep = len(ids) - (length(turns) - max_tokens)
    while keep > 0:  # the marker and re-tokenising at the cuts cost a few tokens: retry
        head, tail = keep - keep // 2, keep // 2
        text = tokenizer.decode(ids[:head]) + TRUNCATION_MARKER
        text += tokenizer.decode(ids[len(ids) - tail:]) if tail else ""
        turns[longest] = {**turns[longest], "content": text}
        over = length(turns) - max_tokens
        if over <= 0:
            return turns
        keep -= over
    return None


def tokenize_pairs(tokenizer: Any, rows: Sequence[Mapping[str, Any]], data: Any, who: str
                   ) -> tuple[list[PairExample], list[int], dict[str, int]]:
    """Every pair of ``rows`` as the run's ``data`` config says: the examples, the index
    of each kept row, and the counts (``rows``, ``truncated``, ``skipped``: cannot fit,
    ``identical``: chosen equals rejected, dropped).

    Raises
    ------
    DataError
        When a row is not a preference pair (the objective needs pairs).
    """
    examples, kept = [], []
    counts = {"rows": len(rows), "truncated": 0, "skipped": 0, "identical": 0}
    for i, row in enumerate(rows):
        if not is_preference(row):
            raise DataError(f"{who}: row {i} is not a preference pair (no chosen / rejected "
                            "answer); train.objective = \"dpo\" needs prompt, chosen and "
                            "rejected in every row (README \"Preference optimisation (DPO)\")")
        if row[CHOSEN].strip() == row[REJECTED].strip():
            counts["identical"] += 1
            continue
        ex = tokenize_pair(tokenizer, row, template=data.template, cutoff_len=data.cutoff_len,
                           truncation=data.truncation,
                           min_response_tokens=data.min_response_tokens)
        if ex is None:
            counts["skipped"] += 1
            continue
        if ex.chosen_ids == ex.rejected_ids:  # the same once cut: no signal left
            counts["identical"] += 1
            continue
        counts["truncated"] += int(ex.truncated)
        examples.append(ex)
        kept.append(i)
    return examples, kept, counts


def tokenize_pairs_for_run(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], data: Any, who: str,
    log: Callable[[str], None] | None = print, stats_file: Path | None = None,
) -> tuple[list[PairExample], list[int]]:
    """:func:`tokenize_pairs`, telling ``log`` what was shortened, skipped or dropped and
    recording the counts under ``who`` in ``stats_file`` (as SFT's rows are)."""
    examples, kept, counts = tokenize_pairs(tokenizer, rows, data, who)
    n = len(rows)
    if n and not examples:
        raise DataError(
            f"{who}: none of its {n} pairs is left to train on ({counts['skipped']} cannot "
            f"fit data.cutoff_len = {data.cutoff_len} with data.min_response_tokens = "
            f"{data.min_response_tokens} answer tokens each, {counts['identical']} have the "
            "same chosen and rejected answer); raise data.cutoff_len or lower "
            "data.min_response_tokens")
    if log is not None and counts["truncated"]:
        log(f"{who}: {counts['truncated']} of {n} pairs shortened to fit data.cutoff_len = "
            f"{data.cutoff_len} (a prompt lost its middle, or an answer its end)")
    if log is not None and counts["skipped"]:
        log(f"{who}: {counts['skipped']} of {n} pairs skipped: the prompt cannot be "
            f"shortened enough to leave data.min_response_tokens = {data.min_response_tokens}"
            f" answer tokens within data.cutoff_len = {data.cutoff_len}")
    if log is not None and counts["identical"]:
        log(f"{who}: {counts['identical']} of {n} pairs dropped: chosen and rejected are the "
            "same answer (no preference to learn)")
    if stats_file is not None:
        record_length_counts(stats_file, who, counts)
    return examples, kept
