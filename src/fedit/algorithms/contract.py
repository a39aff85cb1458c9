"""The contract between the server, the strategies and the clients: what a round sends
(:class:`Instruction`), what comes back (:class:`Reply`), what the server learns of a round
(:class:`Combined`), the state each side keeps between rounds (:class:`ServerState`,
:class:`ClientState`) and the trainer's hook (:class:`TrainHook`).

Every value that crosses the wire or is saved is in an explicit dataclass below: nothing
a strategy needs between rounds lives in hidden attributes, so a checkpoint of
``ServerState`` (and each client's ``ClientState``) is the whole story and ``--resume``
continues exactly. These types are also fedit's public API (``from fedit import Reply``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Arrays = list[np.ndarray]
Scalar = int | float | str | bool


@dataclass
class Instruction:
    """What one client is told for a round: config values plus optional named arrays
    (e.g. SCAFFOLD's server control variate ``c``). The global adapter travels beside it."""

    config: dict[str, Scalar] = field(default_factory=dict)
    arrays: dict[str, Arrays] = field(default_factory=dict)
    #: the adapter this client starts from when it is not the global one (a client of
    #: another LoRA rank gets its own); it travels in the global adapter's place
    adapter: Arrays | None = None


@dataclass
class Reply:
    """One client's answer to a training round: its adapter, extra named arrays, its data
    size (FedAvg's weight) and metrics."""

    client: int
    arrays: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Arrays] = field(default_factory=dict)


@dataclass
class Combined:
    """What the server learns from a round's replies: under SecAgg+ only this, masked.

    ``arrays`` is the example-weighted mean of the clients' adapters, ``extra`` the same
    mean of each extra array; ``num_examples`` their total."""

    arrays: Arrays
    num_examples: int
    num_replies: int
    extra: dict[str, Arrays] = field(default_factory=dict)


@dataclass
class TrainInfo:
    """What the trainer reports to ``after_train``: the optimizer steps taken and the sum
    of the learning rates they used (SCAFFOLD's ``K * eta_l`` under any schedule)."""

    steps: int
    lr_sum: float


@dataclass
class ServerState:
    """A strategy's state between rounds (momentum, Adam moments, control variates, an
    accountant's numbers): named lists of arrays and scalars, saved with every round."""

    arrays: dict[str, Arrays] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class ClientState:
    """What one client keeps between its rounds (SCAFFOLD's ``c_i``, a personal adapter,
    error-feedback residuals). It never leaves the client's machine under Flower."""

    arrays: dict[str, Arrays] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.arrays or self.scalars)


class TrainHook:
    """An extra loss term and a gradient correction on the LoRA weights (FedProx, SCAFFOLD).

    ``params`` are the adapter's trainable tensors in the order the arrays travel. Both
    methods are optional; the trainer skips a hook's step when it is not overridden.
    """

    def loss(self, params: Sequence[Any]) -> Any:
        """A scalar tensor added to every optimizer step's loss (differentiable)."""
        raise NotImplementedError

    def correct(self, params: Sequence[Any]) -> None:
        """Edit ``p.grad`` in place after the step's backward, before clipping."""
        raise NotImplementedError




def hook_steps(hook: TrainHook | None) -> tuple[Any, Any]:
    """The hook's ``loss`` and ``correct`` where its class overrides them, else None (the
    trainer skips what a hook does not do)."""
    if hook is None:
        return None, None
    loss = hook.loss if type(hook).loss is not TrainHook.loss else None
    correct = hook.correct if type(hook).correct is not TrainHook.correct else None
    return loss, correct
