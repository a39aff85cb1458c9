"""A preference data set that runs offline: human answers against the model's own.

``fedit data self-play`` (and ``fedit experiment fedit-dpo``, which builds it on first use)
turns instruction rows into preference pairs the way the first iteration of self-play
fine-tuning does (SPIN: Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language
Models to Strong Language Models", arXiv 2401.01335): for each selected row,

- ``prompt``: the row's instruction and its context as one text (``instruction`` +
  blank line + ``context``: the user turn fedit's templates render for the row);
- ``chosen``: the row's human reference response;
- ``rejected``: the base model's own greedy answer to that prompt, rendered in the
  template (``chatml`` by default, SmolLM2's chat format), at most ``max_new_tokens``
  new tokens; an answer that reached the cap is cut there (``rejected_cut`` in the row).

The rows come from databricks-dolly-15k as shipped with fedit (CC BY-SA 3.0,
``resources/DATA_LICENSE.md``) unless another source is given. Selection, seeded: rows
whose prompt is at most ``max_prompt_tokens`` tokens and whose reference response is 1 to
``max_new_tokens`` tokens (so the two answers have the room the model had), one row per
normalised prompt (:func:`fedit.data.dedup.prompt_key`), then ``per_label`` rows of each
label (``label_field``, sorted; fewer where a label has fewer). A pair whose greedy answer
is empty or equals the reference (whitespace and case aside) carries no signal and is
dropped (counted in the manifest).

The model is run in fp32 by default, so the pairs are the same on every CPU (bf16 greedy
decoding can pick other tokens). The result is cached: ``<cache>/preferences/<key>.jsonl``
(``$FEDIT_CACHE``, default ``~/.cache/fedit``) with ``<key>.json`` beside it (the settings,
the counts, the seconds it took), ``key`` a digest of the source file, the model, the
settings and :data:`BUILDER_VERSION`; a second call with the same settings reads it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedit.data.dedup import normalise, prompt_key
from fedit.data.load import dolly_path, load_rows
from fedit.data.prompts import TEMPLATES
from fedit.errors import ConfigError, DataError
from fedit.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, file_sha256
from fedit.model.base import load_base_model, load_tokenizer
from fedit.model.convert import cache_dir, resolve_model
from fedit.model.generate import generate_answers

Log = Callable[[str], None]

BUILDER_VERSION = 1  # bump when the construction changes: old cache entries are not reused


@dataclass(frozen=True)
class SelfPlaySettings:
    """What a self-play preference set is built from (all of it goes into the cache key)."""

    source: str = "dolly-15k"
    model: str = "smollm2-135m"
    template: str = "chatml"
    label_field: str = "category"
    per_label: int = 40
    max_prompt_tokens: int = 128
    max_new_tokens: int = 96
    dtype: str = "fp32"
    seed: int = 42
    batch_size: int = 32  # answers decoded at once (does not change greedy answers' text)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"--template {self.template!r}: use one of {', '.join(TEMPLATES)}")
        for name in ("per_label", "max_prompt_tokens", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: must be an integer "
                                  ">= 1")
        if self.dtype not in ("fp32", "bf16", "auto"):
            raise ConfigError(f"--dtype {self.dtype!r}: use fp32, bf16 or auto")

    def key(self) -> str:
        """The cache key: settings (batch size aside), source and model identity, version."""
        parts = {k: v for k, v in asdict(self).items() if k != "batch_size"}
        parts |= {"source_digest": _source_digest(self.source),
                  "model_path": resolve_model(self.model), "version": BUILDER_VERSION}
        text = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class SelfPlaySet:
    """A built (or cached) preference set: the pairs file and its manifest."""

    path: Path
    manifest: dict[str, Any]
    cached: bool


def _source_digest(source: str) -> str:
    """sha256 of the source file's bytes (dolly-15k: the shipped file); a hub id: its name."""
    path = dolly_path() if source == "dolly-15k" else Path(source).expanduser()
    return file_sha256(path) if path.is_file() else source


def pair_prompt(row: Mapping[str, Any]) -> str:
    """The pair's prompt: the instruction, then a blank line and the context if any (the
    user turn fedit's chat templates render for an instruction row)."""
    context = row.get("context") or ""
    return f"{row['instruction']}\n\n{context}" if context else str(row["instruction"])


def select_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, s: SelfPlaySettings
                ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The seeded selection of the module docstring, in label order; and the counts of rows
    left out for each reason."""
    counts = {"rows": len(rows), "no_label": 0, "prompt_too_long": 0,
              "response_too_long_or_empty": 0, "duplicate_prompt": 0}
    by_label: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for row in rows:
        label = str(row.get(s.label_field) or "")
        if not label:
            counts["no_label"] += 1
            continue
        key = prompt_key(row)
        if key in seen:
            counts["duplicate_prompt"] += 1
            continue
        seen.add(key)
        if len(tokenizer(pair_prompt(row), add_special_tokens=False)["input_ids"]) > \
                s.max_prompt_tokens:
            counts["prompt_too_long"] += 1
            continue
        n = len(tokenizer(row["response"], add_special_tokens=False)["input_ids"])
        if not 1 <= n <= s.max_new_tokens:
            counts["response_too_long_or_empty"] += 1
            continue
        by_label.setdefault(label, []).append(row)
    rng = np.random.default_rng([s.seed, 11])
    picked = []
    for label in sorted(by_label):
        group = by_label[label]
        take = sorted(rng.permutation(len(group))[: s.per_label].tolist())
        picked += [group[i] for i in take]
    return picked, counts


def build_self_play(s: SelfPlaySettings, *, out: Path | None = None, rebuild: bool = False,
                    log: Log = print) -> SelfPlaySet:
    """The preference set of ``s``: read from the cache, or built and cached (and copied to
    ``out`` when given). Raises DataError when no row qualifies."""
    folder = cache_dir() / "preferences"
    key = s.key()
    path, meta = folder / f"{key}.jsonl", folder / f"{key}.json"
    if not rebuild and path.is_file() and meta.is_file():
        manifest = json.loads(meta.read_text(encoding="utf-8"))
        log(f"self-play pairs: cached {path} ({manifest['pairs']} pairs, built in "
            f"{manifest['seconds']:.0f} s)")
        _copy(path, out)
        return SelfPlaySet(path, manifest, cached=True)
    start = time.perf_counter()
    rows = load_rows(s.source, required_label=s.label_field)
    tokenizer = load_tokenizer(s.model)
    picked, counts = select_rows(rows, tokenizer, s)
    if not picked:
        raise DataError(f"{s.source}: no row has a prompt of <= {s.max_prompt_tokens} tokens "
                        f"and a response of 1-{s.max_new_tokens} tokens with a "
                        f"{s.label_field!r} label; raise --max-prompt-tokens or "
                        "--max-new-tokens")
    log(f"self-play pairs: {len(picked)} rows of {len(rows)} selected; generating the "
        f"model's greedy answers (<= {s.max_new_tokens} new tokens, {s.dtype})")
    model = load_base_model(s.model, dtype=s.dtype, device="cpu")
    t0 = time.perf_counter()
    gen = generate_answers(model, tokenizer,
                           [{"instruction": pair_prompt(r), "context": ""} for r in picked],
                           template=s.template, max_new_tokens=s.max_new_tokens,
                           batch_size=s.batch_size, max_batch_tokens=1 << 20)
    gen_seconds = time.perf_counter() - t0
    pairs, dropped = [], {"empty_answer": 0, "same_as_reference": 0}
    for row, answer, n in zip(picked, gen.answers, gen.tokens, strict=True):
        if not answer.strip():
            dropped["empty_answer"] += 1
            continue
        if normalise(answer) == normalise(row["response"]):
            dropped["same_as_reference"] += 1
            continue
        pairs.append({"prompt": pair_prompt(row), "chosen": row["response"],
                      "rejected": answer, s.label_field: row[s.label_field],
                      "rejected_tokens": n, "rejected_cut": n >= s.max_new_tokens})
    if not pairs:
        raise DataError(f"{s.source}: every one of the model's {len(picked)} answers was empty "
                        f"or the same as its reference: no pair to build (is {s.model!r} a "
                        "trained model, and its template --template?)")
    seconds = time.perf_counter() - start
    manifest = {
        "construction": "chosen: the human reference response; rejected: the model's own "
                        "greedy answer (SPIN, Chen et al. 2024, arXiv 2401.01335)",
        "settings": asdict(s), "key": key, "version": BUILDER_VERSION,
        "torch": torch.__version__, "pairs": len(pairs),
        "per_label": {str(k): int(v) for k, v in
                      zip(*np.unique([p[s.label_field] for p in pairs], return_counts=True),
                          strict=True)},
        "left_out": counts, "dropped": dropped,
        "rejected_cut": sum(p["rejected_cut"] for p in pairs),
        "new_tokens": gen.new_tokens, "generate_seconds": round(gen_seconds, 1),
        "seconds": round(seconds, 1),
    }
    atomic_write_jsonl(path, pairs)  # the pairs first: the manifest marks the entry done
    atomic_write_json(meta, manifest)
    log(f"self-play pairs: {len(pairs)} pairs ({gen.new_tokens} new tokens in "
        f"{gen_seconds:.0f} s, {seconds:.0f} s in all) -> {path}")
    _copy(path, out)
    return SelfPlaySet(path, manifest, cached=False)


def _copy(path: Path, out: Path | None) -> None:
    if out is not None:
        atomic_write_bytes(out, path.read_bytes())


__all__ = ["BUILDER_VERSION", "SelfPlaySet", "SelfPlaySettings", "build_self_play",
           "pair_prompt", "select_rows"]
