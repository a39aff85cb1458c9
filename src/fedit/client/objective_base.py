"""The objective seam's base classes: :class:`Objective` (what every training objective
implements; :mod:`fedit.client.objective` describes the contract and holds the registry)
and :class:`HeldOut` (an objective's per-round held-out evaluation), with the helpers
both objectives share."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fedit.algorithms.contract import ClientState
from fedit.config import DataConfig, RunConfig

Log = Callable[[str], None]
NO_LABEL = "(none)"  # the category of a row without the label field


class Objective:
    """A training objective (base class; see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    #: the row kinds it trains on, for messages
    accepts: ClassVar[str] = ""
    #: what ``train_loss`` in a metrics line is under this objective
    train_loss_means: ClassVar[str] = ""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Objective:
        """The objective a run's config sets up (its own section, if any)."""
        return cls()

    def examples(self, tokenizer: Any, rows: Sequence[dict[str, Any]], data: DataConfig,
                 who: str, log: Log | None = None, stats_file: Path | None = None
                 ) -> tuple[list[Any], list[int]]:
        """The rows' training examples and the indices of the rows kept."""
        raise NotImplementedError

    def steps(self, examples: Sequence[Any], batch_size: int, micro_batch_size: int,
              pad_id: int, rng: np.random.Generator, group_by_length: bool
              ) -> Iterator[list[Any]]:
        """One epoch: the micro-batches of each optimizer step."""
        raise NotImplementedError

    def normaliser(self, micro: Sequence[Any]) -> int:
        """What a step's summed loss is divided by (its gradient is that mean)."""
        raise NotImplementedError

    def micro_loss(self, model: torch.nn.Module, micro: Any, state: ClientState
                   ) -> tuple[torch.Tensor, int]:
        """The micro-batch's summed loss (a differentiable scalar) and its real tokens."""
        raise NotImplementedError

    def precompute(self, model: torch.nn.Module, examples: Sequence[Any],
                   state: ClientState) -> None:
        """Once per client, before its first round, with the start adapter loaded: fill
        ``state`` with what every later round reuses (nothing, by default)."""
        return None

    def held_out(self, tokenizer: Any, model: torch.nn.Module,
                 rows: Sequence[dict[str, Any]], cfg: RunConfig, log: Log | None = None,
                 stats_file: Path | None = None) -> HeldOut:
        """The server's per-round evaluation of an adapter on the held-out rows."""
        raise NotImplementedError


class HeldOut:
    """An adapter's held-out loss and loss per label, computed on the model in memory.

    ``rows``: how many held-out rows it scores; calling it with an adapter's arrays gives
    ``(loss, loss by label)``, ``(None, None)`` when there is no held-out row."""

    rows: int = 0

    def __call__(self, arrays: list[np.ndarray]
                 ) -> tuple[float | None, dict[str, float] | None]:
        raise NotImplementedError

    def last_metrics(self) -> dict[str, float]:
        """More numbers of the last call for the round's metrics line (none by default;
        DPO's: preference accuracy and reward margin)."""
        return {}


def row_label(row: dict[str, Any], label_field: str) -> str:
    """The category of a row: its label field as text, ``NO_LABEL`` when absent or empty."""
    value = row.get(label_field)
    return str(value) if value not in (None, "") else NO_LABEL


def loss_by_category(
    sums: np.ndarray, counts: np.ndarray, labels: Sequence[str]
) -> dict[str, float]:
    """Token-weighted loss per label: the label's summed token losses over its token count."""
    out = {}
    for label in sorted(set(labels)):
        mask = np.asarray([x == label for x in labels], dtype=bool)
        n = int(counts[mask].sum())
        if n:
            out[label] = float(sums[mask].sum() / n)
    return out
