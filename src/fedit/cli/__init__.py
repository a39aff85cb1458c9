"""The ``fedit`` command line: the Typer ``app`` and the commands it lists, in this order.

A command is a small function in the module of its group (``train``, ``evaluate``,
``serve``, ``data``, ``flower``, ``experiment``): it parses, calls the library, prints;
``cli.errors`` turns the library's errors into one line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import typer

from fedit.cli import data, evaluate, experiment, flower, serve, train

app = typer.Typer(
    name="fedit",
    help="Federated instruction tuning of LLMs with LoRA: partition data over clients, "
    "train locally, combine the adapters with a federated strategy (FedAvg, FedProx, "
    "SCAFFOLD, FedAdam, ...: see `fedit strategies`), evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Look at data files; build a preference set offline.",
                       no_args_is_help=True)
flower_app = typer.Typer(
    help="Run fedit on Flower: a local SuperLink + SuperNodes, a long-lived ClientApp worker.",
    no_args_is_help=True,
)


def _add(group: typer.Typer, name: str, command: Callable[..., Any]) -> None:
    """Register ``command`` as ``name``, the first paragraph of its docstring as one line.

    Rich keeps a docstring's line breaks in the command list of ``fedit --help``, which
    would cut the descriptions mid-sentence.
    """
    first, blank, rest = inspect.cleandoc(command.__doc__ or "").partition("\n\n")
    group.command(name, help=" ".join(first.split()) + blank + rest)(command)


_add(app, "train", train.train)
_add(app, "strategies", train.strategies)
_add(app, "eval", evaluate.eval_cmd)
_add(app, "export", serve.export_cmd)
_add(app, "serve", serve.serve_cmd)
_add(app, "partition", data.partition_cmd)
_add(app, "judge", evaluate.judge_cmd)
_add(app, "experiment", experiment.experiment_cmd)
_add(app, "report", experiment.report_cmd)
app.add_typer(data_app, name="data")
_add(data_app, "inspect", data.data_inspect)
_add(data_app, "self-play", data.self_play_cmd)
app.add_typer(flower_app, name="flower")
_add(flower_app, "local", flower.flower_local)
_add(flower_app, "worker", flower.flower_worker)

__all__ = ["app"]
