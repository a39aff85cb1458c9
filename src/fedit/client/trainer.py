"""The local trainer: one client's epochs on its adapter, in a plain PyTorch loop.

Why not ``transformers.Trainer``: a client round is small (tens of steps) and runs many
times in one process; the loop below keeps the model and skips the Trainer's set-up per
round. What is trained on, and how a step's loss is normalised, is the objective's
(:mod:`fedit.client.objective`); the loop owns the optimizer, the schedule, the
strategy's hook, clipping and the fused / compiled paths.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedit.algorithms.contract import ClientState, TrainHook, hook_steps
from fedit.client.fused import fused_training
from fedit.client.losses import decoder_and_head
from fedit.client.objective import SFT, Objective
from fedit.config import TrainConfig
from fedit.errors import ConfigError


@dataclass
class TrainResult:
    """What one client's local training reports back."""

    num_examples: int  # the client's data size (its FedAvg weight), not steps x batch
    train_loss: float  # the objective's normaliser-weighted mean loss over the round's steps
    steps: int
    tokens: int  # real (non-pad) tokens seen, all epochs
    seconds: float
    lr_sum: float = 0.0  # sum of the learning rates of the steps taken (SCAFFOLD's K * eta)


@contextmanager
def compiled_layers(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block, the decoder layers run compiled by ``torch.compile``.

    Each layer is compiled once per process (dynamic shapes: batches of new lengths do not
    recompile) and every layer shares the compiled code. Only training runs compiled:
    outside the block, evaluation and KV-cache generation take the eager path. Inductor
    fuses the elementwise work (RMSNorm, rotary, SiLU, residual adds, LoRA dropout) that
    is ~40% of an eager fp32 step on CPU; the first step pays the compilation.
    """
    if not enabled:
        yield
        return
    device = next(model.parameters()).device
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        raise ConfigError("train.compile needs a C++ compiler on CPU (torch.compile builds "
                          "C++ kernels): install g++ or set train.compile = false")
    decoder: Any = decoder_and_head(model)[0]
    layers = list(decoder.layers)
    for layer in layers:
        if not hasattr(layer, "_fedit_compiled"):
            # what nn.Module.compile() stores; kept aside so it can be switched off
            layer._fedit_compiled = torch.compile(layer._call_impl, dynamic=True)
    try:
        for layer in layers:
            layer._compiled_call_impl = layer._fedit_compiled
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


def _lr_lambda(kind: str, total: int) -> Callable[[int], float]:
    if kind == "constant":
        return lambda step: 1.0
    return lambda step: max(0.0, 1.0 - step / max(1, total))


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def train_adapter(
    model: torch.nn.Module,
    examples: Sequence[Any],
    cfg: TrainConfig,
    *,
    pad_id: int,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    hook: TrainHook | None = None,
    objective: Objective | None = None,
    state: ClientState | None = None,
) -> TrainResult:
    """Train the model's trainable (LoRA) parameters on ``examples`` for one client round.

    A fresh AdamW each call (as the reference code builds a new Trainer per round); the
    gradient of a step is its micro-batches' summed loss over the ``objective``'s
    normaliser (SFT, the default: every label token of its ``batch_size`` examples,
    however many micro-batches it is split into); ``state`` is the client's state, which
    the objective may read (its precomputed values). ``progress(step, total, loss)`` is
    called after each optimizer step. ``hook`` (a strategy's, e.g. FedProx's proximal term
    or SCAFFOLD's correction) adds ``hook.loss(params)`` to each step's loss and calls
    ``hook.correct(params)`` after its backward, before clipping; ``params`` are the
    adapter's tensors in the order its arrays travel. Without a hook nothing is added to
    the step (fused or stock path alike).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach a LoRA adapter first")
    torch.manual_seed(seed)  # LoRA dropout on the stock path (the fused one has its own)
    rng = np.random.default_rng(seed)
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.local_epochs * _steps_per_epoch(len(examples), cfg.batch_size)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(cfg.lr_scheduler, total))
    model.train()
    start, step, tokens, loss_sum, norm_sum = time.perf_counter(), 0, 0, 0.0, 0
    lr_sum = 0.0
    fused = cfg.fused and not cfg.compile  # compiled layers trace the stock modules
    extra_loss, correct = hook_steps(hook)
    objective = objective or SFT()
    state = state if state is not None else ClientState()
    with compiled_layers(model, cfg.compile), fused_training(model, seed, enabled=fused):
        while step < total:
            for micro in objective.steps(examples, cfg.batch_size, cfg.micro_batch_size,
                                         pad_id, rng, cfg.group_by_length):
                if step >= total:
                    break
                norm = objective.normaliser(micro)
                step_loss = 0.0
                for m in micro:
                    summed, seen = objective.micro_loss(model, m, state)
                    loss = summed / norm
                    loss.backward()
                    step_loss += float(loss.detach())
                    tokens += seen
                if extra_loss is not None:
                    extra_loss(params).backward()
                if correct is not None:
                    correct(params)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optim.step()
                lr_sum += float(optim.param_groups[0]["lr"])
                sched.step()
                optim.zero_grad(set_to_none=True)
                step += 1
                loss_sum, norm_sum = loss_sum + step_loss * norm, norm_sum + norm
                if progress is not None:
                    progress(step, total, step_loss)
    model.eval()
    return TrainResult(
        num_examples=len(examples),
        train_loss=loss_sum / max(1, norm_sum),
        steps=step,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        lr_sum=lr_sum,
    )
