"""FedProx: FedAvg whose clients add a proximal term to their local loss.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020
(https://arxiv.org/abs/1812.06127), Algorithm 2: client ``k`` minimises
``F_k(w) + mu / 2 * ||w - w_t||^2`` from the round's global weights ``w_t``; the server
averages as FedAvg does. Here ``w`` is the LoRA adapter. As in Flower's FedProx, the
server puts ``mu`` into each client's config (``proximal-mu``) and the client reads it
from there, so a Flower node trains with the server's value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedit.strategies.base import (
    Arrays,
    ClientState,
    Instruction,
    ServerState,
    Strategy,
    StrategyParams,
    TrainHook,
)

PROXIMAL_MU = "proximal-mu"  # instruction key: the proximal term's weight this round


@dataclass
class FedProxParams(StrategyParams):
    """FedProx's hyper-parameter (``[strategy]`` key).

    Parameters
    ----------
    mu : float, default 0.01
        The proximal term's weight (``strategy.mu``); 0 is FedAvg.
    """

    mu: float = 0.01

    def __post_init__(self) -> None:
        if not self.mu >= 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")


class ProximalTerm(TrainHook):
    """``mu / 2 * sum ||w - w_start||^2`` over the adapter tensors, added to every step.

    ``w_start`` is a detached copy of ``params`` taken on the first call: the trainer calls
    the hook only after the round's start adapter is loaded, so that copy is ``w_t``.
    ``start`` gives it instead (Ditto's personal adapter stays near the global one while
    it trains from its own weights).
    """

    def __init__(self, mu: float, start: list[Any] | None = None) -> None:
        self.mu = mu
        self.start: list[Any] | None = start

    def loss(self, params: Sequence[Any]) -> Any:
        if self.start is None:
            self.start = [p.detach().clone() for p in params]
        total = sum(((p - s) ** 2).sum() for p, s in zip(params, self.start, strict=True))
        return self.mu / 2 * total


class FedProx(Strategy):
    """FedAvg on the server, the proximal term ``mu / 2 ||w - w_t||^2`` on each client."""

    name = "fedprox"
    params: FedProxParams

    def __init__(self, params: FedProxParams | None = None) -> None:
        super().__init__(params or FedProxParams())

    def configure(self, server_round: int, client: int, global_arrays: Arrays,
                  state: ServerState) -> Instruction:
        return Instruction(config={PROXIMAL_MU: float(self.params.mu)})

    def train_hook(self, instruction: Instruction, state: ClientState) -> TrainHook | None:
        """The proximal term with the server's ``mu`` (None when it is 0: plain training)."""
        mu = float(instruction.config.get(PROXIMAL_MU, self.params.mu))
        return ProximalTerm(mu) if mu > 0 else None
