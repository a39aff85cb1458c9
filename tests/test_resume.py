"""Kill-and-resume with real processes: `fedit train` (and `fedit experiment`) killed with
SIGKILL at several moments, then resumed, ends byte for byte where a run never
interrupted ends.

The kill comes from inside (``FEDIT_FAULT=POINT:ROUND``, see
``fedit.federation.checkpoint.fault_point``) so that it lands exactly at the moment under test, not
at whatever moment a timer hits on a busy machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_rows, write_config, write_jsonl

FINAL = "final/adapter/adapter_model.safetensors"
TIMEOUT = 300  # seconds for one process (2 busy cores)


def _fedit(*args: str, fault: str | None = None, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every process
    env.pop("FEDIT_FAULT", None)
    if fault:
        env["FEDIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "fedit", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _lines(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "seconds"} for m in rows]


#: the jobs run whole once, and killed + resumed: their --set options
STRATEGY_SETS = {
    "fedavg": [],
    "fedavgm": ["--set", "strategy.name=fedavgm"],
    # each round's lr from the cosine round schedule: a resumed run must go on with it
    "cosine": ["--set", "train.round_schedule=cosine", "--set", "train.min_lr=1e-4"],
}


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    """A 3-round job and its uninterrupted run, for FedAvg and for FedAvgM."""
    root = tmp_path_factory.mktemp("resume")
    data = write_jsonl(root / "rows.jsonl", make_rows(64, seed=4))
    cfg = write_config(root / "job.toml", tiny_model_dir, data, rounds=3, seed=9,
                       partition={"clients": 3}, strategy={"fraction": 0.67},
                       train={"max_steps": 2})
    whole = {}
    for name, sets in STRATEGY_SETS.items():
        done = _fedit("train", str(cfg), "--set", f"name=whole-{name}", *sets, cwd=root)
        assert done.returncode == 0, done.stderr
        whole[name] = root / "runs" / f"whole-{name}"
    return root, cfg, whole


@pytest.mark.parametrize("strategy,fault", [
    ("fedavg", "mid-client:2"),       # inside a client's round, before its reply
    ("fedavg", "before-metrics:2"),   # round 2's adapter and blobs written, no line yet
    ("fedavg", "before-manifest:2"),  # the metrics line written, not committed
    ("fedavg", "after-manifest:1"),   # between rounds
    ("fedavgm", "before-manifest:2"),  # server momentum must come back from the checkpoint
    ("cosine", "mid-client:2"),  # round 2 trained again at round 2's lr, round 3 at its own
])
def test_killed_run_resumes_to_the_same_bytes(job, strategy, fault):
    root, cfg, whole = job
    name = f"{strategy}-{fault.replace(':', '-')}"
    sets = STRATEGY_SETS[strategy]
    # Execute: killed at the fault point, then resumed
    killed = _fedit("train", str(cfg), "--set", f"name={name}", *sets, fault=fault, cwd=root)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = root / "runs" / name
    assert not (run_dir / "summary.json").exists()
    resumed = _fedit("train", "--resume", str(run_dir), cwd=root)
    assert resumed.returncode == 0, resumed.stderr
    # Assert: the same final adapter, byte for byte; each round's line exactly once
    assert (run_dir / FINAL).read_bytes() == (whole[strategy] / FINAL).read_bytes()
    assert _lines(run_dir) == _lines(whole[strategy])
    last = int(fault.split(":")[1]) - (0 if fault.startswith("after") else 1)
    assert f"resumed {run_dir} after round {last} of 3" in resumed.stderr
    if strategy == "cosine":  # FlowerTune's cosine_annealing(r, 3, 3e-3, 1e-4), by hand
        assert [m["lr"] for m in _lines(run_dir)[1:]] == pytest.approx(
            [1e-4 + 0.5 * (3e-3 - 1e-4) * (1 + math.cos(math.pi * r / 3)) for r in (1, 2, 3)],
            rel=1e-12)


def test_fedavgm_is_not_fedavg(job):
    # The momentum case above would pass trivially if fedavgm changed nothing
    _, _, whole = job
    assert (whole["fedavgm"] / FINAL).read_bytes() != (whole["fedavg"] / FINAL).read_bytes()


def test_resume_needs_a_run_folder_and_no_other_config(job, tmp_path):
    root, cfg, _ = job
    no_run = _fedit("train", "--resume", str(tmp_path), cwd=root)
    assert no_run.returncode == 2
    assert no_run.stderr.strip() == (f"error: --resume {tmp_path}: no config.toml there; "
                                     "is it a run folder?")
    both = _fedit("train", str(cfg), "--resume", str(tmp_path), cwd=root)
    assert both.returncode == 2
    assert "--resume takes the run's own config.toml: give no CONFIG and no --set" in both.stderr


def test_a_killed_experiment_resumes_its_fedit_arm(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(80))
    args = ["experiment", "fedit-paper", "--scale", "test", "--set",
            f"model.name={tiny_model_dir}", "--set", f"data.path={data}",
            "--set", "experiment.generate=false"]
    whole = _fedit(*args, "--out", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    # Execute: killed inside the FedIT arm, right after its round 1 was committed
    out = tmp_path / "killed"
    killed = _fedit(*args, "--out", str(out), fault="after-manifest:1", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = _fedit(*args, "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    # Assert: the arm continued after round 1 (not restarted) and ended where it would have
    assert f"resumed {out / 'fedit'} after round 1 of 2" in again.stderr
    assert "[base] done before (eval.json exists): skipped" in again.stderr
    assert [m["round"] for m in _lines(out / "fedit")] == [0, 1, 2]
    assert (out / "fedit" / FINAL).read_bytes() == (tmp_path / "whole" / "fedit" / FINAL
                                                    ).read_bytes()
    a = json.loads((out / "experiment.json").read_text())["arms"]
    b = json.loads((tmp_path / "whole" / "experiment.json").read_text())["arms"]
    assert a["fedit"]["overall"] == b["fedit"]["overall"]
    assert a["fedit"]["steps"] == b["fedit"]["steps"] == 4


def _default_sigint() -> None:
    """Run in the child between fork and exec: SIGINT back to its default action.

    A shell without job control starts a background job (`nohup make test &`, some CI
    runners) with SIGINT ignored, every child inherits that, and a Python started with
    SIGINT ignored never raises KeyboardInterrupt: the Ctrl-C below would be lost.
    (``restore_signals`` restores SIGPIPE, SIGXFZ and SIGXFSZ only, not SIGINT.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_names_the_resume_command_and_resume_finishes_the_run(job):
    root, cfg, whole = job
    # the run waits after committing round 1 (FEDIT_PAUSE), so the Ctrl-C cannot come after
    # the last round however fast the tiny rounds are
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDIT_PAUSE": "after-manifest:1"}
    env.pop("FEDIT_FAULT", None)
    run_dir = root / "runs" / "interrupted"
    # preexec_fn: the Ctrl-C reaches the run even when this suite is a background job
    proc = subprocess.Popen([sys.executable, "-m", "fedit", "train", str(cfg), "--set",
                             "name=interrupted"], env=env, cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)
    try:
        # Wait for round 1 to be committed (a file, not a timer), then press Ctrl-C
        manifest = run_dir / "rounds" / "0001" / "manifest.json"
        while not manifest.exists() and proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)  # returns at once if the process ends
        assert proc.poll() is None, "the run ended before round 1 was committed"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.rstrip().splitlines()[-1] == (
        f"interrupted: continue from the last committed round with `fedit train --resume "
        f"{run_dir}`")
    resumed = _fedit("train", "--resume", "runs/interrupted", cwd=root)
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / FINAL).read_bytes() == (whole["fedavg"] / FINAL).read_bytes()
    assert _lines(run_dir) == _lines(whole["fedavg"])
