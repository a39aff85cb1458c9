"""`fedit partition` and `fedit data inspect`, run as a user runs them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedit.cli import app


def test_partition_writes_clients_stats_and_plot(tmp_path, tiny_data_file):
    out = tmp_path / "parts"
    result = CliRunner().invoke(app, [
        "partition", str(tiny_data_file), "--out", str(out), "--clients", "4",
        "--method", "shards", "--by", "category", "--test-per-label", "2", "--seed", "1",
    ])
    assert result.exit_code == 0, result.output
    assert "56 rows -> 4 clients (shards)" in result.output
    clients = sorted(out.glob("client_*.jsonl"))
    assert [p.name for p in clients] == [f"client_{i:04d}.jsonl" for i in range(4)]
    rows = [json.loads(x) for p in clients for x in p.read_text().splitlines()]
    test = [json.loads(x) for x in (out / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 56 and len(test) == 8  # 64 rows: 2 per category held out
    stats = json.loads((out / "stats.json").read_text())
    assert [c["rows"] for c in stats["clients"]] == [len(p.read_text().splitlines())
                                                     for p in clients]
    assert (out / "clients.png").read_bytes()[:4] == b"\x89PNG"


def test_partition_names_a_missing_label_field(tmp_path, tiny_data_file):
    result = CliRunner().invoke(app, ["partition", str(tiny_data_file), "--out",
                                      str(tmp_path / "p"), "--by", "topic"])
    assert result.exit_code == 2
    assert "rows have no field 'topic' (choose one with --by)" in result.output


def test_data_inspect_counts(tiny_data_file, tiny_model_dir):
    result = CliRunner().invoke(app, ["data", "inspect", str(tiny_data_file),
                                      "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert "rows: 64" in result.output
    for cat in ("open_qa", "closed_qa", "classification", "brainstorming"):
        assert f"{cat}" in result.output and "16" in result.output
    assert "text (tokens)" in result.output


def test_data_inspect_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": \n')
    result = CliRunner().invoke(app, ["data", "inspect", str(bad), "--model", "none"])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "bad.jsonl:2:" in result.output
    assert len(result.output.strip().splitlines()) == 1
