"""Offline evaluation of a model on held-out preference pairs (``fedit eval`` on rows of
``prompt``, ``chosen``, ``rejected``; :mod:`fedit.data.preferences`).

Per label and overall:

- ``preference_accuracy``: the share of pairs whose chosen answer has the larger DPO
  implicit reward, ``beta * (pi - ref)`` (``dpo.beta`` of the config), and
  ``reward_margin``, the mean of chosen's minus rejected's;
- ``reference_free_accuracy`` / ``reference_free_margin``: the same on the policy's mean
  log-probability per answer token (no reference: meaningful for the base model too,
  whose implicit reward is identically zero);
- ``dpo_loss``: the mean per-pair loss of ``dpo.loss``;
- ``answer_tokens``: the mean length in tokens of the model's own answer (greedy unless
  ``[eval] do_sample``) to each prompt, rendered as a pair's prompt is (DPO is known to
  lengthen answers): the tokens generated for it (a template stop marker included).

The reference is the one DPO trains against: the config's ``lora.init_from`` adapter
(a run's own config when TARGET is a run or one of its adapters), else the base model,
the adapter disabled; the base model itself when there is no adapter (its margins are
then exactly 0). Pairs are tokenised as training does
(``data.cutoff_len``, truncation); a pair that cannot fit or whose answers are the same
has no score but is still answered. ``answers.jsonl`` holds one record a pair, which
``fedit eval --compare`` pairs by prompt, chosen and rejected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedit.client.dpo import pair_logps, preference_scores, reference_logps
from fedit.client.objective_base import row_label
from fedit.config import RunConfig
from fedit.data.preference_tokens import tokenize_pairs
from fedit.data.preferences import CHOSEN, PROMPT, REJECTED, is_preference
from fedit.errors import DataError
from fedit.evaluate.table import fmt, metric_lines
from fedit.evaluate.verdicts import PREFERENCE_METRICS, RECORD_FIELDS
from fedit.model.generate import generate_answers
from fedit.model.init_from import (
    has_reference_adapter,
    init_adapter_arrays,
    set_reference_adapter,
)

Log = Callable[[str], None]

KIND = "preference"  # eval.json settings["kind"] of a preference evaluation
#: metric -> the per-pair record field it is the mean of
FIELDS = {m: RECORD_FIELDS.get(m, m) for m in PREFERENCE_METRICS}


def preference_rows(rows: Sequence[dict[str, Any]], source: str) -> bool:
    """True when every row is a preference pair, False when none is; a file mixing both
    is refused (one line naming the first row of the other kind)."""
    kinds = [is_preference(r) for r in rows]
    if all(kinds) or not any(kinds):
        return bool(rows) and kinds[0]
    first = kinds.index(not kinds[0])
    pair, other = ("row 1", f"row {first + 1}") if kinds[0] else (f"row {first + 1}", "row 1")
    raise DataError(f"{source}: mixes preference pairs ({pair}: prompt, chosen, rejected) "
                    f"with instruction rows ({other}); fedit eval scores one kind of row a "
                    "file: split it in two")


def generation_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row :func:`~fedit.model.generate.generate_answers` renders as the pair's prompt
    is rendered (a string: the instruction; messages: the conversation so far)."""
    prompt = row[PROMPT]
    if isinstance(prompt, list):
        return {"messages": [*prompt, {"role": "assistant", "content": row[CHOSEN]}]}
    return {"instruction": prompt, "context": ""}


def _records(rows: Sequence[dict[str, Any]], labels: list[str], kept: list[int],
             scores: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One record a pair, scored where its pair was kept."""
    where = {i: j for j, i in enumerate(kept)}
    out = []
    for i, row in enumerate(rows):
        j = where.get(i)
        rec: dict[str, Any] = {"id": i, "category": labels[i], "prompt": row[PROMPT],
                               "instruction": row.get("instruction", ""), "context": "",
                               "chosen": row[CHOSEN], "rejected": row[REJECTED],
                               "answer": None, "answer_tokens": None}
        for key, values in scores.items():
            v = None if j is None else values[j]
            rec[key] = None if v is None else bool(v) if v.dtype == bool else float(v)
        out.append(rec)
    return out


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each metric's mean over the records that have it, and the counts."""
    out: dict[str, Any] = {"rows": len(records),
                           "pairs_scored": sum(r["correct"] is not None for r in records)}
    for metric, field in FIELDS.items():
        values = [float(r[field]) for r in records if r.get(field) is not None]
        out[metric] = float(np.mean(values)) if values else None
    return out


def evaluate_preferences(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], cfg: RunConfig, *,
    generate: bool = True, log: Log = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate ``model`` (its active adapter, if any) on preference pairs; returns
    ``result`` ({"overall", "by_category", "settings"}) and one record a pair, as
    :func:`fedit.evaluate.evaluation.evaluate_model` does for instruction rows."""
    start = time.perf_counter()
    labels = [row_label(r, cfg.data.label_field) for r in rows]
    examples, kept, counts = tokenize_pairs(tokenizer, rows, cfg.data, "held-out set")
    if len(kept) < len(rows):
        log(f"{len(rows) - len(kept)} of {len(rows)} pairs have no score (answered all the "
            f"same): {counts['skipped']} cannot fit data.cutoff_len = {cfg.data.cutoff_len},"
            f" {counts['identical']} have the same chosen and rejected answer")
    pad_id = int(tokenizer.pad_token_id or 0)
    policy = pair_logps(model, examples, pad_id, batch_size=cfg.eval.batch_size)
    reference, which = _reference(model, examples, pad_id, cfg, policy)  # batched alike
    records = _records(rows, labels, kept, preference_scores(policy, reference, cfg.dpo))
    new_tokens = 0
    if generate and rows:
        ev, t0 = cfg.eval, time.perf_counter()
        gen = generate_answers(model, tokenizer, [generation_row(r) for r in rows],
                               template=cfg.data.template, max_new_tokens=ev.max_new_tokens,
                               batch_size=ev.generate_batch_size,
                               max_batch_tokens=ev.generate_batch_tokens,
                               do_sample=ev.do_sample, temperature=ev.temperature,
                               top_p=ev.top_p, seed=cfg.seed)
        new_tokens = gen.new_tokens
        log(f"generated {len(rows)} answers, {new_tokens} tokens in "
            f"{time.perf_counter() - t0:.0f} s")
        for rec, text, n in zip(records, gen.answers, gen.tokens, strict=True):
            rec["answer"], rec["answer_tokens"] = text, n
    result = {
        "overall": summarise(records),
        "by_category": {c: summarise([r for r in records if r["category"] == c])
                        for c in sorted(set(labels))},
        "settings": _settings(cfg, rows, counts, generate, new_tokens, start, which),
    }
    return result, records


def _reference(model: Any, examples: Sequence[Any], pad_id: int, cfg: RunConfig,
               policy: tuple[np.ndarray, ...]) -> tuple[tuple[np.ndarray, ...], str]:
    """The reference's chosen and rejected log-probabilities and what it is: the
    ``lora.init_from`` adapter of the config (held as a frozen second adapter for the
    pass), else the base model (the adapter disabled); the model itself without one."""
    if not hasattr(model, "disable_adapter"):
        return policy[:2], "the model itself (no adapter: implicit rewards are 0)"
    init_from = cfg.lora.init_from
    if not init_from:
        return (reference_logps(model, examples, pad_id, cfg.eval.batch_size),
                "the base model (adapter disabled)")
    if has_reference_adapter(model):  # a DPO run's model holds it already: keep it there
        return (reference_logps(model, examples, pad_id, cfg.eval.batch_size),
                f"the starting adapter (lora.init_from = {init_from})")
    set_reference_adapter(model, init_adapter_arrays(model, init_from))
    try:
        return (reference_logps(model, examples, pad_id, cfg.eval.batch_size),
                f"the starting adapter (lora.init_from = {init_from})")
    finally:
        set_reference_adapter(model, None)


def _settings(cfg: RunConfig, rows: Sequence[dict[str, Any]], counts: dict[str, int],
              generated: bool, new_tokens: int, start: float, reference: str
              ) -> dict[str, Any]:
    ev, d = cfg.eval, cfg.data
    decoding: dict[str, Any] = {"do_sample": ev.do_sample}
    if ev.do_sample:
        decoding |= {"temperature": ev.temperature, "top_p": ev.top_p, "seed": cfg.seed}
    return {"kind": KIND, "model": cfg.model.name, "adapter": None, "rows": len(rows),
            "pairs_truncated": counts["truncated"], "pairs_skipped": counts["skipped"],
            "pairs_identical": counts["identical"], "label_field": d.label_field,
            "template": d.template, "cutoff_len": d.cutoff_len, "truncation": d.truncation,
            "min_response_tokens": d.min_response_tokens, "fields": dict(d.fields),
            "beta": cfg.dpo.beta, "dpo_loss": cfg.dpo.loss,
            "label_smoothing": cfg.dpo.label_smoothing,
            "reference": reference,
            "generated": generated, "max_new_tokens": ev.max_new_tokens,
            "decoding": decoding, "new_tokens": new_tokens,
            "seconds": round(time.perf_counter() - start, 3)}


def format_preference_table(result: dict[str, Any]) -> str:
    """A short text table: one line per label, then the overall line."""
    head = (f"{'category':<22}{'pairs':>6}{'acc':>7}{'margin':>9}{'rf acc':>8}"
            f"{'rf margin':>10}{'dpo loss':>9}{'tokens':>8}")
    lines = metric_lines(head, result, lambda name, m: (
        f"{name[:21]:<22}{m['rows']:>6}{fmt(m['preference_accuracy']):>7}"
        f"{fmt(m['reward_margin'], 4):>9}{fmt(m['reference_free_accuracy']):>8}"
        f"{fmt(m['reference_free_margin'], 4):>10}{fmt(m['dpo_loss']):>9}"
        f"{fmt(m['answer_tokens'], 1):>8}"))
    s = result["settings"]
    lines.append(f"acc / margin: DPO implicit reward (beta {s['beta']}, reference: "
                 f"{s['reference']}); rf: reference-free, mean log-probability per token; "
                 "tokens: mean answer length")
    return "\n".join(lines)
