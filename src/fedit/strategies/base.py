"""The strategy contract: what a round sends, what comes back, and the state it keeps.

One round of :class:`fedit.rounds.RoundLoop` calls a strategy in this order::

    state    = strategy.init_state(global_arrays)              # once, round 0
    clients  = strategy.sample(rnd, available)
    instr[c] = strategy.configure(rnd, c, global_arrays, state) # per client
    # ... each client: hook = strategy.train_hook(instr, cstate); train; extras =
    #     strategy.after_train(instr, cstate, global_arrays, trained_arrays, info)
    combined = strategy.combine(rnd, replies)                    # SecAgg+ computes this masked
    global_arrays, state = strategy.server_update(rnd, global_arrays, combined, state)

Every value that crosses the wire or is saved is in an explicit dataclass below: nothing
a strategy needs between rounds lives in hidden attributes, so a checkpoint of
``ServerState`` (and each client's ``ClientState``) is the whole story and ``--resume``
continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

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


class Strategy:
    """The five server methods and two client methods; the defaults are FedAvg's.

    A variant overrides only what differs (FedAvgM: ``init_state`` and
    ``server_update``). ``secure_aggregation`` says whether the strategy is correct when the
    server only learns :class:`Combined` (SecAgg+): true when ``combine`` is the weighted
    mean and everything else works on its result.
    """

    name: ClassVar[str] = "base"
    secure_aggregation: ClassVar[bool] = True

    def __init__(self, params: StrategyParams | None = None) -> None:
        self.params = params or StrategyParams()

    # -- server ----------------------------------------------------------------------------
    def init_state(self, global_arrays: Arrays) -> ServerState:
        """The state before round 1."""
        return ServerState()

    def sample(self, server_round: int, clients: Sequence[int]) -> list[int]:
        """The clients that train in ``server_round`` (seeded: same seed, same clients)."""
        from fedit.strategies.utils import sample_clients

        p = self.params
        return sample_clients(clients, server_round, p.fraction, p.min_clients, p.seed)

    def configure(self, server_round: int, client: int, global_arrays: Arrays,
                  state: ServerState) -> Instruction:
        """Client ``client``'s instruction for the round (a new object each call)."""
        return Instruction()

    def combine(self, server_round: int, replies: Sequence[Reply]) -> Combined:
        """The replies' example-weighted mean (what SecAgg+ computes masked)."""
        from fedit.strategies.utils import combine_weighted

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
        from dataclasses import asdict

        return {"name": self.name, **asdict(self.params)}  # type: ignore[call-overload]
