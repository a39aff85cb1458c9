"""Seconds per adapter on a local multiple-choice task: ``fedit eval --task-file`` against
lm-evaluation-harness's own CLI (``lm_eval --model hf ... peft=...``).

    .venv/bin/python bench/tasks_speed.py                # SmolLM2, 200 questions, 2 adapters
    .venv/bin/python bench/tasks_speed.py --fast         # the tiny random model (~1 min)
    .venv/bin/python bench/tasks_speed.py --questions 50 --adapters 1 --no-write

The task: ``--questions`` databricks-dolly-15k instructions, each with four answers to
choose from (its own response and three other rows', each cut to 24 words), in the
harness's own format (a task YAML + a JSONL file). Adapters: the default LoRA shape with
random (non-zero) B. Arms, each timed as a whole command in a subprocess (model load, task
build and scoring; fp32 on both sides), one adapter after another:

- ``harness``: ``lm_eval --model hf --model_args pretrained=DIR,peft=ADAPTER,dtype=float32``
  with its default batch size (1);
- ``harness_batched``: the same with ``--batch_size`` = fedit's ``eval.batch_size`` (16);
- ``fedit``: ``fedit eval ADAPTER --model DIR --task-file TASK --no-heldout``;
- ``fedit_one_model``: in this process, one base model loaded once and each adapter's
  arrays swapped in (what ``fedit experiment --tasks`` does for its arms), task built once.

Reported: seconds per adapter of each arm and the harness's seconds over fedit's; the
per-document log-likelihoods of every arm are checked to agree (max abs difference).
Writes bench/results/tasks_speed.json unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from round_overhead import build_tiny_model  # noqa: E402
from tests.harness_tasks import write_mc_task  # noqa: E402

from fedit.data.load import load_rows  # noqa: E402
from fedit.evaluate.tasks import prepare_tasks, run_tasks, task_spec  # noqa: E402
from fedit.model.adapter import (  # noqa: E402
    adapter_names,
    get_adapter_arrays,
    load_adapter_arrays,
    save_adapter,
    set_adapter_arrays,
)
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer  # noqa: E402
from fedit.model.convert import resolve_model  # noqa: E402

DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULT = Path(__file__).parent / "results" / "tasks_speed.json"
BIN = Path(sys.executable).parent


def dolly_questions(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` four-way questions from dolly: the row's response among three others'."""
    source = next(DOLLY.glob("*.jsonl"))
    rows = [r for r in load_rows(str(source), None)
            if not r.get("context") and len(r["instruction"].split()) <= 40
            and r["response"].strip()]
    rng = random.Random(seed)
    picked = rng.sample(rows, n + 3 * n)

    def cut(text: str) -> str:
        return " ".join(text.split()[:24])

    out = []
    for i in range(n):
        row, others = picked[i], picked[n + 3 * i: n + 3 * i + 3]
        answer = rng.randrange(4)
        choices = [cut(o["response"]) for o in others]
        choices.insert(answer, cut(row["response"]))
        out.append({"question": row["instruction"].strip(), "choices": choices,
                    "answer": answer})
    return out


def make_adapters(base: str, out: Path, n: int) -> list[Path]:
    lm = attach_lora(load_base_model(base, dtype="fp32"), LoraSpec(), seed=0)
    names = adapter_names(lm)
    folders = []
    for i in range(n):
        rng = np.random.default_rng(i)
        arrays = [rng.normal(0, 0.01, a.shape).astype(a.dtype) if "lora_B" in k else a
                  for k, a in zip(names, get_adapter_arrays(lm), strict=True)]
        set_adapter_arrays(lm, arrays)
        folders.append(save_adapter(lm, out / f"adapter_{i}", base_model=base))
    return folders


def _timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{done.stderr[-3000:]}")
    return seconds


def _harness_lls(out: Path) -> list[list[float]]:
    [samples] = list(out.rglob("samples_*.jsonl"))
    recs = sorted((json.loads(x) for x in samples.read_text().splitlines()),
                  key=lambda r: r["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in recs]


def _fedit_lls(records: list[dict[str, Any]]) -> list[list[float]]:
    return [r["loglikelihoods"] for r in sorted(records, key=lambda r: r["doc_id"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="the tiny random model")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="fedit's eval.batch_size")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = str(build_tiny_model(tmp / "tiny")) if args.fast else resolve_model(
            "smollm2-135m")
        task = write_mc_task(tmp / "task", dolly_questions(args.questions), "dolly_mc")
        adapters = make_adapters(base, tmp, args.adapters)
        seconds: dict[str, list[float]] = {k: [] for k in
                                           ("harness", "harness_batched", "fedit",
                                            "fedit_one_model")}
        lls: dict[str, list[list[list[float]]]] = {k: [] for k in seconds}
        for i, adapter in enumerate(adapters):
            for arm, extra in (("harness", []),
                               ("harness_batched", ["--batch_size", str(args.batch_size)])):
                out = tmp / f"{arm}_{i}"
                cmd = [str(BIN / "lm_eval"), "--model", "hf", "--model_args",
                       f"pretrained={base},peft={adapter},dtype=float32", "--tasks",
                       "dolly_mc", "--include_path", str(task.parent), "--device", "cpu",
                       "--log_samples", "--output_path", str(out), *extra]
                seconds[arm].append(_timed(cmd, tmp))
                lls[arm].append(_harness_lls(out))
                print(f"{arm} adapter {i}: {seconds[arm][-1]:.1f} s", flush=True)
            out = tmp / f"fedit_{i}"
            cmd = [str(BIN / "fedit"), "eval", str(adapter), "--model", base, "--task-file",
                   str(task), "--no-heldout", "--out", str(out),
                   "--set", f"eval.batch_size={args.batch_size}", "--set", "model.dtype=fp32"]
            seconds["fedit"].append(_timed(cmd, tmp))
            lls["fedit"].append(_fedit_lls([json.loads(x) for x in
                                            (out / "tasks.jsonl").read_text().splitlines()]))
            print(f"fedit adapter {i}: {seconds['fedit'][-1]:.1f} s", flush=True)
        # one model for every adapter, as fedit experiment --tasks does
        t0 = time.perf_counter()
        lm = attach_lora(load_base_model(base, dtype="fp32"), LoraSpec(), seed=0)
        tokenizer = load_tokenizer(base)
        prepared = prepare_tasks(task_spec(task_files=[task], batch_size=args.batch_size))
        setup = time.perf_counter() - t0
        names = adapter_names(lm)
        for i, adapter in enumerate(adapters):
            t0 = time.perf_counter()
            set_adapter_arrays(lm, load_adapter_arrays(adapter, names))
            _, records = run_tasks(lm, tokenizer, prepared, log=lambda _: None)
            seconds["fedit_one_model"].append(time.perf_counter() - t0
                                              + (setup if i == 0 else 0.0))
            lls["fedit_one_model"].append(_fedit_lls(records))
            print(f"fedit_one_model adapter {i}: {seconds['fedit_one_model'][-1]:.1f} s",
                  flush=True)
    agree = max(float(np.max(np.abs(np.array(a) - np.array(b))))
                for arm in seconds for a, b in zip(lls[arm], lls["harness"], strict=True))
    per = {arm: float(np.mean(s)) for arm, s in seconds.items()}
    result = {
        "model": "tiny" if args.fast else "smollm2-135m", "questions": args.questions,
        "adapters": args.adapters, "batch_size": args.batch_size,
        "seconds_per_adapter": per, "seconds": seconds,
        "harness_over_fedit": per["harness"] / per["fedit"],
        "harness_batched_over_fedit": per["harness_batched"] / per["fedit"],
        "harness_over_fedit_one_model": per["harness"] / per["fedit_one_model"],
        "max_abs_loglikelihood_difference": agree,
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        RESULT.parent.mkdir(exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
