"""TensorBoard events and an offline W&B run of a fedit run, read back with each tool's own
reader (TensorBoard's EventAccumulator; the W&B transaction log, record by record) and
compared with metrics.jsonl and with the step losses the trainer reported."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedit.client.round as client_round
import fedit.runtimes.inprocess as inprocess
from fedit.config import LogConfig, load_config
from fedit.errors import ConfigError
from fedit.federation.loggers import check_log_config, scalars, tensorboard_on
from fedit.federation.rundir import check_new_run_dir
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

TIMEOUT = 300  # seconds for one `fedit train` process (2 busy cores)


@pytest.fixture
def cfg_path(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(64, seed=2))
    return write_config(tmp_path / "logs.toml", tiny_model_dir, data, name="logs", seed=4,
                        rounds=3, partition={"clients": 3}, strategy={"fraction": 0.67},
                        train={"max_steps": 3, "batch_size": 2, "micro_batch_size": 2})


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] as TensorBoard shows them (purged data left out)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _value_of(line: dict, tag: str) -> float:
    """The metrics line's number a tag stands for, found by hand: ``a/b`` is line[a][b],
    ``x_count`` the length of the list line[x]."""
    if "/" in tag:
        key, sub = tag.split("/", 1)
        return float(line[key][sub])
    if tag.endswith("_count") and isinstance(line.get(tag[:-6]), list):
        return float(len(line[tag[:-6]]))
    return float(line[tag])


def _assert_rounds_match(events: dict, lines: list[dict]) -> None:
    """Each round once per tag, every value the line's (float32), every number there."""
    by_round = {m["round"]: m for m in lines}
    for tag, points in events.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: a round twice: {steps}"
        for step, value in points:
            np.testing.assert_allclose(value, _value_of(by_round[step], tag), rtol=1e-6,
                                       err_msg=f"{tag} at round {step}")
    for m in lines:  # the numbers of each line are all there
        for key in ("eval_loss", "train_loss", "bytes_up", "bytes_down", "num_examples",
                    "seconds"):
            if isinstance(m.get(key), int | float):
                assert (m["round"], pytest.approx(m[key], rel=1e-6)) in events[key], key
        if m["round"]:
            assert (m["round"], len(m["dropped"])) in events["dropped_count"]
            assert (m["round"], 1.0) in events["aggregated"]
        for cat, loss in (m["eval_loss_by_category"] or {}).items():
            assert (m["round"], pytest.approx(loss, rel=1e-6)) in \
                events[f"eval_loss_by_category/{cat}"]


def _record_steps(monkeypatch) -> dict[tuple[int, int], list[float]]:
    """(round, client) -> the losses the trainer reported after each optimizer step of that
    client round (both runtimes call ``run_client_round``)."""
    calls: dict[tuple[int, int], list[float]] = {}
    real = client_round.run_client_round

    def recording(*args, progress=None, **kwargs):
        losses = calls[kwargs["server_round"], kwargs["client"]] = []

        def seen(step, total, loss):
            losses.append(loss)
            if progress is not None:
                progress(step, total, loss)

        return real(*args, progress=seen, **kwargs)

    monkeypatch.setattr(client_round, "run_client_round", recording)
    monkeypatch.setattr(inprocess, "run_client_round", recording)
    return calls


def test_tensorboard_events_are_the_metrics_lines_and_the_clients_steps(cfg_path, monkeypatch):
    # Prepare: no [log] section: TensorBoard is on because the package is installed
    cfg = load_config(cfg_path)
    assert cfg.log.tensorboard is None and tensorboard_on(cfg.log)
    calls = _record_steps(monkeypatch)
    # Execute
    run_dir = make_run_dir(cfg)
    Simulation(cfg, run_dir, log=lambda m: None).run()
    # Assert: every round's numbers at step = round, equal to metrics.jsonl
    lines = _lines(run_dir)
    events = _events(run_dir / "tensorboard")
    assert sorted(s for s, _ in events["eval_loss"]) == [0, 1, 2, 3]
    assert sorted(s for s, _ in events["train_loss"]) == [1, 2, 3]  # round 0 trains nobody
    _assert_rounds_match(events, lines)
    # Each client's step losses: what the trainer reported, at (round - 1) * steps + step
    trained = {(m["round"], c): n for m in lines[1:]
               for c, n in zip(m["clients"], m["client_steps"], strict=True)}
    assert {k: len(v) for k, v in calls.items()} == trained
    assert set(trained.values()) == {3}  # train.max_steps
    clients = _events(run_dir / "tensorboard" / "clients")
    expected: dict[str, list[tuple[int, float]]] = {}
    for (rnd, c), losses in sorted(calls.items()):
        expected.setdefault(f"client_{c:04d}/train_loss", []).extend(
            ((rnd - 1) * 3 + i, loss) for i, loss in enumerate(losses, start=1))
    assert sorted(clients) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in clients[tag]] == [s for s, _ in points]
        np.testing.assert_allclose([v for _, v in clients[tag]], [v for _, v in points],
                                   rtol=1e-6)


def _fedit(*args: str, cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FEDIT_FAULT", None)
    if fault:
        env["FEDIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "fedit", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("fault", [
    "after-manifest:2",  # round 2 committed, killed before its events: written on resume
    "mid-client:3",      # rounds 0-2 logged, round 2 is written again: replaces the first
])
def test_a_killed_and_resumed_run_logs_each_round_once(cfg_path, fault):
    root = cfg_path.parent
    name = f"killed-{fault.replace(':', '-')}"
    killed = _fedit("train", str(cfg_path), "--set", f"name={name}", fault=fault, cwd=root)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = root / "runs" / name
    resumed = _fedit("train", "--resume", str(run_dir), cwd=root)
    assert resumed.returncode == 0, resumed.stderr
    # Assert: rounds 0..3 once each, the resumed run's values; each client step once
    lines = _lines(run_dir)
    events = _events(run_dir / "tensorboard")
    assert [s for s, _ in events["eval_loss"]] == [0, 1, 2, 3]
    _assert_rounds_match(events, lines)
    clients = _events(run_dir / "tensorboard" / "clients")
    steps: dict[str, list[int]] = {}
    for m in lines[1:]:
        for c, n in zip(m["clients"], m["client_steps"], strict=True):
            steps.setdefault(f"client_{c:04d}/train_loss", []).extend(
                range((m["round"] - 1) * n + 1, m["round"] * n + 1))
    # a crash after the manifest loses that round's step losses (they were in memory)
    lost = {int(fault.split(":")[1])} if fault.startswith("after-manifest") else set()
    for tag, want in steps.items():
        got = [s for s, _ in clients.get(tag, [])]
        assert len(got) == len(set(got)), f"{tag}: a step twice: {got}"
        kept = [s for s in want if (s - 1) // 3 + 1 not in lost]
        assert got == kept, tag


# -- Weights & Biases, offline --------------------------------------------------------------
def _wandb_records(path: Path) -> list:
    """The records of a ``run-<id>.wandb`` transaction log: W&B's LevelDB-style log (a
    7-byte file header ``:W&B`` 0xBEE1 0; 32 KiB blocks of chunks, each with a 7-byte
    header: CRC-32C, length, type full/first/middle/last), each record a protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(path: Path) -> tuple[dict, dict[int, dict[str, float]]]:
    """(the run record: id, name, project, config), {step: {key: value}} of one run file."""
    run: dict = {}
    history: dict[int, dict[str, float]] = {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = {"id": r.run.run_id, "name": r.run.display_name, "project": r.run.project,
                   "config": {i.key: json.loads(i.value_json) for i in r.run.config.update}}
        elif kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                     for i in r.history.item}
            history[r.history.step.num] = {k: v for k, v in items.items()
                                           if not k.startswith("_")}
    return run, history


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_DIR", tmp_path / "wandb-dir"),
                       ("WANDB_CONFIG_DIR", tmp_path / "wandb-config"),
                       ("WANDB_CACHE_DIR", tmp_path / "wandb-cache"),
                       ("WANDB_DATA_DIR", tmp_path / "wandb-data")):
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_an_offline_wandb_run_holds_the_metrics_lines_and_the_config(cfg_path, wandb_offline):
    # Execute: W&B only, offline (WANDB_MODE); then the finished run resumed (no round left)
    sets = ["log.wandb=test", "log.tensorboard=false", "rounds=2"]
    cfg = load_config(cfg_path, sets)
    run_dir = make_run_dir(cfg)
    Simulation(cfg, run_dir, log=lambda m: None).run()
    Simulation(load_config(cfg_path, sets), run_dir, log=lambda m: None).run(resume=True)
    # Assert: one W&B run id, both sessions' files under the run folder
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    assert not (run_dir / "tensorboard").exists()
    run, history = _wandb_history(files[0])
    assert (run["id"], run["name"], run["project"]) == (run_id, "logs", "test")
    # The config is the run's RunConfig
    assert run["config"]["rounds"] == 2 and run["config"]["seed"] == 4
    assert run["config"]["log"] == {"tensorboard": False, "wandb": "test", "wandb_mode": ""}
    assert run["config"]["train"]["max_steps"] == 3
    # Each round at step = round, its numbers those of metrics.jsonl
    lines = _lines(run_dir)
    assert sorted(history) == [0, 1, 2]
    for m in lines:
        logged = history[m["round"]]
        assert logged["eval_loss"] == pytest.approx(m["eval_loss"])
        if m["round"]:  # round 0 (the base model) moved nothing
            assert (logged["bytes_up"], logged["bytes_down"]) == (m["bytes_up"], m["bytes_down"])
        for key, value in logged.items():
            assert value == pytest.approx(_value_of(m, key)), key
        assert set(logged) == set(scalars(m))
    assert _wandb_history(files[1])[1] == {}  # the resumed session had no round to log


# -- the config's checks --------------------------------------------------------------------
def _hide(monkeypatch, package: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == package else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_tensorboard_true_without_the_package_stops_before_the_run(cfg_path, monkeypatch):
    _hide(monkeypatch, "tensorboard")
    cfg = load_config(cfg_path, ["log.tensorboard=true"])
    run_dir = make_run_dir(cfg)
    with pytest.raises(ConfigError) as e:
        Simulation(cfg, run_dir, log=lambda m: None)
    assert str(e.value) == ("log.tensorboard = true but the tensorboard package is not "
                            "installed: pip install tensorboard (or set log.tensorboard = false)")
    assert list(run_dir.iterdir()) == []  # nothing written
    # Not set: off, no error
    assert not tensorboard_on(LogConfig())
    check_log_config(LogConfig())


def test_wandb_without_the_package_is_one_line(monkeypatch):
    _hide(monkeypatch, "wandb")
    with pytest.raises(ConfigError, match=r"^log.wandb = 'proj' but the wandb package is not "
                                          r"installed: pip install wandb"):
        check_log_config(LogConfig(wandb="proj"))
    check_log_config(LogConfig(wandb="proj", wandb_mode="disabled"))  # off: nothing needed


def test_wandb_mode_is_checked():
    with pytest.raises(ConfigError, match="log.wandb_mode: use online, offline or disabled"):
        LogConfig(wandb_mode="cloud")


def test_the_loggers_files_belong_to_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    for d in ("tensorboard/clients", "wandb/offline-run-1"):
        (run_dir / d).mkdir(parents=True)
    (run_dir / "wandb.json").write_text('{"id": "abc"}')
    check_new_run_dir(run_dir)  # not foreign: a run that failed early may be run again


def test_scalars_flattens_a_metrics_line():
    line = {"round": 2, "sampled": [0, 1, 2], "clients": [0, 2], "aggregated": True,
            "dropped": [{"client": 1, "reason": "x"}], "train_loss": 1.5, "eval_loss": None,
            "eval_loss_by_category": {"open_qa": 2.0}, "update_norms": {"0": 0.5},
            "secure_aggregation": True, "epsilon": 3.25, "note": "text"}
    assert scalars(line) == {
        "sampled_count": 3.0, "clients_count": 2.0, "aggregated": 1.0, "dropped_count": 1.0,
        "train_loss": 1.5, "eval_loss_by_category/open_qa": 2.0, "update_norms/0": 0.5,
        "secure_aggregation": 1.0, "epsilon": 3.25}


# -- Flower: each node writes its own clients' step losses -----------------------------------
def test_each_flower_node_writes_its_clients_step_losses(cfg_path, tmp_path, monkeypatch,
                                                         flower_task_identity):
    from tests.conftest import FakeGrid, run_server_app

    calls = _record_steps(monkeypatch)
    state_dirs = [tmp_path / f"node{k}" for k in range(3)]
    configs = [{"partition-id": k, "num-partitions": 3, "state-dir": str(d)}
               for k, d in enumerate(state_dirs)]
    run_dir, lines = run_server_app(cfg_path, FakeGrid(3, node_configs=configs))
    # The server's run folder has the rounds; no client steps (they stay on the nodes)
    assert [s for s, _ in _events(run_dir / "tensorboard")["eval_loss"]] == [0, 1, 2, 3]
    assert not (run_dir / "tensorboard" / "clients").exists()
    # Each node: its own client's steps, in its state folder
    assert {k for k in calls} == {(m["round"], c) for m in lines[1:] for c in m["clients"]}
    for c, folder in enumerate(state_dirs):
        want = [((rnd - 1) * 3 + i, loss) for (rnd, k), losses in sorted(calls.items())
                if k == c for i, loss in enumerate(losses, start=1)]
        events = _events(folder / "logs" / f"client_{c:05d}" / "tensorboard")
        got = events.get(f"client_{c:04d}/train_loss", [])
        assert [s for s, _ in got] == [s for s, _ in want] and want
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
