"""One client's round, the same function for the simulation and the Flower ClientApp:
adapter in -> local training on the client's own examples -> adapter out + metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedit.config import TrainConfig
from fedit.data.prompts import Example
from fedit.model import get_adapter_arrays, set_adapter_arrays
from fedit.strategies import Reply
from fedit.strategies import payload as P
from fedit.train import train_adapter


def client_seed(seed: int, server_round: int, client: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, client]).generate_state(1)[0])


def run_client_round(
    model: torch.nn.Module,
    global_arrays: list[np.ndarray],
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    client: int,
    server_round: int,
    seed: int,
    pad_id: int,
    round_config: dict[str, Any] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> Reply:
    """Load the global adapter into ``model``, train it on ``examples``, return the reply.

    ``round_config`` carries what a strategy adds for the round (unused by FedAvg)."""
    set_adapter_arrays(model, global_arrays)
    result = train_adapter(
        model, examples, cfg, pad_id=pad_id,
        seed=client_seed(seed, server_round, client), progress=progress,
    )
    metrics = {
        P.TRAIN_LOSS: result.train_loss,
        P.STEPS: float(result.steps),
        P.TOKENS: float(result.tokens),
        P.SECONDS: result.seconds,
    }
    return Reply(client, get_adapter_arrays(model), result.num_examples, metrics)
