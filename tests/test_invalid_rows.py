"""data.invalid_rows: "error" stops at the first bad row (as before); "skip" drops, counts
by reason and per client, names the first few, and still stops when too much is invalid."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedit.cli import app
from fedit.config import DataConfig, config_from_dict
from fedit.data.federated import split_data, write_split
from fedit.data.invalid import RowCounts
from fedit.data.load import load_rows
from fedit.errors import ConfigError, DataError

GOOD = {"instruction": "Name a bird.", "response": "A robin.", "category": "open_qa"}
# one row of each kind of invalid row, and the reason each is counted under
BAD = [
    ({"instruction": "q", "category": "open_qa"}, "missing field"),
    ({"instruction": "q", "response": 3, "category": "open_qa"}, "wrong type"),
    ({"instruction": "  ", "response": "a", "category": "open_qa"}, "empty field"),
    ([1, 2], "not an object"),
    ({"messages": [], "category": "chat"}, "empty conversation"),
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _skip(fraction: float = 0.5) -> RowCounts:
    return RowCounts.from_config(DataConfig(invalid_rows="skip", max_invalid_fraction=fraction))


def test_skip_counts_each_reason_as_counted_by_hand(tmp_path):
    # Prepare: 6 good rows, then the 5 bad ones on lines 7..11 (5 of 11 < 0.5)
    path = _write(tmp_path / "x.jsonl", [GOOD] * 6 + [row for row, _ in BAD])
    counts = _skip()
    # Execute
    rows = load_rows(str(path), invalid=counts)
    # Assert: the good rows are kept; each bad one counted once under its reason
    assert rows == [{"instruction": "Name a bird.", "context": "", "response": "A robin.",
                     "category": "open_qa"}] * 6
    assert counts.as_dict() == {
        "rows": 11, "invalid": 5,
        "reasons": {"empty conversation": 1, "empty field": 1, "missing field": 1,
                    "not an object": 1, "wrong type": 1},
        "leading_assistant_turns": 0, "trailing_user_turns": 0}
    assert [m.split(": ", 1)[0] for m in counts.named] == [
        f"{path}:{n}" for n in range(7, 12)]
    assert counts.named[0] == (f"{path}:7: field 'response' is missing (map another column "
                               'with data.fields.response = "..."; columns: instruction, '
                               "category)")
    lines = counts.log_lines("client A")
    assert lines[0] == ('client A: 5 of 11 rows invalid, skipped (data.invalid_rows = "skip"): '
                        "empty conversation 1, empty field 1, missing field 1, not an object "
                        "1, wrong type 1")
    assert lines[1:] == [f"  skipped {m}" for m in counts.named]


def test_only_the_first_five_are_named(tmp_path):
    path = _write(tmp_path / "x.jsonl", [GOOD] * 10 + [{"instruction": "q"}] * 7)
    counts = _skip()
    assert len(load_rows(str(path), invalid=counts)) == 10
    assert counts.invalid == 7 and counts.reasons == {"missing field": 7}
    assert len(counts.named) == 5 and counts.named[-1].startswith(f"{path}:15: ")


@pytest.mark.parametrize(("bad", "stops"), [(3, False), (4, True)])
def test_the_threshold_passes_just_under_and_stops_just_over(tmp_path, bad, stops):
    # Prepare: 10 rows, `bad` of them without a response, the first on line 2
    rows = [GOOD] * 10
    for i in range(1, 1 + bad):
        rows[i] = {"instruction": "q"}
    path = _write(tmp_path / "x.jsonl", rows)
    counts = _skip(0.3)
    if not stops:
        # 3 of 10 is not more than 0.3: loaded, counted
        assert len(load_rows(str(path), invalid=counts)) == 7 and counts.invalid == 3
        return
    with pytest.raises(DataError) as e:
        load_rows(str(path), invalid=counts)
    assert str(e.value) == (f"{path}: 4 of 10 rows (40%) are invalid, more than "
                            "data.max_invalid_fraction = 0.3; the first: missing field "
                            f"({path}:2); check data.fields / the column mapping")
    assert "\n" not in str(e.value)


def test_a_wrong_mapping_stops_even_when_all_invalid_is_allowed(tmp_path):
    path = _write(tmp_path / "x.jsonl", [GOOD] * 3)
    with pytest.raises(DataError, match=r"all 3 rows are invalid .*'output' is missing.*"
                                        r"check data.fields / the column mapping"):
        load_rows(str(path), {"response": "output"}, invalid=_skip(1.0))


def test_the_default_error_policy_is_unchanged(tmp_path):
    path = _write(tmp_path / "x.jsonl", [GOOD, {"instruction": "q"}, GOOD])
    message = (f"{path}:2: field 'response' is missing (map another column with "
               'data.fields.response = "..."; columns: instruction)')
    for invalid in (None, RowCounts(), RowCounts.from_config(DataConfig())):
        with pytest.raises(DataError) as e:
            load_rows(str(path), invalid=invalid)
        assert str(e.value) == message


def test_config_keys_are_checked():
    d = DataConfig()
    assert (d.invalid_rows, d.max_invalid_fraction) == ("error", 0.5)
    with pytest.raises(ConfigError, match=r"data.invalid_rows: use error or skip"):
        DataConfig(invalid_rows="drop")
    with pytest.raises(ConfigError, match=r"data.max_invalid_fraction: must be in \[0, 1\]"):
        DataConfig(max_invalid_fraction=1.5)


def test_counts_per_client_go_to_stats_json_and_the_log(tmp_path):
    # Prepare: a folder of two clients, A with 1 bad row of 9, B with 2 of 10
    folder = tmp_path / "clients"
    folder.mkdir()
    _write(folder / "a.jsonl", [GOOD] * 8 + [{"instruction": "q", "category": "x"}])
    _write(folder / "b.jsonl", [GOOD] * 8 + [[1], {"instruction": 1, "response": "r",
                                                   "category": "x"}])
    cfg = config_from_dict({"seed": 1, "data": {"clients_dir": str(folder),
                                                "invalid_rows": "skip", "test_per_label": 0}})
    logs: list[str] = []
    # Execute
    data = split_data(cfg, logs.append)
    write_split(data, tmp_path / "run")
    # Assert
    assert [len(r) for r in data.client_rows] == [8, 8]
    stats = json.loads((tmp_path / "run" / "partitions" / "stats.json").read_text())
    zero = {"leading_assistant_turns": 0, "trailing_user_turns": 0}
    assert stats["invalid"] == {
        "a": {"rows": 9, "invalid": 1, "reasons": {"missing field": 1}, **zero},
        "b": {"rows": 10, "invalid": 2, "reasons": {"not an object": 1, "wrong type": 1},
              **zero},
        "total": {"rows": 19, "invalid": 3,
                  "reasons": {"missing field": 1, "not an object": 1, "wrong type": 1},
                  **zero}}
    assert any(x.startswith("a: 1 of 9 rows invalid, skipped") for x in logs)
    assert f"  skipped {folder / 'b.jsonl'}:9: expected an object with named fields, got " \
           "array" in logs


def test_data_path_counts_and_the_error_policy_in_a_run_split(tmp_path):
    rows = [{**GOOD, "instruction": f"Name bird {i}."} for i in range(30)]  # no duplicates
    path = _write(tmp_path / "x.jsonl", [*rows, {"instruction": "q", "category": "c"}])
    cfg = {"seed": 1, "data": {"path": str(path), "test_per_label": 2},
           "partition": {"method": "iid", "clients": 2}}
    with pytest.raises(DataError, match=r"x.jsonl:31: field 'response' is missing"):
        split_data(config_from_dict(cfg))
    cfg["data"]["invalid_rows"] = "skip"
    data = split_data(config_from_dict(cfg))
    assert data.invalid[str(path)].as_dict()["invalid"] == 1
    assert sum(map(len, data.client_rows)) + len(data.test_rows) == 30


def test_inspect_reports_invalid_rows(tmp_path):
    path = _write(tmp_path / "x.jsonl", [GOOD] * 6 + [row for row, _ in BAD[:2]])
    runner = CliRunner()
    # Execute: the default stops at the first; skip reports them
    stopped = runner.invoke(app, ["data", "inspect", str(path), "--model", "none"])
    result = runner.invoke(app, ["data", "inspect", str(path), "--model", "none",
                                 "--invalid-rows", "skip"])
    # Assert
    assert stopped.exit_code != 0 and f"{path}:7: field 'response' is missing" in stopped.output
    assert result.exit_code == 0, result.output
    assert "rows: 6" in result.output
    assert "invalid rows (skipped): 2 of 8" in result.output
    assert "  missing field         1" in result.output
    assert "  wrong type            1" in result.output
    assert f"  e.g. {path}:8: field 'response' must be a string" in result.output
