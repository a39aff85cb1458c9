"""Server-side strategies: the contract in :mod:`fedit.strategies.base`, one module per
algorithm, the shared math as plain functions in :mod:`fedit.strategies.utils`.

The in-process runtime and the Flower runtime drive the very same objects through
:class:`fedit.rounds.RoundLoop`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedit.strategies.base import (
    ClientState,
    Combined,
    Instruction,
    Reply,
    ServerState,
    Strategy,
    StrategyParams,
    TrainHook,
    TrainInfo,
)
from fedit.strategies.fedavg import FedAvg
from fedit.strategies.fedavgm import FedAvgM, FedAvgMParams
from fedit.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedOptParams, FedYogi
from fedit.strategies.fedprox import FedProx, FedProxParams
from fedit.strategies.scaffold import Scaffold, ScaffoldParams
from fedit.strategies.utils import aggregate_weighted, combine_weighted, num_sampled, sample_clients

#: name -> (strategy class, its parameters dataclass)
STRATEGIES: dict[str, tuple[type[Strategy], type[StrategyParams]]] = {
    "fedavg": (FedAvg, StrategyParams),
    "fedavgm": (FedAvgM, FedAvgMParams),
    "fedadagrad": (FedAdagrad, FedOptParams),
    "fedadam": (FedAdam, FedOptParams),
    "fedyogi": (FedYogi, FedOptParams),
    "fedprox": (FedProx, FedProxParams),
    "scaffold": (Scaffold, ScaffoldParams),
}


def build_strategy(name: str, options: dict[str, Any]) -> Strategy:
    """The strategy registered under ``name``, its parameters taken from ``options`` (the
    ``[strategy]`` table, plus ``seed``): keys its dataclass does not have are ignored, and
    ``server_lr = 0`` (the config's default) leaves the strategy's own default step."""
    try:
        cls, params_cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; use one of {sorted(STRATEGIES)}") from None
    known = {f.name for f in dataclasses.fields(params_cls)}
    if options.get("server_lr") == 0:
        known.discard("server_lr")
    return cls(params_cls(**{k: v for k, v in options.items() if k in known}))  # type: ignore[call-arg]


def strategy_from_config(cfg: Any) -> Strategy:
    """The run's strategy: ``cfg.strategy`` (a StrategyConfig) and the run's seed."""
    return build_strategy(cfg.strategy.name, {**dataclasses.asdict(cfg.strategy),
                                              "seed": cfg.seed})


__all__ = [
    "ClientState",
    "Combined",
    "FedAvg",
    "FedAvgM",
    "FedAvgMParams",
    "FedAdagrad",
    "FedAdam",
    "FedOpt",
    "FedOptParams",
    "FedProx",
    "FedProxParams",
    "FedYogi",
    "Instruction",
    "Reply",
    "STRATEGIES",
    "Scaffold",
    "ScaffoldParams",
    "ServerState",
    "Strategy",
    "StrategyParams",
    "TrainHook",
    "TrainInfo",
    "aggregate_weighted",
    "build_strategy",
    "combine_weighted",
    "num_sampled",
    "sample_clients",
    "strategy_from_config",
]
