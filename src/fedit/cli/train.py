"""``fedit train`` and ``fedit strategies``: run a federated job, list what it can use."""

# Modules that import torch (the runtimes) are imported inside the commands, so that
# `fedit --help` does not wait seconds for them; light ones are imported here.

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedit.algorithms.catalog import catalog_lines
from fedit.cli.errors import one_line_errors, resume_hint
from fedit.config import load_config
from fedit.errors import FeditError
from fedit.federation.loop import communication_text
from fedit.federation.rundir import named, run_dir_of


def _log(message: str) -> None:
    typer.echo(message, err=True)


@one_line_errors
def train(
    config: Annotated[Path | None, typer.Argument(
        help="TOML run config, e.g. configs/quickstart.toml (not with --resume)")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a key: --set rounds=5 --set train.lr=1e-4"),
    ] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="continue the run in this folder after its last committed round "
                         "(its own config.toml)")] = None,
) -> None:
    """Run a federated job in one process (the in-process runtime) and print a summary;
    --resume RUN_DIR continues a run that was stopped, from its last committed round."""
    from fedit.runtimes.inprocess import resume_federated, run_federated

    if resume is not None:
        if config is not None or set_:
            raise FeditError("--resume takes the run's own config.toml: give no CONFIG "
                             "and no --set")
        with resume_hint(resume):
            summary = resume_federated(resume, log=_log)
    elif config is None:
        raise FeditError("give a CONFIG file (e.g. configs/quickstart.toml) or --resume "
                         "RUN_DIR")
    else:
        cfg = named(load_config(config, set_ or []), config.stem)
        with resume_hint(run_dir_of(cfg)):
            summary = run_federated(cfg, stem=config.stem, log=_log)
    typer.echo("\n" + format_train_summary(summary))


def format_train_summary(summary: dict[str, Any]) -> str:
    """What `fedit train` prints at the end (a run with no held-out rows says so)."""
    base, final = summary["base_eval_loss"], summary["final_eval_loss"]
    if base is None or final is None:
        held_out = "no held-out rows (data.test_per_label = 0): no held-out loss"
    else:
        change = 100 * (final - base) / base if base else 0.0
        dpo = summary.get("objective", {}).get("name") == "dpo"
        what = "DPO loss (per pair)" if dpo else "response loss"
        start = "starting adapter" if summary.get("init_from") else "base model"
        held_out = (f"held-out {what} on {summary['test_rows']} {'pairs' if dpo else 'rows'}: "
                    f"{start} {base:.4f} -> global adapter {final:.4f} ({change:+.1f}%)")
    dropped = f"; {summary['dropped']} client replies dropped" if summary.get("dropped") else ""
    if summary.get("epsilon") is not None:
        held_out += (f"\nprivacy: (epsilon, delta) = ({summary['epsilon']:.3g}, "
                     f"{summary['delta']:g}) spent over the run")
    comm = communication_text(summary)
    dropped += f"\ncommunication: {comm}" if comm else ""
    return (f"{held_out}\n{summary['rounds']} rounds over {summary['clients']} clients in "
            f"{summary['seconds']:.0f} s{dropped}\nrun folder: {summary['run_dir']}\n"
            f"final adapter: {summary['final_adapter']}")


def strategies() -> None:
    """List the federated algorithms, aggregation rules, privacy, compression and LoRA rank
    options, with their config keys and defaults (see docs/strategies.md)."""
    typer.echo("\n".join(catalog_lines()))
