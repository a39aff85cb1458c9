"""Federated DPO like every other run: `--resume` after a SIGKILL mid-round ends byte for
byte where an uninterrupted run ends (the reference log-probabilities come back from the
client state, never recomputed), Flower (2 SuperNodes, in-process) equals the simulation
to 1e-5 with each node computing its own reference once, and a tiny DPO run completes
under each strategy, robust rule, client-level DP, SecAgg+, mixed ranks, compression and
personalisation; the combinations refused by design say why in one line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedit.client.dpo import DPO, REFERENCE
from fedit.config import load_config
from fedit.data.federated import split_data
from fedit.errors import ConfigError
from fedit.federation.checkpoint import decode_state
from fedit.model.adapter import load_adapter_arrays
from fedit.model.base import load_tokenizer
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl

FINAL = "final/adapter/adapter_model.safetensors"
TIMEOUT = 300  # seconds for one process (2 busy cores)
TRAIN = {"objective": "dpo", "batch_size": 2, "micro_batch_size": 2, "max_steps": 1,
         "lr": 3e-3}


def make_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """Pairs the tiny tokenizer knows: a row's response chosen, a short wrong one rejected."""
    return [{"prompt": r["instruction"], "chosen": r["response"],
             "rejected": f"No. {r['response'].split()[-1]}", "category": r["category"]}
            for r in make_rows(n, seed)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo-pairs") / "pairs.jsonl",
                       make_pairs(16, seed=3))


def _config(path: Path, model_dir: Path, data: Path, **sections: object) -> Path:
    """A 2-client, 2-round DPO run of one step a client round (4 held-out pairs)."""
    sections = {"rounds": 2, "train": TRAIN, "data": {"test_per_label": 1},
                "strategy": {"fraction": 1.0}, **sections}
    return write_config(path, model_dir, data, **sections)


def _client_pairs(cfg, tiny_model_dir) -> list[int]:
    """Each client's pairs, counted from the split and the tokenizer (not from the run)."""
    tok = load_tokenizer(str(tiny_model_dir))
    return [len(DPO().examples(tok, rows, cfg.data, f"client {c}")[0])
            for c, rows in enumerate(split_data(cfg).client_rows)]


def _lines(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "seconds"} for m in rows]


# -- resume: SIGKILL inside a client's round 2, then `fedit train --resume` -------------------
# `fedit train` with every reference computation appended to $REFERENCE_LOG ("pid size")
COUNTED_FEDIT = """
import os, sys
import fedit.client.dpo as dpo
real = dpo.reference_logps
def counted(model, pairs, *args, **kwargs):
    with open(os.environ["REFERENCE_LOG"], "a") as f:
        f.write(f"{os.getpid()} {len(pairs)}\\n")
    return real(model, pairs, *args, **kwargs)
dpo.reference_logps = counted
from fedit.cli import app
app(prog_name="fedit")
"""


def _fedit(*args: str, cwd: Path, log: Path, fault: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REFERENCE_LOG": str(log)}
    env.pop("FEDIT_FAULT", None)
    if fault:
        env["FEDIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", COUNTED_FEDIT, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _computed(log: Path) -> dict[int, list[int]]:
    """pid -> the sizes of its reference computations, in order."""
    out: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        pid, size = map(int, line.split())
        out.setdefault(pid, []).append(size)
    return out


def test_killed_dpo_run_resumes_to_the_same_bytes_without_recomputing_references(
        tmp_path, tiny_model_dir, pairs_file):
    # Prepare: the uninterrupted run; each client's pair count from the split itself
    cfg_path = _config(tmp_path / "dpo.toml", tiny_model_dir, pairs_file, seed=7)
    sizes = _client_pairs(load_config(cfg_path), tiny_model_dir)
    whole_log, killed_log = tmp_path / "whole.log", tmp_path / "killed.log"
    whole = _fedit("train", str(cfg_path), "--set", "name=whole", cwd=tmp_path, log=whole_log)
    assert whole.returncode == 0, whole.stderr
    held_out = json.loads((tmp_path / "runs" / "whole" / "summary.json").read_text())[
        "test_rows"]
    # Execute: killed inside round 2 after a client trained (its new state not written),
    # then resumed in a new process
    killed = _fedit("train", str(cfg_path), "--set", "name=killed", cwd=tmp_path,
                    log=killed_log, fault="mid-client:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "summary.json").exists()
    resumed = _fedit("train", "--resume", str(run_dir), cwd=tmp_path, log=killed_log)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {run_dir} after round 1 of 2" in resumed.stderr
    # Assert: the same final adapter, byte for byte, and the same metrics lines
    assert (run_dir / FINAL).read_bytes() == (tmp_path / "runs" / "whole" / FINAL).read_bytes()
    lines = _lines(run_dir)
    assert lines == _lines(tmp_path / "runs" / "whole")
    assert [m["round"] for m in lines] == [0, 1, 2]
    assert all(math.isfinite(m["train_loss"]) for m in lines[1:])
    # ... each client's reference computed once, in round 1 (with the held-out pairs');
    # the resumed process read the clients' from their state: it computed only the
    # server's held-out reference (kept in memory, never in a checkpoint)
    [once] = _computed(whole_log).values()
    assert sorted(once) == sorted([*sizes, held_out])
    first, again = _computed(killed_log).values()
    assert sorted(first) == sorted([*sizes, held_out])
    assert again == [held_out]


# -- Flower: 2 SuperNodes over the in-process grid equal the simulation ---------------------
def test_flower_dpo_run_equals_the_simulation_and_each_node_computes_its_reference_once(
        tmp_path, tiny_model_dir, pairs_file, flower_task_identity, reference_calls):
    from tests.conftest import FakeGrid, run_server_app

    # Prepare: the simulation of the same config (the reference run)
    cfg_path = _config(tmp_path / "dpo.toml", tiny_model_dir, pairs_file, seed=5, name="dpo",
                       flower={"round_timeout": 1.0, "node_timeout": 0})
    cfg = load_config(cfg_path, ["name=sim"])
    sizes = _client_pairs(cfg, tiny_model_dir)
    sim = Simulation(cfg, make_run_dir(cfg), log=lambda m: None)
    sim.run()
    sim_calls = list(reference_calls)
    reference_calls.clear()
    # Execute: the ServerApp over two nodes, each holding its client's state on its disk
    state_dirs = [tmp_path / f"node{k}" for k in range(2)]
    nodes = [{"partition-id": k, "num-partitions": 2, "state-dir": str(d)}
             for k, d in enumerate(state_dirs)]
    run_dir, lines = run_server_app(cfg_path, FakeGrid(2, node_configs=nodes), "name=flower")
    # Assert: the final adapter and every round's train loss to 1e-5
    for got, want in zip(load_adapter_arrays((run_dir / FINAL).parent),
                         load_adapter_arrays((sim.run_dir / FINAL).parent), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    want_lines = _lines(sim.run_dir)
    assert [m["round"] for m in lines] == [0, 1, 2]
    for got_line, want_line in zip(lines[1:], want_lines[1:], strict=True):
        assert got_line["clients"] == want_line["clients"] == [0, 1]
        assert got_line["train_loss"] == pytest.approx(want_line["train_loss"], abs=1e-5)
        assert got_line["eval_loss"] == pytest.approx(want_line["eval_loss"], abs=1e-5)
    # ... each node computed its client's reference once over 2 rounds (the server its
    # held-out one), as the simulation did, and keeps it in the state on its own disk
    held_out = sim.prepared.model.held_out_rows
    assert sorted(reference_calls) == sorted(sim_calls) == sorted([*sizes, held_out])
    for c, d in enumerate(state_dirs):
        files = sorted((d / "flower" / f"client_{c:05d}").glob("round_*.safetensors"))
        assert [f.name for f in files] == ["round_0001.safetensors", "round_0002.safetensors"]
        arrays, _ = decode_state(files[-1].read_bytes())
        keys, chosen, rejected = arrays[REFERENCE]
        want = {e.key for e in sim.runtime.client_examples(c)}
        assert set(keys.tolist()) == want and len(keys) == sizes[c]
        sim_state = sim.runtime.client_state(c)
        assert sim_state is not None
        for got_a, want_a in zip((keys, chosen, rejected), sim_state.arrays[REFERENCE],
                                 strict=True):
            np.testing.assert_allclose(got_a, want_a, rtol=1e-6)


# -- DPO under everything else: a tiny run completes, with what each setting reports --------
def _check_dp(summary, lines, run_dir):
    assert summary["epsilon"] > 0 and summary["delta"] == 1e-5
    assert 0 < lines[1]["epsilon"] < lines[2]["epsilon"] == summary["epsilon"]  # it adds up


def _check_aggregator(name):
    def check(summary, lines, run_dir):
        assert summary["strategy"]["aggregator"] == name
    return check


def _check_ranks(summary, lines, run_dir):
    assert summary["strategy"]["client_ranks"] == [2, 4]
    # each client sends its own rank's factors: per rank, 2 layers x (q: 64 + 64, k and v:
    # 64 + 32 (2 kv heads of 16), o: 64 + 64) fp32 numbers
    per_rank = 2 * (128 + 96 + 96 + 128) * 4
    assert all(m["bytes_up"] == per_rank * (2 + 4) for m in lines[1:])


def _check_compress(summary, lines, run_dir):
    assert summary["strategy"]["compress"] == "int8"
    assert summary["bytes_up"] < summary["bytes_down"] / 2  # int8 codes + a scale per row


def _check_personal(summary, lines, run_dir):
    info = json.loads((run_dir / "personal" / "personal.json").read_text())
    assert set(info["clients"]) == {"0", "1"} and all(info["clients"].values())
    final = load_adapter_arrays((run_dir / FINAL).parent)
    for c in (0, 1):
        personal = load_adapter_arrays(run_dir / info["clients"][str(c)])
        assert any(not np.array_equal(a, b) for a, b in zip(personal, final, strict=True))


def _check_secure(summary, lines, run_dir):
    assert all(m["secure_aggregation"] and m["update_norms"] == {} for m in lines[1:])


def _check_strategy(name, key):
    def check(summary, lines, run_dir):
        assert summary["strategy"]["name"] == name and key in summary["strategy"]
    return check


SETTINGS = {
    "dp-central": ({"privacy": {"mode": "central", "noise_multiplier": 0.5}}, _check_dp),
    "dp-local": ({"privacy": {"mode": "local", "noise_multiplier": 0.5}}, _check_dp),
    "median": ({"strategy": {"fraction": 1.0, "aggregator": "median"}},
               _check_aggregator("median")),
    "mixed-ranks": ({"lora": {"client_ranks": [2, 4]}}, _check_ranks),
    "int8": ({"compress": {"method": "int8"}}, _check_compress),
    "ditto": ({"personalize": {"method": "ditto", "lam": 0.1}}, _check_personal),
    "finetune": ({"personalize": {"method": "finetune", "max_steps": 1}}, _check_personal),
    "secagg": ({"flower": {"secure_aggregation": True}}, _check_secure),
    "fedprox": ({"strategy": {"fraction": 1.0, "name": "fedprox", "mu": 0.1}},
                _check_strategy("fedprox", "mu")),
    "scaffold": ({"strategy": {"fraction": 1.0, "name": "scaffold"}},
                 _check_strategy("scaffold", "server_lr")),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dpo_run_completes_under(setting, tmp_path, tiny_model_dir, pairs_file,
                                 reference_calls):
    sections, check = SETTINGS[setting]
    cfg = load_config(_config(tmp_path / "dpo.toml", tiny_model_dir, pairs_file,
                              name=setting, **sections))
    sizes = _client_pairs(cfg, tiny_model_dir)
    # Execute
    sim = Simulation(cfg, make_run_dir(cfg), log=lambda m: None)
    summary = sim.run()
    # Assert: two rounds, both clients aggregated each, finite DPO losses
    lines = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1, 2]
    assert all(m["clients"] == [0, 1] and not m["dropped"] and m["aggregated"]
               for m in lines[1:])
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["eval_loss"])
               for m in lines[1:])
    assert summary["objective"]["name"] == "dpo" and summary["dropped"] == 0
    assert summary["base_eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["final_eval_loss"] != pytest.approx(math.log(2), abs=1e-6)  # it moved
    # ... each client's reference computed once (and the held-out pairs'), whatever ran
    assert sorted(reference_calls) == sorted([*sizes, sim.prepared.model.held_out_rows])
    check(summary, lines, sim.run_dir)


REFUSED = [
    ({"strategy": {"aggregator": "median"}, "privacy": {"mode": "central"}},
     "privacy.mode = central calibrates its noise to the mean's sensitivity C/m: "
     "strategy.aggregator = median is not the mean; use mean"),
    ({"strategy": {"aggregator": "median"}, "flower": {"secure_aggregation": True}},
     "strategy.aggregator = median ranks single updates, which SecAgg+ hides"),
    ({"compress": {"method": "int8"}, "flower": {"secure_aggregation": True}},
     "compress.method = int8 under SecAgg+"),
    ({"lora": {"client_ranks": [2, 4]}, "flower": {"secure_aggregation": True}},
     "lora.client_ranks (mixed ranks) needs each client's factors, which SecAgg+ hides"),
    ({"lora": {"client_ranks": [2, 4]}, "privacy": {"mode": "central"}},
     "privacy with lora.client_ranks: clipping is defined on one adapter shape"),
    ({"strategy": {"name": "scaffold"}, "flower": {"secure_aggregation": True}},
     "strategy.name = scaffold needs each client's reply, which SecAgg+ hides"),
    ({"strategy": {"name": "scaffold"}, "privacy": {"mode": "central"}},
     "scaffold's control-variate updates travel unclipped and without noise"),
]


@pytest.mark.parametrize("sections,message", REFUSED, ids=[
    "median+dp", "median+secagg", "int8+secagg", "ranks+secagg", "ranks+dp", "scaffold+secagg",
    "scaffold+dp"])
def test_combinations_refused_by_design_say_why_in_one_line(
        sections, message, tmp_path, tiny_model_dir, pairs_file):
    sections = {**sections, "strategy": {"fraction": 1.0, **sections.get("strategy", {})}}
    cfg = load_config(_config(tmp_path / "dpo.toml", tiny_model_dir, pairs_file, name="no",
                              **sections))
    with pytest.raises(ConfigError) as err:
        Simulation(cfg, make_run_dir(cfg), log=lambda m: None).run()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
