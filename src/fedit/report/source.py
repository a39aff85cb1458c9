"""What ``fedit report`` reads: a run folder or an experiment folder, as a :class:`Source`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.errors import DataError
from fedit.federation.loop import communication_text


@dataclass
class Source:
    """What a report is drawn from: one run, or the arms of an experiment."""

    folder: Path
    kind: str  # "experiment" | "run"
    title: str
    facts: list[tuple[str, str]]  # shown under the title
    metrics: list[dict[str, Any]]  # metrics.jsonl lines of the (FedIT) run; may be empty
    evals: dict[str, dict[str, Any]]  # arm -> eval.json
    answers: dict[str, list[dict[str, Any]]]  # arm -> answers.jsonl
    arm_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> steps, time
    judges: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> judge.json
    partitions: Path | None = None  # the folder with stats.json / clients.png
    paired: dict[str, Any] = field(default_factory=dict)  # experiment.json's "paired"



def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); "
                        "re-run the command that wrote it") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _read_arm(folder: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    ev = read_json(folder / "eval.json") if (folder / "eval.json").is_file() else None
    ans = read_jsonl(folder / "answers.jsonl") if (folder / "answers.jsonl").is_file() else []
    return ev, ans


def load_source(folder: Path) -> Source:
    """Read an experiment folder or a run folder; a one-line error for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (give a run folder or an experiment folder)")
    if (folder / "experiment.json").is_file():
        return _load_experiment(folder)
    if (folder / "metrics.jsonl").is_file() or (folder / "eval.json").is_file():
        return _load_run(folder)
    raise DataError(f"{folder}: neither an experiment folder (experiment.json) nor a run "
                    "folder (metrics.jsonl); run `fedit experiment` or `fedit train` first")


def _load_experiment(folder: Path) -> Source:
    exp = read_json(folder / "experiment.json")
    if not isinstance(exp, dict) or not isinstance(exp.get("arms"), dict):
        raise DataError(f"{folder / 'experiment.json'}: no 'arms' table; re-run "
                        "`fedit experiment` to rewrite it")
    if isinstance(exp.get("folders"), dict):  # --seeds: one experiment a seed below
        seeds = ", ".join(exp["folders"])
        raise DataError(f"{folder} holds {len(exp['folders'])} seeds ({seeds}), each with its "
                        f"own report.html: fedit report {folder}/seed-S")
    src = Source(folder, "experiment", f"{exp.get('experiment', 'experiment')} "
                 f"({exp.get('scale') or 'custom'} scale)", [], [], {}, {})
    for arm, info in exp["arms"].items():
        ev, ans = _read_arm(folder / arm)
        src.evals[arm] = ev if ev is not None else {"overall": info.get("overall", {}),
                                                    "by_category": info.get("by_category", {})}
        src.answers[arm] = ans
        src.arm_info[arm] = info
        src.judges |= _read_judges(folder / arm, arm)
    src.paired = exp.get("paired") or {}
    if (folder / "fedit" / "metrics.jsonl").is_file():
        src.metrics = read_jsonl(folder / "fedit" / "metrics.jsonl")
    budget = exp.get("budget", {})
    src.facts = [
        ("model", str(exp.get("model", "?"))),
        ("clients", str(exp.get("clients", "?"))),
        ("held-out rows", str(exp.get("test_rows", "?"))),
        ("FedIT", f"{budget.get('rounds', '?')} rounds x {budget.get('clients_per_round', '?')}"
                  f" clients x {budget.get('local_steps', '?')} steps"),
        ("steps a client / in all", f"{budget.get('client_steps', '?')} / "
                                    f"{budget.get('total_steps', '?')}"),
        ("local-only clients", ", ".join(map(str, exp.get("local_clients", [])))),
        ("wall time (last command)", duration(exp.get("seconds"))),
    ]
    fedit_summary = folder / "fedit" / "summary.json"
    src.facts += round_facts(src.metrics, read_json(fedit_summary)
                             if fedit_summary.is_file() else {})
    src.partitions = _first_dir(folder / "partitions", folder / "fedit" / "partitions")
    return src


def _load_run(folder: Path) -> Source:
    metrics = read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
    title = f"run {folder.name}" if metrics else folder.name
    src = Source(folder, "run", title, [], metrics, {}, {})
    ev, ans = _read_arm(folder)
    if ev is not None:
        src.evals["run"], src.answers["run"] = ev, ans
    src.judges = _read_judges(folder, "run")
    summary = read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    trained = [m for m in metrics if m.get("round", 0) > 0]
    rows = summary.get("test_rows", (ev or {}).get("overall", {}).get("rows"))
    facts = [("rounds", len(trained) if metrics else None), ("clients", summary.get("clients")),
             ("held-out rows", rows), ("wall time", summary.get("seconds"))]
    src.facts = [(k, duration(v) if k == "wall time" else str(v))
                 for k, v in facts if v is not None]  # only what the folder says
    src.facts += round_facts(metrics, summary)
    src.partitions = _first_dir(folder / "partitions")
    return src


def round_facts(metrics: list[dict[str, Any]], summary: dict[str, Any]
                ) -> list[tuple[str, str]]:
    """The learning rate across rounds (when it changes) and the communication, for the
    facts under the title."""
    facts = []
    lrs = [(m["round"], m["lr"]) for m in metrics if m.get("round") and m.get("lr") is not None]
    if len({lr for _, lr in lrs}) > 1:
        facts.append(("learning rate", f"{lrs[0][1]:.3g} (round {lrs[0][0]}) to "
                                       f"{lrs[-1][1]:.3g} (round {lrs[-1][0]})"))
    comm = communication_text(summary)
    if comm:
        facts.append(("communication", comm))
    return facts


def _read_judges(folder: Path, arm: str) -> dict[str, dict[str, Any]]:
    """judge.json (single grading) and judge-vs-<other>.json (pairwise) of one model."""
    out = {}
    for path in sorted(folder.glob("judge*.json")):
        label = arm if path.name == "judge.json" else f"{arm} {path.stem.removeprefix('judge-')}"
        judge = read_json(path)
        if not isinstance(judge, dict) or not isinstance(judge.get("overall"), dict):
            raise DataError(f"{path}: no 'overall' table; re-run `fedit judge` to rewrite it")
        out[label] = judge
    return out


def _first_dir(*folders: Path) -> Path | None:
    return next((f for f in folders if (f / "stats.json").is_file()
                 or (f / "clients.png").is_file()), None)


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"
