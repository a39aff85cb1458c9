"""Loading rows from every supported source, field mapping, and every validation error."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import socket
import threading
import urllib.error
from collections import Counter
from pathlib import Path

import pytest

from fedit.data import load
from fedit.data.load import DOLLY, dolly_path, load_rows
from fedit.errors import DataError
from tests.conftest import SHARED_DOLLY, make_rows, write_jsonl

DOLLY_SHA256 = "f71c42b7e0ea11943f04875000c74478d43c9b0d666e155a39e55b6ef14122be"
DOLLY_CATEGORIES = {
    "open_qa": 3742,
    "general_qa": 2191,
    "classification": 2136,
    "closed_qa": 1773,
    "brainstorming": 1766,
    "information_extraction": 1506,
    "summarization": 1188,
    "creative_writing": 709,
}
ALPACA = {"instruction": "instruction", "context": "input", "response": "output"}


def _alpaca(rows: list[dict]) -> list[dict]:
    return [
        {
            "instruction": r["instruction"],
            "input": r["context"],
            "output": r["response"],
            "category": r["category"],
        }
        for r in rows
    ]


def _write_csv(path: Path, header: list[str], records: list[list[str]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(records)
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --- formats -------------------------------------------------------------------------


def test_jsonl_rows_come_back_with_canonical_keys_first(tmp_path):
    # Prepare
    rows = make_rows(5)
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    # Execute
    got = load_rows(str(path))
    # Assert
    assert got == rows
    assert list(got[0]) == ["instruction", "context", "response", "category"]


def test_jsonl_gz_and_blank_lines(tmp_path):
    rows = make_rows(4)
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n  \n"
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress(text.encode()))
    assert load_rows(str(path)) == rows


def test_json_list(tmp_path):
    rows = make_rows(3)
    path = tmp_path / "x.json"
    path.write_text(json.dumps(rows, indent=2))
    assert load_rows(str(path)) == rows


def test_csv_with_multiline_cell(tmp_path):
    path = _write_csv(
        tmp_path / "x.csv",
        ["instruction", "context", "response", "category"],
        [["Say hi.", "", "Hi,\nthere.", "open_qa"], ["Add.", "1 2", "3", "closed_qa"]],
    )
    got = load_rows(str(path))
    assert got == [
        {"instruction": "Say hi.", "context": "", "response": "Hi,\nthere.", "category": "open_qa"},
        {"instruction": "Add.", "context": "1 2", "response": "3", "category": "closed_qa"},
    ]


def test_parquet(tmp_path):
    rows = make_rows(6)
    path = _write_parquet(tmp_path / "x.parquet", rows)
    assert load_rows(str(path)) == rows


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = make_rows(7)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    test_rows = make_rows(2, seed=9)
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows), test=datasets.Dataset.from_list(test_rows)
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "ds")) == rows
    assert load_rows(str(tmp_path / "dd")) == rows  # the "train" split


def test_dataset_dict_without_train_split_is_ambiguous(tmp_path):
    import datasets

    one = datasets.Dataset.from_list(make_rows(2))
    datasets.DatasetDict(a=one, b=one).save_to_disk(str(tmp_path / "dd"))
    datasets.DatasetDict(only=one).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(DataError, match=r"dd: several splits \(a, b\) and none is 'train'"):
        load_rows(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "single")) == make_rows(2)


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain: a folder, but not one written by datasets"):
        load_rows(str(tmp_path / "plain"))


# --- field mapping -------------------------------------------------------------------


def test_alpaca_schema_mapped_and_extra_columns_kept(tmp_path):
    # Prepare
    rows = make_rows(4)
    for i, r in enumerate(rows):
        r["source"] = f"s{i}"
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [{**a, "source": r["source"]} for a, r in zip(_alpaca(rows), rows, strict=True)],
    )
    # Execute
    got = load_rows(str(path), ALPACA)
    # Assert: the mapped columns become canonical, the others stay as they were
    assert got == [
        {
            "instruction": r["instruction"],
            "context": r["context"],
            "response": r["response"],
            "category": r["category"],
            "source": r["source"],
        }
        for r in rows
    ]


def test_partial_mapping_and_absent_or_null_context(tmp_path):
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [{"q": "Why?", "response": "Because.", "context": None}, {"q": "How?", "response": "So."}],
    )
    got = load_rows(str(path), {"instruction": "q"})
    assert got == [
        {"instruction": "Why?", "context": "", "response": "Because."},
        {"instruction": "How?", "context": "", "response": "So."},
    ]


def test_unknown_field_in_mapping(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", make_rows(1))
    with pytest.raises(DataError, match="data.fields.answer: unknown field"):
        load_rows(str(path), {"answer": "output"})


def test_long_rows_are_not_errors(tmp_path):
    row = {"instruction": "Repeat.", "context": "x" * 100_000, "response": "y " * 50_000}
    path = write_jsonl(tmp_path / "long.jsonl", [row])
    assert load_rows(str(path)) == [row]


# --- validation errors ---------------------------------------------------------------


def _jsonl_with_bad_line(tmp_path: Path, bad: str) -> Path:
    """A jsonl file whose line 3 is ``bad`` (the blank line 2 checks the numbering)."""
    good = [json.dumps(r) for r in make_rows(2)]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join([good[0], "", bad, good[1]]) + "\n")
    return path


BAD_LINES = [
    ('{"instruction": "a", "response": ', r"x\.jsonl:3: invalid JSON \(Expecting value"),
    (
        '{"instruction": "a"}',
        r"x\.jsonl:3: field 'response' is missing \(map another column "
        r'with data\.fields\.response = "\.\.\."; columns: instruction\)',
    ),
    ('{"response": "b"}', r"x\.jsonl:3: field 'instruction' is missing"),
    (
        '{"instruction": 7, "response": "b"}',
        r"x\.jsonl:3: field 'instruction' must be a "
        r"string, got number",
    ),
    (
        '{"instruction": "a", "response": ["b"]}',
        r"x\.jsonl:3: field 'response' must be a "
        r"string, got array",
    ),
    (
        '{"instruction": "a", "response": null}',
        r"x\.jsonl:3: field 'response' must be a "
        r"string, got null",
    ),
    (
        '{"instruction": "a", "context": {}, "response": "b"}',
        r"x\.jsonl:3: field 'context' "
        r"must be a string, got object",
    ),
    ('{"instruction": " \\n\\t", "response": "b"}', r"x\.jsonl:3: field 'instruction' is empty"),
    ('{"instruction": "a", "response": ""}', r"x\.jsonl:3: field 'response' is empty"),
    ('["a", "b"]', r"x\.jsonl:3: expected an object with named fields, got array"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
def test_jsonl_errors_name_file_line_and_field(tmp_path, bad, message):
    path = _jsonl_with_bad_line(tmp_path, bad)
    with pytest.raises(DataError, match=message):
        load_rows(str(path))


def test_mapped_column_missing_names_the_mapping(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "response": "b"}])
    with pytest.raises(
        DataError,
        match=r"x\.jsonl:1: field 'output' is missing "
        r"\(data\.fields\.response = 'output' asks for it",
    ):
        load_rows(str(path), {"response": "output"})


def test_required_label_missing_or_empty(tmp_path):
    rows = make_rows(3)
    del rows[1]["category"]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    rows[1]["category"] = " "
    path_empty = write_jsonl(tmp_path / "y.jsonl", rows)
    assert len(load_rows(str(path))) == 3  # not asked for: no error
    with pytest.raises(DataError, match=r"x\.jsonl:2: field 'category' is missing or empty"):
        load_rows(str(path), required_label="category")
    with pytest.raises(DataError, match=r"y\.jsonl:2: field 'category' is missing or empty"):
        load_rows(str(path_empty), required_label="category")


def test_json_list_errors_name_the_index(tmp_path):
    rows = make_rows(3)
    rows[2]["response"] = 5
    path = tmp_path / "x.json"
    path.write_text(json.dumps(rows))
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"instruction": "a",\n  "response": }\n]')
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"data": rows}))
    with pytest.raises(DataError, match=r"x\.json\[2\]: field 'response' must be a string"):
        load_rows(str(path))
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        load_rows(str(bad))
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of objects, got object"):
        load_rows(str(obj))


def test_csv_errors_count_the_header_as_line_1(tmp_path):
    header = ["instruction", "context", "response"]
    path = _write_csv(tmp_path / "x.csv", header, [["a", "", "b"], ["c", "", "d"], ["e", "", " "]])
    ragged = _write_csv(tmp_path / "r.csv", header, [["a", "", "b"], ["c", "d"]])
    no_response = _write_csv(tmp_path / "n.csv", ["instruction", "output"], [["a", "b"]])
    with pytest.raises(DataError, match=r"x\.csv:4: field 'response' is empty"):
        load_rows(str(path))
    with pytest.raises(DataError, match=r"r\.csv:3: row has 2 cells, the header has 3"):
        load_rows(str(ragged))
    with pytest.raises(DataError, match=r"n\.csv:2: field 'response' is missing"):
        load_rows(str(no_response))


def test_parquet_errors_name_the_row_index(tmp_path):
    rows = make_rows(4)
    rows[3]["instruction"] = ""
    path = _write_parquet(tmp_path / "x.parquet", rows)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"x\.parquet\[3\]: field 'instruction' is empty"):
        load_rows(str(path))
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet file"):
        load_rows(str(broken))


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.csv"])
def test_empty_files_have_no_rows(tmp_path, name):
    path = tmp_path / name
    path.write_text({"e.jsonl": "\n\n", "e.json": "[]", "e.csv": "instruction,response\n"}[name])
    with pytest.raises(DataError, match=rf"{name}: no rows \(the file is empty\)"):
        load_rows(str(path))


def test_missing_file_and_unknown_extension(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"data/nope\.jsonl: file not found"):
        load_rows("data/nope.jsonl")
    with pytest.raises(DataError, match=r"notes\.txt: unknown file type; use \.jsonl"):
        load_rows(str(txt))


def test_empty_source_string():
    with pytest.raises(DataError, match="no data source given"):
        load_rows(" ")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(
        json.dumps({"instruction": "caf\u00e9", "response": "b"}).encode()
        + b"\n"
        + b'{"instruction": "caf\xe9", "response": "b"}\n'
    )
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8 text"):
        load_rows(str(path))


# --- the hub -------------------------------------------------------------------------


@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_is_one_clear_error_without_a_network_attempt(monkeypatch, offline):
    # Prepare: offline or not, both ways datasets can learn it (the env var is read at
    # import); online, the hub probe says it cannot be reached. Every connection is
    # recorded and refused, so nothing here depends on the network or on how long
    # datasets would retry one.
    import datasets

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    probes, attempts = [], []
    monkeypatch.setattr(load, "hub_reachable", lambda: probes.append("probe") or False)

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    # Execute
    with pytest.raises(DataError) as info:
        load_rows("fedit-test/no-such-set")
    # Assert: one line naming the id and what to do; offline, datasets looks in its cache
    # without the probe; online, the probe alone answers: nobody tried to connect
    message = str(info.value)
    assert message.startswith("fedit-test/no-such-set: not a local file or folder")
    assert "pass a local file path" in message and "\n" not in message
    assert probes == ([] if offline else ["probe"])
    assert attempts == []


def test_unreachable_hub_is_reported_without_trying(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(load, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("tried the hub"))
    with pytest.raises(DataError, match=r"org/set: .*the Hugging Face hub cannot be reached"):
        load_rows("org/set")


@pytest.mark.parametrize(
    ("answer", "reachable"),
    [("ok", True), ("http_error", True), ("refused", False), ("never", False)],
)
def test_hub_probe_waits_for_its_request_at_most_its_timeout(monkeypatch, answer, reachable):
    # Prepare: a fake request and a thread that records the wait for it; "never" is a
    # request that has not ended when the wait does (its thread never runs)
    from fedit import hub

    seen = []

    def urlopen(request, timeout):
        seen.append(("request", request.full_url, request.get_method(), timeout))
        if answer == "http_error":  # an error status is still the hub answering
            raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)
        if answer == "refused":
            raise OSError("connection refused")
        return io.BytesIO()

    class RecordingThread(threading.Thread):
        def start(self):
            if answer != "never":
                super().start()

        def join(self, timeout=None):
            seen.append(("wait", timeout))
            if answer != "never":
                super().join()  # until the request ends, however long this machine takes

    monkeypatch.setattr(hub.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(hub, "Thread", RecordingThread)
    # Execute (unwrapped: the probe's answer is cached per endpoint)
    got = hub._probe.__wrapped__("https://hub.invalid", timeout=0.3)
    # Assert: one HEAD request with the probe's timeout, and a wait bounded by the same
    request = [] if answer == "never" else [("request", "https://hub.invalid", "HEAD", 0.3)]
    assert got is reachable
    assert seen == [*request, ("wait", 0.3)]


# --- the embedded corpus -------------------------------------------------------------


def test_embedded_dolly_is_byte_identical_to_the_shared_file():
    if not SHARED_DOLLY.is_file():
        pytest.skip(f"{SHARED_DOLLY} is absent (the project's ../shared folder is not here)")
    data = gzip.decompress(dolly_path().read_bytes())
    assert hashlib.sha256(data).hexdigest() == DOLLY_SHA256
    assert data == SHARED_DOLLY.read_bytes()


def test_embedded_gzip_header_has_no_name_or_time():
    header = dolly_path().read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] & 0x08 == 0  # FNAME flag: no file name stored
    assert header[4:8] == b"\0\0\0\0"  # MTIME: zero


def test_load_dolly_alias_reads_the_embedded_file_directly(monkeypatch):
    # Prepare: record the files read; neither datasets nor the hub may be asked
    read = []
    real_read_file = load._read_file

    def recording(path, name):
        read.append((path, name))
        return real_read_file(path, name)

    monkeypatch.setattr(load, "_read_file", recording)
    monkeypatch.setattr(load, "_read_saved_dataset", lambda *a: pytest.fail("used datasets"))
    monkeypatch.setattr(load, "_read_hub", lambda *a: pytest.fail("asked the hub"))
    # Execute
    rows = load_rows(DOLLY, required_label="category")
    # Assert: the gzip shipped in the package, once, read whole
    assert read == [(dolly_path(), DOLLY)]
    assert len(rows) == 15011
    assert Counter(r["category"] for r in rows) == DOLLY_CATEGORIES
    assert all(set(r) == {"instruction", "context", "response", "category"} for r in rows)


def test_a_mapped_context_column_must_exist(tmp_path):
    # Prepare: alpaca rows, but the mapping misspells "input"
    rows = [{"instruction": "Add.", "input": "1 and 2", "output": "3"}]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    fields = {"context": "imput", "response": "output"}
    # Execute / Assert: named, not silently empty
    with pytest.raises(DataError, match=r"alpaca.jsonl:1: field 'imput' is missing "
                       r"\(data.fields.context = 'imput' asks for it"):
        load_rows(str(path), fields)
    assert load_rows(str(path), {"context": "input", "response": "output"})[0]["context"] == (
        "1 and 2"
    )
