"""What a server serves: the base model and every adapter found under the paths it was given.

Names are stable and follow the folders: a run folder ``runs/R`` gives ``R`` (its final
adapter), ``R/round-0005`` (each kept round) and ``R/personal-0003`` (client 3's personal
adapter, ``[personalize]``); an adapter folder gives its own name (or,
inside a run, the run's name as above); any other folder (an experiment's, say) is searched
for runs and adapters, named by their path below it: ``exp/centralized``,
``exp/local-only/client-03``. ``base`` is always the base model without an adapter.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.config import load_config
from fedit.data.prompts import TEMPLATES
from fedit.errors import ConfigError, ModelError
from fedit.evaluate.runner import (
    ADAPTER_CONFIG,
    CONFIG_FILE,
    FINAL_ADAPTER,
    adapter_base,
    run_of_adapter,
)
from fedit.federation.checkpoint import read_metrics

BASE = "base"
_MAX_DEPTH = 4  # how deep a plain folder is searched for runs and adapters


@dataclass
class ServedModel:
    """One name a client can ask for."""

    name: str
    adapter: Path | None  # None: the base model
    base_model: str | None = None  # the base the adapter names (base_model_name_or_path)
    run: Path | None = None  # the run folder it belongs to
    round: int | None = None  # None: the run's final adapter
    template: str | None = None  # the run's prompt template, when it has a run
    created: int = 0

    def card(self) -> dict[str, Any]:
        """The ``/v1/models`` entry (OpenAI's fields plus ``fedit``'s)."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "fedit",
                "fedit": {"adapter": str(self.adapter) if self.adapter else None,
                          "run": self.run.name if self.run else None, "round": self.round,
                          "template": self.template,
                          "has_metrics": self.metrics_file() is not None}}

    def metrics_file(self) -> Path | None:
        if self.run is None:
            return None
        path = self.run / "metrics.jsonl"
        return path if path.is_file() else None


@dataclass
class Catalog:
    """Every served model by name, the base model they share and the prompt template."""

    models: dict[str, ServedModel] = field(default_factory=dict)
    base_model: str = ""
    template: str = "chat"

    def default_pair(self) -> tuple[str, str]:
        """What the chat page compares first: base vs the first run's final adapter (else
        the first adapter)."""
        runs = [m.name for m in self.models.values() if m.run and m.adapter and m.round is None]
        adapters = [m.name for m in self.models.values() if m.adapter]
        return BASE, (runs or adapters or [BASE])[0]

    def loss_curve(self, name: str) -> dict[str, Any]:
        """The held-out loss per round of the run a model belongs to (metrics.jsonl)."""
        model = self.models[name]
        if model.run is None or model.metrics_file() is None:
            raise ConfigError(f"model {name!r} has no run with a metrics.jsonl")
        lines = read_metrics(model.run)
        points = [(int(x["round"]), x.get("eval_loss")) for x in lines if "round" in x]
        return {"model": name, "run": model.run.name if model.run else None,
                "round": model.round,
                "rounds": [r for r, v in points if v is not None],
                "eval_loss": [v for _, v in points if v is not None]}


def build_catalog(paths: list[str], model: str | None = None,
                  template: str | None = None) -> Catalog:
    """Find every adapter under ``paths``; check they share one base model (or ``model``)."""
    if template is not None and template not in TEMPLATES:
        raise ConfigError(f"--template {template}: use one of {', '.join(TEMPLATES)}")
    catalog = Catalog()
    found: list[ServedModel] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(f"{raw}: no such run or adapter folder")
        entries = _entries(path)
        if not entries:
            raise ConfigError(f"{raw}: no run folder ({CONFIG_FILE}) or adapter folder "
                              f"({ADAPTER_CONFIG}) in it")
        found += entries
    for entry in found:
        if entry.name in catalog.models or entry.name == BASE:
            other = catalog.models.get(entry.name)
            where = f" and {other.adapter}" if other else ""
            raise ConfigError(f"two models named {entry.name!r} ({entry.adapter}{where}): "
                              "serve them from folders with different names")
        catalog.models[entry.name] = entry
    bases = {m.base_model for m in found if m.base_model}
    if model is None and len(bases) > 1:
        raise ModelError(f"the adapters name different base models ({', '.join(sorted(bases))})"
                         ": serve each base separately, or pass --model")
    if model is None and not bases and found:
        raise ModelError(f"{found[0].adapter}: the adapter names no base model "
                         "(base_model_name_or_path): pass --model")
    catalog.base_model = model or (bases.pop() if bases else "")
    templates = {m.template for m in found if m.template}
    catalog.template = template or (sorted(templates)[0] if len(templates) == 1 else "chat")
    catalog.models = {BASE: ServedModel(BASE, None, catalog.base_model), **catalog.models}
    return catalog


def _entries(path: Path, depth: int = 0, prefix: str | None = None) -> list[ServedModel]:
    """The servable adapters under ``path`` (a run, an adapter, or a folder holding them)."""
    if (path / CONFIG_FILE).is_file():
        return _run_entries(path, prefix or path.resolve().name)
    if (path / ADAPTER_CONFIG).is_file():
        run = run_of_adapter(path)
        if run is not None and prefix is None:
            return [e for e in _run_entries(run, run.name) if e.adapter == path.resolve()]
        folder = path.resolve()
        own = folder.parent.name if folder.name == "adapter" else folder.name  # arm/adapter
        return [_adapter_entry(prefix or own, folder)]
    if depth >= _MAX_DEPTH or not path.is_dir():
        return []
    top = prefix or path.resolve().name
    out: list[ServedModel] = []
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        name = f"{top}/{child.name}"
        if child.name == "adapter" and (child / ADAPTER_CONFIG).is_file():
            name = top  # exp/centralized/adapter is served as exp/centralized
        out += _entries(child, depth + 1, name)
    return out


def _run_entries(run: Path, name: str) -> list[ServedModel]:
    run = run.resolve()
    cfg = load_config(run / CONFIG_FILE, [])
    out: list[ServedModel] = []
    final = run / FINAL_ADAPTER
    if (final / ADAPTER_CONFIG).is_file():
        out.append(_adapter_entry(name, final, run, None, cfg.data.template))
    rounds = run / "rounds"
    for folder in sorted(rounds.iterdir()) if rounds.is_dir() else []:
        adapter = folder / "adapter"
        if re.fullmatch(r"\d+", folder.name) and (adapter / ADAPTER_CONFIG).is_file():
            rnd = int(folder.name)
            out.append(_adapter_entry(f"{name}/round-{rnd:04d}", adapter, run, rnd,
                                      cfg.data.template))
    for adapter in sorted(run.glob("personal/client_*/adapter")):
        client = adapter.parent.name.removeprefix("client_")
        if re.fullmatch(r"\d+", client) and (adapter / ADAPTER_CONFIG).is_file():
            out.append(_adapter_entry(f"{name}/personal-{client}", adapter, run, None,
                                      cfg.data.template))
    return out


def _adapter_entry(name: str, adapter: Path, run: Path | None = None, rnd: int | None = None,
                   template: str | None = None) -> ServedModel:
    return ServedModel(name, adapter, adapter_base(adapter), run, rnd, template,
                       int(os.path.getmtime(adapter / ADAPTER_CONFIG)))
