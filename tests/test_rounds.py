"""The round loop in-process: failing clients, client state, checkpoints and resume.

A crash is a BaseException raised inside a client's round (the loop lets it through, as a
process kill would stop it); the real SIGKILL tests are in test_resume.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import fedit.client.round as client_round
import fedit.runtimes.inprocess as fs
from fedit.algorithms.schedule import round_lr
from fedit.algorithms.strategies import (
    ClientState,
    ServerState,
)
from fedit.config import load_config
from fedit.federation import checkpoint as ckpt
from fedit.model.adapter import load_adapter_arrays
from fedit.runtimes.inprocess import Simulation
from tests.conftest import KILL, Killed, make_rows, make_run_dir, write_config, write_jsonl


@pytest.fixture
def cfg_path(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(72, seed=11))
    return write_config(tmp_path / "loop.toml", tiny_model_dir, data, name="loop", seed=5,
                        rounds=3, partition={"clients": 4, "min_size": 4},
                        strategy={"fraction": 0.5}, train={"max_steps": 2})


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(cfg_path, *sets, resume_dir=None):
    cfg = load_config(cfg_path, list(sets))
    run_dir = resume_dir or make_run_dir(cfg)
    Simulation(cfg, run_dir, log=lambda m: None).run(resume=resume_dir is not None)
    return run_dir


# -- failing clients ---------------------------------------------------------------------------
def _misbehave(monkeypatch, kinds: dict[int, str]) -> None:
    real = fs.run_client_round

    def wrapped(*args, **kwargs):
        reply = real(*args, **kwargs)
        kind = kinds.get(kwargs["client"])
        if kind == "raise":
            raise RuntimeError("CUDA out of memory (simulated)")
        if kind == "nan":
            reply.arrays[0] = np.full_like(reply.arrays[0], np.nan)
        if kind == "shape":
            reply.arrays = reply.arrays[:-1]
        if kind == "huge":
            reply.arrays = [a * 1e4 for a in reply.arrays]
        return reply

    monkeypatch.setattr(fs, "run_client_round", wrapped)


def test_each_failure_kind_is_dropped_with_its_reason(cfg_path, monkeypatch):
    # Prepare: five clients, all sampled; client 0 behaves, each other fails its own way
    _misbehave(monkeypatch, {1: "raise", 2: "nan", 3: "shape", 4: "huge"})
    # Execute
    run_dir = _run(cfg_path, "rounds=1", "partition.clients=5", "strategy.fraction=1.0",
                   "strategy.max_update_norm=50")
    # Assert: the round combined client 0 alone and names why each other one is out
    line = _lines(run_dir)[1]
    assert line["sampled"] == [0, 1, 2, 3, 4] and line["clients"] == [0]
    assert line["aggregated"] is True
    why = {d["client"]: d["reason"] for d in line["dropped"]}
    assert why[1] == "raised RuntimeError: CUDA out of memory (simulated)"
    assert why[2] == "array 0 has non-finite values"
    assert why[3].endswith("arrays, expected " + str(len(load_adapter_arrays(
        run_dir / "final/adapter"))))
    assert why[4].startswith("update norm ") and "> strategy.max_update_norm 50" in why[4]
    assert json.loads((run_dir / "summary.json").read_text())["dropped"] == 4


def test_too_few_valid_replies_keep_the_global_adapter(cfg_path, monkeypatch):
    _misbehave(monkeypatch, {1: "raise", 2: "nan", 3: "raise"})
    run_dir = _run(cfg_path, "rounds=1", "strategy.fraction=1.0", "strategy.min_replies=2")
    line = _lines(run_dir)[1]
    assert line["aggregated"] is False and line["clients"] == [] and line["train_loss"] is None
    assert line["eval_loss"] == _lines(run_dir)[0]["eval_loss"]  # still the base model
    final = load_adapter_arrays(run_dir / "final/adapter")
    assert all(not a.any() for a in final[1::2])  # every lora_B still zero


TALLY = "strategy.name=tests.conftest:Tally"  # a user strategy, loaded by name


def _states(run_dir: Path) -> tuple[dict, dict[int, ClientState]]:
    m = ckpt.latest_manifest(run_dir, log=lambda x: None)
    assert m is not None
    server = ckpt.read_state(run_dir, m.strategy_state, ServerState)
    clients = {c: ckpt.read_state(run_dir, b, ClientState) for c, b in m.client_states.items()}
    return {"sum": server.arrays["sum"][0].tolist(), **server.scalars}, clients


def test_client_state_and_instructions_reach_the_clients(cfg_path):
    run_dir = _run(cfg_path, TALLY)
    lines = _lines(run_dir)
    trained: dict[int, int] = {}
    for m in lines[1:]:
        for c in m["clients"]:
            trained[c] = trained.get(c, 0) + 1
    server, clients = _states(run_dir)
    # Each client's state counts the rounds it trained in, and saw its own array
    assert {c: int(s.scalars["n"]) for c, s in clients.items()} == trained
    for c, s in clients.items():
        np.testing.assert_array_equal(s.arrays["c_seen"][0], [c, c])
    assert server["rounds"] == 3
    assert max(trained.values()) >= 2  # some client carried its state across rounds


COSINE = ["train.round_schedule=cosine", "train.min_lr=1e-4"]  # lr 3e-3 (write_config)


@pytest.mark.parametrize("sets", [[], COSINE], ids=["constant", "cosine"])
def test_a_crash_mid_round_resumes_to_the_same_adapter_and_states(cfg_path, tmp_path, sets):
    # Prepare: the uninterrupted run
    whole = _run(cfg_path, TALLY, "name=whole", *sets)
    # Execute: a run that crashes inside round 2, then is resumed
    KILL["round"] = 2
    cfg = load_config(cfg_path, [TALLY, "name=crashed", *sets])
    run_dir = make_run_dir(cfg)
    with pytest.raises(Killed):
        Simulation(cfg, run_dir, log=lambda m: None).run()
    assert [m["round"] for m in _lines(run_dir)] == [0, 1]
    _run(cfg_path, TALLY, "name=crashed", *sets, resume_dir=run_dir)
    # Assert: same adapter bytes, same states, each round once
    final = "final/adapter/adapter_model.safetensors"
    assert (run_dir / final).read_bytes() == (whole / final).read_bytes()
    assert _states(run_dir)[0] == _states(whole)[0]
    ca, cb = _states(run_dir)[1], _states(whole)[1]
    assert {c: s.scalars for c, s in ca.items()} == {c: s.scalars for c, s in cb.items()}
    assert [m["round"] for m in _lines(run_dir)] == [0, 1, 2, 3]
    strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert [strip(m) for m in _lines(run_dir)] == [strip(m) for m in _lines(whole)]


# -- the learning rate across rounds, communication ----------------------------------------
def _flowertune_lr(r: int, rounds: int, lrate_max: float, lrate_min: float) -> float:
    """FlowerTune's cosine_annealing(current_round, total_round, lrate_max, lrate_min)."""
    cos_inner = math.pi * r / rounds
    return lrate_min + 0.5 * (lrate_max - lrate_min) * (1 + math.cos(cos_inner))


def test_round_lr_is_flowertunes_cosine_annealing():
    # cos(pi/2) = 0: round 1 of 2 gets the midpoint; the last round gets min_lr
    assert round_lr("cosine", 5e-5, 1e-6, 1, 2) == pytest.approx(2.55e-5, rel=1e-12)
    assert round_lr("cosine", 5e-5, 1e-6, 2, 2) == pytest.approx(1e-6, rel=1e-12)
    assert round_lr("cosine", 4e-4, 0.0, 1, 3) == pytest.approx(3e-4, rel=1e-12)  # cos(pi/3)
    assert round_lr("cosine", 4e-4, 0.0, 3, 3) == pytest.approx(0.0, abs=1e-20)
    assert round_lr("constant", 4e-4, 1e-6, 2, 3) == 4e-4
    for r in range(1, 21):
        assert round_lr("cosine", 5e-5, 1e-6, r, 20) == pytest.approx(
            _flowertune_lr(r, 20, 5e-5, 1e-6), rel=1e-12)


def test_each_round_trains_at_the_cosine_schedules_lr(cfg_path, monkeypatch):
    # Prepare: record the lr each client's trainer (its AdamW) is built with
    seen: list[float] = []
    real = client_round.train_adapter

    def spy(model, examples, cfg, **kwargs):
        seen.append(cfg.lr)
        return real(model, examples, cfg, **kwargs)

    monkeypatch.setattr(client_round, "train_adapter", spy)
    # Execute: 4 rounds, lr 3e-3 decaying to 0 (the last round trains at lr 0)
    run_dir = _run(cfg_path, "rounds=4", "train.round_schedule=cosine", "train.min_lr=0")
    # Assert: every line's lr is FlowerTune's formula, and every client of it trained at it
    lines = _lines(run_dir)
    assert lines[0].get("lr") is None
    expected = [_flowertune_lr(r, 4, 3e-3, 0.0) for r in (1, 2, 3, 4)]
    assert [m["lr"] for m in lines[1:]] == pytest.approx(expected, rel=1e-12, abs=1e-20)
    assert seen == pytest.approx([lr for m, lr in zip(lines[1:], expected, strict=True)
                                  for _ in m["clients"]], rel=1e-12, abs=1e-20)
    # lr 0 in round 4: its clients' adapters, hence the global one, do not move
    r3 = load_adapter_arrays(run_dir / "rounds/0003/adapter")
    for a, b in zip(r3, load_adapter_arrays(run_dir / "final/adapter"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_weights_mb_count_uncompressed_arrays_both_ways(cfg_path):
    # Execute: uploads in fp16, which halves fedit's bytes_up but not FlowerTune's count
    run_dir = _run(cfg_path, "compress.method=fp16")
    # Assert: each sampled client got the fp32 adapter, each reply counts it whole
    adapter = sum(a.nbytes for a in load_adapter_arrays(run_dir / "final/adapter"))
    total = 0.0
    for m in _lines(run_dir)[1:]:
        assert m["weights_mb_down"] == pytest.approx(len(m["sampled"]) * adapter / 2**20)
        assert m["weights_mb_up"] == pytest.approx(len(m["clients"]) * adapter / 2**20)
        assert m["bytes_up"] == len(m["clients"]) * adapter // 2  # what really travelled
        total += m["weights_mb_down"] + m["weights_mb_up"]
        assert m["weights_mb_total"] == pytest.approx(total)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["weights_mb_total"] == pytest.approx(total)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(cfg_path):
    whole = _run(cfg_path, "name=whole")
    run_dir = _run(cfg_path, "name=damaged")
    # Prepare: truncate round 3's global-array blob (a disk that filled up)
    m3 = ckpt.read_manifest(run_dir, 3)
    blob = run_dir / m3.global_arrays.path
    blob.write_bytes(blob.read_bytes()[:100])
    (run_dir / "summary.json").unlink()
    # Execute
    logs: list[str] = []
    cfg = load_config(cfg_path, ["name=damaged"])
    Simulation(cfg, run_dir, log=logs.append).run(resume=True)
    # Assert: a warning named the file; round 3 was trained again from round 2's checkpoint
    assert any(x.startswith("warning: round 3's checkpoint is not usable") and
               "does not match its checksum" in x for x in logs)
    assert "resumed " + str(run_dir) + " after round 2 of 3" in logs
    final = "final/adapter/adapter_model.safetensors"
    assert (run_dir / final).read_bytes() == (whole / final).read_bytes()
    assert [m["round"] for m in _lines(run_dir)] == [0, 1, 2, 3]


def test_keep_last_bounds_the_checkpoints_on_disk(cfg_path):
    run_dir = _run(cfg_path, "rounds=4", "checkpoint.keep_last=2")
    assert ckpt.committed_rounds(run_dir) == [4, 3]
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == ["0003", "0004"]
    named = {Path(b.path).name for r in (3, 4) for b in ckpt.read_manifest(run_dir, r).blobs()
             if b.path.startswith("checkpoint")}
    assert {p.name for p in (run_dir / ckpt.BLOBS).iterdir()} == named


def test_resume_of_a_finished_run_changes_nothing(cfg_path):
    run_dir = _run(cfg_path, "rounds=1")
    before = (run_dir / "final/adapter/adapter_model.safetensors").read_bytes()
    lines = _lines(run_dir)
    _run(cfg_path, "rounds=1", resume_dir=run_dir)
    assert (run_dir / "final/adapter/adapter_model.safetensors").read_bytes() == before
    assert _lines(run_dir) == lines


def test_state_blobs_round_trip():
    arrays = {"m": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2)]}
    data = ckpt.encode_state(arrays, {"t": 3, "name": "x"})
    back, scalars = ckpt.decode_state(data)
    assert scalars == {"t": 3, "name": "x"}
    for a, b in zip(back["m"], arrays["m"], strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert ckpt.encode_state(arrays, {"name": "x", "t": 3}) == data  # deterministic bytes
