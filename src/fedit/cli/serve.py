"""``fedit serve`` and ``fedit export``: use a trained adapter outside fedit."""

# fedit.serve and fedit.export import torch and transformers: they are imported inside the
# commands, so that `fedit --help` does not wait seconds for them.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.errors import one_line_errors


def _log(message: str) -> None:
    typer.echo(message, err=True)


@one_line_errors
def export_cmd(
    target: Annotated[str, typer.Argument(help="run folder or PEFT adapter folder")],
    merged: Annotated[Path | None, typer.Option(
        "--merged", help="write the base with the adapter merged in: a transformers folder")
    ] = None,
    adapter: Annotated[Path | None, typer.Option(
        "--adapter", help="write a clean PEFT adapter folder")] = None,
    model: Annotated[str | None, typer.Option(
        help="base model; default: the run's, or the adapter's base_model_name_or_path")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="--merged: fp32 (default) | bf16 | fp16 of the saved weights (merged in fp32)")
    ] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="replace OUT when it exists and is not empty")] = False,
) -> None:
    """Export TARGET's adapter (a run folder's final/adapter, or an adapter folder) with a
    model card: --merged OUT (base + adapter, loads without PEFT) or --adapter OUT."""
    from fedit.export.merge import export

    out = export(target, merged=merged, adapter=adapter, model=model, dtype=dtype,
                 force=force, log=_log)
    typer.echo(f"wrote {out}")


@one_line_errors
def serve_cmd(
    targets: Annotated[list[str], typer.Argument(
        help="run folders, adapter folders, or folders holding them (an experiment's)")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", help="require 'Authorization: Bearer KEY', KEY read from this "
                              "environment variable")] = None,
    model: Annotated[str | None, typer.Option(
        help="base model; default: the one the adapters name")] = None,
    template: Annotated[str | None, typer.Option(
        help="prompt template of chat requests to the base model: alpaca | chat; default: "
             "the runs' data.template")] = None,
    max_batch: Annotated[int, typer.Option(
        help="requests decoded together (1 = one at a time)")] = 16,
    max_queue: Annotated[int, typer.Option(
        help="requests that may wait; one more is answered 429")] = 64,
    max_adapters: Annotated[int, typer.Option(
        help="adapters held in memory at once (least recently used leave)")] = 8,
    max_model_len: Annotated[int, typer.Option(
        help="prompt + completion tokens a request may use")] = 2048,
    dtype: Annotated[str, typer.Option(help="base weights: auto | bf16 | fp32 | fp16")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
) -> None:
    """Serve the base model and every adapter of TARGETS over an OpenAI-compatible API
    (/v1/chat/completions, /v1/completions, /v1/models; streaming), batching concurrent
    requests across adapters, with a chat page comparing two models at /."""
    from fedit.serve import load_server, serve

    server = load_server(targets, model=model, template=template, dtype=dtype,
                         device=device, max_batch=max_batch, max_queue=max_queue,
                         max_adapters=max_adapters, max_model_len=max_model_len,
                         api_key_env=api_key_env, log=_log)
    _log(f"chat page: http://{host}:{port}/  API: http://{host}:{port}/v1")
    serve(server, host, port)
