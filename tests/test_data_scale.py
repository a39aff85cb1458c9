"""Big files: JSON lists and JSON lines read as streams, memory bounded, truncation named."""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc
from pathlib import Path

import pytest

from fedit.data import files
from fedit.data.inspect import inspect_rows
from fedit.data.load import iter_rows, load_rows
from fedit.errors import DataError
from tests.conftest import make_rows

CUT = "the file ends inside a row (truncated?)"


def _long_rows(n: int) -> list[dict[str, str]]:
    """Rows of about 1 kB each, as long as a typical dolly row with a context."""
    return [{"instruction": f"Question {i}: " + "why is the sky blue? " * 5,
             "context": f"Context {i}. " + "Light scatters off the air. " * 12,
             "response": f"Answer {i}. " + "Short wavelengths scatter more. " * 18,
             "category": ("open_qa", "closed_qa", "summarization")[i % 3]} for i in range(n)]


# --- a file cut short --------------------------------------------------------------------


def test_a_json_list_cut_inside_a_row_names_the_row(tmp_path):
    text = json.dumps(make_rows(3), indent=2)
    path = tmp_path / "x.json"
    path.write_text(text[: text.rindex('"response"')])  # inside row 2 (0-based)
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    assert str(e.value).startswith(f"{path}[2]: {CUT}")
    assert "\n" not in str(e.value)


def test_a_json_list_cut_before_its_closing_bracket(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(make_rows(3))[:-1])  # every row whole, "]" missing
    with pytest.raises(DataError, match=r"x\.json\[3\]: " + re.escape(CUT)):
        load_rows(str(path))


def test_a_gzipped_json_list_cut_short(tmp_path):
    path = tmp_path / "x.json.gz"
    data = gzip.compress(json.dumps(_long_rows(200)).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"x\.json\.gz\[\d+\]: the file ends inside a row"):
        load_rows(str(path))


@pytest.mark.parametrize("last", [
    '{"instruction": "a", "response": "b"',  # the closing brace missing
    '{"instruction": "a", "respo',  # cut inside a string
    '{"instruction": "a", "response": ',  # cut before a value
])
def test_a_jsonl_file_whose_last_line_is_cut(tmp_path, last):
    good = [json.dumps(r) for r in make_rows(2)]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join([good[0], "", good[1], last]))  # the row is on line 4
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    assert str(e.value).startswith(f"{path}:4: {CUT}")


def test_a_cut_line_before_other_rows_is_invalid_json_not_truncation(tmp_path):
    good = [json.dumps(r) for r in make_rows(2)]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join([good[0], '{"instruction": "a"', good[1]]) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        load_rows(str(path))


def test_a_gzipped_jsonl_file_cut_short(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in _long_rows(300)).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"x\.jsonl\.gz:\d+: the file ends inside a row"):
        load_rows(str(path))


# --- what ijson refuses and json reads -----------------------------------------------------


def test_a_small_json_list_ijson_refuses_is_read_whole(tmp_path):
    # NaN and integers past 64 bits are not JSON to ijson; Python's json reads them
    path = tmp_path / "x.json"
    path.write_bytes(b'\xef\xbb\xbf [{"instruction": "a", "response": "b", "id": 1},\n'
                     b' {"instruction": "c", "response": "d", "id": 123456789012345678901234,'
                     b' "score": NaN}]')
    rows = load_rows(str(path))
    assert [r["id"] for r in rows] == [1, 123456789012345678901234]
    assert rows[1]["score"] != rows[1]["score"]  # NaN


def test_invalid_json_in_a_big_list_names_the_row(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "REPARSE_BELOW", 0)  # as if the file were too big to reparse
    path = tmp_path / "bad.json"
    path.write_text('[{"instruction": "a", "response": "b"},\n {"instruction" "c"}]')
    with pytest.raises(DataError, match=r"bad\.json\[1\]: invalid JSON \(parse error: .*\); "
                                        "fix row 1 of the list"):
        load_rows(str(path))


def test_a_json_scalar_is_not_a_list(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('  "just text"')
    with pytest.raises(DataError, match=r"x\.json: expected a JSON list of objects, got string"):
        load_rows(str(path))


# --- memory ----------------------------------------------------------------------------------


@pytest.fixture
def big_json(tmp_path) -> Path:
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_long_rows(4000)), encoding="utf-8")
    assert path.stat().st_size > 3_000_000
    return path


def test_a_json_list_is_streamed_in_bounded_memory(big_json):
    size = big_json.stat().st_size
    tracemalloc.start()
    try:
        n = sum(1 for _ in iter_rows(str(big_json)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 4000
    assert peak < size / 20  # json.load would hold the text and every row: several times size


def test_inspect_keeps_counts_not_rows(big_json):
    size = big_json.stat().st_size
    tracemalloc.start()
    try:
        report = inspect_rows(iter_rows(str(big_json)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["rows"] == 4000
    assert report["labels"] == {"closed_qa": 1333, "open_qa": 1334, "summarization": 1333}
    assert report["duplicates"]["exact"] == {"groups": 0, "extra": 0}  # every row differs
    assert peak < size / 10
