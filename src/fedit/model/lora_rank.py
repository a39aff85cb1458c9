"""Training at another LoRA rank, and FFA-LoRA's frozen ``A``, on the PEFT model.

Mixed ranks (``fedit.algorithms.ranks``): one PEFT model holds an adapter per rank it has
trained at -- ``default`` (``attach_lora``'s, at ``spec.r``) and ``rank{r}`` for the others,
each created once -- and exactly one is active. Everything in ``fedit.model.adapter`` (arrays in
and out, ``save_adapter``) and the trainer (stock and fused paths) works on the active one:
PEFT's state-dict keys do not name the adapter, so every rank's arrays travel under the
same names in the same order, only their shapes differ.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from fedit.model.base import LoraSpec


def rank_adapter_name(r: int, spec: LoraSpec) -> str:
    """The PEFT adapter name of rank ``r``: ``default`` for ``spec.r``, else ``rank{r}``."""
    return "default" if r == spec.r else f"rank{r}"


def use_rank(model: Any, r: int, spec: LoraSpec, seed: int = 0) -> None:
    """Make the PEFT model's active adapter one of rank ``r`` (``spec``'s alpha, dropout and
    target modules), adding it the first time.

    ``model.set_adapter`` makes only the active adapter's weights trainable
    (``requires_grad``), so the trainer's optimizer sees that adapter alone. A new adapter
    is built like ``attach_lora``'s: ``A`` drawn from ``seed`` without touching the global
    RNG, ``B`` zero, fp32 weights; the model keeps its train/eval mode (PEFT's new dropout
    layers would start in train mode).

    Raises
    ------
    ValueError
        ``r`` is not positive, or the ``default`` adapter is not of rank ``spec.r``.
    """
    from peft import LoraConfig

    if r <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {r}")
    if model.peft_config["default"].r != spec.r:
        raise ValueError(f"the default adapter has rank {model.peft_config['default'].r}, "
                         f"not spec.r = {spec.r}")
    name = rank_adapter_name(r, spec)
    if name not in model.peft_config:
        config = LoraConfig(
            r=r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM",
        )
        was_training = model.training
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            torch.manual_seed(seed)
            model.add_adapter(name, config)
        model.train(was_training)
        for module in model.modules():  # fp32 adapter weights whatever the base dtype
            for factors in (getattr(module, "lora_A", None), getattr(module, "lora_B", None)):
                if isinstance(factors, torch.nn.ModuleDict) and name in factors:
                    factors[name].weight.data = factors[name].weight.data.float()
    model.set_adapter(name)
