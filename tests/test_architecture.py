"""The layout's rules, checked: the import contracts (import-linter, as `make lint` runs
them), the algorithms layer importable alone, and the objective seam the loop relies on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedit.client.objective import OBJECTIVES, SFT, Objective, objective_for
from fedit.config import OBJECTIVE_NAMES, load_config

ROOT = Path(__file__).resolve().parents[1]
LOWER = ("fedit.client", "fedit.model", "fedit.data", "fedit.runtimes")


def test_the_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a dev extra: pip install -e '.[dev]'"
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in done.stdout


def test_algorithms_import_no_client_model_data_or_runtime():
    # Execute: every submodule of fedit.algorithms, in a fresh process
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import fedit.algorithms as a\n"
        "names = [m.name for m in pkgutil.walk_packages(a.__path__, 'fedit.algorithms.')]\n"
        "for n in names: importlib.import_module(n)\n"
        "print(json.dumps({'imported': names, 'modules': sorted(sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    out = json.loads(done.stdout)
    # Assert: the whole layer came in, and nothing of the layers it must not touch
    assert {"fedit.algorithms.pipeline", "fedit.algorithms.strategies.scaffold",
            "fedit.algorithms.privacy", "fedit.algorithms.hooks"} <= set(out["imported"])
    leaked = [m for m in out["modules"] if m.startswith(LOWER)]
    assert leaked == []
    assert "torch" not in out["modules"]  # the server's math is numpy


def test_the_command_line_and_the_data_layer_import_no_torch():
    # `fedit --help`, `fedit data inspect --model none` and `fedit partition` start in a
    # fraction of a second: torch (1.5 s, ~200 MB) comes in only with a model
    code = ("import json, sys\nimport fedit.cli, fedit.cli.data, fedit.data.inspect\n"
            "import fedit.data.load, fedit.data.federated, fedit.data.preference_tokens\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert "torch" not in json.loads(done.stdout)


def test_the_objective_names_agree_with_the_config():
    assert set(OBJECTIVE_NAMES) == set(OBJECTIVES)
    assert all(issubclass(c, Objective) and c.name == n for n, c in OBJECTIVES.items())


def test_a_run_trains_with_the_objective_it_is_given(tmp_path, tiny_model_dir, monkeypatch):
    # Prepare: an objective that weighs every label token twice: the loop, the runtime
    # and the strategy never look inside it, so the run's train loss doubles exactly
    from fedit.client import objective as obj
    from fedit.runtimes.inprocess import Simulation
    from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl

    class Doubled(SFT):
        name = "doubled"

        def micro_loss(self, model, micro, state):
            summed, seen = super().micro_loss(model, micro, state)
            state.scalars["doubled.micro"] = int(state.scalars.get("doubled.micro", 0)) + 1
            return 2 * summed, seen

    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(24, seed=2))
    path = write_config(tmp_path / "o.toml", tiny_model_dir, data, seed=3, rounds=1,
                        partition={"clients": 2, "min_size": 4},
                        strategy={"fraction": 1.0}, train={"max_steps": 1, "lr": 1e-9})
    lines, summaries = {}, {}
    for name in ("sft", "doubled"):
        monkeypatch.setattr(obj, "objective_for", lambda cfg, n=name: (
            Doubled() if n == "doubled" else SFT()))
        for where in ("fedit.runtimes.inprocess", "fedit.runtimes.model_side"):
            monkeypatch.setattr(f"{where}.objective_for", obj.objective_for)
        cfg = load_config(path, [f"name={name}"])
        run_dir = make_run_dir(cfg)
        Simulation(cfg, run_dir, log=lambda m: None).run()
        lines[name] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text()
                       .splitlines()][1]
        summaries[name] = json.loads((run_dir / "summary.json").read_text())
    # Assert: lr ~0 keeps the adapters equal, so the loss is exactly twice the SFT one
    assert lines["doubled"]["train_loss"] == pytest.approx(2 * lines["sft"]["train_loss"],
                                                           rel=1e-6)
    assert lines["doubled"]["eval_loss"] == pytest.approx(lines["sft"]["eval_loss"], rel=1e-6)
    # the summary says which objective ran and what its train_loss is
    assert summaries["doubled"]["objective"] == {"name": "doubled", "train_loss": (
        "the mean loss per label token over every step of the round")}


def test_sft_normalises_a_step_by_its_label_tokens(tiny_model_dir, tiny_rows):
    # the normaliser is the step's label tokens, however it is split into micro-batches
    from fedit.data.batching import tokenize_rows
    from fedit.model.base import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    examples = tokenize_rows(tok, tiny_rows, cutoff_len=128)
    sft = SFT()
    steps = list(sft.steps(examples[:8], 8, 2, tok.pad_token_id, np.random.default_rng(0),
                           False))
    assert len(steps) == 1 and len(steps[0]) == 4
    labels = sum(int((np.asarray(e.labels) != -100).sum()) for e in examples[:8])
    assert sft.normaliser(steps[0]) == labels


def test_objective_for_the_default_config(tmp_path, tiny_model_dir):
    from tests.conftest import make_rows, write_config, write_jsonl

    path = write_config(tmp_path / "c.toml", tiny_model_dir,
                        write_jsonl(tmp_path / "r.jsonl", make_rows(8, seed=1)))
    assert isinstance(objective_for(load_config(path)), SFT)
    with pytest.raises(Exception, match="train.objective: use one of sft, dpo"):
        load_config(path, ["train.objective=ppo"])
