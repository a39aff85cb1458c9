"""What ``fedit eval`` evaluates: a run folder, a PEFT adapter folder, or the base model.

- a run folder (it has ``config.toml``): its config, ``final/adapter`` and ``test.jsonl``;
- an adapter folder (it has ``adapter_config.json``): the base model it names (or
  ``--model``); inside a run (``final/adapter``, ``rounds/NNNN/adapter``) the run's config
  too, so the prompt template and cutoff are the ones it was trained with;
- ``base`` or ``base:<model>``: the untuned base model (``[model] name`` by default).

For a run folder whose clients have their own held-out rows (``client_test/``, from
``data.test_per_client``) the result also holds ``per_client``: each client's loss on its
own rows under the global adapter and, when the run saved one (``[personalize]``), under
its personal adapter (``personal/client_NNNN/adapter``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedit.client.losses import evaluate_loss
from fedit.client.objective import SFT
from fedit.client.personalize import personal_adapter_dir
from fedit.config import RunConfig, load_config
from fedit.data.invalid import RowCounts
from fedit.data.load import load_rows
from fedit.errors import ConfigError, DataError, ModelError
from fedit.evaluate.evaluation import evaluate_model, write_eval
from fedit.evaluate.preference import evaluate_preferences, preference_rows
from fedit.evaluate.tasks import TaskSpec, prepare_tasks, run_tasks, write_task_samples
from fedit.io import atomic_write_text
from fedit.model.adapter import (
    adapter_names,
    get_adapter_arrays,
    load_adapter_arrays,
    set_adapter_arrays,
)
from fedit.model.base import load_base_model, load_tokenizer
from fedit.model.device import pick_device

Log = Callable[[str], None]

CONFIG_FILE = "config.toml"
ADAPTER_CONFIG = "adapter_config.json"
FINAL_ADAPTER = Path("final") / "adapter"
TEST_FILE = "test.jsonl"
CLIENT_TEST_DIR = "client_test"  # <run>/client_test/client_NNNN.jsonl
PER_CLIENT_FILE = "per_client.txt"  # the per-client table, beside eval.json


@dataclass
class EvalTarget:
    """A resolved ``fedit eval`` argument."""

    kind: str  # "run" | "adapter" | "base"
    cfg: RunConfig  # cfg.model.name is the base model to load
    adapter: Path | None = None
    run_dir: Path | None = None
    like: Path | None = None  # base --like RUN: the run whose settings it takes

    @property
    def default_test(self) -> Path | None:
        run = self.run_dir or self.like
        return run / TEST_FILE if run is not None else None

    @property
    def default_out(self) -> Path | None:
        if self.kind == "run":
            return self.run_dir
        return self.adapter  # an adapter folder keeps its own eval; base: --out is needed


def run_of_adapter(adapter: Path) -> Path | None:
    """The run folder holding ``adapter`` when it is ``final/adapter``, ``rounds/N/adapter``
    or ``personal/client_N/adapter``."""
    parts = adapter.resolve().parts
    if len(parts) >= 3 and parts[-2:] == ("final", "adapter"):
        run = adapter.resolve().parents[1]
    elif len(parts) >= 4 and parts[-1] == "adapter" and (
            (parts[-3] == "rounds" and re.fullmatch(r"\d+", parts[-2]))
            or (parts[-3] == "personal" and re.fullmatch(r"client_\d+", parts[-2]))):
        run = adapter.resolve().parents[2]
    else:
        return None
    return run if (run / CONFIG_FILE).is_file() else None


def adapter_base(adapter: Path) -> str | None:
    path = adapter / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read the adapter config ({e})") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(base) if base else None


def resolve_target(target: str, *, model: str | None = None,
                   overrides: list[str] | None = None, like: Path | None = None) -> EvalTarget:
    """Resolve ``RUN_OR_ADAPTER`` (with ``--model``, ``--set`` and, for the base model,
    ``--like RUN``: the run's config, so its data and eval settings) to what is evaluated."""
    overrides = overrides or []
    is_base = target == "base" or target.startswith("base:")
    if like is not None and not is_base:
        raise ConfigError(f"--like is only for base / base:<model> (got {target}): a run "
                          "or an adapter is evaluated with its own settings")
    if is_base:
        cfg = load_config(_like_config(like), overrides)
        name = model or target.partition(":")[2] or cfg.model.name
        return EvalTarget("base", dataclasses.replace(cfg, model=_with_name(cfg, name)),
                          like=like)
    path = Path(target).expanduser()
    if not path.exists():
        raise ConfigError(f"{target}: no such run folder or adapter folder "
                          "(or say base / base:<model> for the untuned base model)")
    if (path / CONFIG_FILE).is_file() and path.is_dir():
        cfg = load_config(path / CONFIG_FILE, overrides)
        adapter = path / FINAL_ADAPTER
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise ModelError(f"{path}: run folder has no {FINAL_ADAPTER} (the run has not "
                             f"finished?); pass a round's adapter, e.g. {path}/rounds/0001/adapter")
        name = model or cfg.model.name
        return EvalTarget("run", _replace_model(cfg, name), adapter, path)
    if (path / ADAPTER_CONFIG).is_file():
        run = run_of_adapter(path)
        cfg = load_config(run / CONFIG_FILE if run else None, overrides)
        found = model or adapter_base(path) or (cfg.model.name if run else None)
        if not found:
            raise ModelError(f"{path / ADAPTER_CONFIG} names no base model "
                             "(base_model_name_or_path): pass --model")
        return EvalTarget("adapter", _replace_model(cfg, found), path, run)
    raise ConfigError(f"{target}: not a run folder (no {CONFIG_FILE}) nor an adapter folder "
                      f"(no {ADAPTER_CONFIG})")


def _like_config(like: Path | None) -> Path | None:
    """The config.toml of the ``--like`` run folder (None without ``--like``)."""
    if like is None:
        return None
    if not (like / CONFIG_FILE).is_file():
        raise ConfigError(f"--like {like}: not a run folder (no {CONFIG_FILE}); name the run "
                          "whose data and eval settings the base model should take")
    return like / CONFIG_FILE


def _with_name(cfg: RunConfig, name: str) -> Any:
    return dataclasses.replace(cfg.model, name=name)


def _replace_model(cfg: RunConfig, name: str) -> RunConfig:
    return dataclasses.replace(cfg, model=_with_name(cfg, name))


def load_eval_rows(
    on: str | None, target: EvalTarget, max_rows: int = 0, log: Log | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """The held-out rows (``--on``, else the run's test.jsonl) and where they came from.

    ``max_rows``: a random subset of that many rows (seeded by the config's seed, in file
    order), for a quick look. Invalid rows follow the config's ``data.invalid_rows``;
    ``log`` hears what was skipped."""
    if on is None:
        test = target.default_test
        if test is None:
            raise DataError("no held-out file: pass --on FILE (the base model and an adapter "
                            "outside a run folder have no test.jsonl)")
        if not test.is_file():
            raise DataError(f"{test}: the run's held-out file is missing; pass --on FILE")
        if target.run_dir is not None and (target.run_dir / CLIENT_TEST_DIR).is_dir() \
                and not test.read_text(encoding="utf-8").strip():
            return [], str(test)  # data.test_per_label = 0: only the clients' own rows
        on = str(test)
    fields = target.cfg.data.fields or None
    counts = RowCounts.from_config(target.cfg.data)
    try:
        rows = load_rows(on, fields, invalid=counts)
    except DataError as first:
        if fields is None:
            raise
        # A run's own test.jsonl is already in canonical columns (instruction, context,
        # response), whatever data.fields mapped when the run read its source.
        try:
            counts = RowCounts.from_config(target.cfg.data)
            rows = load_rows(on, None, invalid=counts)
        except DataError:
            raise first from None
    for line in counts.log_lines(on):
        if log is not None:
            log(line)
    if max_rows < 0:
        raise ConfigError(f"--max-rows {max_rows}: must be >= 0 (0 = every row)")
    if max_rows and max_rows < len(rows):
        keep = np.random.default_rng(target.cfg.seed).choice(len(rows), max_rows, replace=False)
        rows = [rows[i] for i in sorted(keep)]
    return rows, on


def load_eval_model(target: EvalTarget) -> tuple[Any, Any]:
    """Tokenizer and the model to evaluate: the base, with the adapter loaded if any."""
    m = target.cfg.model
    tokenizer = load_tokenizer(m.name)
    model = load_base_model(m.name, dtype=m.dtype, device=pick_device(m.device),
                            quantization=m.quantization or None)
    if target.adapter is None:
        return tokenizer, model
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            model = PeftModel.from_pretrained(model, str(target.adapter), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"{target.adapter}: cannot load the adapter onto {m.name} "
                         f"({reason}); is --model the base it was trained on?") from e
    return tokenizer, model.eval()


def run_eval(
    target: str, *, on: str | None = None, out: Path | None = None, max_rows: int = 0,
    model: str | None = None, overrides: list[str] | None = None, generate: bool = True,
    like: Path | None = None, log: Log = print, tasks: TaskSpec | None = None,
    heldout: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]], Path]:
    """``fedit eval``: resolve, load, evaluate, write eval.json + answers.jsonl (and
    per_client.txt for a run with per-client held-out rows); returns (result, answers,
    the folder written).

    ``tasks``: benchmark tasks (:mod:`fedit.evaluate.tasks`) scored on the same model,
    their results in eval.json's ``"tasks"`` and their documents in tasks.jsonl. With
    tasks, the held-out rows are scored too when there are some (``--on``, the run's
    test.jsonl) unless ``heldout`` is False."""
    t = resolve_target(target, model=model, overrides=overrides, like=like)
    out_dir = out if out is not None else t.default_out
    if out_dir is None:
        raise ConfigError("evaluating the base model: pass --out DIR for eval.json")
    if not heldout and not tasks:
        raise ConfigError("--no-heldout leaves nothing to evaluate: give --tasks, "
                          "--task-file or --suite")
    rows: list[dict[str, Any]] | None = None
    source = ""
    answers: list[dict[str, Any]] = []
    if heldout and (on is not None or t.default_test is not None or not tasks):
        rows, source = load_eval_rows(on, t, max_rows, log)
    prepared = None
    if tasks:  # built (data read) before the model is loaded: a missing data set stops now
        spec = dataclasses.replace(tasks, batch_size=t.cfg.eval.batch_size)
        prepared = prepare_tasks(spec)
    what = f" on {len(rows)} rows of {source}" if rows is not None else " (tasks only)"
    log(f"evaluating {t.cfg.model.name}" + (f" + {t.adapter}" if t.adapter else "") + what)
    tokenizer, lm = load_eval_model(t)
    if rows is None:
        result = tasks_only_result(t.cfg)
        pairs = False
    else:
        pairs = bool(preference_rows(rows, source))  # pairs: preference metrics (DPO)
        evaluate = evaluate_preferences if pairs else evaluate_model
        result, answers = evaluate(lm, tokenizer, rows, t.cfg, generate=generate, log=log)
    result["settings"] |= {"adapter": str(t.adapter) if t.adapter else None,
                           "run": str(t.run_dir) if t.run_dir else None,
                           "test_file": source or None, "max_rows": max_rows,
                           "like": str(t.like) if t.like else None}
    if prepared is not None:
        result["tasks"], samples = run_tasks(lm, tokenizer, prepared, log)
        write_task_samples(out_dir, samples)
    if t.kind == "run" and t.run_dir is not None and rows is not None and not pairs:
        per_client = per_client_losses(lm, tokenizer, t.run_dir, t.cfg)
        if per_client:
            result["per_client"] = per_client
            log(f"per-client loss on each client's own held-out rows ({len(per_client)} "
                f"clients, {CLIENT_TEST_DIR}/)")
        elif (t.run_dir / "personal").is_dir():
            log("the run has personal adapters but its clients hold out no rows of their "
                "own: train with data.test_per_client = N to compare them per client")
    write_eval(out_dir, result, answers)
    if result.get("per_client"):

        atomic_write_text(out_dir / PER_CLIENT_FILE, format_per_client(result["per_client"])
                          + "\n")
    return result, answers, out_dir


def tasks_only_result(cfg: RunConfig) -> dict[str, Any]:
    """The eval.json of an evaluation on benchmark tasks alone (no held-out rows)."""
    return {"overall": {"rows": 0}, "by_category": {},
            "settings": {"kind": "tasks", "rows": 0, "model": cfg.model.name,
                         "dtype": cfg.model.dtype}}


def per_client_losses(model: Any, tokenizer: Any, run_dir: Path, cfg: RunConfig
                      ) -> list[dict[str, Any]]:
    """Each client's response-token loss on its own held-out rows (``client_test/``),
    under the model's adapter (the global one) and the client's personal adapter when the
    run saved one; [] when the run has no per-client held-out rows. The model's adapter
    is left as it was."""

    files = sorted((run_dir / CLIENT_TEST_DIR).glob("client_*.jsonl"))
    if not files:
        return []
    global_arrays, names = get_adapter_arrays(model), adapter_names(model)
    client_names = _client_names(run_dir)
    out = []
    try:
        for file in files:
            client = int(file.stem.removeprefix("client_"))
            rows = load_rows(str(file), None) if file.stat().st_size else []
            examples = _examples(tokenizer, rows, cfg)
            personal = personal_adapter_dir(run_dir, client)
            has_personal = (personal / "adapter_model.safetensors").is_file()
            entry: dict[str, Any] = {
                "client": client, "name": client_names.get(client),
                "rows": len(rows), "rows_with_loss": len(examples),
                "global_loss": None, "personal_loss": None,
                "personal_adapter": str(personal.relative_to(run_dir)) if has_personal else None,
            }
            if examples:
                entry["global_loss"] = _loss(model, examples, global_arrays, tokenizer, cfg)
                if has_personal:

                    entry["personal_loss"] = _loss(model, examples,
                                                   load_adapter_arrays(personal, names),
                                                   tokenizer, cfg)
            out.append(entry)
    finally:
        set_adapter_arrays(model, global_arrays)
    return out


def _client_names(run_dir: Path) -> dict[int, str]:
    """Client id -> its name (a client folder's label) from partitions/stats.json."""
    try:
        stats = json.loads((run_dir / "partitions" / "stats.json").read_text(encoding="utf-8"))
        return {int(c["client"]): str(c["name"]) for c in stats.get("clients", [])
                if c.get("name")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _examples(tokenizer: Any, rows: list[dict[str, Any]], cfg: RunConfig) -> list[Any]:

    return SFT().examples(tokenizer, rows, cfg.data, "held-out set")[0] if rows else []


def _loss(model: Any, examples: list[Any], arrays: list[np.ndarray], tokenizer: Any,
          cfg: RunConfig) -> float:

    set_adapter_arrays(model, arrays)
    return evaluate_loss(model, examples, cfg.eval.batch_size, int(tokenizer.pad_token_id))


def format_per_client(per_client: list[dict[str, Any]]) -> str:
    """A text table: each client's held-out loss, global vs personal adapter."""
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    width = max([8, *(len(_client_label(e)) + 2 for e in per_client)])
    head = f"{'client':<{width}}{'rows':>6}{'global':>9}{'personal':>10}{'change':>9}"
    lines = [head, "-" * len(head)]
    both = [(e["global_loss"], e["personal_loss"]) for e in per_client
            if e["global_loss"] is not None and e["personal_loss"] is not None]
    for e in per_client:
        g, p = e["global_loss"], e["personal_loss"]
        change = f"{p - g:+.3f}" if g is not None and p is not None else "-"
        lines.append(f"{_client_label(e):<{width}}{e['rows']:>6}{fmt(g):>9}{fmt(p):>10}"
                     f"{change:>9}")
    if both:
        g, p = (float(np.mean(x)) for x in zip(*both, strict=True))
        lines += ["-" * len(head),
                  f"{f'mean of {len(both)}':<{width}}{'':>6}{g:>9.3f}{p:>10.3f}{p - g:>+9.3f}"]
    return "\n".join(lines)


def _client_label(entry: dict[str, Any]) -> str:
    name = entry.get("name")
    return f"{entry['client']} {name}" if name else str(entry["client"])
