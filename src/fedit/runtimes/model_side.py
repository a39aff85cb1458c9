"""What both runtimes hand the round loop of the model they hold (the loop never imports
a model): the initial adapter, its tensor names, the objective's held-out evaluation and
saving an adapter folder. Shared by the runtimes; neither imports the other."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedit.client.load import model_notes
from fedit.client.objective import objective_for
from fedit.config import RunConfig
from fedit.data.batching import DATA_STATS
from fedit.federation.setup import ModelSide
from fedit.model.adapter import ADAPTER_WEIGHTS, adapter_names, save_adapter, set_adapter_arrays
from fedit.model.init_from import start_from


def model_side(cfg: RunConfig, tokenizer: Any, model: torch.nn.Module,
               test_rows: list[dict[str, Any]], run_dir: Path,
               log: Callable[[str], None], fused: bool) -> ModelSide:
    """The loop's view of ``model`` (with its LoRA adapter): logs the model's notes once
    (``fused``: whether this process trains on the fused path). The initial adapter is
    ``lora.init_from``'s, else the model's fresh one; for DPO the starting adapter is the
    reference (held in ``model`` before the held-out set's reference is computed)."""
    initial = start_from(model, cfg.lora.init_from, reference=cfg.train.objective == "dpo")
    for note in model_notes(model, cfg.lora.target_modules, fused):
        log(note)
    objective = objective_for(cfg)
    held_out = objective.held_out(tokenizer, model, test_rows, cfg, log, run_dir / DATA_STATS)

    def save(arrays: list[np.ndarray], folder: Path) -> Path:
        set_adapter_arrays(model, arrays)
        return save_adapter(model, folder) / ADAPTER_WEIGHTS

    return ModelSide(initial=initial, adapter_names=adapter_names(model),
                     evaluate=held_out, save_adapter=save, held_out_rows=held_out.rows,
                     objective={"name": objective.name,
                                "train_loss": objective.train_loss_means},
                     eval_metrics=held_out.last_metrics)
