"""Server-side strategies: the base class in :mod:`fedit.algorithms.strategies.base` (the
types it exchanges in :mod:`fedit.algorithms.contract`), one module per algorithm, the
shared math as plain functions in :mod:`fedit.algorithms.aggregate`; a user's own
``Strategy`` subclass is loaded by name (``strategy.name = "module:Class"``).

The in-process runtime and the Flower runtime drive the very same objects through
:class:`fedit.federation.loop.RoundLoop`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from fedit.algorithms.aggregate import (
    aggregate_weighted,
    combine_weighted,
    num_sampled,
    sample_clients,
)
from fedit.algorithms.contract import (
    ClientState,
    Combined,
    Instruction,
    Reply,
    ServerState,
    TrainHook,
    TrainInfo,
)
from fedit.algorithms.strategies.base import Strategy, StrategyParams
from fedit.algorithms.strategies.fedavg import FedAvg
from fedit.algorithms.strategies.fedavgm import FedAvgM, FedAvgMParams
from fedit.algorithms.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedOptParams, FedYogi
from fedit.algorithms.strategies.fedprox import FedProx, FedProxParams
from fedit.algorithms.strategies.scaffold import Scaffold, ScaffoldParams
from fedit.config.schema import is_strategy_ref
from fedit.errors import ConfigError

#: name -> (strategy class, its parameters dataclass)
STRATEGIES: dict[str, tuple[type[Strategy], type[StrategyParams]]] = {
    cls.name: (cls, cls.params_class)
    for cls in (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi, FedProx, Scaffold)
}
USER_MODULE_PREFIX = "fedit_user_strategy_"  # sys.modules name of a strategy loaded from a file


def load_strategy_class(ref: str) -> type[Strategy]:
    """A user's :class:`Strategy` subclass from ``"module:Class"`` (a module on the path)
    or ``"path/to/file.py:Class"``; ConfigError (one line naming the module) otherwise."""
    module_ref, _, name = ref.rpartition(":")
    try:
        if module_ref.endswith(".py"):
            module = _module_from_file(Path(module_ref).expanduser())
        else:
            module = importlib.import_module(module_ref)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why
        raise ConfigError(
            f"strategy.name = {ref!r}: cannot import {module_ref} ({type(e).__name__}: {e}); "
            "make it importable (PYTHONPATH, or an absolute path to a .py file), under "
            "Flower on every SuperNode too (docs/deployment.md)") from None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy.name = {ref!r}: {module_ref} has no Strategy subclass "
                          f"named {name} (from fedit import Strategy)")
    return cls


def _module_from_file(path: Path) -> ModuleType:
    """The module in ``path``, loaded once per process (by its resolved path)."""
    if not path.is_file():
        raise ConfigError(f"strategy.name: {path}: no such file")
    key = USER_MODULE_PREFIX + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module


def build_strategy(name: str, options: dict[str, Any],
                   params: dict[str, Any] | None = None) -> Strategy:
    """The strategy ``name`` (registered, or a user's ``module:Class``) with its parameters
    dataclass filled from ``options`` (the ``[strategy]`` table plus ``seed``: keys the
    dataclass does not have are ignored) and ``params`` (``[strategy.params]``: every key
    must be a field). ``server_lr = None`` (the config's default: not set) leaves the
    strategy's own default step."""
    if is_strategy_ref(name):
        cls = load_strategy_class(name)
        params_cls = cls.params_class
    elif name in STRATEGIES:
        cls, params_cls = STRATEGIES[name]
    else:
        raise ConfigError(f"strategy.name = {name!r}: use one of {', '.join(STRATEGIES)}, or "
                          "'module:Class' for your own")
    known = {f.name for f in dataclasses.fields(params_cls)}
    kwargs = {k: v for k, v in options.items() if k in known}
    if options.get("server_lr") is None:
        kwargs.pop("server_lr", None)
    unknown = sorted(set(params or {}) - known)
    if unknown:
        raise ConfigError(f"strategy.params.{unknown[0]}: {params_cls.__name__} has no such "
                          f"field; it has {', '.join(sorted(known))}")
    kwargs.update(params or {})
    try:
        return cls(params_cls(**kwargs))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"strategy ({name}): {e}") from None


def strategy_from_config(cfg: Any) -> Strategy:
    """The run's strategy: ``cfg.strategy`` (a StrategyConfig) and the run's seed."""
    options = {k: v for k, v in dataclasses.asdict(cfg.strategy).items() if k != "params"}
    return build_strategy(cfg.strategy.name, {**options, "seed": cfg.seed},
                          cfg.strategy.params)


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
    "load_strategy_class",
    "combine_weighted",
    "num_sampled",
    "sample_clients",
    "strategy_from_config",
]
