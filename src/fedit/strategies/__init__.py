"""Server-side strategies: pure functions on lists of adapter arrays plus small objects.

A strategy samples the clients of a round, gives each its round config, and aggregates
their replies into the next global adapter. The simulation and the Flower ServerApp call
the very same objects.
"""

from collections.abc import Callable

from fedit.strategies.base import Reply, Strategy, StrategyParams
from fedit.strategies.fedavg import FedAvg
from fedit.strategies.utils import aggregate_weighted, num_sampled, sample_clients

STRATEGIES: dict[str, Callable[[StrategyParams], Strategy]] = {"fedavg": FedAvg}


def build_strategy(name: str, params: StrategyParams) -> Strategy:
    """The strategy registered under ``name`` (``strategy.name`` in the config)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; use one of {sorted(STRATEGIES)}") from None
    return cls(params)


__all__ = [
    "FedAvg",
    "Reply",
    "STRATEGIES",
    "Strategy",
    "StrategyParams",
    "aggregate_weighted",
    "build_strategy",
    "num_sampled",
    "sample_clients",
]
