"""fedit: federated instruction tuning of LLMs with LoRA adapters.

The public API for writing a strategy (stable while internal paths move; see
docs/strategies.md)::

    from fedit import Strategy, StrategyParams, Instruction, Reply, ServerState, ClientState

and name it in a run config: ``strategy.name = "my_module:MyStrategy"`` (or
``"path/to/file.py:MyStrategy"``), its parameters under ``[strategy.params]``.
"""

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

__version__ = "0.1.0"

__all__ = [
    "Arrays",
    "ClientState",
    "Combined",
    "Instruction",
    "Reply",
    "ServerState",
    "Strategy",
    "StrategyParams",
    "TrainHook",
    "TrainInfo",
    "aggregate_weighted",
    "combine_weighted",
]
