"""``fedit export``: a run's (or any PEFT folder's) LoRA adapter as a folder to share.

- ``--merged OUT``: the base model with the adapter merged in, a plain transformers folder
  (``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer with
  its chat template) that ``AutoModelForCausalLM.from_pretrained(OUT)`` loads without
  PEFT. The base is loaded in fp32 on the CPU, the adapter merged there (W + alpha/r * B A:
  what PEFT's forward adds), and only then cast to ``--dtype`` for saving: fp32 (the
  default) holds the merged weights exactly, bf16 / fp16 halve the size and round each
  weight once. An fp32 copy of the base must fit in memory.
- ``--adapter OUT``: a clean PEFT folder, ``adapter_config.json`` (its
  ``base_model_name_or_path`` the base model's name) and ``adapter_model.safetensors``,
  without the run's other files.

Both get a model card, ``README.md`` (``fedit.export.card``). The argument is resolved as
``fedit eval`` resolves it (``fedit.evaluate.runner.resolve_target``): a run folder
exports ``final/adapter``; an adapter folder inside a run (``rounds/NNNN/adapter``) gets
the run's card. OUT is written whole in a temporary folder beside it, then renamed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from fedit.errors import ConfigError, ModelError
from fedit.evaluate.runner import (
    ADAPTER_CONFIG,
    FINAL_ADAPTER,
    EvalTarget,
    load_eval_model,
    resolve_target,
)
from fedit.export.card import CardFacts, model_card
from fedit.federation.checkpoint import read_metrics
from fedit.federation.loop import Log
from fedit.io import atomic_dir
from fedit.model.adapter import ADAPTER_WEIGHTS
from fedit.model.device import parse_dtype

SAVE_DTYPES = ("fp32", "bf16", "fp16")
CARD = "README.md"


def export(target: str, *, merged: Path | None = None, adapter: Path | None = None,
           model: str | None = None, dtype: str | None = None, force: bool = False,
           log: Log = print) -> Path:
    """Export ``target`` (a run or adapter folder) to ``merged`` or ``adapter``; returns OUT.

    Raises
    ------
    ConfigError
        Neither or both of ``merged``/``adapter``; ``base``; OUT not empty (without
        ``force``) or holding the adapter itself; a bad ``dtype``.
    ModelError
        The adapter cannot be read or loaded onto its base.
    """
    if (merged is None) == (adapter is None):
        raise ConfigError("give one of --merged OUT (base + adapter, merged) or --adapter OUT "
                          "(a PEFT folder)")
    if target == "base" or target.startswith("base:"):
        raise ConfigError(f"{target}: the untuned base model has no adapter to export; give a "
                          "run folder or an adapter folder")
    if adapter is not None and dtype is not None:
        raise ConfigError("--dtype is for --merged; an adapter is exported as saved (fp32)")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ConfigError(f"--dtype {dtype}: use one of {', '.join(SAVE_DTYPES)}")
    out = Path(merged or adapter)  # type: ignore[arg-type]
    t = resolve_target(target, model=model)
    assert t.adapter is not None  # a run or adapter target always has one
    check_out(out, t.adapter, force)
    facts = card_facts(t, "merged" if merged else "adapter", out, dtype or "fp32")
    log(f"exporting {t.adapter} ({'merged into ' if merged else 'on '}{t.cfg.model.name}) "
        f"to {out}")
    if merged is not None:
        write_merged(t, out, dtype or "fp32", model_card(facts), log)
    else:
        write_adapter(t, out, model_card(facts))
    return out


def check_out(out: Path, source: Path, force: bool) -> None:
    """OUT may be new, empty, or (with ``force``) replaced, but never hold ``source``."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file: OUT must be a folder")
    src = source.resolve()
    if out.resolve() == src or out.resolve() in src.parents:
        raise ConfigError(f"{out} holds the adapter being exported ({source}): choose another "
                          "folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty: choose another folder, or pass "
                          "--force to replace it")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read it ({e})") from None


def _round_of(rel: Path) -> int | None:
    """The round of ``rounds/NNNN/adapter``; None for ``final/adapter``."""
    return int(rel.parts[1]) if rel.parts[0] == "rounds" else None


def _metrics(run: Path, last: int | None) -> list[dict[str, Any]]:
    """The run's metrics.jsonl lines, up to round ``last`` (None: all)."""
    if not (run / "metrics.jsonl").is_file():
        return []
    return [m for m in read_metrics(run) if last is None or int(m.get("round", 0)) <= last]


def _evals(t: EvalTarget) -> list[tuple[str, dict[str, Any]]]:
    """The eval.json files about this adapter: in its folder, the folder holding it (a
    round's, an experiment arm's) and, for ``final/adapter``, the run folder's."""
    assert t.adapter is not None
    places = [(t.adapter, "adapter folder"), (t.adapter.parent, f"{t.adapter.parent.name}/")]
    if t.run_dir is not None and t.adapter.resolve() == (t.run_dir / FINAL_ADAPTER).resolve():
        places.append((t.run_dir, "run folder"))
    found, seen = [], set()
    for folder, where in places:
        path = (folder / "eval.json").resolve()
        if path.is_file() and path not in seen:
            seen.add(path)
            found.append((where, _read_json(path)))
    return found


def card_facts(t: EvalTarget, kind: str, out: Path, dtype: str) -> CardFacts:
    """What the model card of ``t`` says, read from its run folder (if any)."""
    assert t.adapter is not None
    lora = _read_json(t.adapter / ADAPTER_CONFIG)
    facts = CardFacts(kind=kind, base_model=t.cfg.model.name, folder=out.name, lora=lora,
                      evals=_evals(t), dtype=dtype if kind == "merged" else None,
                      source=f"adapter `{t.adapter.name}`")
    if t.run_dir is None:  # the default config resolve_target made says nothing true
        return facts
    rel = t.adapter.resolve().relative_to(t.run_dir.resolve())
    summary = t.run_dir / "summary.json"
    return dataclasses.replace(
        facts, cfg=t.cfg, source=f"run `{t.run_dir.resolve().name}`, `{rel.as_posix()}`",
        metrics=_metrics(t.run_dir, _round_of(rel)),
        summary=_read_json(summary) if summary.is_file() else {})


def write_adapter(t: EvalTarget, out: Path, card: str) -> None:
    """A PEFT folder: the adapter's weights, its config naming the base, the card."""
    assert t.adapter is not None
    weights = t.adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{t.adapter}: no {ADAPTER_WEIGHTS} (only safetensors adapters are "
                         "exported)")
    config = _read_json(t.adapter / ADAPTER_CONFIG)
    config |= {"base_model_name_or_path": t.cfg.model.name, "inference_mode": True}
    with atomic_dir(out) as tmp:
        shutil.copyfile(weights, tmp / ADAPTER_WEIGHTS)
        text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (tmp / ADAPTER_CONFIG).write_text(text, encoding="utf-8")
        (tmp / CARD).write_text(card, encoding="utf-8")


def write_merged(t: EvalTarget, out: Path, dtype: str, card: str, log: Log) -> None:
    """The base with the adapter merged in fp32, cast to ``dtype``, tokenizer and card."""
    fp32 = dataclasses.replace(t.cfg.model, dtype="fp32", device="cpu", quantization=0)
    tokenizer, lm = load_eval_model(dataclasses.replace(t, cfg=dataclasses.replace(
        t.cfg, model=fp32)))
    log("merging in fp32 on the CPU")
    model = lm.merge_and_unload()
    model.config.use_cache = True  # fedit trains without the KV cache; generation wants it
    model.to(parse_dtype(dtype))
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / CARD).write_text(card, encoding="utf-8")
