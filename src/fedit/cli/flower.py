"""``fedit flower local`` and ``fedit flower worker``: fedit on a Flower federation."""

# The Flower runtime imports flwr, torch and transformers: it is imported inside the
# commands, so that `fedit --help` does not wait seconds for them.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.errors import one_line_errors
from fedit.cli.train import format_train_summary


def _log(message: str) -> None:
    typer.echo(message, err=True)


@one_line_errors
def flower_local(
    config: Annotated[Path, typer.Argument(help="TOML run config, e.g. configs/quickstart.toml")],
    nodes: Annotated[int, typer.Option(help="SuperNodes to start (= partition.clients)")] = 2,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key: --set rounds=5")
    ] = None,
    tls: Annotated[bool, typer.Option(help="TLS with a private CA made for this run")] = False,
    auth: Annotated[bool, typer.Option(help="only registered SuperNodes may join")] = False,
    isolation: Annotated[
        str, typer.Option(help="process (default: a long-lived worker per node keeps the "
                               "model and data loaded) | subprocess (Flower's own default: "
                               "a ClientApp process per message loads them every round)")
    ] = "process",
    workdir: Annotated[
        Path | None, typer.Option(help="logs and credentials (default <output_dir>/.flower/)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds before the run is stopped")] = 3600,
) -> None:
    """Run a config on a local Flower federation (127.0.0.1): a SuperLink, N SuperNodes
    (partition-id 0..N-1), `flwr run`; every process is stopped at the end."""
    from fedit.runtimes.flower.local import run_local

    summary = run_local(config, nodes=nodes, overrides=set_ or [], tls=tls, auth=auth,
                        isolation=isolation, workdir=workdir, timeout=timeout,
                        log=_log)
    typer.echo("\n" + format_train_summary(summary))


def flower_worker(
    runtime_api_address: Annotated[
        str, typer.Option(help="the SuperNode's runtime API (its --port)")
    ] = "127.0.0.1:9094",
    root_certificates: Annotated[
        Path | None, typer.Option(help="CA file when that API uses TLS")
    ] = None,
    parent_pid: Annotated[
        int | None, typer.Option(help="exit when this process (the SuperNode) is gone")
    ] = None,
) -> None:
    """Take a SuperNode's ClientApp tasks in one long-lived process (start the SuperNode
    with --isolation process): the base model is loaded once, not per message."""
    from fedit.runtimes.flower.worker import run_worker

    certs = root_certificates.read_bytes() if root_certificates else None
    run_worker(runtime_api_address, certs, parent_pid=parent_pid)
