"""``fedit eval`` (and ``eval --compare``) and ``fedit judge``: score what a run made."""

# Modules that import torch or an HTTP client (evaluate.runner, .compare, .judge) are
# imported inside the commands, so that `fedit --help` does not wait for them.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.errors import one_line_errors
from fedit.cli.task_options import AllowCode, NumFewshot, Suite, TaskFiles, TaskLimit, Tasks
from fedit.errors import FeditError


def _log(message: str) -> None:
    typer.echo(message, err=True)


@one_line_errors
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
    tasks: Tasks = None,
    task_file: TaskFiles = None,
    suite: Suite = None,
    num_fewshot: NumFewshot = None,
    task_limit: TaskLimit = None,
    heldout: Annotated[bool, typer.Option(
        help="with tasks: also score the held-out rows when there are some (--on, the "
             "run's test.jsonl); --no-heldout: the tasks alone")] = True,
    allow_code_execution: AllowCode = False,
) -> None:
    """Evaluate TARGET (a run folder, a PEFT adapter folder, or base / base:MODEL) on
    held-out rows: loss and perplexity per category, and ROUGE-L, embedding similarity and
    exact match of batched greedy answers; on preference pairs (prompt, chosen, rejected):
    preference accuracy, reward margin, their reference-free versions, the DPO loss and
    the greedy answers' length; writes eval.json and answers.jsonl. --tasks / --task-file /
    --suite also score lm-evaluation-harness tasks on the same model (tasks.jsonl).
    --compare A B compares two evaluations of the same rows instead."""
    from fedit.evaluate.evaluation import format_table
    from fedit.evaluate.runner import format_per_client, run_eval
    from fedit.evaluate.tasks import format_tasks, task_spec

    if compare is not None:
        _compare(target, compare, out, seed, resamples)
        return
    if target is None:
        raise FeditError("give a TARGET to evaluate (run folder, adapter folder, base) "
                         "or --compare A B")
    spec = task_spec(tasks, task_file or [], suite, num_fewshot=num_fewshot, limit=task_limit,
                     allow_code=allow_code_execution)
    result, _, out_dir = run_eval(target, on=on, out=out, max_rows=max_rows, model=model,
                                  overrides=set_ or [], generate=generate, like=like, log=_log,
                                  tasks=spec, heldout=heldout)
    tasks_only = result["settings"].get("kind") == "tasks"
    if not tasks_only and (result["overall"]["rows"] or not result.get("per_client")):
        typer.echo(format_table(result))  # (no global rows but per-client ones: skip it)
    if result.get("per_client"):
        typer.echo("\nper client, on its own held-out rows (loss):")
        typer.echo(format_per_client(result["per_client"]))
    if result.get("tasks"):
        typer.echo(("" if tasks_only else "\n") + format_tasks(result["tasks"]))
    written = [str(out_dir / w) for w in ("eval.json", "answers.jsonl",
                                          *(["tasks.jsonl"] if spec else []))]
    typer.echo(f"wrote {', '.join(written[:-1])} and {written[-1]}")


def _compare(target: str | None, folders: tuple[Path, Path], out: Path | None, seed: int,
             resamples: int) -> None:
    """``fedit eval --compare A B``: print the table, write compare.json."""
    from fedit.evaluate.compare import compare_evals, format_compare, write_compare

    if target is not None:
        raise FeditError(f"--compare A B takes no TARGET (got {target}): evaluate each "
                         "folder first, then compare them")
    if resamples < 1:
        raise FeditError(f"--resamples {resamples}: must be >= 1 (2000 by default)")
    result = compare_evals(*folders, resamples=resamples, seed=seed)
    paths = write_compare(out if out is not None else folders[1], result)
    typer.echo(format_compare(result))
    typer.echo(f"wrote {' and '.join(map(str, paths))}")


@one_line_errors
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

    result = run_judge(answers, against, url=judge_url, model=judge_model,
                       key_env=judge_key_env, out=out, concurrency=concurrency,
                       timeout=timeout, retries=retries, reference=reference,
                       cache_path=cache, log=_log)
    typer.echo(format_judge(result))
