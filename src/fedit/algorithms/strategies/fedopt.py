"""FedAdagrad, FedAdam and FedYogi: an adaptive optimizer on the server.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021
(https://arxiv.org/abs/2003.00295), Algorithm 2. The round's pseudo-gradient is
``d = mean(w_k) - x`` (the example-weighted mean of the client adapters minus the global
one); the server keeps two moments and steps::

    m <- beta1 * m + (1 - beta1) * d
    v <- v + d^2                                   # FedAdagrad
    v <- beta2 * v + (1 - beta2) * d^2             # FedAdam
    v <- v - (1 - beta2) * d^2 * sign(v - d^2)     # FedYogi
    x <- x + eta * m / (sqrt(v) + tau)

As in the paper there is no bias correction, ``m`` starts at 0 and ``v`` at ``tau^2``
(Algorithm 2 asks ``v_{-1} >= tau^2``; Flower starts ``v`` at 0 instead). The three differ
only in the ``v`` update: one pure step function, :func:`fedopt_step`, takes the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedit.algorithms.contract import Arrays, Combined, ServerState
from fedit.algorithms.strategies.base import Strategy, StrategyParams


@dataclass
class FedOptParams(StrategyParams):
    """FedAdagrad's, FedAdam's and FedYogi's hyper-parameters (``[strategy]`` keys).

    Parameters
    ----------
    server_lr : float, default 1e-2
        ``eta``: the server's step (``strategy.server_lr``; the paper tunes it in
        ``[1e-3, 1]``, 1e-2 is a safe start for adapters).
    beta1 : float, default 0.9
        The first moment's decay (``strategy.beta1``).
    beta2 : float, default 0.99
        The second moment's decay (``strategy.beta2``); FedAdagrad ignores it.
    tau : float, default 1e-3
        The adaptivity floor added to ``sqrt(v)``, and ``v``'s start ``tau^2``
        (``strategy.tau``).
    """

    server_lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"beta1 must be in [0, 1), got {self.beta1}")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


SecondMoment = Callable[[np.ndarray, np.ndarray, float], np.ndarray]

#: rule -> ``v``'s update from (v, d^2, beta2), in float64
SECOND_MOMENTS: dict[str, SecondMoment] = {
    "adagrad": lambda v, d2, beta2: v + d2,
    "adam": lambda v, d2, beta2: beta2 * v + (1 - beta2) * d2,
    "yogi": lambda v, d2, beta2: v - (1 - beta2) * d2 * np.sign(v - d2),
}


def fedopt_step(rule: str, global_arrays: Arrays, mean_arrays: Arrays, m: Arrays, v: Arrays,
                p: FedOptParams) -> tuple[Arrays, Arrays, Arrays]:
    """One server step of Algorithm 2: the next global adapter, ``m`` and ``v``.

    The math runs in float64; each result comes back in its global array's dtype."""
    second_moment = SECOND_MOMENTS[rule]
    new_x, new_m, new_v = [], [], []
    for x, mean, m0, v0 in zip(global_arrays, mean_arrays, m, v, strict=True):
        x64 = x.astype(np.float64)
        d = mean.astype(np.float64) - x64
        m1 = p.beta1 * m0.astype(np.float64) + (1 - p.beta1) * d
        v1 = second_moment(v0.astype(np.float64), d * d, p.beta2)
        new_x.append((x64 + p.server_lr * m1 / (np.sqrt(v1) + p.tau)).astype(x.dtype))
        new_m.append(m1.astype(x.dtype))
        new_v.append(v1.astype(x.dtype))
    return new_x, new_m, new_v


class FedOpt(Strategy):
    """An adaptive server optimizer on the example-weighted mean (the base of the three).

    ``ServerState.arrays["m"]`` and ``["v"]`` hold the moments (one array per adapter
    tensor, in its dtype), saved every round; a subclass names only its ``rule``.
    """

    name = "fedopt"
    params_class = FedOptParams
    rule: ClassVar[str] = "adam"
    params: FedOptParams

    def __init__(self, params: FedOptParams | None = None) -> None:
        super().__init__(params or FedOptParams())

    def init_state(self, global_arrays: Arrays) -> ServerState:
        tau2 = self.params.tau ** 2
        return ServerState(arrays={"m": [np.zeros_like(a) for a in global_arrays],
                                   "v": [np.full_like(a, tau2) for a in global_arrays]})

    def server_update(self, server_round: int, global_arrays: Arrays, combined: Combined,
                      state: ServerState) -> tuple[Arrays, ServerState]:
        new, m, v = fedopt_step(self.rule, global_arrays, combined.arrays, state.arrays["m"],
                                state.arrays["v"], self.params)
        return new, ServerState(arrays={"m": m, "v": v}, scalars=dict(state.scalars))


class FedAdagrad(FedOpt):
    """FedAdagrad: ``v`` sums every round's squared pseudo-gradient (``beta2`` unused)."""

    name = "fedadagrad"
    rule = "adagrad"


class FedAdam(FedOpt):
    """FedAdam: ``v`` is an exponential average of the squared pseudo-gradient."""

    name = "fedadam"
    rule = "adam"


class FedYogi(FedOpt):
    """FedYogi: ``v`` moves towards the squared pseudo-gradient additively (sign rule)."""

    name = "fedyogi"
    rule = "yogi"
