"""A strategy written as a user writes one: FedAvg with Nesterov momentum on the server.

Run it (docs/strategies.md walks through it)::

    fedit train configs/quickstart.toml \
        --set strategy.name=examples/strategies/nesterov.py:NesterovFedAvgM \
        --set strategy.params.momentum=0.8

The round's mean adapter minus the global one is the pseudo-gradient ``d``; the server
keeps a velocity ``v <- momentum * v + d`` in its state and steps by
``server_lr * (d + momentum * v)`` (Nesterov's look-ahead; FedAvgM steps by ``v``).
Everything else (sampling, the example-weighted mean, the clients' training) is
FedAvg's, inherited from ``Strategy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedit import Arrays, Combined, ServerState, Strategy, StrategyParams


@dataclass
class NesterovParams(StrategyParams):
    """Its own parameters, set under ``[strategy.params]`` (unknown keys are refused).

    Parameters
    ----------
    server_lr : float, default 1.0
        The server's step on the pseudo-gradient.
    momentum : float, default 0.9
        The velocity's decay; 0 is FedAvg.
    """

    server_lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


class NesterovFedAvgM(Strategy):
    """FedAvg with server-side Nesterov momentum (arXiv 1909.06335's FedAvgM, look-ahead)."""

    name = "nesterov-fedavgm"
    params_class = NesterovParams
    params: NesterovParams

    def init_state(self, global_arrays: Arrays) -> ServerState:
        # everything kept between rounds is in the state, so --resume continues exactly
        return ServerState(arrays={"velocity": [np.zeros_like(g) for g in global_arrays]})

    def server_update(self, server_round: int, global_arrays: Arrays, combined: Combined,
                      state: ServerState) -> tuple[Arrays, ServerState]:
        p = self.params
        d = [m - g for m, g in zip(combined.arrays, global_arrays, strict=True)]
        v = [p.momentum * v + x for v, x in zip(state.arrays["velocity"], d, strict=True)]
        step = [x + p.momentum * y for x, y in zip(d, v, strict=True)]
        new = [(g + p.server_lr * s).astype(g.dtype)
               for g, s in zip(global_arrays, step, strict=True)]
        return new, ServerState(arrays={"velocity": v})
