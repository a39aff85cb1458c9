"""Prompt templates and tokenisation of one instruction row into ``input_ids`` + ``labels``.

The alpaca template is the text FederatedGPT-Shepherd (and alpaca-lora before it) uses, so
adapters trained here are prompted the same way. ``chat`` uses the base model's own chat
template. Labels are ``-100`` on the prompt unless ``train_on_inputs``; EOS is appended
when the text fits in ``cutoff_len`` (as Shepherd does: a truncated answer gets no EOS, so
the model is not taught to stop mid-sentence).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
TEMPLATES = ("alpaca", "chat")
# Where an answer in a template ends when the model runs on into a new section of its own.
TEMPLATE_STOPS = {"alpaca": ("### Instruction:", "### Input:", "### Response:"), "chat": ()}


@dataclass(frozen=True)
class Example:
    """One tokenised training example."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def build_prompt(row: Mapping[str, Any], template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text (everything before the response) for a canonical row."""
    instruction, context = row["instruction"], row.get("context") or ""
    if template == "alpaca":
        if context:
            return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=context)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        content = f"{instruction}\n\n{context}" if context else instruction
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    raise ValueError(f"unknown prompt template {template!r}; use one of {', '.join(TEMPLATES)}")


def tokenize_row(
    tokenizer: Any,
    row: Mapping[str, Any],
    *,
    template: str = "alpaca",
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
) -> Example:
    """Tokenise prompt + response, truncate to ``cutoff_len``, append EOS, mask the prompt."""
    prompt = build_prompt(row, template, tokenizer)
    # The chat template already carries the model's special tokens in its text.
    special = template != "chat"
    ids = tokenizer(prompt + row["response"], add_special_tokens=special)["input_ids"]
    ids = list(ids[:cutoff_len])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids.append(eos)
    labels = list(ids)
    if not train_on_inputs:
        prompt_len = len(tokenizer(prompt, add_special_tokens=special)["input_ids"])
        prompt_len = min(prompt_len, len(ids))
        labels[:prompt_len] = [IGNORE_INDEX] * prompt_len
    return Example(input_ids=ids, labels=labels)
