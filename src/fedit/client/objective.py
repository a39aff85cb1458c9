"""The objective seam: everything that differs between training objectives.

An :class:`Objective` owns, for one client (and for the server's held-out evaluation):

- which rows it accepts and how they become examples (``examples``),
- how examples become the micro-batches of each optimizer step (``steps``),
- the loss of a micro-batch, summed, and the step's normaliser (``micro_loss``,
  ``normaliser``): the step's gradient is the sum over its micro-batches divided by it,
- what ``train_loss`` in a metrics line means (``train_loss_means``),
- the held-out evaluation of an adapter each round (``held_out``),
- an optional once-per-client precompute kept in the client's ``ClientState``
  (``precompute``: a preference objective's reference log-probabilities).

The round loop, the runtimes and the strategies never know which objective runs: the
trainer calls it, the runtimes ask :func:`objective_for` for the run's: supervised
fine-tuning on response tokens (:class:`SFT`) or direct preference optimisation on pairs
(:class:`~fedit.client.dpo.DPO`). The base class is in :mod:`fedit.client.objective_base`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedit.algorithms.contract import ClientState
from fedit.client.dpo import DPO
from fedit.client.losses import example_losses, mean_token_loss, token_losses
from fedit.client.objective_base import (  # re-exported: the seam's names live here too
    NO_LABEL,
    HeldOut,
    Log,
    Objective,
    loss_by_category,
    row_label,
)
from fedit.config import DataConfig, RunConfig
from fedit.data.batching import Batch, collate, make_batches, tokenize_for_run
from fedit.data.preferences import is_preference
from fedit.errors import DataError
from fedit.model.adapter import set_adapter_arrays

__all__ = ["DPO", "NO_LABEL", "OBJECTIVES", "SFT", "HeldOut", "Log", "Objective",
           "ResponseTokenLoss", "loss_by_category", "objective_for", "row_label"]

class ResponseTokenLoss(HeldOut):
    """SFT's held-out loss: every response token of the held-out rows counts once."""

    def __init__(self, examples: list[Any], labels: list[str], model: torch.nn.Module,
                 batch_size: int, pad_id: int) -> None:
        self.examples, self.labels, self.model = examples, labels, model
        self.batch_size, self.pad_id, self.rows = batch_size, pad_id, len(examples)

    def __call__(self, arrays: list[np.ndarray]
                 ) -> tuple[float | None, dict[str, float] | None]:
        if not self.examples:
            return None, None
        set_adapter_arrays(self.model, arrays)
        sums, counts = example_losses(self.model, self.examples, self.batch_size, self.pad_id)
        return mean_token_loss(sums, counts), loss_by_category(sums, counts, self.labels)


class SFT(Objective):
    """Supervised fine-tuning: cross-entropy on the response tokens (every token with
    ``train_on_inputs``), the step's gradient averaged over all its label tokens however
    many micro-batches it is split into."""

    name = "sft"
    accepts = "instruction rows or conversations"
    train_loss_means = "the mean loss per label token over every step of the round"

    def examples(self, tokenizer: Any, rows: Sequence[dict[str, Any]], data: DataConfig,
                 who: str, log: Log | None = None, stats_file: Path | None = None
                 ) -> tuple[list[Any], list[int]]:
        if any(is_preference(row) for row in rows):
            raise DataError(f"{who}: the rows are preference pairs (prompt, chosen, rejected); "
                            "train them with train.objective = \"dpo\"")
        return tokenize_for_run(tokenizer, rows, data, who, log, stats_file)

    def steps(self, examples: Sequence[Any], batch_size: int, micro_batch_size: int,
              pad_id: int, rng: np.random.Generator, group_by_length: bool
              ) -> Iterator[list[Batch]]:
        for batch in make_batches(examples, batch_size, rng=rng,
                                  group_by_length=group_by_length):
            yield [collate(batch[i : i + micro_batch_size], pad_id)
                   for i in range(0, len(batch), micro_batch_size)]

    def normaliser(self, micro: Sequence[Batch]) -> int:
        return sum(m.num_labels for m in micro)

    def micro_loss(self, model: torch.nn.Module, micro: Batch, state: ClientState
                   ) -> tuple[torch.Tensor, int]:
        losses, _ = token_losses(model, micro)
        return losses.sum(), micro.num_tokens

    def held_out(self, tokenizer: Any, model: torch.nn.Module,
                 rows: Sequence[dict[str, Any]], cfg: RunConfig, log: Log | None = None,
                 stats_file: Path | None = None) -> ResponseTokenLoss:
        examples, kept = self.examples(tokenizer, rows, cfg.data, "held-out set", log,
                                       stats_file)
        labels = [row_label(rows[i], cfg.data.label_field) for i in kept]
        return ResponseTokenLoss(examples, labels, model, cfg.eval.batch_size,
                                 int(tokenizer.pad_token_id))


#: train.objective -> its class
OBJECTIVES: dict[str, type[Objective]] = {"sft": SFT, "dpo": DPO}


def objective_for(cfg: RunConfig) -> Objective:
    """The run's objective (``train.objective``), set up from the run's config."""
    return OBJECTIVES[cfg.train.objective].from_config(cfg)
