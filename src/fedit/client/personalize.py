"""Personal adapters: one per client, good on that client's own data (``[personalize]``).

- ``finetune``: after the last round each client trains the final global adapter further
  on its own rows (``personalize.epochs`` / ``max_steps``, ``personalize.lr``).
- ``ditto`` (Li et al., "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021, https://arxiv.org/abs/2012.04221, Algorithm 1): each client
  keeps a personal adapter ``v_k`` in its ``ClientState``. Whenever it is sampled it first
  does the usual local update of the global adapter ``w`` (what it uploads), then trains
  ``v_k`` for the same budget on the same rows with the loss
  ``F_k(v_k) + lam / 2 * ||v_k - w||^2`` (FedProx's proximal term, anchored at the round's
  global adapter). ``v_k`` starts from the global adapter the first time and never leaves
  the client: it is not in the reply, only in the client-state store (the run folder's
  checkpoint blobs in the simulation, ``state-dir`` on a Flower node).

The personal training draws its own seed, so the global adapter of a run is the same
with personalisation on or off. At the end of a simulated run every personal adapter is
saved as a PEFT folder, ``<run>/personal/client_NNNN/adapter``, with
``personal/personal.json`` naming them; ``fedit eval RUN`` compares each with the global
adapter on that client's own held-out rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedit.algorithms.contract import ClientState
from fedit.algorithms.hooks import ProximalTerm
from fedit.client.objective import SFT, Objective, objective_for
from fedit.client.trainer import TrainResult, train_adapter
from fedit.config import PersonalizeConfig, RunConfig, TrainConfig
from fedit.data.prompts import Example
from fedit.io import atomic_dir, atomic_write_json
from fedit.model.adapter import adapter_params, get_adapter_arrays, save_adapter, set_adapter_arrays

PERSONAL = "ditto.personal"  # client-state arrays: the personal adapter v_k (never sent)
PERSONAL_DIR = "personal"  # <run>/personal/client_NNNN/adapter
PERSONAL_FILE = "personal.json"  # <run>/personal/personal.json: method, settings, clients

Arrays = list[np.ndarray]


def personal_seed(seed: int, server_round: int, client: int) -> int:
    """The personal training's seed: distinct from the client's round seed, so the global
    update's batches and dropout masks do not depend on personalisation."""
    return int(np.random.SeedSequence([seed, server_round, client, 0x5E]).generate_state(1)[0])


def personal_train_config(train: TrainConfig, p: PersonalizeConfig) -> TrainConfig:
    """The trainer settings of a personal update: ditto trains with the local update's
    budget, finetune with ``personalize.epochs`` / ``max_steps``; both at
    ``personalize.lr`` (0: ``train.lr``, for ditto the round's lr of
    ``train.round_schedule``)."""
    lr = p.lr or train.lr
    if p.method == "finetune":
        return dataclasses.replace(train, lr=lr, local_epochs=p.epochs, max_steps=p.max_steps)
    # ditto at the round's lr (a cosine schedule's last round may be 0: no replace)
    return train if lr == train.lr else dataclasses.replace(train, lr=lr)


def personal_adapter_dir(run_dir: Path, client: int) -> Path:
    """Where client ``client``'s personal adapter is saved in a run folder."""
    return Path(run_dir) / PERSONAL_DIR / _client_path(client)


def _client_path(client: int) -> str:
    return f"client_{client:04d}/adapter"


def ditto_update(
    model: torch.nn.Module, global_arrays: Arrays, examples: Sequence[Example],
    train: TrainConfig, p: PersonalizeConfig, state: ClientState, *, seed: int, pad_id: int,
    objective: Objective | None = None,
) -> TrainResult:
    """Train the client's personal adapter ``v_k`` (from ``state``, else the global one)
    towards its own rows, held near ``global_arrays`` by ``lam / 2 ||v_k - w||^2``, on the
    run's ``objective`` (SFT by default; DPO reads its reference from ``state``); the
    new ``v_k`` goes back into ``state``. Leaves ``v_k`` loaded in ``model``."""
    set_adapter_arrays(model, state.arrays.get(PERSONAL, global_arrays))
    hook = None
    if p.lam > 0:  # the anchor, as the trainable tensors the trainer hands the hook
        anchor = [torch.as_tensor(a).to(t.device, t.dtype) for a, t in
                  zip(global_arrays, adapter_params(model).values(), strict=True)
                  if t.requires_grad]
        hook = ProximalTerm(p.lam, start=anchor)
    result = train_adapter(model, examples, personal_train_config(train, p), pad_id=pad_id,
                           seed=seed, hook=hook, objective=objective, state=state)
    state.arrays[PERSONAL] = get_adapter_arrays(model)
    return result


def finetune_adapter(
    model: torch.nn.Module, global_arrays: Arrays, examples: Sequence[Example],
    train: TrainConfig, p: PersonalizeConfig, *, seed: int, pad_id: int,
    objective: Objective | None = None, state: ClientState | None = None,
) -> Arrays:
    """The global adapter trained further on one client's rows (``finetune``), on the
    run's ``objective``; its precompute (DPO's reference) fills what ``state`` lacks."""
    objective, state = objective or SFT(), state or ClientState()
    set_adapter_arrays(model, global_arrays)
    objective.precompute(model, examples, state)
    train_adapter(model, examples, personal_train_config(train, p), pad_id=pad_id, seed=seed,
                  objective=objective, state=state)
    return get_adapter_arrays(model)


def write_personal_adapters(
    run_dir: Path, cfg: RunConfig, model: torch.nn.Module, global_arrays: Arrays,
    clients: Sequence[int], *, examples_of: Callable[[int], Sequence[Example]],
    state_of: Callable[[int], ClientState | None], pad_id: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Save every client's personal adapter under ``<run>/personal`` (replaced whole) and
    return what ``personal.json`` says: the method, its settings, and per client whether
    it has a personal adapter (a ditto client never sampled has none)."""
    p = cfg.personalize
    objective = objective_for(cfg)
    saved: dict[int, str] = {}
    with atomic_dir(Path(run_dir) / PERSONAL_DIR) as tmp:
        for k in clients:
            if p.method == "finetune":
                arrays: Arrays | None = finetune_adapter(
                    model, global_arrays, examples_of(k), cfg.train, p,
                    seed=personal_seed(cfg.seed, cfg.rounds + 1, k), pad_id=pad_id,
                    objective=objective, state=state_of(k))
            else:
                state = state_of(k)
                arrays = state.arrays.get(PERSONAL) if state is not None else None
            if arrays is None:
                continue
            set_adapter_arrays(model, arrays)
            save_adapter(model, tmp / _client_path(k))
            saved[k] = f"{PERSONAL_DIR}/{_client_path(k)}"
        info = {**dataclasses.asdict(p), "clients": {str(k): saved.get(k) for k in clients}}
        atomic_write_json(tmp / PERSONAL_FILE, info)
    set_adapter_arrays(model, global_arrays)
    missing = [k for k in clients if k not in saved]
    log(f"personal adapters ({p.method}) of {len(saved)} clients in {run_dir / PERSONAL_DIR}"
        + (f"; clients {missing} were never sampled: no personal adapter" if missing else ""))
    return info
