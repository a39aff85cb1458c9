"""The ``fedit`` command line, run as a user runs it: `fedit --help`, the one-line errors,
`fedit partition` and `fedit data inspect`."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from fedit.cli import app
from fedit.cli.errors import one_line_errors
from fedit.errors import DataError


def _listed(output: str) -> dict[str, str]:
    """``{command: description}`` of the rows of a help page's panels."""
    rows = (line.strip().strip("│").split(maxsplit=1) for line in output.splitlines()
            if line.startswith("│"))
    return {cells[0]: cells[1].strip() for cells in rows if len(cells) == 2}


@pytest.mark.parametrize("group", [[], ["data"], ["flower"]])
def test_help_lists_every_command_on_one_unbroken_line(group):
    # A terminal wide enough that no description needs wrapping: one row a command.
    result = CliRunner().invoke(app, [*group, "--help"], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    commands = typer.main.get_command(app)
    for name in group:
        commands = commands.commands[name]
    listed = _listed(result.output)
    for name, command in commands.commands.items():
        assert "\n" not in command.help, name
        assert listed.get(name) == command.help, name


def test_help_names_the_strategies_not_only_fedavg():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "1000"})
    assert "aggregate with FedAvg," not in result.output
    assert "federated strategy (FedAvg, FedProx, SCAFFOLD" in result.output


@pytest.mark.parametrize("error", [DataError("x.jsonl:3: no 'response'"),
                                   ValueError("x.jsonl:3: no 'response'")])
def test_an_error_in_a_command_is_one_line_on_stderr_and_exit_2(error):
    @one_line_errors
    def fails() -> None:
        raise error

    cli = typer.Typer()
    cli.command()(fails)
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 2
    assert result.stderr == "error: x.jsonl:3: no 'response'\n"
    assert result.stdout == ""


def test_train_without_a_config_is_one_line():
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2
    assert result.stderr == ("error: give a CONFIG file (e.g. configs/quickstart.toml) or "
                             "--resume RUN_DIR\n")


def test_an_interrupted_train_says_how_to_resume(tmp_path, monkeypatch):
    def interrupted(run_dir, log):
        raise KeyboardInterrupt

    monkeypatch.setattr("fedit.runtimes.inprocess.resume_federated", interrupted)
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 130
    assert result.stderr == ("\ninterrupted: continue from the last committed round with "
                             f"`fedit train --resume {tmp_path}`\n")


def test_partition_writes_clients_stats_and_plot(tmp_path, tiny_data_file):
    out = tmp_path / "parts"
    result = CliRunner().invoke(app, [
        "partition", str(tiny_data_file), "--out", str(out), "--clients", "4",
        "--method", "shards", "--by", "category", "--test-per-label", "2", "--seed", "1",
    ])
    assert result.exit_code == 0, result.output
    # 56 training rows in 4 x 2 shards of 7: every client holds 14
    assert result.stdout.splitlines() == [
        "56 rows -> 4 clients (shards); rows a client: min 14, median 14, max 14",
        f"wrote {out}/client_*.jsonl, {out}/stats.json, {out}/clients.png",
    ]
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
    lines = result.stdout.splitlines()
    assert lines[0] == "rows: 64"
    labels = lines.index("labels (category):")
    # 64 rows, 16 of each category (sorted by name): count and share on each one's own row
    assert [line.split() for line in lines[labels + 1:labels + 5]] == [
        [cat, "16", "25.0%"] for cat in ("brainstorming", "classification", "closed_qa",
                                         "open_qa")
    ]
    assert lines[labels + 5] == ""
    assert "text (tokens)" in result.output


def test_data_inspect_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": \n')
    result = CliRunner().invoke(app, ["data", "inspect", str(bad), "--model", "none"])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "bad.jsonl:2:" in result.output
    assert len(result.output.strip().splitlines()) == 1
