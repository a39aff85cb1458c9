"""``fedit experiment`` and ``fedit report``: the paper's comparison and its HTML page."""

# fedit.experiment trains and evaluates (torch, transformers): it is imported inside the
# command, so that `fedit --help` does not wait seconds for it.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.errors import one_line_errors
from fedit.cli.task_options import AllowCode, NumFewshot, Suite, TaskFiles, TaskLimit, Tasks
from fedit.report import build_report


def _log(message: str) -> None:
    typer.echo(message, err=True)


@one_line_errors
def experiment_cmd(
    name: Annotated[str, typer.Argument(
        help="fedit-paper (instruction tuning) | fedit-dpo (federated DPO on self-play "
             "preference pairs)")],
    scale: Annotated[
        str, typer.Option(help="fedit-paper: test (tiny, for tests) | small (~25 min bf16, "
                               "~90 fp32 CPU) | medium (~75 min measured, bf16 CPU path) | "
                               "full (the reference setting, for a GPU); fedit-dpo: test | "
                               "small (~1 h on 2 fp32 CPU cores)")
    ] = "small",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="folder (default runs/<name>-<scale>)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a key: --set rounds=6 "
                                   "--set experiment.local_clients=3"),
    ] = None,
    seeds: Annotated[int, typer.Option(
        help="repeat the arms with seeds seed..seed+N-1, each in <out>/seed-<s>/; "
             "experiment.json: mean ± sd across seeds")] = 1,
    tasks: Tasks = None,
    task_file: TaskFiles = None,
    suite: Suite = None,
    num_fewshot: NumFewshot = None,
    task_limit: TaskLimit = None,
    allow_code_execution: AllowCode = False,
) -> None:
    """The FedIT paper's comparison: base, local-only, FedIT and centralized on one held-out
    set with the same compute budget (fedit-dpo: the same arms trained with DPO, scored on
    held-out preference pairs); an arm already evaluated in --out is skipped."""
    from fedit.evaluate.tasks import task_spec
    from fedit.experiment.run import format_summary, run_experiment
    from fedit.experiment.seeds import format_seeds, run_seeds

    spec = task_spec(tasks, task_file or [], suite, num_fewshot=num_fewshot, limit=task_limit,
                     allow_code=allow_code_execution)
    if seeds == 1:  # a plain experiment, in <out> itself
        summary = run_experiment(name, scale, out, set_ or [], log=_log, tasks=spec)
        reports = [build_report(Path(summary["out"]))]
        table = format_summary(summary)
    else:
        summary = run_seeds(name, scale, seeds, out, set_ or [], log=_log, tasks=spec)
        reports = [build_report(Path(summary["out"]) / f) for f in summary["folders"].values()]
        reports.append(build_report(Path(summary["out"])))  # the page across seeds
        table = format_seeds(summary)
    typer.echo(f"\n{table}\n\nexperiment folder: {summary['out']}\nreport: "
               + ", ".join(str(r) for r in reports))


@one_line_errors
def report_cmd(
    folder: Annotated[Path, typer.Argument(help="run folder or experiment folder")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML file (default <folder>/report.html)")
    ] = None,
) -> None:
    """A self-contained HTML page (plots embedded) of a run or an experiment; the PNGs are
    also written beside it."""
    path = build_report(folder, out)
    typer.echo(f"wrote {path}")
