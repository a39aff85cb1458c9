"""One client's round, the same function for the in-process runtime and the Flower
ClientApp: global adapter + instruction + client state in -> local training on the
client's own examples (with the strategy's trainer hook) -> reply + new client state."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fedit.adapter import get_adapter_arrays, set_adapter_arrays
from fedit.config import PersonalizeConfig, RunConfig, TrainConfig
from fedit.data.prompts import Example
from fedit.device import pick_device
from fedit.model import LoraSpec, attach_lora, load_base_model, load_tokenizer
from fedit.strategies import ClientState, FedAvg, Instruction, Reply, Strategy, TrainInfo
from fedit.strategies import payload as P
from fedit.strategies.compose import LORA_RANK, Pipeline
from fedit.train import train_adapter


def client_seed(seed: int, server_round: int, client: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, client]).generate_state(1)[0])


def load_model(cfg: RunConfig) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and the base model with a fresh LoRA adapter (loaded once per process)."""
    tokenizer = load_tokenizer(cfg.model.name)
    device = pick_device(cfg.model.device)
    base = load_base_model(cfg.model.name, dtype=cfg.model.dtype, device=device,
                           quantization=cfg.model.quantization or None)
    lora = cfg.lora
    spec = LoraSpec(r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                    target_modules=tuple(lora.target_modules))
    return tokenizer, attach_lora(base, spec, seed=cfg.seed)


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
    strategy: Strategy | Pipeline | None = None,
    instruction: Instruction | None = None,
    state: ClientState | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    personalize: PersonalizeConfig | None = None,
) -> Reply:
    """Load the adapter the client starts from into ``model``, train it on ``examples``,
    return the reply (the upload: the adapter, or what the pipeline's codec makes of it).

    ``global_arrays`` is the adapter sent to this client (the global one, or its own rank's
    when ``instruction`` names a ``lora-rank``); ``instruction`` is what the strategy sent;
    ``state`` is this client's state from its earlier rounds, updated in place (the caller
    saves it). No ``strategy``: plain local training (FedAvg's client). ``personalize``
    with ``method = "ditto"``: then the client's personal adapter trains too, kept in
    ``state`` and never in the reply (:mod:`fedit.personalize`)."""
    pipe = strategy if isinstance(strategy, Pipeline) else Pipeline(strategy or FedAvg())
    instruction = instruction or Instruction()
    state = state if state is not None else ClientState()
    rank = instruction.config.get(LORA_RANK)
    with adapter_rank(model, int(rank) if rank is not None else None):
        set_adapter_arrays(model, global_arrays)
        result = train_adapter(
            model, examples, cfg, pad_id=pad_id,
            seed=client_seed(seed, server_round, client), progress=progress,
            hook=pipe.train_hook(instruction, state),
        )
        trained = get_adapter_arrays(model)
        if personalize is not None and personalize.method == "ditto":
            from fedit.personalize import ditto_update, personal_seed

            ditto_update(model, global_arrays, examples, cfg, personalize, state,
                         seed=personal_seed(seed, server_round, client), pad_id=pad_id)
    extra = pipe.after_train(instruction, state, global_arrays, trained,
                             TrainInfo(result.steps, result.lr_sum))
    arrays, codec_extra, dp_metrics = pipe.client_upload(
        instruction, state, global_arrays, trained, client=client, server_round=server_round)
    metrics = {
        P.TRAIN_LOSS: result.train_loss,
        P.STEPS: float(result.steps),
        P.TOKENS: float(result.tokens),
        P.SECONDS: result.seconds,
        **dp_metrics,
    }
    return Reply(client, arrays, result.num_examples, metrics, {**extra, **codec_extra})


@contextmanager
def adapter_rank(model: Any, rank: int | None) -> Iterator[None]:
    """Train at ``rank`` (mixed LoRA ranks) inside the block; the run's own adapter after."""
    default = model.peft_config["default"].r if hasattr(model, "peft_config") else None
    if rank is None or default is None or rank == default:
        yield
        return
    from fedit.lora_rank import use_rank

    base = model.peft_config["default"]
    spec = LoraSpec(r=default, alpha=base.lora_alpha, dropout=base.lora_dropout,
                    target_modules=tuple(sorted(base.target_modules)))
    use_rank(model, rank, spec)
    try:
        yield
    finally:
        use_rank(model, default, spec)
