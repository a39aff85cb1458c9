"""Offline evaluation of a model (base, or base + adapter) on held-out instruction rows.

Per category and overall: the response-token loss (token-weighted: every label token of
the category counts once, as ``fedit.client.losses.evaluate_loss`` does) and its perplexity; then,
on answers generated with the KV cache (greedy unless ``[eval] do_sample``), ROUGE-L,
embedding similarity and exact match (short-answer categories only), and each answer's
length, ``answer_tokens``: the new tokens generated for it (a template stop marker's
included), so that ``fedit eval --compare`` can compare the scores at equal length. A row
whose prompt fills ``data.cutoff_len`` has no response token left: it gets no loss
(counted in the settings) but is still answered and scored.

``eval.json`` holds the result, ``answers.jsonl`` one line a row; the LLM judge and the
report read both (see ``write_eval``/``load_eval``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedit.client.losses import example_losses
from fedit.client.objective import SFT, row_label
from fedit.config import RunConfig
from fedit.errors import DataError
from fedit.evaluate.metrics import SIMILARITY_MODEL, exact_match, perplexity, rouge_l, similarity
from fedit.evaluate.preference import KIND, format_preference_table
from fedit.evaluate.table import fmt, metric_lines
from fedit.io import atomic_write_json, atomic_write_jsonl
from fedit.model.generate import generate_answers

Log = Callable[[str], None]

EVAL_FILE = "eval.json"
ANSWERS_FILE = "answers.jsonl"
METRIC_KEYS = ("rows", "loss", "perplexity", "rouge_l", "similarity", "exact_match",
               "answer_tokens")


def _mean(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return float(np.mean(real)) if real else None


def _metrics(answers: list[dict[str, Any]], sums: list[float], counts: list[int]) -> dict[str, Any]:
    """One M of the contract over some rows (``sums``/``counts``: of the rows with a loss)."""
    n = sum(counts)
    loss = float(sum(sums) / n) if n else None
    return {
        "rows": len(answers),
        "loss": loss,
        "perplexity": perplexity(loss),
        "rouge_l": _mean([a["rouge_l"] for a in answers]),
        "similarity": _mean([a["similarity"] for a in answers]),
        "exact_match": _mean([a["exact_match"] for a in answers]),
        "answer_tokens": _mean([a.get("answer_tokens") for a in answers]),
    }


def _answer_rows(
    rows: Sequence[dict[str, Any]], labels: list[str], losses: dict[int, tuple[float, int]],
) -> list[dict[str, Any]]:
    """One answer line a row, before generation; ``losses``: row -> (summed loss, tokens)."""
    return [
        {
            "id": i,
            "category": labels[i],
            "instruction": row["instruction"],
            "context": row.get("context") or "",
            "reference": row["response"],
            "answer": None,
            "rouge_l": None,
            "similarity": None,
            "exact_match": None,
            "answer_tokens": None,
            "loss": losses[i][0] / losses[i][1] if i in losses else None,
        }
        for i, row in enumerate(rows)
    ]


def _score_answers(
    answers: list[dict[str, Any]], texts: list[str], cfg: RunConfig, device: str,
    tokens: Sequence[int] | None = None,
) -> None:
    """Fill in each answer, its length in new tokens and its ROUGE-L, exact match and
    similarity, in place."""
    short = set(cfg.eval.exact_match_categories)
    for i, (a, text) in enumerate(zip(answers, texts, strict=True)):
        a["answer"] = text
        a["answer_tokens"] = int(tokens[i]) if tokens else None
        a["rouge_l"] = rouge_l(text, a["reference"])
        a["exact_match"] = exact_match(text, a["reference"]) if a["category"] in short else None
    if cfg.eval.similarity:
        sims = similarity(texts, [a["reference"] for a in answers], device=device)
        for a, s in zip(answers, sims, strict=True):
            a["similarity"] = s


def _check_rows(rows: Sequence[dict[str, Any]]) -> None:
    for i, row in enumerate(rows):
        for key in ("instruction", "response"):
            if not isinstance(row.get(key), str):
                raise DataError(f"held-out row {i}: field {key!r} is missing or not text "
                                "(every row needs an instruction and a reference response)")


def evaluate_model(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], cfg: RunConfig, *,
    generate: bool = True, log: Log = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate ``model`` on held-out rows (dolly schema: instruction, context, response,
    and the label field ``cfg.data.label_field``, category by default).

    Parameters
    ----------
    model : transformers or PEFT causal LM
        Evaluated as it is (its active adapter, if any); left in the mode it was in.
    tokenizer : transformers tokenizer
        With a pad token (``fedit.model.base.load_tokenizer``).
    rows : list of dict
        The held-out rows; answers keep their order (``id`` = index).
    cfg : RunConfig
        ``data`` (template, cutoff_len, label_field) and ``eval`` (batch sizes, decoding,
        max_new_tokens, exact_match_categories, similarity) are used.
    generate : bool
        False: losses only (answers and generation metrics None).

    Returns
    -------
    (dict, list of dict)
        ``result`` ({"overall", "by_category", "settings"}; ``settings["adapter"]`` is
        None: the caller knows where the adapter came from) and ``answers``, one a row.
    """
    start = time.perf_counter()
    _check_rows(rows)
    labels = [row_label(r, cfg.data.label_field) for r in rows]
    # Losses: one no-grad pass over the rows that keep a response token
    examples, kept = SFT().examples(tokenizer, rows, cfg.data, "held-out set")
    if len(kept) < len(rows):
        log(f"{len(rows) - len(kept)} of {len(rows)} rows have no loss (answered all the "
            f"same): the prompt alone fills data.cutoff_len = {cfg.data.cutoff_len}")
    sums, counts = example_losses(model, examples, cfg.eval.batch_size,
                                  int(tokenizer.pad_token_id))
    losses = {i: (float(sums[j]), int(counts[j])) for j, i in enumerate(kept)}
    answers = _answer_rows(rows, labels, losses)
    # Answers: batched generation, then the metrics against the references
    new_tokens = 0
    if generate and rows:
        ev = cfg.eval
        t0 = time.perf_counter()
        gen = generate_answers(model, tokenizer, rows, template=cfg.data.template,
                               max_new_tokens=ev.max_new_tokens,
                               batch_size=ev.generate_batch_size,
                               max_batch_tokens=ev.generate_batch_tokens, do_sample=ev.do_sample,
                               temperature=ev.temperature, top_p=ev.top_p, seed=cfg.seed)
        new_tokens = gen.new_tokens
        log(f"generated {len(rows)} answers, {new_tokens} tokens in "
            f"{time.perf_counter() - t0:.0f} s")
        device = next(model.parameters()).device.type
        _score_answers(answers, gen.answers, cfg, "cuda" if device == "cuda" else "cpu",
                       gen.tokens)
    result = {
        "overall": _metrics(answers, [float(s) for s in sums], [int(c) for c in counts]),
        "by_category": {
            c: _metrics([a for a in answers if a["category"] == c],
                        [s for i, (s, _) in losses.items() if labels[i] == c],
                        [n for i, (_, n) in losses.items() if labels[i] == c])
            for c in sorted(set(labels))
        },
        "settings": {**_settings(cfg, rows, kept, generate, new_tokens, start),
                     "rows_truncated": sum(e.truncated for e in examples),
                     "truncation": cfg.data.truncation},
    }
    return result, answers


def _settings(
    cfg: RunConfig, rows: Sequence[dict[str, Any]], kept: list[int], generated: bool,
    new_tokens: int, start: float,
) -> dict[str, Any]:
    ev = cfg.eval
    decoding: dict[str, Any] = {"do_sample": ev.do_sample}
    if ev.do_sample:
        decoding |= {"temperature": ev.temperature, "top_p": ev.top_p, "seed": cfg.seed}
    return {
        "model": cfg.model.name,
        "adapter": None,
        "rows": len(rows),
        "rows_without_loss": len(rows) - len(kept),
        "label_field": cfg.data.label_field,
        "template": cfg.data.template,
        "cutoff_len": cfg.data.cutoff_len,
        "min_response_tokens": cfg.data.min_response_tokens,
        "train_on_inputs": cfg.data.train_on_inputs,
        "fields": dict(cfg.data.fields),
        "generated": generated,
        "max_new_tokens": ev.max_new_tokens,
        "decoding": decoding,
        "new_tokens": new_tokens,
        "exact_match_categories": list(ev.exact_match_categories),
        "similarity_model": SIMILARITY_MODEL if ev.similarity and generated else None,
        "seconds": round(time.perf_counter() - start, 3),
    }


def write_eval(out_dir: Path, result: dict[str, Any], answers: list[dict[str, Any]]) -> None:
    """``eval.json`` and ``answers.jsonl`` in ``out_dir`` (created), each written atomically."""
    out_dir = Path(out_dir)
    atomic_write_jsonl(out_dir / ANSWERS_FILE, answers)
    atomic_write_json(out_dir / EVAL_FILE, result)


def load_eval(out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read back what ``write_eval`` wrote; a missing or broken file is a one-line DataError."""
    out_dir = Path(out_dir)
    path = out_dir / EVAL_FILE
    if not path.is_file():
        raise DataError(f"{out_dir}: no {EVAL_FILE} (run fedit eval {out_dir} first)")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); run fedit eval again") from None
    if not isinstance(result, dict) or not {"overall", "by_category", "settings"} <= set(result):
        raise DataError(f"{path}: not an eval result (needs overall, by_category, settings)")
    answers = []
    path = out_dir / ANSWERS_FILE
    if not path.is_file():
        raise DataError(f"{out_dir}: no {ANSWERS_FILE} beside {EVAL_FILE}; run fedit eval again")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                answers.append(json.loads(line))
            except ValueError:
                raise DataError(f"{path}:{n}: not valid JSON; run fedit eval again") from None
    return result, answers


def format_table(result: dict[str, Any]) -> str:
    """A short text table: one line per category, then the overall line (a preference
    evaluation's: :func:`fedit.evaluate.preference.format_preference_table`)."""
    if result["settings"].get("kind") == KIND:
        return format_preference_table(result)
    head = (f"{'category':<24}{'rows':>6}{'loss':>8}{'ppl':>9}{'rougeL':>8}{'sim':>7}{'EM':>7}"
            f"{'tokens':>8}")
    lines = metric_lines(head, result, lambda name, m: (
        f"{name[:23]:<24}{m['rows']:>6}{fmt(m['loss']):>8}{fmt(m['perplexity'], 2):>9}"
        f"{fmt(m['rouge_l']):>8}{fmt(m['similarity']):>7}{fmt(m['exact_match']):>7}"
        f"{fmt(m.get('answer_tokens'), 1):>8}"))
    return "\n".join([*lines, "tokens: mean answer length (new tokens generated)"])
