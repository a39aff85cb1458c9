"""A client folder (data.clients_dir): one file a client, clients.toml, held-out rows."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from fedit.config import config_from_dict
from fedit.data.clients import load_client_folder, read_client_folder, with_client_count
from fedit.data.federated import split_data, write_split
from fedit.errors import DataError
from tests.conftest import make_rows, write_jsonl


def _renamed(rows: list[dict], mapping: dict[str, str]) -> list[dict]:
    return [{mapping.get(k, k): v for k, v in r.items()} for r in rows]


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three clients in three formats: a.jsonl.gz (q/a columns), b.csv, c.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_rows(60, seed=3)
    root = tmp_path / "clients"
    root.mkdir()
    a = _renamed(rows[:20], {"instruction": "q", "response": "a"})
    with gzip.open(root / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in a)
    with open(root / "b.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[20:35])
    pq.write_table(pa.Table.from_pylist(rows[35:60]), root / "c.parquet")
    (root / "clients.toml").write_text(
        '[files."a.jsonl.gz"]\nlabel = "hospital A"\nfields = {instruction = "q", response = "a"}\n'
        '\n[files."c.parquet"]\nlabel = "clinic C"\n', encoding="utf-8")
    return root


def _cfg(folder: Path, **data: object) -> object:
    return config_from_dict({"seed": 5, "data": {"clients_dir": str(folder), **data}})


def test_three_formats_one_client_each_in_name_order(folder):
    clients, rows = load_client_folder(folder)
    assert [c.path.name for c in clients] == ["a.jsonl.gz", "b.csv", "c.parquet"]
    assert [c.label for c in clients] == ["hospital A", "b", "clinic C"]  # b: from its name
    assert [len(r) for r in rows] == [20, 15, 25]
    assert rows[0][0]["instruction"].startswith("Tell me about")  # q mapped to instruction


def test_partition_clients_is_set_from_the_folder(folder):
    # the run set-up counts the files (building a config reads no disk)
    cfg = config_from_dict({"data": {"clients_dir": str(folder)}, "partition": {"clients": 10}})
    assert cfg.partition.clients == 10
    assert with_client_count(cfg).partition.clients == 3


def test_per_client_held_out_rows_never_reach_training(folder, tmp_path):
    lines: list[str] = []
    data = split_data(_cfg(folder, test_per_client=3, test_per_label=1), log=lines.append)
    assert len(lines) == 1 and "3 files" in lines[0]
    assert [len(t) for t in data.client_test_rows] == [3, 3, 3]
    assert data.client_names == ["hospital A", "b", "clinic C"]
    key = lambda r: r["instruction"]  # noqa: E731 - rows are unique by instruction
    held = {key(r) for t in data.client_test_rows for r in t}
    trained = {key(r) for rows in data.client_rows for r in rows}
    global_test = {key(r) for r in data.test_rows}
    assert not held & trained and not held & global_test and not trained & global_test
    assert len(held) + len(trained) + len(global_test) == 60
    assert len(data.test_rows) == 4  # one a category, over all clients' rows
    # each client's held-out rows are its own
    _, per_client = load_client_folder(folder)
    for own, rows in zip(data.client_test_rows, per_client, strict=True):
        assert {key(r) for r in own} <= {key(r) for r in rows}
    write_split(data, tmp_path / "run")
    written = sorted(p.name for p in (tmp_path / "run" / "client_test").iterdir())
    assert written == ["client_0000.jsonl", "client_0001.jsonl", "client_0002.jsonl"]
    stats = json.loads((tmp_path / "run" / "partitions" / "stats.json").read_text())
    assert [c["name"] for c in stats["clients"]] == data.client_names
    assert [c["rows"] for c in stats["clients"]] == [len(r) for r in data.client_rows]


def test_split_is_seeded(folder):
    one = split_data(_cfg(folder, test_per_client=2))
    two = split_data(_cfg(folder, test_per_client=2))
    assert one.client_test_rows == two.client_test_rows and one.test_rows == two.test_rows


def test_no_per_client_rows_by_default_in_both_paths(folder, tiny_data_file, tmp_path):
    data = split_data(_cfg(folder))
    assert data.client_test_rows == [[], [], []]
    cfg = config_from_dict({"data": {"path": str(tiny_data_file), "test_per_label": 2},
                            "partition": {"method": "iid", "clients": 2}})
    plain = split_data(cfg)
    assert plain.client_test_rows == [[], []]
    write_split(plain, tmp_path / "run")
    assert not (tmp_path / "run" / "client_test").exists()


def test_partitioned_path_holds_out_per_client_too(tiny_data_file):
    cfg = config_from_dict({"data": {"path": str(tiny_data_file), "test_per_label": 1,
                                     "test_per_client": 2},
                            "partition": {"method": "iid", "clients": 4}})
    data = split_data(cfg)
    assert [len(t) for t in data.client_test_rows] == [2, 2, 2, 2]
    held = {r["instruction"] for t in data.client_test_rows for r in t}
    assert not held & {r["instruction"] for rows in data.client_rows for r in rows}
    assert sum(map(len, data.client_rows)) + len(held) + len(data.test_rows) == 64


def test_unreadable_file_is_named(folder):
    (folder / "d.jsonl").write_text('{"instruction": "x", "response": "y"}\nnot json\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        split_data(_cfg(folder))


def test_unknown_file_type_is_named(folder):
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unknown file type"):
        split_data(_cfg(folder))


@pytest.mark.parametrize(("toml", "match"), [
    ('[files."zz.jsonl"]\nlabel = "Z"\n', r'\[files\."zz\.jsonl"\] names no file'),
    ('[files."b.csv"]\ncolour = "red"\n', r"unknown key 'colour'"),
    ('[files."b.csv"]\nlabel = ""\n', "label must be a non-empty string"),
    ('[files."b.csv"]\nlabel = "clinic C"\n[files."c.parquet"]\nlabel = "clinic C"\n',
     "share the label 'clinic C'"),
    ("oops = 1\n", "unknown key 'oops'"),
    ("[files\n", "not valid TOML"),
])
def test_bad_clients_toml(folder, toml, match):
    (folder / "clients.toml").write_text(toml)
    with pytest.raises(DataError, match=match):
        read_client_folder(folder)


def test_missing_or_empty_folder(tmp_path):
    # a run's config.toml is read without its data (eval, export): the count it holds stays
    cfg = with_client_count(config_from_dict({"data": {"clients_dir": str(tmp_path / "nope")},
                                              "partition": {"clients": 3}}))
    assert cfg.partition.clients == 3
    with pytest.raises(DataError, match="folder not found"):
        split_data(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no data file"):
        with_client_count(_cfg(tmp_path / "empty"))  # the run set-up counts the files


def test_client_with_nothing_left_to_train_on(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    write_jsonl(root / "big.jsonl", make_rows(20, seed=1))
    write_jsonl(root / "tiny.jsonl", make_rows(2, seed=2))
    with pytest.raises(DataError, match=r"tiny\.jsonl: no training rows left"):
        split_data(_cfg(root, test_per_client=2, test_per_label=0))


def test_partition_natural_from_a_folder(folder, tmp_path):
    from typer.testing import CliRunner

    from fedit.cli import app

    out = tmp_path / "parts"
    result = CliRunner().invoke(app, ["partition", "--natural-from", str(folder), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "60 rows in 3 client files (hospital A 20, b 15, clinic C 25)" in result.output
    stats = json.loads((out / "stats.json").read_text())
    assert [(c["name"], c["rows"]) for c in stats["clients"]] == [
        ("hospital A", 20), ("b", 15), ("clinic C", 25)]
    assert stats["label_field"] == "category" and len(stats["labels"]) == 4
    assert (out / "clients.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("client_*.jsonl"))


def test_partition_natural_from_names_the_bad_file(folder, tmp_path):
    from typer.testing import CliRunner

    from fedit.cli import app

    (folder / "b.csv").write_bytes(b"instruction,response\nok,\xff\xfe\n")
    result = CliRunner().invoke(app, ["partition", "--natural-from", str(folder), "-o",
                                      str(tmp_path / "p")])
    assert result.exit_code != 0
    assert "b.csv" in result.output
    both = CliRunner().invoke(app, ["partition", "x.jsonl", "--natural-from", str(folder),
                                    "-o", str(tmp_path / "p")])
    assert both.exit_code != 0 and "give one of them" in both.output


def test_the_readme_example_folder(tmp_path):
    from typer.testing import CliRunner

    from fedit.cli import app

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "parts"
    result = CliRunner().invoke(app, ["partition", "--natural-from",
                                      str(root / "examples" / "clients"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first == "12 rows in 3 client files (clinic B 4, hospital A 4, school C 4)"
    assert first in (root / "README.md").read_text(encoding="utf-8")


def test_model_card_names_the_client_folder(folder):
    from fedit.export.card import CardFacts, model_card

    cfg = with_client_count(_cfg(folder, test_per_client=2))  # as a run's config.toml holds
    card = model_card(CardFacts("adapter", "tiny", "adapter", {"r": 8}, cfg=cfg))
    assert "- file: the files of `clients`" in card
    assert ("- partition: 3 clients, one a file of the folder `clients`; 2 rows of each held "
            "out for it alone") in card


# --- a folder per party ----------------------------------------------------------------


@pytest.fixture
def parties(tmp_path) -> tuple[Path, list[dict]]:
    """A client folder of three kinds of client, and the 40 rows it holds in all:
    ``a_party/`` (3 files in 3 formats: 5 + 6 + 7 rows), ``b_saved/`` (a datasets folder,
    8 rows) and ``c.jsonl`` (one file, 14 rows)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_rows(40, seed=7)
    root = tmp_path / "clients"
    party = root / "a_party"
    party.mkdir(parents=True)
    # names sort 1, 2, 3: the reading order, whatever order the files were written in
    pq.write_table(pa.Table.from_pylist(rows[11:18]), party / "3_march.parquet")
    with open(party / "2_feb.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[5:11])
    (party / "1_jan.json").write_text(json.dumps(rows[:5]), encoding="utf-8")
    (party / ".DS_Store").write_text("ignored: its name starts with a dot")
    datasets.Dataset.from_list(rows[18:26]).save_to_disk(str(root / "b_saved"))
    write_jsonl(root / "c.jsonl", rows[26:])
    return root, rows


def test_a_party_folder_is_one_client_beside_a_datasets_folder_and_a_file(parties):
    root, rows = parties
    clients, per_client = load_client_folder(root)
    assert [c.path.name for c in clients] == ["a_party", "b_saved", "c.jsonl"]
    assert [c.label for c in clients] == ["a_party", "b_saved", "c"]  # names by default
    assert [s.name for s in clients[0].sources] == ["1_jan.json", "2_feb.csv", "3_march.parquet"]
    assert [len(r) for r in per_client] == [5 + 6 + 7, 8, 14]
    keys = ("instruction", "context", "response", "category")
    assert [[{k: r[k] for k in keys} for r in client] for client in per_client] == [
        rows[:18], rows[18:26], rows[26:]]  # every row back, in file-name order
    assert with_client_count(_cfg(root)).partition.clients == 3


def test_clients_toml_labels_a_party_folder(parties):
    root, _ = parties
    (root / "clients.toml").write_text('[files."a_party"]\nlabel = "hospital A"\n'
                                       '[files."b_saved"]\nlabel = "clinic B"\n')
    clients = read_client_folder(root)
    assert [c.label for c in clients] == ["hospital A", "clinic B", "c"]
    data = split_data(_cfg(root, test_per_label=0))
    assert [len(c) for c in data.client_rows] == [18, 8, 14]
    assert data.client_names == ["hospital A", "clinic B", "c"]


def test_a_party_folder_without_a_data_file_is_named(parties):
    root, _ = parties
    (root / "d_empty").mkdir()
    (root / "d_empty" / "readme.txt").write_text("no rows here")
    with pytest.raises(DataError, match=r"d_empty: a client folder with no data file"):
        read_client_folder(root)
    (root / "d_empty" / "rows.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    with pytest.raises(DataError, match=r"readme\.txt: not a data file of client folder "
                                        r"'d_empty'.*start its name with a dot"):
        read_client_folder(root)


def test_a_bad_row_in_a_party_folder_names_its_file(parties):
    root, _ = parties
    (root / "a_party" / "4_april.jsonl").write_text('{"instruction": "a", "response": "b"}\n'
                                                    '{"instruction": "a"}\n')
    with pytest.raises(DataError, match=r"a_party/4_april\.jsonl:2: field 'response'"):
        load_client_folder(root)
