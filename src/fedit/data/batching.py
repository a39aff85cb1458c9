"""Tokenise once, then cut examples into padded batches, grouped by length.

Length grouping (as HF's ``group_by_length``): shuffle, take mega-chunks of 50 batches,
sort each by length, cut, shuffle the batch order. Batches then hold rows of similar
length, so padding (which costs compute and carries no label) stays small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedit.data.prompts import IGNORE_INDEX, Example, record_length_counts, tokenize_row

MEGA_CHUNK = 50  # batches per sorted mega-chunk
# A run's rows shortened / skipped for length, per client: the "length" entry of the
# partition stats (written by write_split before anything is tokenised)
DATA_STATS = "partitions/stats.json"


@dataclass
class Batch:
    """A padded batch: ``input_ids``/``attention_mask``/``labels`` of shape (B, L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.attention_mask.sum())

    @property
    def num_labels(self) -> int:
        """Tokens that carry a label (predicted by the previous position)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def tokenize_rows(tokenizer: Any, rows: Iterable[Mapping[str, Any]], **options: Any
                  ) -> list[Example]:
    """Tokenise every row (``options`` as :func:`~fedit.data.prompts.tokenize_row` takes);
    rows whose response was cut away entirely carry no label and are dropped (they would
    add nothing but compute)."""
    return tokenize_rows_indexed(tokenizer, rows, **options)[0]


def tokenize_rows_indexed(
    tokenizer: Any, rows: Iterable[Mapping[str, Any]], **options: Any
) -> tuple[list[Example], list[int]]:
    """``tokenize_rows``, plus the index in ``rows`` of each example kept."""
    out, kept = [], []
    for i, row in enumerate(rows):
        ex = tokenize_row(tokenizer, row, **options)
        if ex.num_labels > 1:
            out.append(ex)
            kept.append(i)
    return out, kept


def tokenize_for_run(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], data: Any, who: str,
    log: Callable[[str], None] | None = print, stats_file: Path | None = None,
) -> tuple[list[Example], list[int]]:
    """Tokenise rows as a run's data config (``data.template``, ``cutoff_len``,
    ``train_on_inputs``, ``truncation``, ``min_response_tokens``) says; tell ``log`` how
    many rows were shortened or skipped, and record it under ``who`` in ``stats_file``
    (see :func:`record_length_counts`). Returns the examples and the index of each kept
    row."""
    examples, kept = tokenize_rows_indexed(
        tokenizer, rows, template=data.template, cutoff_len=data.cutoff_len,
        train_on_inputs=data.train_on_inputs, truncation=data.truncation,
        min_response_tokens=data.min_response_tokens)
    counts = {"rows": len(rows), "truncated": sum(e.truncated for e in examples),
              "skipped": len(rows) - len(kept)}
    if log is not None and counts["truncated"]:
        log(f"{who}: {counts['truncated']} of {len(rows)} rows shortened to fit "
            f"data.cutoff_len = {data.cutoff_len} (a context or instruction lost its "
            "middle, or a conversation its last turns)")
    if log is not None and counts["skipped"]:
        log(f"{who}: {counts['skipped']} of {len(rows)} rows skipped: the prompt "
            f"alone fills data.cutoff_len = {data.cutoff_len}, leaving no response token")
    if stats_file is not None:
        record_length_counts(stats_file, who, counts)
    return examples, kept


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example; padding gets label -100 and mask 0."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(input_ids=ids, attention_mask=mask, labels=labels)


def batch_order(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator, group_by_length: bool
) -> list[list[int]]:
    """Index lists, one per batch, covering every example exactly once."""
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    chunk = batch_size * MEGA_CHUNK
    batches = []
    for start in range(0, len(order), chunk):
        mega = sorted(order[start : start + chunk].tolist(), key=lambda i: -lengths[i])
        batches += [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def make_batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    group_by_length: bool = True,
) -> list[list[Example]]:
    """Group examples into batches (lists); collate each micro-batch when it is used."""
    rng = rng if rng is not None else np.random.default_rng(0)
    lengths = [len(e.input_ids) for e in examples]
    order = batch_order(lengths, batch_size, rng, group_by_length)
    return [[examples[i] for i in idx] for idx in order]


def capped_batches(order: Sequence[int], lengths: Sequence[int], batch_size: int,
                   max_tokens: int, extra_tokens: int = 0) -> list[list[int]]:
    """Consecutive runs of ``order`` (ascending lengths), each of at most ``batch_size`` rows
    and ``max_tokens`` positions: the row joining a batch is its longest, so the batch's
    width is that row's length (+ ``extra_tokens``, e.g. tokens to generate). A row wider
    than ``max_tokens`` goes alone."""
    out: list[list[int]] = []
    for i in order:
        width = lengths[i] + extra_tokens
        if out and len(out[-1]) < batch_size and width * (len(out[-1]) + 1) <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out
