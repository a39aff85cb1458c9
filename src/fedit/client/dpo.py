"""Direct preference optimisation (Rafailov et al. 2023, arXiv 2305.18290) on the objective
seam: ``train.objective = "dpo"``, configured by ``[dpo]``.

A pair is one packed sequence, ``prompt + chosen + rejected``: the prompt is computed once
for both answers (the shared-prefix packing of, e.g., Wang et al. 2024, "Accelerating
Direct Preference Optimization with Prefix Sharing", arXiv 2410.20305). The rejected
answer takes the positions the chosen one has (its rotary positions start where the
prompt ends) and attends to the prompt and to itself, never to the chosen answer
(:class:`PairBatch`'s mask), so each answer's log-probabilities are those of its own
``prompt + answer`` sequence; its first token is predicted by the prompt's last position.
A micro-batch of pairs is one forward pass of one row a pair, and a pair costs
``prompt + chosen + rejected`` tokens where two sequences cost twice the prompt. A
sequence's log-probability is the sum over its answer tokens of the fused labelled
cross-entropy (:func:`fedit.client.fused.labelled_cross_entropy`).
With ``z = beta * ((pi_c - pi_r) - (ref_c - ref_r))`` the ``sigmoid`` loss of a pair is
``-(1 - ls) * logsigmoid(z) - ls * logsigmoid(-z)`` (``ls``: ``label_smoothing``, the
conservative DPO of Mitchell 2023); ``ipo`` (Azar et al. 2023, arXiv 2310.12036) is
``(d - 1 / (2 * beta))**2`` with ``d`` the same difference on log-probabilities divided
by each answer's token count, as TRL computes it. A step's loss is the mean over its
pairs, however many micro-batches it is split into (the normaliser: its pairs).

The reference costs no second copy of the model. With a fresh adapter it is the base
model: the client's adapter disabled (PEFT's ``disable_adapter``). With ``lora.init_from``
it is that starting adapter, held frozen as a second PEFT adapter (``"reference"``) in the
same model and made active for the reference pass
(:func:`fedit.model.init_from.reference_weights`). Its log-probabilities do not change
during a run: ``precompute`` computes each pair's once per client, keyed by
the pair's token hash (:attr:`~fedit.data.preference_tokens.PairExample.key`), and keeps
them in the client's state, which every later round reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedit.algorithms.contract import ClientState
from fedit.client.fused import labelled_cross_entropy
from fedit.client.losses import EVAL_BATCH_TOKENS, decoder_and_head
from fedit.client.objective_base import HeldOut, Log, Objective, loss_by_category, row_label
from fedit.config import DataConfig, DPOConfig, RunConfig
from fedit.data.batching import batch_order, capped_batches
from fedit.data.preference_tokens import PairExample, tokenize_pairs_for_run
from fedit.model.adapter import set_adapter_arrays
from fedit.model.init_from import reference_weights

REFERENCE = "dpo-reference"  # ClientState.arrays key: [pair keys, ref chosen, ref rejected]


@dataclass
class PairBatch:
    """A micro-batch of pairs, one packed row a pair (``prompt + chosen + rejected``),
    right-padded to ``L``.

    ``mask`` (B, 1, L, L) is True where a query position may attend a key: causal, except
    that the rejected answer's positions do not see the chosen answer's (pads see what is
    before them, and carry no label). ``positions``: the rotary positions (the rejected
    answer's restart where the prompt ends). ``source`` indexes the flattened (B x L)
    positions whose output predicts each answer token ``targets``; ``rows`` says whose it
    is: pair ``i``'s chosen answer ``i``, its rejected answer ``B + i``."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    source: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    keys: list[int]
    num_tokens: int  # real (non-pad) tokens of the packed rows

    @property
    def pairs(self) -> int:
        return len(self.keys)


def packed_length(pair: PairExample) -> int:
    """Tokens of a pair's packed row: its prompt once, then both answers."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def pair_batch(pairs: Sequence[PairExample], pad_id: int) -> PairBatch:
    """Pack pairs into one forward pass (see :class:`PairBatch`)."""
    b, width = len(pairs), max(packed_length(p) for p in pairs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    mask = torch.ones((b, width, width), dtype=torch.bool).tril_()
    source: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    for i, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        end = n_p + n_c + n_r
        ids[i, :end] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        positions[i, : n_p + n_c] = torch.arange(n_p + n_c)
        positions[i, n_p + n_c : end] = torch.arange(n_p, n_p + n_r)
        positions[i, end:] = torch.arange(n_p + max(n_c, n_r), n_p + max(n_c, n_r) + width - end)
        mask[i, n_p + n_c : end, n_p : n_p + n_c] = False
        base = i * width
        # an answer token is predicted by the position before it in its own sequence: the
        # prompt's last for the first token (none when the prompt is empty, as unpacked)
        first = 0 if n_p else 1
        for j in range(first, n_c):
            source.append(base + (n_p - 1 if j == 0 else n_p + j - 1))
            targets.append(p.chosen_ids[j])
            rows.append(i)
        for j in range(first, n_r):
            source.append(base + (n_p - 1 if j == 0 else n_p + n_c + j - 1))
            targets.append(p.rejected_ids[j])
            rows.append(b + i)
    return PairBatch(ids, positions, mask.unsqueeze(1), torch.tensor(source),
                     torch.tensor(targets), torch.tensor(rows), [p.key for p in pairs],
                     sum(packed_length(p) for p in pairs))


def sequence_logps(model: torch.nn.Module, micro: PairBatch
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer (the chosen ones, then the rejected ones): the summed log-probability of
    its tokens and their count."""
    decoder, head = decoder_and_head(model)
    device = next(head.parameters()).device
    hidden = decoder(input_ids=micro.input_ids.to(device),
                     position_ids=micro.positions.to(device),
                     attention_mask=micro.mask.to(device)).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    losses = labelled_cross_entropy(flat[micro.source.to(device)], head,
                                    micro.targets.to(device))  # -log p of each answer token
    rows = micro.rows.to(device)
    n = 2 * micro.pairs
    logps = -torch.zeros(n, device=device, dtype=losses.dtype).index_add(0, rows, losses)
    counts = torch.bincount(rows, minlength=n).to(losses.dtype)
    return logps, counts


def dpo_losses(policy_c: torch.Tensor, policy_r: torch.Tensor, ref_c: torch.Tensor,
               ref_r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor, cfg: DPOConfig
               ) -> torch.Tensor:
    """Each pair's loss (``cfg.loss``: sigmoid or ipo; see the module docstring)."""
    if cfg.loss == "ipo":
        delta = (policy_c - ref_c) / n_c.clamp(min=1) - (policy_r - ref_r) / n_r.clamp(min=1)
        return (delta - 1 / (2 * cfg.beta)) ** 2
    z = cfg.beta * ((policy_c - policy_r) - (ref_c - ref_r))
    ls = cfg.label_smoothing
    return -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)


def implicit_rewards(policy_c: np.ndarray, policy_r: np.ndarray, ref_c: np.ndarray,
                     ref_r: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """DPO's implicit rewards ``beta * (pi - ref)`` of the chosen and rejected answers."""
    return beta * (policy_c - ref_c), beta * (policy_r - ref_r)


def preference_scores(policy: Sequence[np.ndarray], reference: Sequence[np.ndarray],
                      cfg: DPOConfig) -> dict[str, np.ndarray]:
    """Per pair, from ``policy = (chosen logp, rejected logp, chosen tokens, rejected
    tokens)`` (:func:`pair_logps`) and the reference's ``(chosen logp, rejected logp)``:
    ``reward_margin`` (implicit reward of chosen minus rejected, ``beta * ((pi_c - ref_c)
    - (pi_r - ref_r))``), ``correct`` (that margin > 0), ``reference_free_margin`` (the
    policy's mean log-probability per token of chosen minus rejected), its
    ``reference_free_correct`` and ``dpo_loss`` (``cfg.loss``)."""
    pc, pr, nc, nr = (np.asarray(x, dtype=np.float64) for x in policy)
    rc, rr = (np.asarray(x, dtype=np.float64) for x in reference)
    chosen, rejected = implicit_rewards(pc, pr, rc, rr, cfg.beta)
    free = pc / np.maximum(nc, 1) - pr / np.maximum(nr, 1)
    t = [torch.from_numpy(x) for x in (pc, pr, rc, rr, nc, nr)]
    return {"reward_margin": chosen - rejected, "correct": chosen > rejected,
            "reference_free_margin": free, "reference_free_correct": free > 0,
            "dpo_loss": dpo_losses(t[0], t[1], t[2], t[3], t[4], t[5], cfg).numpy()}


@torch.inference_mode()
def pair_logps(model: torch.nn.Module, pairs: Sequence[PairExample], pad_id: int,
               batch_size: int = 8, max_tokens: int = EVAL_BATCH_TOKENS
               ) -> tuple[np.ndarray, ...]:
    """No-grad ``(chosen logp, rejected logp, chosen tokens, rejected tokens)`` per pair,
    in the order given, in batches sorted by length (dropout off)."""
    was_training = model.training
    model.eval()
    out = np.zeros((4, len(pairs)))
    lengths = [packed_length(p) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: lengths[i])
    for idx in map(np.asarray, capped_batches(order, lengths, batch_size, max_tokens)):
        micro = pair_batch([pairs[i] for i in idx], pad_id)
        logps, counts = sequence_logps(model, micro)
        n = len(idx)
        out[0, idx], out[1, idx] = logps[:n].double().cpu(), logps[n:].double().cpu()
        out[2, idx], out[3, idx] = counts[:n].double().cpu(), counts[n:].double().cpu()
    model.train(was_training)
    return tuple(out)


def reference_logps(model: Any, pairs: Sequence[PairExample], pad_id: int,
                    batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The reference's chosen and rejected log-probabilities: the starting adapter of
    ``lora.init_from`` (the model's frozen reference adapter) when there is one, else the
    base model, the adapter disabled (no second copy of the model either way). Batched as
    :func:`pair_logps` with the same ``batch_size`` batches them, so a policy equal to its
    reference (a fresh adapter, B = 0) gets exactly its log-probabilities."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError("DPO's reference is the base model with the LoRA adapter disabled; "
                        "the model has no adapter (attach one first)")
    with reference_weights(model):
        chosen, rejected, _, _ = pair_logps(model, pairs, pad_id, batch_size=batch_size)
    return chosen, rejected


def reference_table(state: ClientState) -> dict[int, tuple[float, float]]:
    """The client's reference log-probabilities so far: pair key -> (chosen, rejected)."""
    if REFERENCE not in state.arrays:
        return {}
    keys, chosen, rejected = state.arrays[REFERENCE]
    return {int(k): (float(c), float(r)) for k, c, r in zip(keys, chosen, rejected, strict=True)}


class DPO(Objective):
    """Direct preference optimisation on preference pairs (see the module docstring).

    Parameters
    ----------
    cfg : DPOConfig, optional
        ``beta`` (0.1), ``loss`` (``"sigmoid"`` | ``"ipo"``), ``label_smoothing`` (0.0).
    """

    name = "dpo"
    accepts = "preference pairs (prompt, chosen, rejected)"
    train_loss_means = "the mean DPO loss per preference pair over every step of the round"

    def __init__(self, cfg: DPOConfig | None = None) -> None:
        self.cfg = cfg or DPOConfig()
        self.pad_id = 0  # the tokenizer's, once examples are made (pads carry no label)
        self._table: tuple[Any, dict[int, tuple[float, float]]] | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> DPO:
        return cls(cfg.dpo)

    def examples(self, tokenizer: Any, rows: Sequence[dict[str, Any]], data: DataConfig,
                 who: str, log: Log | None = None, stats_file: Path | None = None
                 ) -> tuple[list[Any], list[int]]:
        self.pad_id = int(tokenizer.pad_token_id or 0)
        return tokenize_pairs_for_run(tokenizer, rows, data, who, log, stats_file)

    def steps(self, examples: Sequence[Any], batch_size: int, micro_batch_size: int,
              pad_id: int, rng: np.random.Generator, group_by_length: bool
              ) -> Iterator[list[PairBatch]]:
        """``batch_size`` pairs a step, ``micro_batch_size`` pairs a forward pass (one
        packed row a pair)."""
        lengths = [packed_length(e) for e in examples]
        for idx in batch_order(lengths, batch_size, rng, group_by_length):
            pairs = [examples[i] for i in idx]
            yield [pair_batch(pairs[i : i + micro_batch_size], pad_id)
                   for i in range(0, len(pairs), micro_batch_size)]

    def normaliser(self, micro: Sequence[PairBatch]) -> int:
        return sum(m.pairs for m in micro)

    def micro_loss(self, model: torch.nn.Module, micro: PairBatch, state: ClientState
                   ) -> tuple[torch.Tensor, int]:
        logps, counts = sequence_logps(model, micro)
        n = micro.pairs
        table = self._reference(state)
        try:
            ref = torch.tensor([table[k] for k in micro.keys], dtype=logps.dtype,
                               device=logps.device)
        except KeyError:
            raise RuntimeError("a pair has no reference log-probability: precompute was not "
                               "run on this client's examples") from None
        losses = dpo_losses(logps[:n], logps[n:], ref[:, 0], ref[:, 1], counts[:n],
                            counts[n:], self.cfg)
        return losses.sum(), micro.num_tokens

    def _reference(self, state: ClientState) -> dict[int, tuple[float, float]]:
        """The state's table, read once per state object (a round reads it every step)."""
        arrays = state.arrays.get(REFERENCE)
        if self._table is None or self._table[0] is not arrays:  # held: its id stays unique
            self._table = (arrays, reference_table(state))
        return self._table[1]

    def precompute(self, model: torch.nn.Module, examples: Sequence[Any],
                   state: ClientState) -> None:
        """The reference log-probabilities of the pairs the state lacks (all of them
        before the client's first round, none after)."""
        table = reference_table(state)
        missing = list({e.key: e for e in examples if e.key not in table}.values())
        if not missing:
            return
        chosen, rejected = reference_logps(model, missing, self.pad_id)
        table.update({e.key: (float(c), float(r))
                      for e, c, r in zip(missing, chosen, rejected, strict=True)})
        keys = sorted(table)  # a deterministic state file
        state.arrays[REFERENCE] = [np.asarray(keys, dtype=np.int64),
                                   np.asarray([table[k][0] for k in keys]),
                                   np.asarray([table[k][1] for k in keys])]

    def held_out(self, tokenizer: Any, model: torch.nn.Module,
                 rows: Sequence[dict[str, Any]], cfg: RunConfig, log: Log | None = None,
                 stats_file: Path | None = None) -> PreferenceLoss:
        examples, kept = self.examples(tokenizer, rows, cfg.data, "held-out set", log,
                                       stats_file)
        labels = [row_label(rows[i], cfg.data.label_field) for i in kept]
        return PreferenceLoss(examples, labels, model, self.cfg, self.pad_id)


class PreferenceLoss(HeldOut):
    """DPO's held-out evaluation: the mean DPO loss per held-out pair (and per label);
    ``metrics`` after a call: ``preference_accuracy`` (the share of pairs whose chosen
    answer has the larger implicit reward) and ``reward_margin`` (the mean difference),
    which the round's metrics line carries (``last_metrics``). The reference
    log-probabilities are computed on the first call, then kept."""

    def __init__(self, examples: list[PairExample], labels: list[str], model: torch.nn.Module,
                 cfg: DPOConfig, pad_id: int) -> None:
        self.examples, self.labels, self.model = examples, labels, model
        self.cfg, self.pad_id, self.rows = cfg, pad_id, len(examples)
        self.reference: tuple[np.ndarray, np.ndarray] | None = None
        self.metrics: dict[str, float] = {}

    def __call__(self, arrays: list[np.ndarray]
                 ) -> tuple[float | None, dict[str, float] | None]:
        if not self.examples:
            return None, None
        if self.reference is None:
            self.reference = reference_logps(self.model, self.examples, self.pad_id)
        set_adapter_arrays(self.model, arrays)
        scores = preference_scores(pair_logps(self.model, self.examples, self.pad_id),
                                   self.reference, self.cfg)
        losses = scores["dpo_loss"]
        self.metrics = {"preference_accuracy": float(np.mean(scores["correct"])),
                        "reward_margin": float(np.mean(scores["reward_margin"]))}
        ones = np.ones(len(losses), dtype=np.int64)  # a pair counts once in its label's mean
        return float(losses.mean()), loss_by_category(losses, ones, self.labels)

    def last_metrics(self) -> dict[str, float]:
        return dict(self.metrics)
