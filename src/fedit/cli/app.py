"""The ``fedit`` command line: one small function per command, the logic lives elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from fedit.errors import FeditError

app = typer.Typer(
    name="fedit",
    help="Federated instruction tuning of LLMs with LoRA: partition data over clients, "
    "train locally, aggregate with FedAvg, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Look at instruction data files.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _fail(e: Exception) -> NoReturn:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
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
    from fedit.config import load_config
    from fedit.federation.rundir import named, run_dir_of
    from fedit.runtimes.inprocess import resume_federated, run_federated

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    run_dir = resume
    try:
        if resume is not None:
            if config is not None or set_:
                raise FeditError("--resume takes the run's own config.toml: give no CONFIG "
                                 "and no --set")
            summary = resume_federated(resume, log=log)
        elif config is None:
            raise FeditError("give a CONFIG file (e.g. configs/quickstart.toml) or --resume "
                             "RUN_DIR")
        else:
            cfg = named(load_config(config, set_ or []), config.stem)
            run_dir = run_dir_of(cfg)  # for the message below, when interrupted
            summary = run_federated(cfg, stem=config.stem, log=log)
    except (FeditError, ValueError) as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.secho(f"\ninterrupted: continue from the last committed round with "
                    f"`fedit train --resume {run_dir}`", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    typer.echo("\n" + format_train_summary(summary))


def format_train_summary(summary: dict[str, Any]) -> str:
    """What `fedit train` prints at the end (a run with no held-out rows says so)."""
    base, final = summary["base_eval_loss"], summary["final_eval_loss"]
    if base is None or final is None:
        held_out = "no held-out rows (data.test_per_label = 0): no held-out loss"
    else:
        change = 100 * (final - base) / base if base else 0.0
        held_out = (f"held-out response loss on {summary['test_rows']} rows: base model "
                    f"{base:.4f} -> global adapter {final:.4f} ({change:+.1f}%)")
    dropped = f"; {summary['dropped']} client replies dropped" if summary.get("dropped") else ""
    if summary.get("epsilon") is not None:
        held_out += (f"\nprivacy: (epsilon, delta) = ({summary['epsilon']:.3g}, "
                     f"{summary['delta']:g}) spent over the run")
    return (f"{held_out}\n{summary['rounds']} rounds over {summary['clients']} clients in "
            f"{summary['seconds']:.0f} s{dropped}\nrun folder: {summary['run_dir']}\n"
            f"final adapter: {summary['final_adapter']}")


@app.command("strategies")
def strategies_cmd() -> None:
    """List the federated algorithms, aggregation rules, privacy, compression and LoRA rank
    options, with their config keys and defaults (see docs/strategies.md)."""
    from fedit.algorithms.catalog import catalog_lines

    typer.echo("\n".join(catalog_lines()))


@app.command("eval")
def eval_cmd(
    target: Annotated[str | None, typer.Argument(
        help="run folder, PEFT adapter folder, or base / base:<model> (the untuned model)")
    ] = None,
    on: Annotated[str | None, typer.Option(
        "--on", help="held-out rows (file or dolly-15k); default: the run's test.jsonl")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="folder for eval.json + answers.jsonl; default: the run or "
                            "adapter folder")] = None,
    max_rows: Annotated[int, typer.Option(help="a seeded random N rows; 0 = all")] = 0,
    model: Annotated[str | None, typer.Option(
        help="base model; default: the run's, or the adapter's base_model_name_or_path")] = None,
    generate: Annotated[bool, typer.Option(
        help="generate answers (ROUGE-L, similarity, exact match); --no-generate: loss only"
    )] = True,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="override a key: --set eval.max_new_tokens=64")] = None,
    like: Annotated[Path | None, typer.Option(
        "--like", help="base / base:MODEL only: take this run's config (data: template, "
                       "cutoff, truncation, fields; eval; dtype; seed) and its test.jsonl, "
                       "so the base is scored like the run")] = None,
    compare: Annotated[tuple[Path, Path] | None, typer.Option(
        "--compare", help="compare two evaluated folders A B (eval.json + answers.jsonl): "
                          "B - A per metric with a paired bootstrap 95% interval; writes "
                          "compare.json in B (or --out)")] = None,
    seed: Annotated[int, typer.Option(help="--compare: the bootstrap's seed")] = 0,
    resamples: Annotated[int, typer.Option(help="--compare: bootstrap resamples")] = 2000,
) -> None:
    """Evaluate TARGET (a run folder, a PEFT adapter folder, or base / base:MODEL) on
    held-out rows: loss and perplexity per category, and ROUGE-L, embedding similarity and
    exact match of batched greedy answers; writes eval.json and answers.jsonl.
    --compare A B compares two evaluations of the same rows instead."""
    from fedit.evaluate.evaluation import format_table
    from fedit.evaluate.runner import run_eval

    if compare is not None:
        _compare(target, compare, out, seed, resamples)
        return
    try:
        if target is None:
            raise FeditError("give a TARGET to evaluate (run folder, adapter folder, base) "
                             "or --compare A B")
        result, _, out_dir = run_eval(target, on=on, out=out, max_rows=max_rows, model=model,
                                      overrides=set_ or [], generate=generate, like=like,
                                      log=lambda m: typer.echo(m, err=True))
    except (FeditError, ValueError) as e:
        _fail(e)
    if result["overall"]["rows"] or not result.get("per_client"):  # no global rows: skip it
        typer.echo(format_table(result))
    if result.get("per_client"):
        from fedit.evaluate.runner import format_per_client

        typer.echo("\nper client, on its own held-out rows (loss):")
        typer.echo(format_per_client(result["per_client"]))
    typer.echo(f"wrote {out_dir / 'eval.json'} and {out_dir / 'answers.jsonl'}")


def _compare(target: str | None, folders: tuple[Path, Path], out: Path | None, seed: int,
             resamples: int) -> None:
    """``fedit eval --compare A B``: print the table, write compare.json."""
    from fedit.evaluate.compare import compare_evals, format_compare, write_compare

    try:
        if target is not None:
            raise FeditError(f"--compare A B takes no TARGET (got {target}): evaluate each "
                             "folder first, then compare them")
        if resamples < 1:
            raise FeditError(f"--resamples {resamples}: must be >= 1 (2000 by default)")
        result = compare_evals(*folders, resamples=resamples, seed=seed)
        paths = write_compare(out if out is not None else folders[1], result)
    except (FeditError, ValueError) as e:
        _fail(e)
    typer.echo(format_compare(result))
    typer.echo(f"wrote {' and '.join(map(str, paths))}")


@app.command("export")
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

    try:
        out = export(target, merged=merged, adapter=adapter, model=model, dtype=dtype,
                     force=force, log=lambda m: typer.echo(m, err=True))
    except (FeditError, ValueError) as e:
        _fail(e)
    typer.echo(f"wrote {out}")


@app.command("serve")
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

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    try:
        server = load_server(targets, model=model, template=template, dtype=dtype,
                             device=device, max_batch=max_batch, max_queue=max_queue,
                             max_adapters=max_adapters, max_model_len=max_model_len,
                             api_key_env=api_key_env, log=log)
    except (FeditError, ValueError) as e:
        _fail(e)
    log(f"chat page: http://{host}:{port}/  API: http://{host}:{port}/v1")
    serve(server, host, port)


@app.command("partition")
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
        _fail(FeditError("give a data file (or dolly-15k), or --natural-from a client folder"))
    from fedit.data.load import load_rows
    from fedit.data.partition import holdout_split, partition, write_partitions
    from fedit.io import atomic_write_jsonl

    try:
        rows = load_rows(data)
        if test_per_label:
            labels = [str(r.get(by, "")) for r in rows] if rows and by in rows[0] else None
            train_idx, test_idx = holdout_split(labels, len(rows), test_per_label, seed)
            atomic_write_jsonl(out / "test.jsonl", [rows[i] for i in test_idx])
            rows = [rows[i] for i in train_idx]
        if method != "iid" and rows and by not in rows[0]:
            raise FeditError(f"{data}: rows have no field '{by}' (choose one with --by)")
        keys = [str(r.get(by, "")) for r in rows]
        parts = partition(keys, method, clients, alpha, min_size, shards_per_client, seed)
        stats = write_partitions(out, rows, parts, by if method != "iid" else None)
    except (FeditError, ValueError) as e:
        _fail(e)
    sizes = [c["rows"] for c in stats["clients"]]
    typer.echo(
        f"{len(rows)} rows -> {len(parts)} clients ({method}); rows a client: min {min(sizes)}, "
        f"median {sorted(sizes)[len(sizes) // 2]}, max {max(sizes)}\nwrote {out}/client_*.jsonl, "
        f"{out}/stats.json, {out}/clients.png"
    )


def _folder_partitions(folder: Path, out: Path, by: str, data: str | None) -> None:
    """``fedit partition --natural-from DIR``: one client a file, as a run would see it."""
    from fedit.data.clients import write_folder_partitions

    try:
        if data is not None:
            raise FeditError(f"--natural-from {folder} and {data}: give one of them")
        stats = write_folder_partitions(folder, out, by)
    except (FeditError, ValueError) as e:
        _fail(e)
    sizes = ", ".join(f"{c['name']} {c['rows']}" for c in stats["clients"])
    typer.echo(f"{stats['num_rows']} rows in {stats['num_clients']} client files ({sizes})\n"
               f"wrote {out}/stats.json, {out}/clients.png")


@data_app.command("inspect")
def data_inspect(
    file: Annotated[str, typer.Argument(help="data file, folder, or dolly-15k")],
    label_field: Annotated[str, typer.Option(help="field to count values of")] = "category",
    model: Annotated[
        str, typer.Option(help="tokenizer for token lengths ('none' to skip)")
    ] = "smollm2-135m",
    template: Annotated[str, typer.Option(help="alpaca | chat | chatml")] = "alpaca",
) -> None:
    """Rows, fields, label counts and token-length percentiles of a data file."""
    from fedit.data.inspect import format_inspect, inspect_rows
    from fedit.data.load import load_rows

    try:
        rows = load_rows(file)
        tokenizer = None
        if model != "none":
            from fedit.model.base import load_tokenizer

            tokenizer = load_tokenizer(model)
        report = inspect_rows(rows, label_field=label_field, tokenizer=tokenizer,
                              template=template)
    except (FeditError, ValueError) as e:
        _fail(e)
    typer.echo(format_inspect(report))


@app.command("judge")
def judge_cmd(
    answers: Annotated[Path, typer.Argument(help="answers.jsonl of `fedit eval`, or its folder")],
    judge_url: Annotated[str, typer.Option(help="OpenAI base URL, e.g. http://127.0.0.1:8080/v1")],
    judge_model: Annotated[str, typer.Option(help="model name the endpoint serves")],
    against: Annotated[
        Path | None, typer.Option(help="second answers file: pairwise comparison, both orders")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="default: judge.json (judge-vs-<other>.json) beside")
    ] = None,
    judge_key_env: Annotated[
        str | None, typer.Option(help="env var holding the API key (default OPENAI_API_KEY; "
                                      "no key, no Authorization header)")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 4,
    timeout: Annotated[float, typer.Option(help="seconds for one request")] = 60.0,
    retries: Annotated[int, typer.Option(help="retries on timeouts, 429 and 5xx")] = 4,
    reference: Annotated[bool, typer.Option(help="show the judge the reference answer")] = True,
    cache: Annotated[
        Path | None,
        typer.Option(help="reply cache file (default $FEDIT_CACHE/judge/replies.sqlite)"),
    ] = None,
) -> None:
    """Grade answers 1-10 with an LLM judge (MT-Bench prompts), or compare them with
    --against (each pair judged in both orders); writes judge.json and judge.jsonl."""
    from fedit.evaluate.judge import format_judge, run_judge

    try:
        result = run_judge(answers, against, url=judge_url, model=judge_model,
                           key_env=judge_key_env, out=out, concurrency=concurrency,
                           timeout=timeout, retries=retries, reference=reference,
                           cache_path=cache, log=lambda m: typer.echo(m, err=True))
    except (FeditError, ValueError) as e:
        _fail(e)
    typer.echo(format_judge(result))



flower_app = typer.Typer(
    help="Run fedit on Flower: a local SuperLink + SuperNodes, a long-lived ClientApp worker.",
    no_args_is_help=True,
)
app.add_typer(flower_app, name="flower")


@flower_app.command("local")
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

    try:
        summary = run_local(config, nodes=nodes, overrides=set_ or [], tls=tls, auth=auth,
                            isolation=isolation, workdir=workdir, timeout=timeout,
                            log=lambda m: typer.echo(m, err=True))
    except (FeditError, ValueError) as e:
        _fail(e)
    typer.echo("\n" + format_train_summary(summary))


@flower_app.command("worker")
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


@app.command("experiment")
def experiment_cmd(
    name: Annotated[str, typer.Argument(help="the experiment: fedit-paper")],
    scale: Annotated[
        str, typer.Option(help="test (tiny, for tests) | small (~25 min bf16, ~90 fp32 CPU) | "
                               "medium (~75 min measured, bf16 CPU path) | "
                               "full (the reference setting, for a GPU)")
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
) -> None:
    """The FedIT paper's comparison: base, local-only, FedIT and centralized on one held-out
    set with the same compute budget; an arm already evaluated in --out is skipped."""
    from fedit.experiment.run import format_summary, run_experiment
    from fedit.experiment.seeds import format_seeds, run_seeds
    from fedit.report import build_report

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    try:
        if seeds == 1:  # a plain experiment, in <out> itself
            summary = run_experiment(name, scale, out, set_ or [], log=log)
            reports = [build_report(Path(summary["out"]))]
            table = format_summary(summary)
        else:
            summary = run_seeds(name, scale, seeds, out, set_ or [], log=log)
            reports = [build_report(Path(summary["out"]) / f) for f in
                       summary["folders"].values()]
            reports.append(build_report(Path(summary["out"])))  # the page across seeds
            table = format_seeds(summary)
    except (FeditError, ValueError) as e:
        _fail(e)
    typer.echo(f"\n{table}\n\nexperiment folder: {summary['out']}\nreport: "
               + ", ".join(str(r) for r in reports))


@app.command("report")
def report_cmd(
    folder: Annotated[Path, typer.Argument(help="run folder or experiment folder")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML file (default <folder>/report.html)")
    ] = None,
) -> None:
    """A self-contained HTML page (plots embedded) of a run or an experiment; the PNGs are
    also written beside it."""
    from fedit.report import build_report

    try:
        path = build_report(folder, out)
    except (FeditError, ValueError) as e:
        _fail(e)
    typer.echo(f"wrote {path}")
