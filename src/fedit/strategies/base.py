"""The strategy interface and the reply a client sends back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Reply:
    """One client's answer to a training round."""

    client: int
    arrays: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


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


class Strategy(Protocol):
    """What the round loop needs from a strategy."""

    params: StrategyParams

    def sample(self, server_round: int, clients: Sequence[int]) -> list[int]:
        """The clients that train in ``server_round``."""
        ...

    def configure_train(self, server_round: int) -> dict[str, Any]:
        """Extra round config sent to every sampled client (a new dict each call)."""
        ...

    def aggregate_train(
        self, server_round: int, global_arrays: list[np.ndarray], replies: Sequence[Reply]
    ) -> list[np.ndarray]:
        """The next global adapter from the current one and the clients' replies."""
        ...
