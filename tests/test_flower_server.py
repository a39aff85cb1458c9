"""The Flower ServerApp's round loop and reply checks, without processes: a fake Grid
hands each message to the real ClientApp handler in this process, or misbehaves."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)

from fedit.algorithms import payload as P  # noqa: E402
from fedit.algorithms.strategies import Reply  # noqa: E402
from fedit.config import load_config  # noqa: E402
from fedit.data.federated import split_data  # noqa: E402
from fedit.errors import ConfigError  # noqa: E402
from fedit.federation.replies import BadReply, check_reply  # noqa: E402
from fedit.model.adapter import load_adapter_arrays  # noqa: E402
from fedit.runtimes.flower import wire  # noqa: E402
from fedit.runtimes.flower.client import handle_query, node_rows  # noqa: E402
from fedit.runtimes.flower.server import server_main  # noqa: E402
from tests.conftest import (  # noqa: E402
    FakeGrid,
    make_rows,
    run_server_app,
    write_config,
    write_jsonl,
)

Behaviour = Callable[[Message, Message], Message | None]  # (message, good reply) -> reply


@pytest.fixture(autouse=True)
def task_identity(flower_task_identity):
    """Every test here runs the ServerApp and the ClientApp handlers in this process."""


def _with_arrays(good: Message, edit: Callable[[list[np.ndarray]], list[np.ndarray]]) -> Message:
    content = good.content
    arrays = edit(wire.record_to_arrays(content.array_records[P.ARRAYS]))
    content.array_records[P.ARRAYS] = ArrayRecord(arrays)
    return good


def _nan(msg: Message, good: Message) -> Message:
    def edit(arrays):
        arrays[0] = arrays[0].copy()
        arrays[0].flat[0] = np.nan
        return arrays
    return _with_arrays(good, edit)


def _shape(msg: Message, good: Message) -> Message:
    return _with_arrays(good, lambda arrays: arrays[:-1])


def _huge(msg: Message, good: Message) -> Message:
    return _with_arrays(good, lambda arrays: [a * 1e4 for a in arrays])


def _silent(msg: Message, good: Message) -> None:
    return None


def _error(msg: Message, good: Message) -> Message:
    return Message(Error(code=2, reason="ClientApp raised: out of memory"), reply_to=msg)


@pytest.fixture
def cfg_path(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(60, seed=5))
    return write_config(tmp_path / "fake.toml", tiny_model_dir, data, name="fake", seed=3,
                        partition={"clients": 3}, train={"max_steps": 2},
                        strategy={"max_update_norm": 50.0},
                        flower={"round_timeout": 1.0, "node_timeout": 0})


_run = run_server_app


def _reasons(line):
    return {d["client"]: d["reason"] for d in line["dropped"]}


def test_bad_or_missing_replies_are_logged_not_averaged(cfg_path):
    # Execute: client 0 behaves, clients 1-5 each fail in their own way
    bad = {1: _nan, 2: _shape, 3: _huge, 4: _silent, 5: _error}
    run_dir, lines = _run(cfg_path, FakeGrid(6, bad), "rounds=1", "partition.clients=6")
    # Assert: the round aggregates client 0 alone and says why each other one is out
    line = lines[1]
    assert line["sampled"] == [0, 1, 2, 3, 4, 5] and line["clients"] == [0]
    assert line["aggregated"] is True and [d["client"] for d in line["dropped"]] == [1, 2, 3, 4, 5]
    why = _reasons(line)
    assert "array 0 has non-finite values" in why[1]
    assert "arrays, expected" in why[2]
    assert "> strategy.max_update_norm 50" in why[3]
    assert why[4] == "no reply in 1 s"
    assert "out of memory" in why[5]
    assert set(line["update_norms"]) == {"0"}
    # The run folder is a simulated run's: config, held-out rows, partitions, checkpoints
    for name in ["config.toml", "test.jsonl", "partitions/stats.json", "summary.json",
                 "rounds/0001/adapter/adapter_model.safetensors", "final/adapter"]:
        assert (run_dir / name).exists(), name
    assert np.isfinite(np.concatenate(
        [a.ravel() for a in load_adapter_arrays(run_dir / "final/adapter")])).all()


def test_too_few_replies_keep_the_global_adapter(cfg_path):
    # Execute: two of three clients silent, two valid replies required
    grid = FakeGrid(3, {0: _silent, 2: _silent})
    run_dir, lines = _run(cfg_path, grid, "rounds=1", "strategy.min_replies=2")
    # Assert: nothing aggregated; the checkpoint is the starting adapter (B = 0)
    line = lines[1]
    assert line["aggregated"] is False and line["clients"] == [] and line["sampled"] == [0, 1, 2]
    assert sorted(_reasons(line)) == [0, 2]
    assert line["train_loss"] is None
    final = load_adapter_arrays(run_dir / "final/adapter")
    assert all(not a.any() for a in final[1::2])  # lora_B arrays are still zero


def test_a_node_that_rejoins_gets_the_current_global_adapter(cfg_path):
    # Prepare: client 1's node dies in round 1 and comes back as a new node (202)
    grid = FakeGrid(2)

    def crash(msg: Message, good: Message) -> None:
        grid.node_ids[1] = 202
        del grid.behaviours[1]

    grid.behaviours[1] = crash
    # Execute
    run_dir, lines = _run(cfg_path, grid, "partition.clients=2")
    # Assert: round 1 misses client 1; round 2 trains it on the new node, from the
    # global adapter of round 1
    assert lines[1]["clients"] == [0] and sorted(_reasons(lines[1])) == [1]
    assert lines[2]["clients"] == [0, 1] and lines[2]["dropped"] == []
    sent = [m for node, m in grid.sent if node == 202 and
            m.metadata.message_type == MessageType.TRAIN]
    assert len(sent) == 1
    received = wire.record_to_arrays(sent[0].content.array_records[P.ARRAYS])
    for a, b in zip(received, load_adapter_arrays(run_dir / "rounds/0001/adapter"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_nodes_with_their_own_files_get_client_ids_in_node_order(cfg_path, tmp_path):
    # Prepare: two parties, each with a data file only it has, no partition ids
    files = [write_jsonl(tmp_path / f"party{k}.jsonl", make_rows(8 + 4 * k, seed=20 + k))
             for k in range(2)]
    grid = FakeGrid(2, node_configs=[{"data-path": str(f)} for f in files])
    # Execute
    _, lines = _run(cfg_path, grid, "rounds=1", "partition.clients=2", "data.cutoff_len=512")
    # Assert: both trained, each on all of its own rows but those asking a held-out prompt
    # (make_rows draws from few words: party 1 holds one of the server's held-out prompts)
    assert lines[1]["clients"] == [0, 1] and lines[1]["num_examples"] == 8 + 12 - 1
    assert lines[1]["held_out_duplicates"] == {"0": 0, "1": 1}


def test_node_rows_come_from_the_node_config_only(cfg_path, tmp_path):
    cfg = load_config(cfg_path)
    own = write_jsonl(tmp_path / "own.jsonl", make_rows(5, seed=9))
    assert node_rows(cfg, {"data-path": str(own)}) == make_rows(5, seed=9)
    assert node_rows(cfg, {"partition-id": 2, "num-partitions": 3}) == \
        split_data(cfg).client_rows[2]
    with pytest.raises(ConfigError, match="num-partitions=4 but the run has partition.clients"):
        node_rows(cfg, {"partition-id": 0, "num-partitions": 4})
    with pytest.raises(ConfigError, match="give data-path=FILE, or partition-id=K"):
        node_rows(cfg, {})


def test_flower_local_checks_nodes_against_partitions(cfg_path):
    from typer.testing import CliRunner

    from fedit.cli import app

    result = CliRunner().invoke(app, ["flower", "local", str(cfg_path), "--nodes", "2"])
    assert result.exit_code == 2
    assert "--nodes 2 but partition.clients = 3" in result.output


def test_check_reply_accepts_a_good_reply_and_measures_its_distance():
    g = [np.zeros((2, 3), np.float32), np.ones(4, np.float32)]
    r = Reply(0, [np.full((2, 3), 1.0, np.float32), np.ones(4, np.float32)], 5, {})
    assert check_reply(r, g, max_update_norm=3.0) == pytest.approx(6 ** 0.5)
    with pytest.raises(BadReply, match=r"update norm 2.449 > strategy.max_update_norm 2"):
        check_reply(r, g, max_update_norm=2.0)
    r.arrays[1] = r.arrays[1].astype(np.float64)
    with pytest.raises(BadReply, match=r"array 1 is float64\[4\], expected float32\[4\]"):
        check_reply(r, g)


def test_reply_round_trips_through_flower_records():
    reply = Reply(2, [np.arange(6, dtype=np.float32).reshape(2, 3)], 7,
                  {P.TRAIN_LOSS: 1.5, P.STEPS: 2.0, P.TOKENS: 30.0, P.SECONDS: 0.1})
    sent = Message(RecordDict({P.CONFIG_RECORD: ConfigRecord({})}), dst_node_id=5,
                   message_type=MessageType.TRAIN, group_id="1")
    sent.metadata.__dict__["_message_id"] = sent.object_id
    back = wire.decode_reply(Message(wire.reply_content(reply), reply_to=sent), client=2)
    assert back.num_examples == 7 and back.metrics[P.TRAIN_LOSS] == 1.5
    np.testing.assert_array_equal(back.arrays[0], reply.arrays[0])


def test_large_arrays_travel_in_chunks_below_the_message_limit():
    # Flower 1.42 cuts every array into chunks of at most 5 MiB on its own
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    record = wire.arrays_to_record([np.random.default_rng(0).random(3 * 2**20, np.float32)])
    chunks = record["0"].children
    assert chunks is not None and len(chunks) == 3
    assert all(len(c.data) <= FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE for c in chunks.values())


class Crash(BaseException):
    """Stands for the ServerApp's process being killed mid-round."""


def test_a_server_killed_mid_run_resumes_to_the_same_adapter(cfg_path):
    # Prepare: the uninterrupted run, with server momentum (state to restore)
    whole, _ = _run(cfg_path, FakeGrid(3), "rounds=3", "name=whole", "strategy.name=fedavgm")
    # Execute: the server dies while round 3's replies come in, then resumes
    grid = FakeGrid(3)

    def crash_in_round_3(msg: Message, good: Message) -> Message:
        if int(msg.content.config_records[P.CONFIG_RECORD][P.SERVER_ROUND]) == 3:
            raise Crash
        return good

    grid.behaviours[0] = crash_in_round_3
    with pytest.raises(Crash):
        _run(cfg_path, grid, "rounds=3", "name=crashed", "strategy.name=fedavgm")
    run_dir = whole.parent / "crashed"
    del grid.behaviours[0]
    _, lines = _run(cfg_path, grid, resume=str(run_dir))
    # Assert: rounds 0-3 once each, and the adapter of the run never interrupted
    assert [m["round"] for m in lines] == [0, 1, 2, 3]
    final = "final/adapter/adapter_model.safetensors"
    assert (run_dir / final).read_bytes() == (whole / final).read_bytes()


def test_client_state_stays_on_the_node_and_follows_a_resume(cfg_path, tmp_path, monkeypatch):
    state_dirs = [tmp_path / f"node{k}" for k in range(3)]
    configs = [{"partition-id": k, "num-partitions": 3, "state-dir": str(d)}
               for k, d in enumerate(state_dirs)]
    # Execute: three rounds over three nodes, each keeping its client's state
    run_dir, lines = _run(cfg_path, FakeGrid(3, node_configs=configs), "rounds=3",
                          "strategy.name=tests.conftest:Tally", "strategy.fraction=0.67")
    # Assert: each node holds its own client's state, counting its rounds
    trained = {c: sum(c in m["clients"] for m in lines[1:]) for c in range(3)}
    for c, d in enumerate(state_dirs):
        files = sorted((d / "fake" / f"client_{c:05d}").glob("round_*.safetensors"))
        if not trained[c]:
            assert not files
            continue
        from fedit.federation.checkpoint import decode_state

        arrays, scalars = decode_state(files[-1].read_bytes())
        assert scalars["n"] == trained[c]
        np.testing.assert_array_equal(arrays["c_seen"][0], [c, c])
    # The server's checkpoint names only the round of each client's state, never its data
    from fedit.federation import checkpoint as ckpt

    m = ckpt.read_manifest(run_dir, 3)
    assert all(b.path.startswith("node:") and b.sha256 == "" for b in m.client_states.values())
    assert not any("client_0" in p.name for p in (run_dir / ckpt.BLOBS).iterdir())


# -- a user's strategy: a node that cannot import it is refused, in one line -----------------
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "strategies" / "nesterov.py"


def _hello(ref: str) -> Message:
    return Message(RecordDict({P.CONFIG_RECORD: ConfigRecord({P.STRATEGY: ref})}),
                   dst_node_id=101, message_type=MessageType.QUERY, group_id="hello")


def test_a_node_answers_the_hello_with_why_it_cannot_import_the_strategy():
    ctx = Context(run_id=1, node_id=101, node_config={"partition-id": 1}, state=RecordDict(),
                  run_config={})
    said = handle_query(_hello("no_such_module_xyz:MyStrategy"), ctx).content.config_records
    reason = str(said[P.CONFIG_RECORD][P.REFUSED])
    assert reason.startswith("strategy.name = 'no_such_module_xyz:MyStrategy': cannot import "
                             "no_such_module_xyz (ModuleNotFoundError")
    assert "\n" not in reason and said[P.CONFIG_RECORD][P.PARTITION_ID] == 1


def test_a_node_that_cannot_import_the_strategy_is_refused(cfg_path, tmp_path, monkeypatch):
    # Prepare: the user's strategy file exists where the server and node 101 look; node
    # 102 lacks it (it resolves the name to a module that is not installed there)
    user = tmp_path / "my_strategy.py"
    user.write_text(EXAMPLE.read_text())
    import fedit.runtimes.flower.client as node

    real, load = handle_query, node.load_strategy_class

    def node_query(msg, ctx):
        if ctx.node_id != 102:
            return real(msg, ctx)
        with pytest.MonkeyPatch.context() as m:  # on this machine the module is missing
            m.setattr(node, "load_strategy_class", lambda ref: load(
                "my_strategy_not_on_this_node:" + ref.rpartition(":")[2]))
            return real(msg, ctx)

    monkeypatch.setattr(node, "handle_query", node_query)  # what FakeGrid's nodes call
    logs: list[str] = []
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={
        "config": str(cfg_path), "resume": "", "set": " ".join([
            "rounds=1", "name=refused", f"strategy.name={user}:NesterovFedAvgM",
            "strategy.params.momentum=0.5", "partition.clients=2", "strategy.fraction=1.0"])})
    # Execute
    summary = server_main(FakeGrid(2), context, log=logs.append)  # type: ignore[arg-type]
    # Assert: one line names the node and the module; the run goes on with node 101 alone
    refused = [m for m in logs if m.startswith("node 102 refused:")]
    assert len(refused) == 1 and "cannot import my_strategy_not_on_this_node" in refused[0], logs
    assert "starting with 1 of 2 nodes" in logs
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text()
             .splitlines()]
    assert lines[1]["clients"] == [0] and lines[1]["aggregated"] is True
