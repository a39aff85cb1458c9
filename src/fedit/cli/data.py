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


@one_line_errors
def self_play_cmd(
    source: Annotated[str, typer.Argument(
        help="instruction rows: dolly-15k (shipped with fedit) or a data file")] = "dolly-15k",
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="also write the pairs here (they are cached either way)")] = None,
    model: Annotated[str, typer.Option(help="the model whose greedy answers are rejected")] = (
        "smollm2-135m"),
    template: Annotated[str, typer.Option(help="alpaca | chat | chatml")] = "chatml",
    label_field: Annotated[str, typer.Option(help="rows are drawn per value of it")] = (
        "category"),
    per_label: Annotated[int, typer.Option(help="pairs drawn per label")] = 40,
    max_prompt_tokens: Annotated[int, typer.Option(help="longest prompt kept")] = 128,
    max_new_tokens: Annotated[int, typer.Option(
        help="the model's answers stop here; references longer are not drawn")] = 96,
    dtype: Annotated[str, typer.Option(
        help="fp32 (the same pairs on every CPU) | bf16 | auto")] = "fp32",
    seed: Annotated[int, typer.Option(help="the draw of rows")] = 42,
    batch_size: Annotated[int, typer.Option(help="answers decoded at once")] = 32,
    rebuild: Annotated[bool, typer.Option(help="build again even if cached")] = False,
) -> None:
    """Build preference pairs offline: the human reference answer chosen, the model's own
    greedy answer rejected (self-play, SPIN: Chen et al. 2024, arXiv 2401.01335); built
    once, then read from fedit's cache (README "Preference optimisation (DPO)")."""
    from fedit.model.self_play import SelfPlaySettings, build_self_play

    settings = SelfPlaySettings(source=source, model=model, template=template,
                                label_field=label_field, per_label=per_label,
                                max_prompt_tokens=max_prompt_tokens,
                                max_new_tokens=max_new_tokens, dtype=dtype, seed=seed,
                                batch_size=batch_size)
    built = build_self_play(settings, out=out, rebuild=rebuild,
                            log=lambda m: typer.echo(m, err=True))
    m = built.manifest
    labels = ", ".join(f"{k} {v}" for k, v in m["per_label"].items())
    typer.echo(f"{m['pairs']} pairs ({labels}); {m['rejected_cut']} rejected answers reached "
               f"{max_new_tokens} tokens; dropped: {m['dropped']['same_as_reference']} same "
               f"as the reference, {m['dropped']['empty_answer']} empty\n"
               f"pairs: {built.path}" + (f"\ncopy: {out}" if out else ""))
