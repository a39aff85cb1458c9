"""One client's round, the same function for the in-process runtime and the Flower
ClientApp: global adapter + instruction + client state in -> local training on the
client's own examples (with the strategy's trainer hook) -> reply + new client state."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fedit.algorithms import payload as P
from fedit.algorithms.contract import ClientState, Instruction, Reply, TrainInfo
from fedit.algorithms.pipeline import LORA_RANK, Pipeline
from fedit.algorithms.schedule import ROUND_LR
from fedit.algorithms.strategies import FedAvg, Strategy
from fedit.client.objective import SFT, Objective
from fedit.client.personalize import ditto_update, personal_seed
from fedit.client.trainer import train_adapter
from fedit.config import PersonalizeConfig, TrainConfig
from fedit.model.adapter import get_adapter_arrays, set_adapter_arrays
from fedit.model.base import LoraSpec
from fedit.model.lora_rank import use_rank


def client_seed(seed: int, server_round: int, client: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, client]).generate_state(1)[0])


def round_train_config(cfg: TrainConfig, instruction: Instruction) -> TrainConfig:
    """``cfg`` with the round's peak lr from the instruction (``train.round_schedule``), if
    it sends one. A copy, not ``dataclasses.replace``: a cosine schedule's last round may
    be 0 (``train.min_lr = 0``), which ``train.lr`` itself may not be."""
    lr = instruction.config.get(ROUND_LR)
    if lr is None or float(lr) == cfg.lr:
        return cfg
    out = copy.copy(cfg)
    out.lr = float(lr)
    return out


def run_client_round(
    model: torch.nn.Module,
    global_arrays: list[np.ndarray],
    examples: Sequence[Any],
    cfg: TrainConfig,
    *,
    client: int,
    server_round: int,
    seed: int,
    pad_id: int,
    strategy: Strategy | Pipeline | None = None,
    instruction: Instruction | None = None,
    state: ClientState | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    personalize: PersonalizeConfig | None = None,
    objective: Objective | None = None,
) -> Reply:
    """Load the adapter the client starts from into ``model``, train it on ``examples``,
    return the reply (the upload: the adapter, or what the pipeline's codec makes of it).

    ``global_arrays`` is the adapter sent to this client (the global one, or its own rank's
    when ``instruction`` names a ``lora-rank``); ``instruction`` is what the strategy sent
    (its ``lr``, the round schedule's, replaces ``cfg.lr``); ``state`` is this client's
    state from its earlier rounds, updated in place (the caller saves it).
    ``objective``: what the client trains on (SFT by default); its
    once-per-client precompute runs with the start adapter loaded and is kept in
    ``state``. No ``strategy``: plain local training (FedAvg's client). ``personalize``
    with ``method = "ditto"``: then the client's personal adapter trains too, kept in
    ``state`` and never in the reply (:mod:`fedit.client.personalize`)."""
    pipe = strategy if isinstance(strategy, Pipeline) else Pipeline(strategy or FedAvg())
    instruction = instruction or Instruction()
    state = state if state is not None else ClientState()
    objective = objective or SFT()
    cfg = round_train_config(cfg, instruction)
    rank = instruction.config.get(LORA_RANK)
    with adapter_rank(model, int(rank) if rank is not None else None):
        set_adapter_arrays(model, global_arrays)
        objective.precompute(model, examples, state)
        result = train_adapter(
            model, examples, cfg, pad_id=pad_id,
            seed=client_seed(seed, server_round, client), progress=progress,
            hook=pipe.train_hook(instruction, state), objective=objective, state=state,
        )
        trained = get_adapter_arrays(model)
        if personalize is not None and personalize.method == "ditto":
            ditto_update(model, global_arrays, examples, cfg, personalize, state,
                         seed=personal_seed(seed, server_round, client), pad_id=pad_id,
                         objective=objective)
    extra = pipe.after_train(instruction, state, global_arrays, trained,
                             TrainInfo(result.steps, result.lr_sum))
    arrays, codec_extra = pipe.client_upload(
        instruction, state, global_arrays, trained, client=client, server_round=server_round)
    metrics = {
        P.TRAIN_LOSS: result.train_loss,
        P.STEPS: float(result.steps),
        P.TOKENS: float(result.tokens),
        P.SECONDS: result.seconds,
    }
    return Reply(client, arrays, result.num_examples, metrics, {**extra, **codec_extra})


@contextmanager
def adapter_rank(model: Any, rank: int | None) -> Iterator[None]:
    """Train at ``rank`` (mixed LoRA ranks) inside the block; the run's own adapter after."""
    default = model.peft_config["default"].r if hasattr(model, "peft_config") else None
    if rank is None or default is None or rank == default:
        yield
        return
    base = model.peft_config["default"]
    spec = LoraSpec(r=default, alpha=base.lora_alpha, dropout=base.lora_dropout,
                    target_modules=tuple(sorted(base.target_modules)))
    use_rank(model, rank, spec)
    try:
        yield
    finally:
        use_rank(model, default, spec)
