"""No held-out prompt is trained on: copies of a held-out prompt (exact, or differing only in
case and whitespace) leave the clients' training rows, are counted in stats.json, the
metrics lines and the summary, alike in the simulation and over Flower."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedit.cli import app
from fedit.config import load_config
from fedit.data.dedup import duplicate_groups, prompt_hash, prompt_key
from fedit.data.federated import split_data, write_split
from fedit.errors import DataError
from fedit.model.adapter import load_adapter_arrays
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl

P1 = {"instruction": "Name the capital of France.", "context": "", "response": "Paris."}
P2 = {"instruction": "Summarise the text.", "context": "The river runs north.\nIt is long.",
      "response": "A long river."}


def _norm(text: str) -> str:
    """The rule, written again here: whitespace runs -> one space, trimmed, lower case."""
    return re.sub(r"\s+", " ", text).strip().lower()


def _prompt(row: dict) -> tuple[str, str]:
    return _norm(row["instruction"]), _norm(row.get("context") or "")


def leaky_rows() -> list[dict]:
    """Two rows that are always held out (labels h1, h2 with one row each, test_per_label=1),
    three training copies of them (owners a: 1, b: 2), two near misses that are not copies,
    and 36 unique rows; ``owner`` makes the clients (natural partition)."""
    rows = [{**P1, "split": "h1", "owner": "a"}, {**P2, "split": "h2", "owner": "b"}]
    copies = [
        {**P1, "response": "copy 1", "owner": "a"},  # exact
        {**P1, "instruction": "  NAME the capital   of france. ", "response": "copy 2",
         "owner": "b"},  # case + whitespace
        {**P2, "context": "the river runs  north. it is long.", "response": "copy 3",
         "owner": "b"},  # newline -> space, case
        {**P2, "instruction": "Summarise the text", "response": "miss 1", "owner": "a"},
        {**P1, "context": "Paris?", "response": "miss 2", "owner": "a"},
    ]
    rows += [{"split": "pool", **r} for r in copies]
    rows += [{**r, "split": "pool", "owner": "ab"[i % 2]} for i, r in enumerate(make_rows(36, 4))]
    return rows


@pytest.fixture
def leaky_cfg(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", leaky_rows())
    return write_config(tmp_path / "leaky.toml", tiny_model_dir, data, name="leaky", seed=3,
                        rounds=1, data={"test_per_label": 1, "label_field": "split",
                                        "cutoff_len": 128},
                        partition={"method": "natural", "by": "owner", "clients": 2},
                        train={"max_steps": 2}, flower={"round_timeout": 5.0, "node_timeout": 0})


# -- the prompt key ------------------------------------------------------------------------
def test_prompt_key_folds_case_and_whitespace_and_hashes_stably():
    a = {"instruction": "Name  the\tCapital", "context": " of France\n"}
    b = {"instruction": "name the capital", "context": "OF FRANCE"}
    assert prompt_key(a) == prompt_key(b) == json.dumps(["instruction", "name the capital",
                                                         "of france"])
    assert prompt_key(a, normalised=False) != prompt_key(b, normalised=False)
    assert prompt_hash(a) == hashlib.sha256(prompt_key(b).encode()).hexdigest()
    # instruction and context stay apart: moving words across them is another prompt
    assert prompt_key({"instruction": "name the", "context": "capital of france"}) != \
        prompt_key(b)


def test_a_conversations_prompt_is_its_turns_before_the_first_answer():
    head = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there"}]
    one = {"messages": [*head, {"role": "assistant", "content": "Hello."}]}
    two = {"messages": [{"role": "system", "content": "be BRIEF."},
                        {"role": "user", "content": "hi there"},
                        {"role": "assistant", "content": "Other answer."},
                        {"role": "user", "content": "More?"},
                        {"role": "assistant", "content": "No."}]}
    no_system = {"messages": [head[1], {"role": "assistant", "content": "Hello."}]}
    assert prompt_hash(one) == prompt_hash(two)
    assert prompt_hash(one) != prompt_hash(no_system)


# -- the split -------------------------------------------------------------------------------
def test_held_out_copies_leave_the_training_rows_and_are_counted(leaky_cfg, tmp_path):
    data = split_data(load_config(leaky_cfg))
    # the premise: the held-out set is h1, h2 and one random pool row, none of them a copy
    assert len(data.test_rows) == 3
    assert {r["split"] for r in data.test_rows} == {"h1", "h2", "pool"}
    assert not any(r["response"].startswith(("copy", "miss")) for r in data.test_rows)
    # Assert: the three copies are gone (a: 1, b: 2), the near misses stay
    trained = [r for rows in data.client_rows for r in rows]
    responses = {r["response"] for r in trained}
    assert not responses & {"copy 1", "copy 2", "copy 3"}
    assert {"miss 1", "miss 2"} <= responses
    assert data.held_out_duplicates == [1, 2]
    assert len(trained) == 43 - 3 - 3
    held = {_prompt(r) for r in data.test_rows}
    assert not [r for r in trained if _prompt(r) in held]
    # stats.json says so, and counts the rows kept
    write_split(data, tmp_path / "split")
    stats = json.loads((tmp_path / "split/partitions/stats.json").read_text())
    assert stats["held_out_duplicates"] == {"removed": 3,
                                            "per_client": {"client_0000": 1, "client_0001": 2}}
    assert [c["rows"] for c in stats["clients"]] == [len(r) for r in data.client_rows]


def _pairs_folder(root: Path) -> Path:
    """Client x: two prompts, each twice (once in other case/spacing); client y: unique."""
    root.mkdir()
    x = [{**P1, "response": "x1"}, {**P1, "instruction": "name the CAPITAL of france.",
                                    "response": "x2"},
         {**P2, "response": "x3"}, {**P2, "context": " THE river runs north. It is long.",
                                    "response": "x4"}]
    write_jsonl(root / "x.jsonl", x)
    write_jsonl(root / "y.jsonl", make_rows(4, seed=8))
    return root


def test_a_clients_own_held_out_row_takes_its_copy_out_of_training(tmp_path, tiny_model_dir):
    folder = _pairs_folder(tmp_path / "clients")
    cfg = load_config(write_config(
        tmp_path / "c.toml", tiny_model_dir, tmp_path / "unused.jsonl",
        data={"clients_dir": folder, "test_per_client": 1, "test_per_label": 0}))
    data = split_data(cfg)
    # whichever of x's four rows is held out, its twin goes and the other pair stays
    (held,) = data.client_test_rows[0]
    assert data.held_out_duplicates == [1, 0]
    assert len(data.client_rows[0]) == 2 and len(data.client_rows[1]) == 3
    assert all(_prompt(r) != _prompt(held) for r in data.client_rows[0])


def test_a_client_left_with_nothing_to_train_on_stops_the_split(tmp_path, tiny_model_dir):
    root = tmp_path / "clients"
    root.mkdir()
    write_jsonl(root / "x.jsonl", [{**P1, "response": "x1"},
                                   {**P1, "instruction": P1["instruction"].upper()}])
    write_jsonl(root / "y.jsonl", make_rows(4, seed=8))
    cfg = load_config(write_config(
        tmp_path / "c.toml", tiny_model_dir, tmp_path / "unused.jsonl",
        data={"clients_dir": root, "test_per_client": 1, "test_per_label": 0}))
    with pytest.raises(DataError, match="client x: all 1 of its training rows ask a prompt "
                                        "of the held-out set"):
        split_data(cfg)


def test_every_row_lands_once_or_is_a_counted_copy(tmp_path, tiny_model_dir):
    # Prepare: 3 clients, each row with an id; many prompts repeated across the clients
    base = make_rows(12, seed=2)
    rows = []
    for i in range(60):
        r = dict(base[i % 12])
        if i % 3 == 1:
            r["instruction"] = "  " + r["instruction"].upper()
        rows.append({**r, "id": i, "owner": "abc"[i % 3]})
    cfg = load_config(write_config(
        tmp_path / "c.toml", tiny_model_dir, write_jsonl(tmp_path / "rows.jsonl", rows),
        seed=5, data={"test_per_client": 2, "test_per_label": 1},
        partition={"method": "natural", "by": "owner", "clients": 3}))
    # Execute
    data = split_data(cfg)
    # Assert: held out, trained, or removed, exactly once each; removed = held-out prompt
    held = [r for r in data.test_rows] + [r for rows_ in data.client_test_rows for r in rows_]
    trained = [r for rows_ in data.client_rows for r in rows_]
    ids = [r["id"] for r in held + trained]
    assert len(ids) == len(set(ids))
    removed = [r for r in rows if r["id"] not in set(ids)]
    prompts = {_prompt(r) for r in held}
    assert removed and all(_prompt(r) in prompts for r in removed)
    assert not [r for r in trained if _prompt(r) in prompts]
    assert data.held_out_duplicates == [sum(r["owner"] == o for r in removed) for o in "abc"]


def test_fedit_partition_removes_copies_of_its_test_rows(tmp_path):
    rows = [{**r, "category": r["split"]} for r in leaky_rows()]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "parts"
    result = CliRunner().invoke(app, ["partition", str(src), "--out", str(out), "--method",
                                      "iid", "--clients", "2", "--test-per-label", "1"])
    assert result.exit_code == 0, result.output
    test = [json.loads(x) for x in (out / "test.jsonl").read_text().splitlines()]
    assert not any(r["response"].startswith("copy") for r in test)  # the premise
    trained = [json.loads(x) for f in sorted(out.glob("client_*.jsonl"))
               for x in f.read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["held_out_duplicates"]["removed"] == 3
    assert "3 training row(s) removed: their prompt is also in test.jsonl" in result.output
    assert len(trained) == 43 - 3 - 3


# -- the runs --------------------------------------------------------------------------------
def test_the_simulation_trains_without_the_copies_and_reports_them(leaky_cfg):
    cfg = load_config(leaky_cfg)
    run_dir = make_run_dir(cfg)
    summary = Simulation(cfg, run_dir, log=lambda m: None).run()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["clients"] == [0, 1] and lines[1]["num_examples"] == 43 - 3 - 3
    assert lines[1]["held_out_duplicates"] == {"0": 1, "1": 2}
    assert summary["held_out_duplicates"] == {"removed": 3, "per_client": {"0": 1, "1": 2}}
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["held_out_duplicates"]["removed"] == 3
    stats = json.loads((run_dir / "partitions/stats.json").read_text())
    assert stats["held_out_duplicates"]["removed"] == 3


flower_only = pytest.mark.usefixtures("flower_task_identity")


@flower_only
def test_flower_nodes_train_the_same_rows_as_the_simulation(leaky_cfg):
    from tests.conftest import FakeGrid, run_server_app

    cfg = load_config(leaky_cfg, ["name=simulated"])
    sim_dir = make_run_dir(cfg)
    Simulation(cfg, sim_dir, log=lambda m: None).run()
    # Execute: the same config over two Flower nodes (partition-id 0 and 1)
    grid = FakeGrid(2)
    run_dir, lines = run_server_app(leaky_cfg, grid, "name=flower")
    # Assert: the same rows trained, the same count reported, the same adapter
    sim = [json.loads(x) for x in (sim_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["num_examples"] == sim[1]["num_examples"] == 37
    assert lines[1]["held_out_duplicates"] == sim[1]["held_out_duplicates"] == {"0": 1, "1": 2}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["held_out_duplicates"] == {"removed": 3, "per_client": {"0": 1, "1": 2}}
    for a, b in zip(load_adapter_arrays(run_dir / "final/adapter"),
                    load_adapter_arrays(sim_dir / "final/adapter"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@flower_only
def test_flower_nodes_get_only_hashes_and_drop_their_own_copies(leaky_cfg, tmp_path):
    from fedit.algorithms import payload as P
    from tests.conftest import FakeGrid, run_server_app

    # Prepare: two parties with files of their own; party 0 holds copies of P1 and P2
    own = [{**P1, "instruction": "name THE capital of France.", "response": "copy"},
           {**P2, "response": "copy"}, *make_rows(6, seed=30)]
    files = [write_jsonl(tmp_path / "p0.jsonl", own),
             write_jsonl(tmp_path / "p1.jsonl", make_rows(5, seed=31))]
    grid = FakeGrid(2, node_configs=[{"data-path": str(f)} for f in files])
    # Execute
    run_dir, lines = run_server_app(leaky_cfg, grid)
    # Assert: party 0 trained on its 6 other rows and said it dropped 2
    assert lines[1]["num_examples"] == 6 + 5
    assert lines[1]["held_out_duplicates"] == {"0": 2, "1": 0}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["held_out_duplicates"] == {"removed": 2, "per_client": {"0": 2}}
    # What the nodes got: the held-out rows' hashes (sha256 of the normalised prompt), and
    # no held-out prompt's text anywhere in a message's config
    test = [json.loads(x) for x in (run_dir / "test.jsonl").read_text().splitlines()]
    expected = " ".join(sorted(hashlib.sha256(json.dumps(
        ["instruction", *_prompt(r)]).encode()).hexdigest() for r in test))
    trains = [m for _, m in grid.sent if P.HELD_OUT in m.content.config_records[
        P.CONFIG_RECORD]]
    assert len(trains) == 2
    for m in trains:
        config = m.content.config_records[P.CONFIG_RECORD]
        assert config[P.HELD_OUT] == expected
        text = json.dumps({k: v for k, v in config.items() if k != P.RUN_CONFIG})
        assert not any(r["instruction"] in text or _norm(r["instruction"]) in text
                       for r in test)


# -- fedit data inspect -------------------------------------------------------------------
def test_inspect_counts_duplicate_prompt_groups(tmp_path):
    a, b = {"instruction": "Say hi.", "context": ""}, {"instruction": "Add.", "context": "1 2"}
    rows = [a, a, {**a, "instruction": "SAY hi. "}, b, {**b, "context": "1\n2"}, {
        "instruction": "Other.", "context": ""}]
    rows = [{**r, "response": f"r{i}"} for i, r in enumerate(rows)]
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    convs = [{"messages": [*chat, {"role": "assistant", "content": x}]} for x in "XY"]
    convs.append({"messages": [chat[1], {"role": "assistant", "content": "Z"}]})
    # exact: (a, a) and the two conversations with the system turn: 2 groups, 2 extra;
    # normalised: a x3, b x2, the conversations: 3 groups, 2 + 1 + 1 extra
    assert duplicate_groups(rows + convs) == {"exact": {"groups": 2, "extra": 2},
                                             "normalised": {"groups": 3, "extra": 4}}
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    result = CliRunner().invoke(app, ["data", "inspect", str(src), "--model", "none"])
    assert result.exit_code == 0, result.output
    assert re.search(r"exact\s+1 groups\s+1 extra copies", result.output)
    assert re.search(r"normalised\s+2 groups\s+3 extra copies", result.output)
