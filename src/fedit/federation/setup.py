"""The one run set-up both runtimes use: the config checked, the data split and written,
the model side built (by the runtime, which owns the model), the pipeline made.

The federation layer never touches a model: what the round loop needs of one (the initial
adapter, evaluating an adapter, saving one) comes in as :class:`ModelSide` callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedit.algorithms.contract import Arrays
from fedit.algorithms.pipeline import Pipeline
from fedit.algorithms.setup import check_compatible, pipeline_from_config
from fedit.algorithms.strategies import strategy_from_config
from fedit.config import RunConfig
from fedit.data.clients import with_client_count
from fedit.data.federated import FederatedData, split_data, write_split
from fedit.federation.loggers import check_log_config

Log = Callable[[str], None]
#: an adapter's held-out loss and loss per label; (None, None) when there is no held-out row
Evaluate = Callable[[Arrays], tuple[float | None, dict[str, float] | None]]


@dataclass
class ModelSide:
    """What the round loop needs of the model, handed in by the runtime.

    ``initial``: the adapter before round 1 (LoRA B = 0: the base model; or
    ``lora.init_from``'s arrays);
    ``adapter_names``: its tensors' names in wire order (mixed ranks, FFA-LoRA);
    ``evaluate``: the objective's held-out evaluation of an adapter;
    ``save_adapter(arrays, folder)``: a PEFT adapter folder, returning its weights file;
    ``held_out_rows``: how many held-out rows ``evaluate`` scores;
    ``objective``: the training objective's name and what its ``train_loss`` is (for the
    run summary);
    ``eval_metrics()``: more numbers of the last ``evaluate`` for the metrics line (DPO:
    ``preference_accuracy``, ``reward_margin``)."""

    initial: Arrays
    adapter_names: list[str]
    evaluate: Evaluate
    save_adapter: Callable[[Arrays, Path], Path]
    held_out_rows: int = 0
    objective: dict[str, str] = field(default_factory=dict)
    eval_metrics: Callable[[], dict[str, float]] = dict


@dataclass
class Run:
    """A prepared run: what :class:`~fedit.federation.loop.RoundLoop` drives."""

    cfg: RunConfig
    run_dir: Path
    data: FederatedData
    model: ModelSide
    pipeline: Pipeline


def prepare_run(cfg: RunConfig, run_dir: Path, build_model: Callable[
                    [RunConfig, FederatedData, Path], ModelSide],
                log: Log = print, data: FederatedData | None = None) -> Run:
    """Check the config (once, before anything is written), split the data (or take
    ``data``), write the split into ``run_dir``, let the runtime build the model side,
    and make the pipeline. Errors in the config or the data stop here, with one line."""
    cfg = with_client_count(cfg)
    strategy = strategy_from_config(cfg)
    check_compatible(cfg, strategy)
    check_log_config(cfg.log)  # log.tensorboard / log.wandb without their package
    data = data if data is not None else split_data(cfg, log)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_split(data, run_dir)
    model = build_model(cfg, data, run_dir)
    return Run(cfg, run_dir, data, model,
               pipeline_from_config(cfg, model.adapter_names, strategy))
