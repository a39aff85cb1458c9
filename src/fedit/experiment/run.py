"""The FedIT paper's experiment as one command: base vs local-only vs FedIT vs centralized.

``fedit experiment fedit-paper --scale small`` trains and evaluates four arms on one
held-out set of databricks-dolly-15k split over clients by a Dirichlet(0.5) draw over
category, every arm on the same base model, loaded once:

1. ``base``: the base model untuned (the initial adapter has B = 0: exactly the base);
2. ``local-only``: each of ``experiment.local_clients`` seeded clients fine-tunes alone on
   its own rows for ``rounds x train.max_steps`` steps, the steps one client does if it
   takes part in every round of the federated run; the arm's numbers are the mean over
   those clients (each client's own eval sits in ``local-only/client_NNNN/``, and its
   overall metrics in ``experiment.json`` under ``arms["local-only"]["per_client"]``);
3. ``fedit``: FedAvg over the clients, run by :class:`fedit.runtimes.inprocess.Simulation`
   (``rounds x clients-a-round x train.max_steps`` steps in all); killed mid-way, it
   continues after its last committed round (``--resume`` semantics);
4. ``centralized``: one adapter trained on the union of every client's rows for the same
   total number of steps as ``fedit``.

``train.max_steps`` is the unit of compute: the experiment sets ``train.local_epochs``
high enough that the step cap always binds (a small client repeats its rows), so the
budgets are exact and recorded (``arm.json`` per arm; ``client_steps`` per round in
``fedit/metrics.jsonl``). ``train.round_schedule`` (cosine: each round's peak lr decays
towards ``train.min_lr``) sets the ``fedit`` arm's lr round by round; ``local-only`` and
``centralized`` train their steps in one go (one AdamW, ``train.lr`` shaped by
``train.lr_scheduler`` over all the steps), so they have no rounds to schedule and keep
``train.lr`` as their peak. Every arm is evaluated with
:func:`fedit.evaluate.evaluation.evaluate_model` into ``<out>/<arm>/eval.json`` and
``answers.jsonl``; ``<out>/experiment.json`` summarises them, with a ``"paired"`` section
(:mod:`fedit.experiment.paired`): fedit against base, each local-only client and
centralized, per metric the paired bootstrap difference, its 95% interval and verdict. An
arm whose ``eval.json`` exists is skipped when the command is run again (resume after a
kill).

Every arm keeps the adapter it evaluated as a PEFT folder, named in its ``arm.json``
(``"adapter"``, relative to the arm's folder): ``base/adapter`` (the initial adapter,
B = 0), ``local-only/client_NNNN/adapter`` (a list, one per client), ``fedit/final/adapter``
and ``centralized/adapter``; ``fedit eval``, ``fedit export`` and ``fedit serve`` take any
of them.

Scales (``SCALES``: test, small, medium, full) and the budget arithmetic of each live in
:mod:`fedit.experiment.scales`.

``fedit experiment fedit-dpo`` runs the same four arms with ``train.objective = "dpo"`` on
preference pairs (``DPO_SCALES``: test, small): ``experiment.pairs`` names a preference
file, else the self-play pairs of :mod:`fedit.model.self_play` are built from
``data.path``'s rows (dolly-15k) with the run's model and template, once, then read from
fedit's cache (``experiment.pairs_per_label`` a label, rejected answers of at most
``experiment.pairs_max_new_tokens``). ``base`` is then the starting adapter (the base
model with a fresh adapter, or ``lora.init_from``'s adapter, which is also the reference);
every arm is scored by :func:`fedit.evaluate.preference.evaluate_preferences` on the
held-out pairs (preference accuracy, reward margin, their reference-free forms, DPO loss,
greedy answer length), and the paired section compares those per pair.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedit.algorithms.contract import ClientState
from fedit.client.load import load_model
from fedit.client.objective import objective_for
from fedit.client.round import client_seed
from fedit.client.trainer import train_adapter
from fedit.config import RunConfig, to_toml
from fedit.data.federated import FederatedData, split_data, write_split
from fedit.errors import ConfigError
from fedit.evaluate.evaluation import evaluate_model, load_eval, write_eval
from fedit.evaluate.preference import evaluate_preferences
from fedit.evaluate.tasks import (
    TASKS_FILE,
    PreparedTasks,
    TaskSpec,
    load_task_samples,
    prepare_tasks,
    run_tasks,
    write_task_samples,
)
from fedit.experiment.paired import format_paired, paired_section
from fedit.experiment.scales import (
    ExperimentSettings,
    experiment_config,
    local_only_clients,
    plan_budget,
)
from fedit.federation.loop import Log
from fedit.io import atomic_write_json, atomic_write_text
from fedit.model.adapter import (
    get_adapter_arrays,
    load_adapter_arrays,
    save_adapter,
    set_adapter_arrays,
)
from fedit.runtimes.inprocess import Simulation

ARMS = ("base", "local-only", "fedit", "centralized")
ADAPTER = "adapter"  # every arm's adapter: a PEFT folder in (or below) the arm's folder


def _train_cfg(cfg: RunConfig, steps: int) -> Any:
    # local_epochs = steps: every epoch is >= 1 step, so max_steps always binds
    return dataclasses.replace(cfg.train, max_steps=steps, local_epochs=steps)


class Experiment:
    """The four arms on one base model and one data split. ``run()`` -> experiment.json."""

    def __init__(self, cfg: RunConfig, settings: ExperimentSettings, out: Path,
                 scale: str = "", log: Log = print, name: str = "fedit-paper",
                 tasks: PreparedTasks | None = None) -> None:
        self.start = time.perf_counter()  # wall time from here: data, model load, arms
        self.cfg, self.settings, self.out, self.scale, self.log = cfg, settings, out, scale, log
        self.name = name
        self.tasks = tasks  # benchmark tasks every arm is also scored on (--tasks)
        self.budget = plan_budget(cfg)
        self.local_clients = local_only_clients(cfg, settings.local_clients)
        if cfg.train.round_schedule != "constant":
            log(f"train.round_schedule = {cfg.train.round_schedule} schedules the fedit arm's "
                "rounds; local-only and centralized train their steps in one go at train.lr "
                f"(train.lr_scheduler = {cfg.train.lr_scheduler} over all of them)")
        self._check_folder()
        self.data = split_data(cfg)
        self._write_data(self.data)
        self.tokenizer, self.model = load_model(cfg)  # the base model, once for all arms
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.initial = get_adapter_arrays(self.model)  # B = 0: exactly the base model

    def _check_folder(self) -> None:
        """A new folder, or one made by the same config (then finished arms are kept)."""
        text = to_toml(self.cfg) + "\n[experiment]\n" + "\n".join(
            f"{k} = {str(v).lower() if isinstance(v, bool) else v}"
            for k, v in self.settings.recorded(self.name).items()) + "\n"
        if self.tasks is not None:  # (an experiment without tasks keeps its old config.toml)
            text += f"tasks = {json.dumps(json.dumps(self.tasks.spec.recorded()))}\n"
        saved = self.out / "config.toml"
        if saved.is_file() and saved.read_text(encoding="utf-8") != text:
            raise ConfigError(f"{self.out} holds an experiment with another config "
                              f"({saved}); choose another --out or delete that folder")
        if not saved.is_file() and self.out.is_dir() and any(self.out.iterdir()):
            raise ConfigError(f"{self.out} exists and is not an experiment folder; "
                              "choose another --out")
        atomic_write_text(saved, text)

    def _write_data(self, data: FederatedData) -> None:
        write_split(data, self.out)

    # -- the arms ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        arms = {
            "base": self._arm_base,
            "local-only": self._arm_local_only,
            "fedit": self._arm_fedit,
            "centralized": self._arm_centralized,
        }
        for name, run_arm in arms.items():
            folder = self.out / name
            if (folder / "eval.json").is_file() and (folder / "arm.json").is_file():
                self.log(f"[{name}] done before (eval.json exists): skipped")
                continue
            self.log(f"[{name}] starting")
            set_adapter_arrays(self.model, self.initial)
            record = run_arm(folder)
            atomic_write_json(folder / "arm.json", record)
        summary = self.summary(time.perf_counter() - self.start)
        atomic_write_json(self.out / "experiment.json", summary)
        return summary

    def _evaluate(self, folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
        t0 = time.perf_counter()
        dpo = self.cfg.train.objective == "dpo"
        evaluate = evaluate_preferences if dpo else evaluate_model
        result, answers = evaluate(self.model, self.tokenizer, self.data.test_rows,
                                   self.cfg, generate=self.settings.generate, log=self.log)
        result["settings"] = {**result.get("settings", {}), "experiment_arm": folder.name}
        if self.tasks is not None:
            result["tasks"], samples = run_tasks(self.model, self.tokenizer, self.tasks,
                                                 self.log)
            write_task_samples(folder, samples)  # before eval.json, which marks it done
        write_eval(folder, result, answers)
        seconds = time.perf_counter() - t0
        o = result["overall"]
        what = (f"preference accuracy {o['preference_accuracy']:.4f}, reference-free "
                f"{o['reference_free_accuracy']:.4f}" if dpo else
                f"held-out loss {o['loss']:.4f}")
        self.log(f"[{folder.name}] {what} (eval {seconds:.0f} s)")
        return result, answers, seconds

    def _train(self, rows: list[dict[str, Any]], steps: int, seed: int, who: str) -> dict[str, Any]:
        """Train the model's adapter (loaded with the arm's start) on ``rows`` with the run's
        objective; DPO's reference log-probabilities are computed first, as a client's."""
        objective = objective_for(self.cfg)
        examples = objective.examples(self.tokenizer, rows, self.cfg.data, who, self.log)[0]
        state = ClientState()
        objective.precompute(self.model, examples, state)
        result = train_adapter(self.model, examples, _train_cfg(self.cfg, steps),
                               pad_id=self.pad_id, seed=seed, objective=objective, state=state)
        self.log(f"{who}: {result.steps} steps on {len(examples)} rows, train loss "
                 f"{result.train_loss:.4f} ({result.seconds:.0f} s)")
        return {"rows": len(examples), "steps": result.steps, "train_loss": result.train_loss,
                "train_seconds": result.seconds}

    def _arm_base(self, folder: Path) -> dict[str, Any]:
        save_adapter(self.model, folder / ADAPTER)  # the initial adapter, B = 0
        _, _, eval_s = self._evaluate(folder)
        return {"arm": "base", "steps": 0, "client_steps": {}, "train_seconds": 0.0,
                "eval_seconds": eval_s, "adapter": ADAPTER}

    def _arm_local_only(self, folder: Path) -> dict[str, Any]:
        results, first_answers, clients = [], None, {}
        for c in self.local_clients:
            sub = folder / f"client_{c:04d}"
            if (sub / "eval.json").is_file() and (sub / "train.json").is_file():
                result, answers = load_eval(sub)
                record = _read_json(sub / "train.json")
            else:
                set_adapter_arrays(self.model, self.initial)
                record = self._train(self.data.client_rows[c], self.budget.client_steps,
                                     client_seed(self.cfg.seed, 0, c), f"local-only client {c}")
                save_adapter(self.model, sub / ADAPTER)  # before train.json, which marks it done
                result, answers, record["eval_seconds"] = self._evaluate(sub)
                atomic_write_json(sub / "train.json", record)
            results.append(result)
            first_answers = answers if first_answers is None else first_answers
            clients[str(c)] = record
        mean = mean_results(results)
        mean["settings"] = {**results[0].get("settings", {}), "local_clients": self.local_clients,
                            "answers_from_client": self.local_clients[0]}
        if self.tasks is not None:  # tasks.jsonl of the first client, like its answers
            first = folder / f"client_{self.local_clients[0]:04d}" / TASKS_FILE
            write_task_samples(folder, load_task_samples(first.parent))
        write_eval(folder, mean, first_answers or [])
        return {
            "arm": "local-only",
            "steps": sum(r["steps"] for r in clients.values()),
            "client_steps": {c: r["steps"] for c, r in clients.items()},
            "clients": clients,
            "train_seconds": sum(r["train_seconds"] for r in clients.values()),
            "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in clients.values()),
            "adapter": [f"client_{c:04d}/{ADAPTER}" for c in self.local_clients],
        }

    def _arm_fedit(self, folder: Path) -> dict[str, Any]:
        cfg = dataclasses.replace(self.cfg, output_dir=str(self.out), name=folder.name,
                                  train=_train_cfg(self.cfg, self.budget.local_steps))
        done = folder / "summary.json"
        if done.is_file():  # trained before, killed while evaluating
            self.log("[fedit] trained before: evaluating its final adapter")
            set_adapter_arrays(self.model, load_adapter_arrays(folder / "final" / "adapter"))
        else:
            # A run killed mid-way continues after its last committed round
            sim = Simulation(cfg, folder, self.log, loaded=(self.tokenizer, self.model),
                             data=self.data)
            sim.run(resume=True)  # leaves the final global adapter in self.model
        lines = [_json_line(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        steps: dict[str, int] = {}
        train_s = 0.0
        for m in lines[1:]:
            for c, s in zip(m["clients"], m["client_steps"], strict=True):
                steps[str(c)] = steps.get(str(c), 0) + int(s)
            train_s += float(m["seconds"])
        _, _, eval_s = self._evaluate(folder)
        return {"arm": "fedit", "steps": sum(steps.values()), "client_steps": steps,
                "rounds": [m["client_steps"] for m in lines[1:]],
                "train_seconds": train_s, "eval_seconds": eval_s,
                "adapter": f"final/{ADAPTER}"}

    def _arm_centralized(self, folder: Path) -> dict[str, Any]:
        union = [r for client in self.data.client_rows for r in client]
        n = len(self.data.client_rows)  # a seed no client of the federation has
        record = self._train(union, self.budget.total_steps,
                             client_seed(self.cfg.seed, 0, n), "centralized")
        save_adapter(self.model, folder / ADAPTER)
        _, _, eval_s = self._evaluate(folder)
        return {"arm": "centralized", "steps": record["steps"], "client_steps": {},
                "rows": record["rows"], "train_loss": record["train_loss"],
                "train_seconds": record["train_seconds"], "eval_seconds": eval_s,
                "adapter": ADAPTER}

    # -- the summary ---------------------------------------------------------------------

    def summary(self, seconds: float) -> dict[str, Any]:
        arms = {}
        for name in ARMS:
            folder = self.out / name
            result = _read_json(folder / "eval.json")
            arms[name] = {**_read_json(folder / "arm.json"), "overall": result["overall"],
                          "by_category": result["by_category"]}
            if "tasks" in result:
                arms[name]["tasks"] = task_values(result["tasks"])
        clients = {c: _read_json(self.out / "local-only" / f"client_{c:04d}" / "eval.json")
                   for c in self.local_clients}  # every client trained, not only their mean
        arms["local-only"]["per_client"] = {str(c): r["overall"] for c, r in clients.items()}
        if all("tasks" in r for r in clients.values()):
            arms["local-only"]["per_client_tasks"] = {
                str(c): task_values(r["tasks"]) for c, r in clients.items()}
        return {
            "experiment": self.name,
            "scale": self.scale,
            "out": str(self.out),
            "model": self.cfg.model.name,
            "clients": self.cfg.partition.clients,
            "test_rows": len(self.data.test_rows),
            "budget": self.budget.as_dict(),
            "local_clients": self.local_clients,
            "arms": arms,
            "paired": paired_section(self.out, self.local_clients, self.cfg.seed),
            "seconds": seconds,
        }


def _mean_metric(ms: list[dict[str, Any]]) -> dict[str, Any]:
    """Each metric's mean over the models (the count fields taken from the first)."""
    out: dict[str, Any] = {"rows": ms[0].get("rows")}
    for key, first in ms[0].items():
        if key in out or key == "pairs_scored" or isinstance(first, bool):
            out.setdefault(key, first)
            continue
        values = [m.get(key) for m in ms]
        numbers = [float(v) for v in values if isinstance(v, int | float)]
        if len(numbers) == len(values):
            out[key] = float(np.mean(numbers))
        elif all(v is None or isinstance(v, int | float) for v in values):
            out[key] = None
    return out


def mean_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean eval result of several models on the same rows (per category, overall),
    and of their benchmark tasks' metrics when every model has them.

    A metric missing (None) for one model is None in the mean."""
    cats = [c for c in results[0]["by_category"] if all(c in r["by_category"] for r in results)]
    out = {
        "overall": _mean_metric([r["overall"] for r in results]),
        "by_category": {c: _mean_metric([r["by_category"][c] for r in results]) for c in cats},
    }
    if all("tasks" in r for r in results):
        out["tasks"] = mean_tasks([r["tasks"] for r in results])
    return out


def mean_tasks(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The first model's task summary with each metric's value the mean over the models
    (its stderr dropped: that of one model's mean is not the mean's)."""
    out = json.loads(json.dumps(summaries[0]))
    for task, res in out["results"].items():
        for name, m in res["metrics"].items():
            m["value"] = float(np.mean([s["results"][task]["metrics"][name]["value"]
                                        for s in summaries]))
            m["stderr"] = None
    out["mean_of"] = len(summaries)
    return out


def task_values(summary: dict[str, Any]) -> dict[str, float]:
    """``task/metric`` -> value of an evaluation's benchmark tasks (eval.json ``tasks``)."""
    return {f"{task}/{name}": m["value"] for task, res in summary["results"].items()
            for name, m in res["metrics"].items()}


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _json_line(line: str) -> Any:
    import json

    return json.loads(line)


def preference_pairs(cfg: RunConfig, settings: ExperimentSettings, log: Log) -> RunConfig:
    """fedit-dpo's config with ``data.path`` at its preference pairs: ``experiment.pairs``,
    else the self-play pairs built (once, then cached) from ``data.path``'s rows."""
    if settings.pairs:
        path = settings.pairs
    else:
        from fedit.model.self_play import SelfPlaySettings, build_self_play

        s = SelfPlaySettings(source=cfg.data.path, model=cfg.model.name,
                             template=cfg.data.template, label_field=cfg.data.label_field,
                             per_label=settings.pairs_per_label,
                             max_new_tokens=settings.pairs_max_new_tokens, seed=cfg.seed)
        path = str(build_self_play(s, log=log).path)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))


def run_experiment(name: str, scale: str, out: Path | None = None,
                   overrides: list[str] | None = None, log: Log = print,
                   tasks: TaskSpec | None = None) -> dict[str, Any]:
    """Build the config, run every arm not done yet, return experiment.json's content.
    ``tasks``: benchmark tasks every arm is also scored on (and paired on)."""
    cfg, settings = experiment_config(name, scale, overrides)
    prepared = prepare_experiment_tasks(cfg, tasks)
    out = Path(out) if out is not None else Path(cfg.output_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    if name == "fedit-dpo":
        cfg = preference_pairs(cfg, settings, log)
    log(f"experiment folder {out}; budget {plan_budget(cfg).as_dict()}")
    return Experiment(cfg, settings, out, scale, log, name, prepared).run()


def prepare_experiment_tasks(cfg: RunConfig, tasks: TaskSpec | None) -> PreparedTasks | None:
    """The tasks built once, before any model is loaded (None without tasks)."""
    if not tasks:
        return None
    return prepare_tasks(dataclasses.replace(tasks, batch_size=cfg.eval.batch_size))


#: the columns of the summary table: (header, overall key, digits) by evaluation kind
SUMMARY_COLUMNS = {
    "instruction": [("loss", "loss", 4), ("ppl", "perplexity", 4), ("rouge_l", "rouge_l", 4),
                    ("sim", "similarity", 4), ("tokens", "answer_tokens", 1)],
    "preference": [("acc", "preference_accuracy", 4), ("margin", "reward_margin", 4),
                   ("rf_acc", "reference_free_accuracy", 4),
                   ("rf_margin", "reference_free_margin", 4), ("dpo_loss", "dpo_loss", 4),
                   ("tokens", "answer_tokens", 1)],
}


def summary_columns(summary: dict[str, Any]) -> list[tuple[str, str, int]]:
    """The table columns of an experiment summary's kind (one seed's or across seeds)."""
    first = next(iter(summary["arms"].values()))["overall"]
    return SUMMARY_COLUMNS["preference" if "preference_accuracy" in first else "instruction"]


def format_summary(summary: dict[str, Any]) -> str:
    """The arms' overall metrics as a plain-text table."""
    columns = summary_columns(summary)

    def row(label: str, steps: str, o: dict[str, Any]) -> str:
        cells = ["-" if o.get(key) is None else f"{o[key]:.{d}f}" for _, key, d in columns]
        return f"{label:<12} {steps:>6} " + " ".join(f"{c:>9}" for c in cells)

    lines = [f"{'arm':<12} {'steps':>6} " + " ".join(f"{h:>9}" for h, _, _ in columns)]
    for name, arm in summary["arms"].items():
        lines.append(row(name, str(arm["steps"]), arm["overall"]))
    for c, o in summary["arms"]["local-only"].get("per_client", {}).items():
        lines.append(row(f"  client {c}", "", o))
    lines += format_task_table(summary["arms"])
    if "paired" in summary:
        lines += ["", *format_paired(summary["paired"])]
    return "\n".join(lines)


def format_task_table(arms: dict[str, Any]) -> list[str]:
    """The arms' benchmark task metrics (``task/metric`` columns); [] without tasks."""
    names = list(next((a["tasks"] for a in arms.values() if "tasks" in a), {}))
    if not names:
        return []
    width = max(12, *(len(n) + 1 for n in names))
    lines = ["", f"{'tasks':<12} " + " ".join(f"{n:>{width}}" for n in names)]
    rows = [(name, arm.get("tasks", {})) for name, arm in arms.items()]
    rows += [(f"  client {c}", t) for c, t in
             arms.get("local-only", {}).get("per_client_tasks", {}).items()]
    for label, values in rows:
        cells = ["-" if values.get(n) is None else f"{values[n]:.4f}" for n in names]
        lines.append(f"{label:<12} " + " ".join(f"{c:>{width}}" for c in cells))
    return lines


__all__ = ["ARMS", "Experiment", "format_summary", "mean_results", "run_experiment",
           "summary_columns"]
