"""``fedit partition`` and ``fedit data inspect``: split a data set over clients, look at it."""

# fedit.model (the tokenizer for token lengths) imports torch and transformers: it is
# imported inside ``data inspect``, so that `fedit --help` does not wait seconds for it.

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedit.cli.errors import one_line_errors
from fedit.config import DataConfig
from fedit.data.clients import write_folder_partitions
from fedit.data.inspect import format_inspect, inspect_rows
from fedit.data.invalid import RowCounts, format_counts
from fedit.data.load import iter_rows
from fedit.data.partition import partition_file
from fedit.errors import DataError, FeditError


@one_line_errors
def partition_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    data: Annotated[str | None, typer.Argument(help="data file, folder, or dolly-15k")] = None,
    natural_from: Annotated[Path | None, typer.Option(
        "--natural-from", help="a client folder (one file a client, README \"Client folders\"): "
                               "stats.json and clients.png of it, nothing split")] = None,
    clients: Annotated[int, typer.Option(help="number of clients")] = 10,
    method: Annotated[str, typer.Option(help="iid | shards | dirichlet | natural")] = "dirichlet",
    by: Annotated[str, typer.Option(help="label field (dirichlet/shards) or id (natural)")] = (
        "category"
    ),
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration")] = 0.5,
    min_size: Annotated[int, typer.Option(help="Dirichlet: min rows a client")] = 40,
    shards_per_client: Annotated[int, typer.Option(help="shards: shards a client")] = 2,
    test_per_label: Annotated[
        int, typer.Option(help="hold out N rows per label first (test.jsonl); 0 = none")
    ] = 0,
    seed: Annotated[int, typer.Option(help="random seed")] = 42,
) -> None:
    """Split a data set over clients: client_NNNN.jsonl, stats.json, clients.png."""
    if natural_from is not None:
        _folder_partitions(natural_from, out, by, data)
        return
    if data is None:
        raise FeditError("give a data file (or dolly-15k), or --natural-from a client folder")
    stats = partition_file(data, out, method=method, num_clients=clients, label_field=by,
                           alpha=alpha, min_size=min_size, shards_per_client=shards_per_client,
                           test_per_label=test_per_label, seed=seed)
    removed = stats["held_out_duplicates"]["removed"]
    if removed:
        typer.echo(f"{removed} training row(s) removed: their prompt is also in test.jsonl")
    typer.echo(f"{_partition_line(stats, method)}\nwrote {out}/client_*.jsonl, "
               f"{out}/stats.json, {out}/clients.png")


def _partition_line(stats: dict[str, Any], method: str) -> str:
    """``N rows -> K clients (method); rows a client: min, median, max``."""
    sizes = sorted(c["rows"] for c in stats["clients"])
    return (f"{stats['num_rows']} rows -> {stats['num_clients']} clients ({method}); rows a "
            f"client: min {sizes[0]}, median {sizes[len(sizes) // 2]}, max {sizes[-1]}")


def _folder_partitions(folder: Path, out: Path, by: str, data: str | None) -> None:
    """``fedit partition --natural-from DIR``: one client a file, as a run would see it."""
    if data is not None:
        raise FeditError(f"--natural-from {folder} and {data}: give one of them")
    stats = write_folder_partitions(folder, out, by)
    sizes = ", ".join(f"{c['name']} {c['rows']}" for c in stats["clients"])
    typer.echo(f"{stats['num_rows']} rows in {stats['num_clients']} client files ({sizes})\n"
               f"wrote {out}/stats.json, {out}/clients.png")


@one_line_errors
def data_inspect(
    file: Annotated[str, typer.Argument(help="data file, folder, or dolly-15k")],
    label_field: Annotated[str, typer.Option(help="field to count values of")] = "category",
    model: Annotated[
        str, typer.Option(help="tokenizer for token lengths ('none' to skip)")
    ] = "smollm2-135m",
    template: Annotated[str, typer.Option(help="alpaca | chat | chatml")] = "alpaca",
    invalid_rows: Annotated[str, typer.Option(
        help="error: stop at an invalid row | skip: count and report them")] = "error",
    max_invalid_fraction: Annotated[float, typer.Option(
        help="skip: stop when more of the file is invalid")] = 0.5,
    cutoff_len: Annotated[int, typer.Option(
        help="preference pairs: count those shortened / skipped at this length")] = 512,
    min_response_tokens: Annotated[int, typer.Option(
        help="preference pairs: answer tokens each keeps when its prompt is shortened")] = 16,
) -> None:
    """Rows, fields, label counts and token-length percentiles of a data file (and, for
    preference pairs, their count, lengths and what a run would shorten or skip)."""
    counts = RowCounts.from_config(DataConfig(invalid_rows=invalid_rows,
                                              max_invalid_fraction=max_invalid_fraction))
    tokenizer = None
    if model != "none":
        from fedit.model.base import load_tokenizer

        tokenizer = load_tokenizer(model)
    rows = iter_rows(file, invalid=counts)  # read as a stream: never held whole
    report = inspect_rows(rows, label_field=label_field, tokenizer=tokenizer, template=template,
                          cutoff_len=cutoff_len, min_response_tokens=min_response_tokens)
    if not report["rows"]:
        raise DataError(f"{file}: no rows (the file is empty); give a file with at least one row")
    typer.echo("\n".join([format_inspect(report), *format_counts(counts)]))
