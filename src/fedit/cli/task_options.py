"""The benchmark-task options shared by ``fedit eval`` and ``fedit experiment``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Tasks = Annotated[str | None, typer.Option(
    "--tasks", help="lm-evaluation-harness tasks or groups, comma-separated "
                    "(mmlu,arc_easy); needs their data sets (hub or cache)")]
TaskFiles = Annotated[list[Path] | None, typer.Option(
    "--task-file", help="a harness task YAML (or a folder of them); its data files are "
                        "read relative to it. Repeatable")]
Suite = Annotated[str | None, typer.Option(
    "--suite", help="the harness tasks closest to a FlowerTune domain: "
                    "flowertune-general | -medical | -finance | -code")]
NumFewshot = Annotated[int | None, typer.Option(
    "--num-fewshot", help="tasks: few-shot examples (default: each task's own)")]
TaskLimit = Annotated[int | None, typer.Option(
    "--task-limit", help="tasks: only the first N documents of each (a quick look)")]
AllowCode = Annotated[bool, typer.Option(
    "--allow-code-execution", help="tasks: run model-written code (HumanEval, MBPP); do it "
                                   "in a sandbox")]
