"""A real federation on 127.0.0.1: a SuperLink with TLS and node authentication and two
SuperNodes (long-lived ClientApp workers), started as processes once for this module.

Every wait has a timeout and every process is stopped by the fixture, test failures
included. The tests run in file order: the last one kills a node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
if not (shutil.which("openssl") and shutil.which("ssh-keygen")):  # pragma: no cover
    pytest.skip("needs openssl and ssh-keygen for TLS and node keys", allow_module_level=True)

import fedit.config.schema as schema  # noqa: E402
from fedit.algorithms.strategies import STRATEGIES, load_strategy_class  # noqa: E402
from fedit.config import load_config  # noqa: E402
from fedit.model.adapter import load_adapter_arrays  # noqa: E402
from fedit.runtimes.flower.local import LocalFederation  # noqa: E402
from fedit.runtimes.flower.secagg import quantisation_bound  # noqa: E402
from fedit.runtimes.inprocess import Simulation  # noqa: E402
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "strategies" / "nesterov.py"
RUN_TIMEOUT = 240  # seconds one `flwr run` may take here (2 busy cores)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    """A config for two clients, and the in-process simulation of it (the reference)."""
    root = tmp_path_factory.mktemp("flower")
    data = write_jsonl(root / "rows.jsonl", make_rows(56, seed=7))
    path = write_config(root / "job.toml", tiny_model_dir, data, seed=11,
                        train={"max_steps": 3},
                        flower={"round_timeout": 120, "node_timeout": 90})
    cfg = load_config(path, ["name=simulated"])
    Simulation(cfg, make_run_dir(cfg), log=lambda m: None).run()
    return path, root / "runs" / "simulated"


@pytest.fixture(scope="module")
def federation(job, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("federation")
    fed = LocalFederation(workdir, tls=True, auth=True, isolation="process", log=lambda m: None)
    # Flower splits every array into chunks of at most this many bytes; the tiny adapter's
    # arrays (2 KiB) then cross the wire in pieces, as a large model's adapter would.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", "512")
        try:
            fed.start_superlink(nodes=2)
            for k in range(2):
                fed.register(k)
                fed.start_node(k, f"partition-id={k} num-partitions=2")
            yield fed
        finally:
            fed.stop()


def _logs(fed: LocalFederation) -> str:
    return "\n".join(f"--- {p.name}\n{p.log.read_text(errors='replace')[-3000:]}"
                     for p in fed.procs)


def _run(fed: LocalFederation, job: Path, *sets: str, while_running=None) -> Path:
    """Submit the job, call ``while_running(run_dir)`` if given, wait for the end."""
    proc, run_dir = fed.submit(job, list(sets))
    try:
        if while_running is not None:
            while_running(run_dir)
        code = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish in {RUN_TIMEOUT} s\n{_logs(fed)}")
    assert code == 0 and (run_dir / "summary.json").is_file(), _logs(fed)
    return run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_close(a_dir: Path, b_dir: Path, atol: float) -> float:
    a, b = load_adapter_arrays(a_dir), load_adapter_arrays(b_dir)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
    assert diff <= atol
    return diff


def test_nodes_without_valid_credentials_are_refused(federation, tmp_path):
    # Prepare: a key the SuperLink never registered, and no key at all
    rogue = tmp_path / "rogue"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(rogue)],
                   check=True, timeout=30)
    # Execute
    nodes = [federation.start_node(7, "partition-id=0 num-partitions=2", key=rogue)[0],
             federation.start_node(8, "partition-id=1 num-partitions=2", key=None)[0]]
    try:
        # Assert: both give up with an error instead of joining
        for node in nodes:
            code = node.popen.wait(timeout=60)
            assert code != 0, node.log.read_text()[-2000:]
    finally:
        federation.kill_node(7)
        federation.kill_node(8)


def test_tls_auth_run_equals_the_simulation(federation, job):
    path, simulated = job
    # Execute: the same config, through SuperLink and SuperNodes
    run_dir = _run(federation, path, "name=flower")
    # Assert: same clients and losses each round, same final adapter (to 1e-5)
    flower, sim = _metrics(run_dir), _metrics(simulated)
    for a, b in zip(flower, sim, strict=True):
        assert a["clients"] == b["clients"]
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)
    assert [m["dropped"] for m in flower[1:]] == [[], []]
    # Flower's bytes are the serialised payload: the same arrays plus a .npy header each
    arrays = len(load_adapter_arrays(simulated / "final/adapter"))
    assert 0 < flower[1]["bytes_up"] - sim[1]["bytes_up"] <= 2 * arrays * 256
    _assert_close(run_dir / "final/adapter", simulated / "final/adapter", atol=1e-5)
    for name in ["config.toml", "test.jsonl", "partitions/stats.json", "summary.json",
                 "rounds/0001/adapter", "rounds/0002/adapter"]:
        assert (run_dir / name).exists(), name


def test_the_round_schedules_lr_reaches_the_nodes(federation, job):
    path, simulated = job
    # Prepare: 2 rounds at lr 3e-3 decaying to 0 (FlowerTune's cosine: 1.5e-3, then 0)
    sets = ["train.round_schedule=cosine", "train.min_lr=0"]
    cfg = load_config(path, ["name=simulated-cosine", *sets])
    Simulation(cfg, make_run_dir(cfg), log=lambda m: None).run()
    # Execute
    run_dir = _run(federation, path, "name=flower-cosine", *sets)
    # Assert: the same lr each round; round 2's lr 0 left the nodes' adapters where they were
    flower, sim = _metrics(run_dir), _metrics(simulated.parent / "simulated-cosine")
    assert [m.get("lr") for m in flower] == [m.get("lr") for m in sim]
    assert [m["lr"] for m in flower[1:]] == pytest.approx([1.5e-3, 0.0], rel=1e-12, abs=1e-20)
    assert _assert_close(run_dir / "final/adapter", run_dir / "rounds/0001/adapter", 0) == 0
    _assert_close(run_dir / "final/adapter", simulated.parent / "simulated-cosine/final/adapter",
                  atol=1e-5)
    # FlowerTune's count is of the arrays, not of their wire format: the same as in-process
    for a, b in zip(flower[1:], sim[1:], strict=True):
        for key in ("weights_mb_down", "weights_mb_up", "weights_mb_total"):
            assert a[key] == b[key] > 0


@pytest.mark.parametrize("name, sets, atol", [
    # (FedAvgM keeps only server state, in the round loop both runtimes share; it runs over
    # Flower in the SecAgg+ test below.) SCAFFOLD's
    # control variates divide the runtimes' ~1e-7 training differences by K * lr, so its
    # adapters agree to a few 1e-5, the others to 1e-5
    ("scaffold", ["strategy.name=scaffold"], 3e-5),  # c_i in each node's state folder
    # the pieces around a strategy travel too: DP's clip norm and top-k uploads with their
    # residual kept on the node; a rank-4 client's own start adapter and delta uploads
    # (int8's rounding would turn the runtimes' 1e-7 training differences into whole
    # quantisation steps)
    ("fedadam", ["strategy.name=fedadam", "strategy.server_lr=0.01", "privacy.mode=central",
                 "privacy.clip=0.01", "compress.method=topk"], 1e-5),
    ("ranks", ["strategy.name=fedprox", "lora.client_ranks=[4, 8]", "compress.method=delta"],
     1e-5),
])
def test_stateful_strategies_over_flower_equal_the_simulation(federation, job, name, sets,
                                                               atol):
    path, _ = job
    # Prepare: the in-process run of a stateful strategy (server momentum, Adam moments,
    # SCAFFOLD's control variates kept by the clients)
    cfg = load_config(path, [f"name=sim-{name}", *sets])
    Simulation(cfg, make_run_dir(cfg), log=lambda m: None).run()
    simulated = path.parent / "runs" / f"sim-{name}"
    # Execute: the same over two SuperNodes
    run_dir = _run(federation, path, f"name=flower-{name}", *sets)
    # Assert: the state crossed rounds the same way: same adapters, to atol
    for rnd in ("rounds/0001/adapter", "rounds/0002/adapter", "final/adapter"):
        _assert_close(run_dir / rnd, simulated / rnd, atol=atol)
    assert [m["eval_loss"] for m in _metrics(run_dir)] == pytest.approx(
        [m["eval_loss"] for m in _metrics(simulated)], abs=1e-5)


def test_secure_aggregation_runs_the_strategys_server_step(federation, job):
    path, simulated = job
    # Execute: one round of SecAgg+ (max_weight close to the clients' 26 examples) with
    # FedAvgM's server step: the loop applies it to the masked mean, in the clear
    run_dir = _run(federation, path, "name=secagg", "rounds=1", "strategy.name=fedavgm",
                   "strategy.server_lr=0.5",
                   "flower.secure_aggregation=true", "flower.secagg_max_weight=32")
    # Assert: the securely aggregated adapter is FedAvg's up to the quantisation error
    line = _metrics(run_dir)[1]
    assert line["secure_aggregation"] is True and line["clients"] == [0, 1]
    cfg = load_config(run_dir / "config.toml")
    f = cfg.flower
    bound = quantisation_bound([line["num_examples"] / 2] * 2, f.secagg_max_weight,
                               f.secagg_clipping_range, f.secagg_quantization_range)
    # Assert: w1 = w0 - 0.5 * (w0 - mean), with FedAvg's mean from the simulation
    w0 = load_adapter_arrays(simulated / "rounds/0000/adapter")
    mean = load_adapter_arrays(simulated / "rounds/0001/adapter")
    got = load_adapter_arrays(run_dir / "rounds/0001/adapter")
    diffs = [float(np.abs(g - (a - 0.5 * (a - m))).max())
             for g, a, m in zip(got, w0, mean, strict=True)]
    assert max(diffs) <= 0.5 * bound
    assert max(float(np.abs(g - m).max()) for g, m in zip(got, mean, strict=True)) > 10 * bound


def test_central_dp_under_secure_aggregation_equals_the_simulations(federation, job):
    path, _ = job
    # Prepare: the in-process run with the SecAgg+ emulation (clients clip and weigh 1,
    # the server adds the noise to the mean)
    sets = ["rounds=1", "privacy.mode=central", "privacy.clip=0.01",
            "privacy.noise_multiplier=0.5", "flower.secure_aggregation=true",
            "flower.secagg_max_weight=2"]
    cfg = load_config(path, ["name=sim-dp-secagg", *sets])
    Simulation(cfg, make_run_dir(cfg), log=lambda m: None).run()
    simulated = path.parent / "runs" / "sim-dp-secagg"
    # Execute: the same over SuperNodes with Flower's SecAgg+
    run_dir = _run(federation, path, "name=flower-dp-secagg", *sets)
    # Assert: the same adapter up to SecAgg+'s quantisation (two uploads of weight 1)
    f = cfg.flower
    bound = quantisation_bound([1, 1], f.secagg_max_weight, f.secagg_clipping_range,
                               f.secagg_quantization_range)
    _assert_close(run_dir / "rounds/0001/adapter", simulated / "rounds/0001/adapter",
                  atol=bound + 1e-6)
    line, sim_line = _metrics(run_dir)[1], _metrics(simulated)[1]
    assert line["epsilon"] == sim_line["epsilon"] > 0
    assert line["num_examples"] == sim_line["num_examples"] > 2  # the real counts, logged


def _wait_for(what: str, done, fed: LocalFederation) -> None:
    """Wait until ``done()`` (a line in a log, a process gone); fail after RUN_TIMEOUT."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not done():
        assert time.monotonic() < deadline, f"waited {RUN_TIMEOUT} s for {what}\n{_logs(fed)}"
        time.sleep(0.2)


def test_a_users_strategy_file_over_flower_equals_the_same_class_in_tree(federation, job,
                                                                         tmp_path, monkeypatch):
    # Prepare: the documented example as the user's own file; the nodes load it by path
    path, _ = job
    user = tmp_path / "my_strategy.py"
    user.write_text(EXAMPLE.read_text())
    sets = ["strategy.params.momentum=0.5", "rounds=2"]
    # Execute: over the Grid by file name; in process with the same class registered in-tree
    run_dir = _run(federation, path, "name=user-strategy",
                   f"strategy.name={user}:NesterovFedAvgM", *sets)
    cls = load_strategy_class(f"{user}:NesterovFedAvgM")
    monkeypatch.setitem(STRATEGIES, "nesterov", (cls, cls.params_class))
    monkeypatch.setattr(schema, "STRATEGY_NAMES", (*schema.STRATEGY_NAMES, "nesterov"))
    cfg = load_config(path, ["name=user-strategy-in-tree", "strategy.name=nesterov", *sets])
    Simulation(cfg, make_run_dir(cfg), log=lambda m: None).run()
    # Assert: the same final adapter to 1e-6, and the server kept the strategy's state
    _assert_close(run_dir / "final/adapter", path.parent / "runs" / cfg.name / "final/adapter",
                  atol=1e-6)
    assert json.loads((run_dir / "summary.json").read_text())["strategy"]["name"] == (
        "nesterov-fedavgm")


def test_a_node_killed_mid_round_is_missing_and_the_run_completes(federation, job):
    path, _ = job
    # Prepare: node 1's worker frozen, and a stand-in that takes one task and exits: the
    # run's hello, with which node 1 says it is client 1. Client 1 is then sampled and can
    # never reply, however fast this machine trains.
    worker_0_log, worker_1 = federation.nodes[0][1].log, federation.nodes[1][1]
    mark = "client 0 round 1: training"
    seen = worker_0_log.read_text().count(mark)
    os.killpg(worker_1.popen.pid, signal.SIGSTOP)
    stand_in = federation.start_worker(1, max_tasks=1)
    _wait_for("the stand-in to take tasks", lambda: "taking ClientApp tasks" in
              stand_in.log.read_text(errors="replace"), federation)

    def kill_node_1_mid_round(run_dir: Path) -> None:
        _wait_for("the hello to node 1", lambda: not stand_in.alive(), federation)
        assert stand_in.popen.returncode == 0, _logs(federation)
        _wait_for("round 1", lambda: worker_0_log.read_text().count(mark) > seen, federation)
        federation.kill_node(1)  # SIGKILL: node, workers and their children

    # Execute
    run_dir = _run(federation, path, "name=killed", "rounds=1", "flower.round_timeout=20",
                   while_running=kill_node_1_mid_round)
    # Assert: the round aggregated client 0 alone, and the metrics name the dropped one
    line = _metrics(run_dir)[1]
    assert line["sampled"] == [0, 1], line
    assert line["clients"] == [0], line
    assert line["dropped"] == [{"client": 1, "reason": "no reply in 20 s"}], line
    assert line["aggregated"] is True
    assert (run_dir / "final/adapter/adapter_model.safetensors").is_file()
    assert "client 1 round 1: training" not in stand_in.log.read_text(errors="replace")
