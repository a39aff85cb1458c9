"""Prompt templates and tokenisation of one instruction row into ``input_ids`` + ``labels``.

The alpaca template is the text FederatedGPT-Shepherd (and alpaca-lora before it) uses, so
adapters trained here are prompted the same way. ``chat`` uses the base model's own chat
template, ``chatml`` the built-in ChatML text (for a model without one). Conversation rows
(``messages``) are rendered and masked by :mod:`fedit.data.conversations`.

Labels are ``-100`` on the prompt unless ``train_on_inputs``; EOS is appended
when the text fits in ``cutoff_len`` (as Shepherd does: a truncated answer gets no EOS, so
the model is not taught to stop mid-sentence).

Length (``truncation="context"``): a row whose prompt would leave fewer than
``min_response_tokens`` response tokens (or its whole response, when shorter) within
``cutoff_len`` is kept by shortening its context: its start and its end are kept, joined by
:data:`TRUNCATION_MARKER`. When even the context's marker is too much, the context is
dropped and the instruction is shortened the same way. ``"skip"`` leaves the row as it is
(a prompt that fills ``cutoff_len`` then leaves no label, and the caller skips the row).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedit.data.conversations import (
    TRUNCATION_MARKER,
    chat_template_of,
    conversation_prompt,
    fit_conversation,
    is_conversation,
    render,
)
from fedit.io import atomic_write_json

IGNORE_INDEX = -100

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_RESPONSE_SPLIT = "### Response:"
TEMPLATES = ("alpaca", "chat", "chatml")
# Where an answer in a template ends when the model runs on into a new section of its own.
TEMPLATE_STOPS = {"alpaca": ("### Instruction:", "### Input:", "### Response:"), "chat": (),
                  "chatml": ("<|im_end|>", "<|im_start|>")}


@dataclass(frozen=True)
class Example:
    """One tokenised training example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # the context or instruction was shortened to fit

    @property
    def num_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def build_prompt(row: Mapping[str, Any], template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text (everything before the response) for a canonical row; for a
    conversation, the turns before its last answer."""
    if is_conversation(row):
        return conversation_prompt(tokenizer, row, template)
    instruction, context = row["instruction"], row.get("context") or ""
    if template == "alpaca":
        if context:
            return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=context)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if template in ("chat", "chatml"):
        if template == "chat" and (tokenizer is None or not getattr(tokenizer, "chat_template",
                                                                     None)):
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        content = f"{instruction}\n\n{context}" if context else instruction
        return render(tokenizer, [{"role": "user", "content": content}], template, True)
    raise ValueError(f"unknown prompt template {template!r}; use one of {', '.join(TEMPLATES)}")


def adds_special_tokens(row: Mapping[str, Any], template: str) -> bool:
    """Whether the tokenizer adds its special tokens (BOS) to a row's text: not for a
    model's chat template, whose text already carries them."""
    return chat_template_of(row, template) != "chat"


def tokenize_row(
    tokenizer: Any,
    row: Mapping[str, Any],
    *,
    template: str = "alpaca",
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
    truncation: str = "context",
    min_response_tokens: int = 16,
) -> Example:
    """Tokenise prompt + response, truncate to ``cutoff_len``, append EOS, mask the prompt.

    With ``truncation="context"`` the row is first fitted (see the module's docstring), so
    that at least ``min_response_tokens`` response tokens carry a label. A conversation
    has labels on every assistant turn and loses whole turns past ``cutoff_len`` (with
    ``"context"``, its first turns are shortened and its first answer cut as needed:
    :func:`~fedit.data.conversations.fit_conversation`)."""
    if is_conversation(row):
        return _tokenize_conversation(tokenizer, row, template, cutoff_len, train_on_inputs,
                                      truncation, min_response_tokens)
    special = adds_special_tokens(row, template)
    fitted = row
    if truncation == "context":
        need = min(min_response_tokens, _count(tokenizer, row["response"], False) + 1)
        fitted = fit_prompt(tokenizer, row, template, cutoff_len - need) or row
    prompt = build_prompt(fitted, template, tokenizer)
    ids = tokenizer(prompt + row["response"], add_special_tokens=special)["input_ids"]
    ids = list(ids[:cutoff_len])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids.append(eos)
    labels = list(ids)
    if not train_on_inputs:
        prompt_len = min(_count(tokenizer, prompt, special), len(ids))
        labels[:prompt_len] = [IGNORE_INDEX] * prompt_len
    return Example(input_ids=ids, labels=labels, truncated=fitted is not row)


def _tokenize_conversation(tokenizer: Any, row: Mapping[str, Any], template: str,
                           cutoff_len: int, train_on_inputs: bool, truncation: str,
                           min_response_tokens: int) -> Example:
    ids, spans, truncated = fit_conversation(
        tokenizer, row, template=template, cutoff_len=cutoff_len, truncation=truncation,
        min_response_tokens=min_response_tokens)
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(ids)
    for start, stop in spans:
        labels[start:stop] = ids[start:stop]
    return Example(input_ids=ids, labels=labels, truncated=truncated)


def fit_prompt(
    tokenizer: Any, row: Mapping[str, Any], template: str, max_tokens: int
) -> Mapping[str, Any] | None:
    """``row`` itself when its prompt takes at most ``max_tokens`` tokens; else a copy with
    the context shortened (or dropped, and the instruction shortened); None when even that
    does not fit."""
    if _prompt_tokens(tokenizer, row, template) <= max_tokens:
        return row
    if row.get("context"):
        short = _shorten_field(tokenizer, row, "context", template, max_tokens)
        if short is not None:
            return short
        row = {**row, "context": ""}
        if _prompt_tokens(tokenizer, row, template) <= max_tokens:
            return row
    return _shorten_field(tokenizer, row, "instruction", template, max_tokens)


def _shorten_field(
    tokenizer: Any, row: Mapping[str, Any], name: str, template: str, max_tokens: int
) -> dict[str, Any] | None:
    """``row`` with field ``name`` cut to its start + marker + end so that the prompt fits
    in ``max_tokens`` (None when not even a token of it fits)."""
    ids = tokenizer(row[name], add_special_tokens=False)["input_ids"]
    keep = len(ids) - (_prompt_tokens(tokenizer, row, template) - max_tokens)
    while keep > 0:  # the marker and re-tokenising at the cuts cost a few tokens: retry
        head, tail = keep - keep // 2, keep // 2
        text = tokenizer.decode(ids[:head]) + TRUNCATION_MARKER
        text += tokenizer.decode(ids[len(ids) - tail :]) if tail else ""
        candidate = {**row, name: text}
        over = _prompt_tokens(tokenizer, candidate, template) - max_tokens
        if over <= 0:
            return candidate
        keep -= over
    return None


def _prompt_tokens(tokenizer: Any, row: Mapping[str, Any], template: str) -> int:
    special = adds_special_tokens(row, template)
    return _count(tokenizer, build_prompt(row, template, tokenizer), special)


def _count(tokenizer: Any, text: str, special: bool) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def record_length_counts(path: Path, who: str, counts: dict[str, int]) -> None:
    """Set ``who``'s counts (rows, truncated, skipped) under the ``"length"`` entry of the
    JSON file ``path`` (a run's ``partitions/stats.json``), and recompute that entry's
    ``"total"`` over every other one; the rest of the file is kept."""
    stats = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    length = stats.get("length", {})
    length.pop("total", None)
    length[who] = counts
    # v.get: a preference run's entries also count "identical" pairs
    length["total"] = {k: sum(v.get(k, 0) for v in length.values()) for k in counts}
    atomic_write_json(path, {**stats, "length": length})
