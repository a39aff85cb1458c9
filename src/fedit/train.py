"""The local trainer: one client's epochs on its adapter, in a plain PyTorch loop.

Why not ``transformers.Trainer``: a client round is small (tens of steps) and runs many
times in one process; the loop below keeps the model, skips the Trainer's set-up per
round, and computes logits only where a label is (the lm_head over a 49k vocabulary is
~20% of the FLOPs, and prompt tokens carry no label by default).
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

from fedit.config import TrainConfig
from fedit.data.batching import Batch, capped_batches, collate, make_batches
from fedit.data.prompts import IGNORE_INDEX, Example
from fedit.errors import ConfigError
from fedit.fused import fused_training, labelled_cross_entropy
from fedit.strategies.base import TrainHook


@dataclass
class TrainResult:
    """What one client's local training reports back."""

    num_examples: int  # the client's data size (its FedAvg weight), not steps x batch
    train_loss: float  # label-token-weighted mean loss over every step of the round
    steps: int
    tokens: int  # real (non-pad) tokens seen, all epochs
    seconds: float
    lr_sum: float = 0.0  # sum of the learning rates of the steps taken (SCAFFOLD's K * eta)


def _decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the output projection of a (PEFT-wrapped) causal LM.

    LoRA layers are injected in place, so calling the body directly still applies them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def token_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label-token cross-entropy (fp32) and the row each token belongs to.

    Logits are computed only at positions whose next token carries a label."""
    decoder, head = _decoder_and_head(model)
    device = next(head.parameters()).device
    ids = batch.input_ids.to(device)
    # No attention mask: batches are right-padded, and under causal attention a real token
    # only sees earlier positions, which are all real; pad positions carry no label. The
    # outputs that matter are the same, and SDPA takes its fused causal path instead of
    # building a (B, 1, L, L) mask.
    hidden = decoder(input_ids=ids).last_hidden_state
    targets = batch.labels[:, 1:].to(device)
    keep = targets != IGNORE_INDEX
    losses = labelled_cross_entropy(hidden[:, :-1][keep], head, targets[keep])
    rows = torch.arange(ids.shape[0], device=device).unsqueeze(1).expand_as(keep)[keep]
    return losses, rows


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
    decoder: Any = _decoder_and_head(model)[0]
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


def _hook_steps(hook: TrainHook | None) -> tuple[Any, Any]:
    """The hook's ``loss`` and ``correct`` where its class overrides them, else None."""
    if hook is None:
        return None, None
    loss = hook.loss if type(hook).loss is not TrainHook.loss else None
    correct = hook.correct if type(hook).correct is not TrainHook.correct else None
    return loss, correct


def _lr_lambda(kind: str, total: int) -> Callable[[int], float]:
    if kind == "constant":
        return lambda step: 1.0
    return lambda step: max(0.0, 1.0 - step / max(1, total))


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def train_adapter(
    model: torch.nn.Module,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    hook: TrainHook | None = None,
) -> TrainResult:
    """Train the model's trainable (LoRA) parameters on ``examples`` for one client round.

    A fresh AdamW each call (as the reference code builds a new Trainer per round); the
    gradient of a step is averaged over every label token of its ``batch_size`` examples,
    however many micro-batches it is split into. ``progress(step, total, loss)`` is
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
    start, step, tokens, loss_sum, label_sum = time.perf_counter(), 0, 0, 0.0, 0
    lr_sum = 0.0
    fused = cfg.fused and not cfg.compile  # compiled layers trace the stock modules
    extra_loss, correct = _hook_steps(hook)
    with compiled_layers(model, cfg.compile), fused_training(model, seed, enabled=fused):
        while step < total:
            for batch in make_batches(examples, cfg.batch_size, rng=rng,
                                      group_by_length=cfg.group_by_length):
                if step >= total:
                    break
                micro = [collate(batch[i : i + cfg.micro_batch_size], pad_id)
                         for i in range(0, len(batch), cfg.micro_batch_size)]
                n_labels = sum(m.num_labels for m in micro)
                step_loss = 0.0
                for m in micro:
                    losses, _ = token_losses(model, m)
                    loss = losses.sum() / n_labels
                    loss.backward()
                    step_loss += float(loss.detach())
                    tokens += m.num_tokens
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
                loss_sum, label_sum = loss_sum + step_loss * n_labels, label_sum + n_labels
                if progress is not None:
                    progress(step, total, step_loss)
    model.eval()
    return TrainResult(
        num_examples=len(examples),
        train_loss=loss_sum / max(1, label_sum),
        steps=step,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        lr_sum=lr_sum,
    )


EVAL_BATCH_TOKENS = 2048  # positions per evaluation batch (padding included)


@torch.inference_mode()
def example_losses(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
    max_batch_tokens: int = EVAL_BATCH_TOKENS,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example summed response-token loss and label count, in the order given.

    Evaluated in no-grad batches sorted by length (dropout off), of at most ``batch_size``
    rows and ``max_batch_tokens`` positions: on a 2-core CPU, 32 rows of ~190 tokens ran
    at half the speed of 4-8 rows (their temporaries no longer fit in cache)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    lengths = [len(e.input_ids) for e in examples]
    for idx in map(np.asarray, capped_batches(order, lengths, batch_size, max_batch_tokens)):
        batch = collate([examples[i] for i in idx], pad_id)
        losses, rows = token_losses(model, batch)
        per_row = torch.zeros(batch.num_examples).index_add_(0, rows.cpu(), losses.cpu())
        sums[idx] = per_row.double().numpy()
        counts[idx] = np.bincount(rows.cpu().numpy(), minlength=batch.num_examples)
    model.train(was_training)
    return sums, counts


def evaluate_loss(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int
) -> float:
    """Held-out response-token loss: summed over every label token, divided by their count."""
    return mean_token_loss(*example_losses(model, examples, batch_size, pad_id))


def mean_token_loss(sums: np.ndarray, counts: np.ndarray) -> float:
    """Summed token losses over the number of label tokens (``example_losses``' outputs)."""
    return float(sums.sum() / max(1, counts.sum()))
