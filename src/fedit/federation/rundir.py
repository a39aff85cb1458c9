"""The run folder: naming a new run, refusing to overwrite one, reading one to resume."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

from fedit.config import RunConfig, load_config
from fedit.errors import ConfigError
from fedit.federation import checkpoint as ckpt
from fedit.federation.loggers import LOG_FILES

#: what a run writes in its folder (a new run may reuse a folder holding only these)
RUN_FILES = frozenset({"config.toml", "test.jsonl", "partitions", "metrics.jsonl", "rounds",
                       "checkpoint", "final", "summary.json", "personal", "client_test"}
                      ) | LOG_FILES


def named(cfg: RunConfig, stem: str = "run") -> RunConfig:
    """``cfg`` with a name: its own, or the config stem and the time (a new object)."""
    if cfg.name:
        return dataclasses.replace(cfg)
    return dataclasses.replace(cfg, name=f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def run_dir_of(cfg: RunConfig) -> Path:
    """``<output_dir>/<name>`` of a named config."""
    if not cfg.name:
        raise ValueError("run_dir_of: the config has no name yet; name it with named()")
    return Path(cfg.output_dir) / cfg.name


def new_run(cfg: RunConfig, stem: str = "run") -> tuple[RunConfig, Path]:
    """A new run's named config and its folder, checked (no committed round there)."""
    cfg = named(cfg, stem)
    run_dir = run_dir_of(cfg)
    check_new_run_dir(run_dir)
    return cfg, run_dir


def check_new_run_dir(run_dir: Path) -> None:
    """A new run may use ``run_dir`` unless a round was committed there (then: resume)."""
    if ckpt.committed_rounds(run_dir):
        raise ConfigError(f"run folder {run_dir} holds a run that already committed rounds: "
                          f"continue it with `fedit train --resume {run_dir}`, or choose "
                          "another name (--set name=...)")
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in RUN_FILES and not p.name.startswith(".")
                     ) if run_dir.is_dir() else []
    if foreign:  # a run that failed early left only fedit's own files: it may be reused
        raise ConfigError(f"{run_dir} exists and is not a fedit run folder (it holds "
                          f"{foreign[0]}); choose another name (--set name=...)")


def resumed_run(run_dir: Path, option: str = "--resume ") -> RunConfig:
    """The config of the run in ``run_dir`` (its own config.toml), to continue it;
    ``option`` names where the folder was given, for the error."""
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{option}{run_dir}: no config.toml there; is it a run folder?")
    cfg = load_config(run_dir / "config.toml")
    return dataclasses.replace(cfg, output_dir=str(run_dir.parent), name=run_dir.name)
