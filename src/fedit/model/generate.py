"""Answers to evaluation prompts, decoded by the generation engine (continuous batching).

Prompts are sorted by length and decoded by :class:`fedit.model.engine.Engine`, the engine
``fedit serve`` runs: rows join the batch as others finish, so short answers do not wait
for long ones. Generation stops at the prompt template's own section markers
(:data:`fedit.data.prompts.TEMPLATE_STOPS`, e.g. alpaca's ``### Instruction:``) and the
answer is cut before the first one: an untuned model that runs on into a new section of
the template is scored on its answer only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedit.data.conversations import chat_template_of
from fedit.data.prompts import TEMPLATE_STOPS, adds_special_tokens, build_prompt
from fedit.errors import ModelError
from fedit.model.engine import Engine, Event, Job, Sampling


@dataclass
class Generations:
    """Answers in the order of the rows given, the new tokens generated in all and for
    each answer (a stop marker's tokens included)."""

    answers: list[str]
    new_tokens: int
    tokens: list[int] = field(default_factory=list)


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
    seed: int = 0,
) -> Generations:
    """Answer every row's prompt (greedy by default), up to ``batch_size`` rows decoding at once.

    Shortest prompts first; a row leaves the batch at its end (EOS, a stop string or
    ``max_new_tokens``) and the next prompt takes its place. The batch holds at most
    ``max_batch_tokens`` prompt + answer positions (left padding included), so one very
    long prompt does not pad the others to its length. Sampling (``do_sample``) draws row
    ``i``'s tokens from its own generator seeded ``seed + i``: the same answers whatever
    the batching. Greedy answers repeat exactly from run to run.
    """
    prompts = [build_prompt(r, template, tokenizer) for r in rows]
    ids = [tokenizer(p, add_special_tokens=adds_special_tokens(r, template))["input_ids"]
           for p, r in zip(prompts, rows, strict=True)]
    pieces: list[list[str]] = [[] for _ in rows]
    counts = [0] * len(rows)

    def emitter(i: int) -> Any:
        def emit(event: Event) -> None:
            if event.kind == "error":
                raise ModelError(f"generating answer {i + 1}: {event.text}")
            pieces[i].append(event.text)
            counts[i] = max(counts[i], event.completion_tokens)
        return emit

    jobs = []
    for i in sorted(range(len(rows)), key=lambda i: len(ids[i])):
        stops = tuple(TEMPLATE_STOPS.get(chat_template_of(rows[i], template), ()))
        sampling = Sampling(max_tokens=max_new_tokens, stop=stops, seed=seed + i,
                            temperature=temperature if do_sample else 0.0, top_p=top_p)
        jobs.append(Job(ids[i], "", sampling, emitter(i)))
    was_training = model.training
    model.eval()
    try:
        Engine(model, tokenizer, max_batch=batch_size).run(jobs, max_batch_tokens)
    finally:
        model.train(was_training)
    return Generations(["".join(p).strip() for p in pieces], sum(counts), counts)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first of ``stops`` (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text
