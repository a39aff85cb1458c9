"""The strategy base class: five server methods and two client methods, FedAvg's defaults.

One round of :class:`fedit.federation.loop.RoundLoop` calls a strategy in this order::

    state    = strategy.init_state(global_arrays)              # once, round 0
    clients  = strategy.sample(rnd, available)
    instr[c] = strategy.configure(rnd, c, global_arrays, state) # per client
    # ... each client: hook = strategy.train_hook(instr, cstate); train; extras =
    #     strategy.after_train(instr, cstate, global_arrays, trained_arrays, info)
    combined = strategy.combine(rnd, replies)                    # SecAgg+ computes this masked
    global_arrays, state = strategy.server_update(rnd, global_arrays, combined, state)

What crosses the wire or is saved is in the dataclasses of :mod:`fedit.algorithms.contract`:
a strategy keeps nothing between rounds in attributes, so ``--resume`` continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from fedit.algorithms.aggregate import combine_weighted, sample_clients
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


@dataclass
class StrategyParams:
    """Hyper-parameters every strategy shares; a strategy's own dataclass extends this.

    Parameters
    ----------
    fraction : float, default 0.1
        Share of the clients sampled each round (Shepherd's ``client_selection_frac``).
    min_clients : int, default 1
        Sample at least this many clients a round.
    seed : int, default 42
        Client sampling is seeded per round: the same seed gives the same clients.
    """

    fraction: float = 0.1
    min_clients: int = 1
    seed: int = 42


class Strategy:
    """The five server methods and two client methods; the defaults are FedAvg's.

    A variant overrides only what differs (FedAvgM: ``init_state`` and
    ``server_update``). ``secure_aggregation`` says whether the strategy is correct when the
    server only learns :class:`Combined` (SecAgg+): true when ``combine`` is the weighted
    mean and everything else works on its result.
    """

    name: ClassVar[str] = "base"
    secure_aggregation: ClassVar[bool] = True
    #: the dataclass of its hyper-parameters, filled from ``[strategy]`` and
    #: ``[strategy.params]`` (a variant extends :class:`StrategyParams`)
    params_class: ClassVar[type[StrategyParams]] = StrategyParams

    def __init__(self, params: StrategyParams | None = None) -> None:
        self.params = params or self.params_class()

    # -- server ----------------------------------------------------------------------------
    def init_state(self, global_arrays: Arrays) -> ServerState:
        """The state before round 1."""
        return ServerState()

    def sample(self, server_round: int, clients: Sequence[int]) -> list[int]:
        """The clients that train in ``server_round`` (seeded: same seed, same clients)."""
        p = self.params
        return sample_clients(clients, server_round, p.fraction, p.min_clients, p.seed)

    def configure(self, server_round: int, client: int, global_arrays: Arrays,
                  state: ServerState) -> Instruction:
        """Client ``client``'s instruction for the round (a new object each call)."""
        return Instruction()

    def combine(self, server_round: int, replies: Sequence[Reply]) -> Combined:
        """The replies' example-weighted mean (what SecAgg+ computes masked)."""
        return combine_weighted(replies)

    def server_update(self, server_round: int, global_arrays: Arrays, combined: Combined,
                      state: ServerState) -> tuple[Arrays, ServerState]:
        """The next global adapter and state (an optimizer step in the clear)."""
        return combined.arrays, state

    # -- client ----------------------------------------------------------------------------
    def train_hook(self, instruction: Instruction, state: ClientState) -> TrainHook | None:
        """The trainer hook a client trains with this round (None: plain training)."""
        return None

    def after_train(self, instruction: Instruction, state: ClientState, global_arrays: Arrays,
                    trained: Arrays, info: TrainInfo) -> dict[str, Arrays]:
        """Extra arrays for the reply; may update ``state`` (saved by the client).
        ``global_arrays`` is the adapter the client started from, ``info`` its steps."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Name and hyper-parameters, for logs and the run summary."""
        return {"name": self.name, **asdict(self.params)}  # type: ignore[call-overload]
