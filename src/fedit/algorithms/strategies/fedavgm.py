"""FedAvgM: FedAvg with server momentum.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019 (https://arxiv.org/abs/1909.06335), Algorithm 1: with the
round's pseudo-gradient ``d = w - mean(w_k)``, the server keeps ``v <- beta * v + d`` and
steps ``w <- w - eta * v``. With ``beta = 0`` and ``eta = 1`` it is FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedit.algorithms.contract import Arrays, Combined, ServerState
from fedit.algorithms.strategies.base import Strategy, StrategyParams


@dataclass
class FedAvgMParams(StrategyParams):
    """FedAvgM's hyper-parameters (``[strategy]`` keys).

    Parameters
    ----------
    server_lr : float, default 1.0
        ``eta``: the server's step on the momentum (``strategy.server_lr``).
    server_momentum : float, default 0.9
        ``beta``: the momentum's decay (``strategy.server_momentum``).
    """

    server_lr: float = 1.0
    server_momentum: float = 0.9

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.server_momentum}")


class FedAvgM(Strategy):
    """Server momentum on the example-weighted mean; the momentum is ``ServerState``'s
    ``arrays["momentum"]`` (float32, one array per adapter tensor), saved every round."""

    name = "fedavgm"
    params_class = FedAvgMParams
    params: FedAvgMParams

    def __init__(self, params: FedAvgMParams | None = None) -> None:
        super().__init__(params or FedAvgMParams())

    def init_state(self, global_arrays: Arrays) -> ServerState:
        return ServerState(arrays={"momentum": [np.zeros_like(a) for a in global_arrays]})

    def server_update(self, server_round: int, global_arrays: Arrays, combined: Combined,
                      state: ServerState) -> tuple[Arrays, ServerState]:
        p = self.params
        momentum = [
            (p.server_momentum * v.astype(np.float64) + (g.astype(np.float64) - m)).astype(g.dtype)
            for v, g, m in zip(state.arrays["momentum"], global_arrays, combined.arrays,
                               strict=True)
        ]
        new = [(g.astype(np.float64) - p.server_lr * v).astype(g.dtype)
               for g, v in zip(global_arrays, momentum, strict=True)]
        return new, ServerState(arrays={"momentum": momentum}, scalars=dict(state.scalars))
