"""The model a client trains, loaded once per process as a run config says, and the lines
a run logs once about it."""

from __future__ import annotations

from typing import Any

import torch

from fedit.client.fused import fused_note
from fedit.config import RunConfig
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer, model_type
from fedit.model.device import pick_device
from fedit.model.init_from import start_from


def load_model(cfg: RunConfig) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and the base model with its LoRA adapter (loaded once per process): a
    fresh one, or ``lora.init_from``'s (for DPO also held as the frozen reference)."""
    tokenizer = load_tokenizer(cfg.model.name)
    device = pick_device(cfg.model.device)
    base = load_base_model(cfg.model.name, dtype=cfg.model.dtype, device=device,
                           quantization=cfg.model.quantization or None)
    lora = cfg.lora
    spec = LoraSpec(r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                    target_modules=tuple(lora.target_modules))
    model = attach_lora(base, spec, seed=cfg.seed)
    if lora.init_from:
        start_from(model, lora.init_from, reference=cfg.train.objective == "dpo")
    return tokenizer, model


def model_notes(model: Any, wanted: tuple[str, ...] | list[str], fused: bool) -> list[str]:
    """Lines a run logs once about a model of another architecture: the LoRA targets picked
    for it (when not ``wanted``) and the fused kernels being off (when ``fused`` asks)."""
    notes = []
    config = getattr(model, "peft_config", {}).get("default")
    used = sorted(config.target_modules) if config is not None else []
    if used and set(used) != set(wanted):
        notes.append(f"lora: this {model_type(model)} model has no {', '.join(wanted)}; "
                     f"LoRA on {', '.join(used)} (PEFT's attention projections for it)")
    note = fused_note(model) if fused else None
    return notes + ([note] if note else [])
