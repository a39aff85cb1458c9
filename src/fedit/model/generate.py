"""Batched answer generation with the KV cache: prompts sorted by length, left-padded.

Generation stops at the prompt template's own section markers
(:data:`fedit.data.prompts.TEMPLATE_STOPS`, e.g. alpaca's ``### Instruction:``) and the
answer is cut before the first one: an untuned model that runs on into a new section of
the template is scored on its answer only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedit.data.batching import capped_batches
from fedit.data.conversations import chat_template_of
from fedit.data.prompts import TEMPLATE_STOPS, adds_special_tokens, build_prompt


@dataclass
class Generations:
    """Answers in the order of the rows given, and the new tokens generated in all."""

    answers: list[str]
    new_tokens: int


@torch.inference_mode()
def generate_answers(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    template: str = "alpaca",
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_batch_tokens: int = 8192,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Generations:
    """Answer every row's prompt (greedy by default), up to ``batch_size`` prompts at a time.

    Prompts of similar length share a batch and are padded on the left, so every row's
    answer starts at the same position and the KV cache serves the whole batch. A batch
    also holds at most ``max_batch_tokens`` prompt + answer positions (padding included),
    so one very long prompt does not pad a whole batch to its length (it goes alone).
    """
    prompts = [build_prompt(r, template, tokenizer) for r in rows]
    ids = [tokenizer(p, add_special_tokens=adds_special_tokens(r, template))["input_ids"]
           for p, r in zip(prompts, rows, strict=True)]
    lengths = [len(x) for x in ids]
    stops = [TEMPLATE_STOPS.get(chat_template_of(r, template), ()) for r in rows]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    answers: list[str] = [""] * len(prompts)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    sampling: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        sampling |= {"temperature": temperature, "top_p": top_p}
    new_tokens = 0
    try:
        for idx in capped_batches(order, lengths, batch_size, max_batch_tokens,
                                  max_new_tokens):
            enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt",
                                padding=True).to(device)
            batch_stops = sorted({x for i in idx for x in stops[i]})
            if batch_stops:  # transformers' StopStringCriteria, per row of the batch
                sampling["stop_strings"], sampling["tokenizer"] = batch_stops, tokenizer
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            sampling.pop("stop_strings", None)
            new = out[:, enc["input_ids"].shape[1] :]
            new_tokens += int((new != tokenizer.pad_token_id).sum())
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True),
                               strict=True):
                answers[i] = cut_at_stops(text, stops[i]).strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return Generations(answers, new_tokens)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first of ``stops`` (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text
