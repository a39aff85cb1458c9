"""Benchmark tasks through EleutherAI's lm-evaluation-harness, on the model in memory.

``fedit eval TARGET --tasks mmlu,arc_easy`` (or ``--task-file my_task.yaml``, ``--suite
flowertune-medical``) hands the harness the base model with the target's adapter already
loaded (:class:`lm_eval.models.huggingface.HFLM` takes a model object), so the harness's
own prompts, few-shot settings and metrics score it and no second copy of the base model is
made. The results go into ``eval.json`` under ``"tasks"``; every scored document goes into
``tasks.jsonl`` beside it, which is what ``fedit eval --compare`` pairs document by
document (:func:`fedit.evaluate.compare.compare_evals`).

A task file is a harness task YAML (``output_type``, ``doc_to_text``, ``dataset_path:
json`` with ``dataset_kwargs.data_files``...). Its data files are read relative to the
YAML's own folder, so a task folder can be copied anywhere; a hub data set
(``dataset_path: owner/name``) needs the hub or the Hugging Face cache: when the hub is
unreachable, a task whose data set is not cached stops at once with one line naming what
to download, instead of the ~25 s of retries ``datasets`` spends on each.

The harness is an optional extra (``pip install -e ".[bench]"``); without it ``--tasks``
stops with one line saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.errors import ConfigError, DataError
from fedit.hub import hub_reachable
from fedit.io import atomic_write_jsonl

Log = Callable[[str], None]

TASKS_FILE = "tasks.jsonl"  # per-document records, beside eval.json
#: the harness's builders that read local files (no hub data set behind them)
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "arrow", "text", "pandas"})
#: where fedit's own harness task YAMLs live (FlowerTune's finance sets)
OWN_TASKS = Path(__file__).resolve().parents[1] / "resources" / "tasks"

#: ``--suite`` -> the harness tasks closest to each FlowerTune LLM leaderboard domain.
#: FlowerTune scores some of these with its own code (medical by generation, finance by
#: its own scripts, code by bigcode's harness): these numbers compare fedit runs with each
#: other, not with the leaderboard (README, "Benchmarks").
SUITES: dict[str, tuple[str, ...]] = {
    "flowertune-general": ("mmlu",),
    "flowertune-medical": ("pubmedqa", "medmcqa", "medqa_4options", "careqa_en"),
    "flowertune-finance": ("fedit_fpb", "fedit_fiqa", "fedit_tfns"),
    "flowertune-code": ("humaneval", "mbpp"),
}


@dataclass
class TaskSpec:
    """What ``--tasks``, ``--task-file`` and ``--suite`` asked for, and how to run it."""

    names: list[str] = field(default_factory=list)  # harness task / group names
    files: list[Path] = field(default_factory=list)  # task YAMLs (or folders of them)
    suite: str | None = None
    num_fewshot: int | None = None  # None: each task's own setting
    limit: int | None = None  # the first N documents of each task (a quick look)
    batch_size: int = 8
    allow_code: bool = False  # run model-written code (HumanEval, MBPP)

    def __bool__(self) -> bool:
        return bool(self.names or self.files)

    def recorded(self) -> dict[str, Any]:
        """The settings a comparison must agree on (``eval.json``'s ``tasks.settings``)."""
        return {"names": self.names, "files": [str(f) for f in self.files],
                "suite": self.suite, "num_fewshot": self.num_fewshot, "limit": self.limit}


def task_spec(tasks: str | None = None, task_files: Sequence[Path] = (),
              suite: str | None = None, *, num_fewshot: int | None = None,
              limit: int | None = None, batch_size: int = 8,
              allow_code: bool = False) -> TaskSpec:
    """Parse the command line's task options into a :class:`TaskSpec` (empty when none
    was given); unknown suites, missing files and bad numbers are one-line errors."""
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if suite is not None:
        if suite not in SUITES:
            raise ConfigError(f"--suite {suite}: unknown; choose one of {', '.join(SUITES)}")
        names += [t for t in SUITES[suite] if t not in names]
    files = []
    for f in task_files:
        path = Path(f).expanduser()
        if not path.exists():
            raise ConfigError(f"--task-file {f}: no such file or folder (a harness task YAML, "
                              "or a folder of them)")
        files.append(path.resolve())
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {num_fewshot}: must be >= 0")
    if limit is not None and limit < 1:
        raise ConfigError(f"--task-limit {limit}: must be >= 1 (leave it out for every document)")
    if batch_size < 1:
        raise ConfigError(f"eval.batch_size {batch_size}: must be >= 1")
    return TaskSpec(names, files, suite, num_fewshot, limit, batch_size, allow_code)


def require_harness() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError('benchmark tasks need lm-evaluation-harness: pip install -e ".[bench]" '
                          "(or pip install lm_eval)")


def _yaml_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*.yaml")) if path.is_dir() else [path]


def _task_manager(spec: TaskSpec) -> Any:
    """The harness's task index: its own tasks only when a name needs them (indexing its
    ~15,000 YAMLs takes ~10 s), plus fedit's own tasks and the task files' folders."""
    from lm_eval.tasks import TaskManager

    folders = [OWN_TASKS] if any(n.startswith("fedit_") for n in spec.names) else []
    folders += sorted({(f if f.is_dir() else f.parent) for f in spec.files})
    builtin = any(not n.startswith("fedit_") for n in spec.names)
    return TaskManager(include_path=[str(f) for f in folders] or None,
                       include_defaults=builtin)


def _file_task_names(tm: Any, spec: TaskSpec) -> list[tuple[str, Path]]:
    """(task or group name, the folder its data files are relative to) of each task file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    out = []
    for f in spec.files:
        for path in _yaml_files(f):
            try:
                cfg = load_yaml(path, resolve_func=False)
            except Exception as e:  # the harness's YAML loader raises several kinds
                raise DataError(f"{path}: not a harness task YAML ({_first_line(e)})") from None
            name = cfg.get("task") or cfg.get("group") if isinstance(cfg, dict) else None
            if not isinstance(name, str):
                if f.is_dir():
                    continue  # an included template in a folder of tasks (no task: key)
                raise DataError(f"{path}: names no task (a harness task YAML needs `task:` "
                                "or `group:`)")
            out.append((name, path.parent))
    if spec.files and not out:
        raise DataError(f"{', '.join(map(str, spec.files))}: no harness task YAML found")
    return out


def _dataset_paths(tm: Any, name: str, depth: int = 0) -> set[tuple[str, str | None]]:
    """(dataset_path, dataset_name) of every hub data set behind ``name`` (a task, group
    or tag), from the harness's index; local builders left out."""
    entry = tm.task_index.get(name)
    if entry is None or depth > 8:
        return set()
    cfg = dict(entry.cfg or {})
    if entry.yaml_path is not None and not cfg:
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(entry.yaml_path, resolve_func=False)
    children = cfg.get("task")
    if isinstance(children, list) or getattr(entry.kind, "name", "") == "TAG":
        names = children if isinstance(children, list) else [
            k for k, e in tm.task_index.items() if name in (e.tags or set())]
        found: set[tuple[str, str | None]] = set()
        for child in names:
            found |= _dataset_paths(tm, child if isinstance(child, str) else
                                    str(child.get("task", "")), depth + 1)
        return found
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or path in LOCAL_BUILDERS or Path(path).exists():
        return set()
    return {(path, cfg.get("dataset_name"))}


def _cached(dataset: str) -> bool:
    """Whether a hub data set has a copy in the Hugging Face caches (hub or datasets)."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    data = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets")
    owner_name = dataset.replace("/", "--")
    return ((hub / f"datasets--{owner_name}").is_dir()
            or any(data.glob(f"{dataset.replace('/', '___')}*")))


def check_offline(tm: Any, names: Sequence[str], suite: str | None) -> None:
    """Stop with one line when the hub is unreachable and a task's data set is not cached."""
    missing = sorted({p for n in names for p, _ in _dataset_paths(tm, n) if not _cached(p)})
    if not missing or hub_reachable():
        return
    what = f"--suite {suite}" if suite else f"--tasks {','.join(names)}"
    raise DataError(
        f"{what}: the Hugging Face hub is unreachable and {len(missing)} data set(s) are not "
        f"in the cache: {', '.join(missing)}; where there is network, download each with "
        "`hf download --repo-type dataset NAME` (or datasets.load_dataset) and copy "
        "~/.cache/huggingface here, or write local task files (--task-file)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness logs every step at INFO: keep its errors only."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # its warnings on a model object passed in are about CLI options
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _no_git_describe() -> Iterator[None]:
    """The harness records ``git describe`` of the working directory, which prints
    ``fatal: not a git repository`` outside one; the hash is not fedit's to record."""
    import lm_eval.evaluator as evaluator

    saved = getattr(evaluator, "get_git_commit_hash", None)
    if saved is not None:
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        if saved is not None:
            evaluator.get_git_commit_hash = saved


def _build_tasks(tm: Any, spec: TaskSpec) -> dict[str, Any]:
    """The harness's task dictionary; each task file's data files read relative to its
    folder (the harness reads them relative to the working directory)."""
    from lm_eval.tasks import get_task_dict

    task_dict: dict[str, Any] = {}
    try:
        if spec.names:
            check_offline(tm, spec.names, spec.suite)
            unknown = [n for n in spec.names if n not in tm.task_index]
            if unknown:
                raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown)} (lm_eval "
                                  "--tasks list shows the harness's; --task-file FILE for "
                                  "your own)")
            task_dict.update(get_task_dict(spec.names, tm))
        for name, folder in _file_task_names(tm, spec):
            check_offline(tm, [name], None)
            with contextlib.chdir(folder):
                task_dict.update(get_task_dict([name], tm))
    except (ConfigError, DataError):
        raise
    except Exception as e:  # datasets / the harness: a missing file, a bad config, ...
        raise DataError(f"cannot build the tasks ({type(e).__name__}: {_first_line(e)})"
                        ) from e
    return task_dict


@dataclass
class PreparedTasks:
    """Tasks built (data sets read) before any model is loaded, so a missing data set or a
    bad task file stops the command at once."""

    spec: TaskSpec
    manager: Any  # lm_eval.tasks.TaskManager
    tasks: dict[str, Any]  # the harness's task dictionary


def prepare_tasks(spec: TaskSpec) -> PreparedTasks:
    """Index and build the tasks of ``spec`` (their data sets loaded)."""
    require_harness()
    with _quiet_harness():
        tm = _task_manager(spec)
        return PreparedTasks(spec, tm, _build_tasks(tm, spec))


def run_tasks(model: Any, tokenizer: Any, tasks: TaskSpec | PreparedTasks, log: Log = print
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``model`` (the base with its adapter, in memory) on ``tasks``.

    Returns
    -------
    summary : dict
        ``eval.json``'s ``"tasks"``: ``settings`` (what was asked, the harness version,
        the model's dtype), ``results`` (per task and group: ``alias``, ``samples``,
        ``n_shot``, ``version`` and ``metrics`` -> ``{value, stderr, higher_is_better,
        paired}``), ``groups`` (group -> its tasks) and ``seconds``.
    samples : list of dict
        One record per scored document and filter: ``task``, ``doc_id``, ``doc_hash``,
        ``target``, the metric values, and the per-choice ``loglikelihoods`` (and
        ``is_greedy``) or the generated ``response`` and its ``answer_tokens``.
    """
    start = time.perf_counter()
    prepared = tasks if isinstance(tasks, PreparedTasks) else prepare_tasks(tasks)
    spec = prepared.spec
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet_harness(), _no_git_describe():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
        was_training = bool(getattr(model, "training", False))
        model.eval()
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(prepared.tasks.values()), num_fewshot=spec.num_fewshot,
                limit=spec.limit, log_samples=True, bootstrap_iters=1000,
                confirm_run_unsafe_code=spec.allow_code, task_manager=prepared.manager)
        except AssertionError as e:  # the harness asserts on what it refuses
            raise DataError(f"lm-evaluation-harness refused the tasks: {_first_line(e)}"
                            ) from None
        except ValueError as e:
            if "unsafe" in str(e):
                raise ConfigError(f"{_first_line(e)}: pass --allow-code-execution to run "
                                  "model-written code (in a sandbox)") from None
            raise
        finally:
            model.train(was_training)
    if out is None:
        raise DataError("lm-evaluation-harness returned no results")
    samples = sample_records(out.get("samples", {}))
    for record in samples:  # a generated answer's length: its tasks compare at equal length
        if "response" in record:
            record["answer_tokens"] = len(tokenizer(record["response"],
                                                    add_special_tokens=False)["input_ids"])
    summary = task_summary(out, samples, spec)
    dtype = next((str(p.dtype) for p in model.parameters()), "?")
    summary["settings"]["dtype"] = dtype.removeprefix("torch.")
    summary["seconds"] = time.perf_counter() - start
    log(f"tasks: {len(samples)} documents in {summary['seconds']:.1f} s "
        f"({', '.join(summary['results'])})")
    return summary, samples


def _metric_key(name: str, filter_name: str) -> str:
    return name if filter_name == "none" else f"{name},{filter_name}"


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


def _doc_hash(sample: dict[str, Any]) -> str:
    if sample.get("doc_hash"):
        return str(sample["doc_hash"])
    text = json.dumps(sample.get("doc"), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sample_records(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The harness's logged samples as flat, JSON-safe records (one per document and
    filter), in task then document order."""
    records = []
    for task in sorted(samples):
        for s in samples[task]:
            filter_name = str(s.get("filter", "none"))
            metrics = {_metric_key(m, filter_name): _number(s.get(m))
                       for m in s.get("metrics", [])}
            record: dict[str, Any] = {
                "task": task, "doc_id": int(s["doc_id"]), "filter": filter_name,
                "doc_hash": _doc_hash(s), "target": str(s.get("target")),
                "metrics": metrics,
            }
            resps = s.get("filtered_resps") or []
            pairs = [r for r in resps if isinstance(r, list | tuple) and len(r) == 2]
            if pairs and len(pairs) == len(resps):  # log-likelihoods: (logprob, is_greedy)
                record["loglikelihoods"] = [float(r[0]) for r in pairs]
                record["is_greedy"] = [str(r[1]) == "True" for r in pairs]
            elif resps:
                first = resps[0]
                record["response"] = first if isinstance(first, str) else json.dumps(
                    first, default=str)
            records.append(record)
    return records


def task_summary(out: dict[str, Any], samples: list[dict[str, Any]], spec: TaskSpec
                 ) -> dict[str, Any]:
    """``eval.json``'s ``"tasks"`` from the harness's result dictionary. A metric is
    ``paired`` when its value is the mean of its per-document values (a paired bootstrap
    over documents is then meaningful; corpus-level metrics such as F1 or BLEU are not)."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in samples:
        by_task.setdefault(r["task"], []).append(r)
    higher = out.get("higher_is_better", {})
    results: dict[str, Any] = {}
    for task, res in out.get("results", {}).items():
        metrics: dict[str, Any] = {}
        for key, value in res.items():
            if "," not in key or "_stderr," in key or _number(value) is None:
                continue
            name, _, filter_name = key.partition(",")
            mkey = _metric_key(name, filter_name)
            stderr = _number(res.get(f"{name}_stderr,{filter_name}"))
            per_doc = [r["metrics"].get(mkey) for r in by_task.get(task, [])]
            values = [v for v in per_doc if v is not None]
            paired = bool(values) and abs(sum(values) / len(values) - float(value)) < 1e-9
            metrics[mkey] = {"value": float(value), "stderr": stderr,
                             "higher_is_better": higher.get(task, {}).get(name),
                             "paired": paired}
        results[task] = {
            "alias": str(res.get("alias", task)).strip(" -"),
            "samples": int(out.get("n-samples", {}).get(task, {}).get("effective", 0)
                           or len({r["doc_id"] for r in by_task.get(task, [])})),
            "n_shot": out.get("n-shot", {}).get(task),
            "version": out.get("versions", {}).get(task),
            "metrics": metrics,
        }
    groups = {g: list(ts) for g, ts in out.get("group_subtasks", {}).items() if ts}
    import lm_eval

    return {"settings": {**spec.recorded(),
                         "harness": f"lm_eval {getattr(lm_eval, '__version__', '?')}",
                         "batch_size": spec.batch_size},
            "results": results, "groups": groups}


def write_task_samples(out_dir: Path, samples: list[dict[str, Any]]) -> Path:
    """``tasks.jsonl`` in ``out_dir``, written atomically."""
    return atomic_write_jsonl(Path(out_dir) / TASKS_FILE, samples)


def load_task_samples(folder: Path) -> list[dict[str, Any]]:
    """Read ``tasks.jsonl`` back; a missing or broken file is a one-line DataError."""
    path = Path(folder) / TASKS_FILE
    if not path.is_file():
        raise DataError(f"{folder}: eval.json has task results but no {TASKS_FILE} beside it; "
                        "run fedit eval --tasks again")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise DataError(f"{path}:{n}: not valid JSON; run fedit eval --tasks again"
                                ) from None
    return records


def format_tasks(summary: dict[str, Any]) -> str:
    """A text table: task | metric | value | stderr | documents."""
    rows = [(task, name, m["value"], m["stderr"], r["samples"])
            for task, r in summary["results"].items() for name, m in r["metrics"].items()]
    width = max([12, *(len(t) + 2 for t, *_ in rows)])
    mwidth = max([8, *(len(n) + 2 for _, n, *_ in rows)])
    head = f"{'task':<{width}}{'metric':<{mwidth}}{'value':>9}{'stderr':>9}{'docs':>7}"
    lines = [head, "-" * len(head)]
    for task, name, value, stderr, n in rows:
        se = "-" if stderr is None else f"{stderr:.4f}"
        lines.append(f"{task:<{width}}{name:<{mwidth}}{value:>9.4f}{se:>9}{n:>7}")
    return "\n".join(lines)
