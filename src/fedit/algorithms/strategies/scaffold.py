"""SCAFFOLD: control variates that correct each client's drift.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020 (https://arxiv.org/abs/1910.06378), Algorithm 1 with option II, on the LoRA
weights. The server keeps ``c`` and sends it; client ``i`` keeps ``c_i`` (0 at first) and
trains with every gradient shifted by ``c - c_i``; from its start ``x`` and result
``y_i`` after ``K`` steps of learning rate ``eta_l``::

    c_i+ = c_i - c + (x - y_i) / (K * eta_l)       # option II

and it sends ``y_i`` and ``c_i+ - c_i``. The server steps::

    x <- x + eta_g * (mean(y_i) - x)
    c <- c + |S| / N * mean(c_i+ - c_i)

``K * eta_l`` is the sum of the learning rates the client's steps used (``TrainInfo.lr_sum``):
``K * eta_l`` for a constant rate, its natural extension under a schedule. The paper's
clients run SGD; ours run AdamW, and using option II with AdamW's steps is the common
practical extension (OpenFedLLM does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedit.algorithms.aggregate import aggregate_weighted, combine_weighted
from fedit.algorithms.contract import (
    Arrays,
    ClientState,
    Combined,
    Instruction,
    Reply,
    ServerState,
    TrainHook,
    TrainInfo,
)
from fedit.algorithms.strategies.base import Strategy, StrategyParams

C = "c"  # server state and instruction arrays: the server's control variate
C_I = "c_i"  # client state arrays: the client's control variate
C_DELTA = "c_delta"  # reply extra arrays: c_i+ - c_i


@dataclass
class ScaffoldParams(StrategyParams):
    """SCAFFOLD's hyper-parameters.

    Parameters
    ----------
    server_lr : float, default 1.0
        ``eta_g``: the server's step towards the clients' mean (``strategy.server_lr``).
    num_clients : int, default 0
        ``N``, all clients of the run (filled from ``partition.clients``, not a config key);
        0 takes the round's replies ``|S|``, i.e. ``c`` moves by the full mean.
    """

    server_lr: float = 1.0
    num_clients: int = 0

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        if self.num_clients < 0:
            raise ValueError(f"num_clients must be >= 0, got {self.num_clients}")


class ControlCorrection(TrainHook):
    """Adds ``c - c_i`` (one array per adapter tensor) to each step's gradient."""

    def __init__(self, shift: Arrays) -> None:
        self.shift = shift
        self._tensors: list[Any] | None = None

    def correct(self, params: Sequence[Any]) -> None:
        import torch

        if len(params) != len(self.shift):
            raise ValueError(f"SCAFFOLD: {len(params)} trainable tensors, expected "
                             f"{len(self.shift)} (one per adapter tensor)")
        if self._tensors is None:  # converted once a round, on the gradients' device
            self._tensors = [torch.from_numpy(s).to(p.device, p.dtype)
                             for s, p in zip(self.shift, params, strict=True)]
        for p, s in zip(params, self._tensors, strict=True):
            if p.grad is not None:
                p.grad.add_(s.to(p.grad.dtype))


def _f64(arrays: Arrays) -> list[np.ndarray]:
    return [a.astype(np.float64) for a in arrays]


class Scaffold(Strategy):
    """Control variates on the server and each client correct the clients' drift (option II).

    ``ServerState.arrays["c"]`` and each ``ClientState.arrays["c_i"]`` are shaped like the
    adapter. Replies carry ``c_delta``, averaged without weights as in the paper (the
    adapters stay example-weighted); the server needs each reply's, so SecAgg+ is refused.
    """

    name = "scaffold"
    params_class = ScaffoldParams
    secure_aggregation = False
    params: ScaffoldParams

    def __init__(self, params: ScaffoldParams | None = None) -> None:
        super().__init__(params or ScaffoldParams())

    # -- server ----------------------------------------------------------------------------
    def init_state(self, global_arrays: Arrays) -> ServerState:
        return ServerState(arrays={C: [np.zeros_like(a) for a in global_arrays]})

    def configure(self, server_round: int, client: int, global_arrays: Arrays,
                  state: ServerState) -> Instruction:
        return Instruction(arrays={C: list(state.arrays[C])})

    def combine(self, server_round: int, replies: Sequence[Reply]) -> Combined:
        """Adapters example-weighted; ``c_delta`` the plain mean over the replies."""
        for r in replies:
            if C_DELTA not in r.extra:
                raise ValueError(f"client {r.client} sent no {C_DELTA}")
        combined = combine_weighted([replace(r, extra={}) for r in replies])
        deltas = [r.extra[C_DELTA] for r in replies]
        combined.extra[C_DELTA] = aggregate_weighted(deltas, [1.0] * len(deltas))
        return combined

    def server_update(self, server_round: int, global_arrays: Arrays, combined: Combined,
                      state: ServerState) -> tuple[Arrays, ServerState]:
        p, c = self.params, state.arrays[C]
        delta = combined.extra.get(C_DELTA)
        if delta is None or len(delta) != len(c):
            raise ValueError(f"SCAFFOLD needs the replies' mean {C_DELTA}, one per adapter array")
        share = combined.num_replies / (p.num_clients or combined.num_replies)
        new = [(g.astype(np.float64) + p.server_lr * (y.astype(np.float64) - g)).astype(g.dtype)
               for g, y in zip(global_arrays, combined.arrays, strict=True)]
        new_c = [(c0.astype(np.float64) + share * d.astype(np.float64)).astype(c0.dtype)
                 for c0, d in zip(c, delta, strict=True)]
        return new, ServerState(arrays={C: new_c}, scalars=dict(state.scalars))

    # -- client ----------------------------------------------------------------------------
    def _client_variates(self, instruction: Instruction, state: ClientState
                         ) -> tuple[Arrays, Arrays]:
        c = instruction.arrays[C]
        c_i = state.arrays.get(C_I) or [np.zeros_like(a) for a in c]
        return c, c_i

    def train_hook(self, instruction: Instruction, state: ClientState) -> TrainHook | None:
        """The gradient correction ``c - c_i``."""
        c, c_i = self._client_variates(instruction, state)
        return ControlCorrection([(a.astype(np.float64) - b).astype(np.float32)
                                  for a, b in zip(c, c_i, strict=True)])

    def after_train(self, instruction: Instruction, state: ClientState, global_arrays: Arrays,
                    trained: Arrays, info: TrainInfo) -> dict[str, Arrays]:
        """Option II: ``c_i+ = c_i - c + (x - y_i) / lr_sum``, kept in ``state``; sends
        ``c_i+ - c_i``. No step taken (``lr_sum`` 0): ``c_i`` stays, the delta is 0."""
        c, c_i = self._client_variates(instruction, state)
        if info.lr_sum > 0:
            delta = [(x.astype(np.float64) - y) / info.lr_sum - c0
                     for x, y, c0 in zip(_f64(global_arrays), _f64(trained), _f64(c),
                                         strict=True)]
        else:
            delta = [np.zeros(a.shape, np.float64) for a in c_i]
        state.arrays[C_I] = [(a.astype(np.float64) + d).astype(a.dtype)
                             for a, d in zip(c_i, delta, strict=True)]
        return {C_DELTA: [d.astype(a.dtype) for a, d in zip(c_i, delta, strict=True)]}
