"""A run's curves besides metrics.jsonl: TensorBoard events and a Weights & Biases run.

The round loop hands every committed round to :class:`RunLoggers` (``round``), with the
step losses of the clients that trained in it (``client_steps``: the in-process runtime
records them; a Flower node writes its own with :func:`write_node_steps`), and closes it
at the end or on an error. A round reaches the loggers only once its manifest is
written, so a resumed run never logs a round twice; TensorBoard's round events are also
re-written from the resume point (``purge_step``), which covers a crash between the
manifest and the events.

The run folder holds::

    tensorboard/            one scalar per number of the metrics line, step = round
    tensorboard/clients/    client_NNNN/train_loss, step = (round - 1) * steps + step
    wandb/, wandb.json      W&B's own files (dir = the run folder) and the run id it resumes

Neither package is needed to run fedit: each is imported where its logger is made, after
``importlib.util.find_spec`` says it is there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedit.config import LogConfig, RunConfig
from fedit.errors import ConfigError
from fedit.federation.checkpoint import Manifest
from fedit.io import atomic_write_json, atomic_write_text

TENSORBOARD_DIR = "tensorboard"
CLIENTS_DIR = "clients"
WANDB_DIR = "wandb"
WANDB_ID = "wandb.json"
#: what the loggers write in a run folder (fedit.federation.rundir.RUN_FILES)
LOG_FILES = frozenset({TENSORBOARD_DIR, WANDB_DIR, WANDB_ID})
LAST_STEP = "last_step"  # a node's events folder: the last step written (see write_node_steps)

Log = Callable[[str], None]


def installed(package: str) -> bool:
    """Whether ``package`` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def tensorboard_on(cfg: LogConfig) -> bool:
    """``log.tensorboard``; not set: on when the tensorboard package is installed."""
    return installed("tensorboard") if cfg.tensorboard is None else cfg.tensorboard


def wandb_on(cfg: LogConfig) -> bool:
    return bool(cfg.wandb) and cfg.wandb_mode != "disabled"


def check_log_config(cfg: LogConfig) -> None:
    """A logger asked for whose package is missing: one line saying what to install."""
    if cfg.tensorboard and not installed("tensorboard"):
        raise ConfigError("log.tensorboard = true but the tensorboard package is not "
                          "installed: pip install tensorboard (or set log.tensorboard = false)")
    if wandb_on(cfg) and not installed("wandb"):
        raise ConfigError(f"log.wandb = {cfg.wandb!r} but the wandb package is not installed: "
                          "pip install wandb (or leave log.wandb out)")


def scalars(line: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics line, flat: a table's keys join with ``/``
    (``eval_loss_by_category/open_qa``), a list gives its length as ``<key>_count``
    (``dropped_count``), a bool is 0 or 1; None, text and ``round`` are left out."""
    out: dict[str, float] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}/{k}", v)
        elif isinstance(value, list):
            out[f"{key}_count"] = float(len(value))
        elif isinstance(value, bool | int | float):
            out[key] = float(value)

    for key, value in line.items():
        if key != "round":
            add(key, value)
    return out


def step_tag(client: int) -> str:
    return f"client_{client:04d}/train_loss"


def client_step(rnd: int, steps: int, step: int) -> int:
    """The x of a client's ``step`` (from 1) of round ``rnd``, of ``steps`` steps: it keeps
    increasing across the rounds the client trains in (a client's steps a round are the
    same each round: its data and the config are)."""
    return (rnd - 1) * steps + step


class _Writer(Protocol):  # torch.utils.tensorboard.SummaryWriter, as used here
    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _summary_writer(folder: Path, purge_step: int | None = None) -> _Writer:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder), purge_step=purge_step)


def _add_steps(writer: _Writer, client: int, rnd: int, losses: list[float]) -> None:
    for i, loss in enumerate(losses, start=1):
        writer.add_scalar(step_tag(client), loss, client_step(rnd, len(losses), i))


class TensorBoardLog:
    """The run's events: rounds in ``folder``, clients' steps in ``folder/clients``.

    ``purge_step``: a resumed run's first round; TensorBoard drops what earlier files hold
    from that round on (a round logged, then lost by a crash before its manifest)."""

    def __init__(self, folder: Path, purge_step: int | None = None) -> None:
        self.folder = folder
        self.rounds = _summary_writer(folder, purge_step)
        self.clients: _Writer | None = None  # opened by the first step losses

    def round(self, rnd: int, line: dict[str, Any]) -> None:
        for tag, value in scalars(line).items():
            self.rounds.add_scalar(tag, value, rnd)
        self.rounds.flush()  # a killed run keeps every round it committed

    def client_steps(self, rnd: int, losses: dict[int, list[float]]) -> None:
        if not losses:
            return
        if self.clients is None:
            self.clients = _summary_writer(self.folder / CLIENTS_DIR)
        for client, steps in sorted(losses.items()):
            _add_steps(self.clients, client, rnd, steps)
        self.clients.flush()

    def close(self, failed: bool = False) -> None:
        for writer in (self.rounds, self.clients):
            if writer is not None:
                writer.close()  # flushes


class WandbLog:
    """A W&B run named after the run folder, its files under it, the RunConfig as its
    config; a resumed run resumes the W&B run whose id ``wandb.json`` holds."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool) -> None:
        import wandb

        id_file = run_dir / WANDB_ID
        run_id = (json.loads(id_file.read_text(encoding="utf-8"))["id"]
                  if resume and id_file.is_file() else None)
        mode: Any = cfg.log.wandb_mode or None  # None: WANDB_MODE, else online
        self.run = wandb.init(project=cfg.log.wandb, name=run_dir.name, id=run_id,
                              dir=str(run_dir), config=dataclasses.asdict(cfg),
                              resume="allow", mode=mode)
        atomic_write_json(id_file, {"id": self.run.id, "project": cfg.log.wandb})

    def round(self, rnd: int, line: dict[str, Any]) -> None:
        self.run.log(scalars(line), step=rnd)

    def client_steps(self, rnd: int, losses: dict[int, list[float]]) -> None:
        return None  # W&B gets the rounds; the steps are TensorBoard's

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _Logger(Protocol):
    def round(self, rnd: int, line: dict[str, Any]) -> None: ...
    def client_steps(self, rnd: int, losses: dict[int, list[float]]) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class RunLoggers:
    """The run's loggers as one: what the round loop calls."""

    def __init__(self, loggers: list[_Logger] | None = None) -> None:
        self.loggers = loggers or []

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, resumed: Manifest | None = None
             ) -> RunLoggers:
        """The loggers ``cfg.log`` asks for; ``resumed``: the manifest a resumed run
        continues after (its round is written to TensorBoard again, replacing any copy)."""
        loggers: list[_Logger] = []
        try:
            if tensorboard_on(cfg.log):
                tb = TensorBoardLog(run_dir / TENSORBOARD_DIR,
                                    None if resumed is None else resumed.round)
                loggers.append(tb)
                if resumed is not None:
                    tb.round(resumed.round, resumed.metrics)
            if wandb_on(cfg.log):
                loggers.append(WandbLog(cfg, run_dir, resume=resumed is not None))
        except BaseException:
            cls(loggers).close(failed=True)
            raise
        return cls(loggers)

    def round(self, rnd: int, line: dict[str, Any]) -> None:
        """A committed round's metrics line."""
        for logger in self.loggers:
            logger.round(rnd, line)

    def client_steps(self, rnd: int, losses: dict[int, list[float]]) -> None:
        """Each client's optimizer-step losses in round ``rnd`` (committed)."""
        for logger in self.loggers:
            logger.client_steps(rnd, losses)

    def close(self, failed: bool = False) -> None:
        """Flush and close every logger (each one, even when one fails)."""
        errors = []
        for logger in self.loggers:
            try:
                logger.close(failed)
            except Exception as e:  # the others still close; the first error is raised
                errors.append(e)
        self.loggers = []
        if errors and not failed:
            raise errors[0]


def write_node_steps(folder: Path, client: int, rnd: int, losses: list[float]) -> None:
    """A Flower node's events for one client round, in ``folder`` (one client's): a writer
    a round (a ClientApp process may live for one message). A round written again (the
    server resumed before it) replaces the first copy (``purge_step``); the last step
    written is kept in ``folder/last_step`` so that only then is anything purged."""
    if not losses:
        return
    first = client_step(rnd, len(losses), 1)
    marker = folder / LAST_STEP
    last = int(marker.read_text(encoding="utf-8")) if marker.is_file() else 0
    writer = _summary_writer(folder, purge_step=first if last >= first else None)
    try:
        _add_steps(writer, client, rnd, losses)
    finally:
        writer.close()
    atomic_write_text(marker, str(client_step(rnd, len(losses), len(losses))))
