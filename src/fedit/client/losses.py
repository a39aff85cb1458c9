"""Response-token losses of a causal LM: what SFT trains on and evaluates.

Logits are computed only at positions whose next token carries a label (the lm_head over
a 49k vocabulary is ~20% of the FLOPs, and prompt tokens carry no label by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedit.client.fused import labelled_cross_entropy
from fedit.data.batching import Batch, capped_batches, collate
from fedit.data.prompts import IGNORE_INDEX, Example


def decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the output projection of a (PEFT-wrapped) causal LM.

    LoRA layers are injected in place, so calling the body directly still applies them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def token_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label-token cross-entropy (fp32) and the row each token belongs to.

    Logits are computed only at positions whose next token carries a label."""
    decoder, head = decoder_and_head(model)
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
