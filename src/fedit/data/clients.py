"""A client folder (``data.clients_dir``): one data file or folder per client, as real
parties hold data.

Every entry of the folder whose name does not start with a dot, except ``clients.toml``,
is one client, in sorted name order (client 0 is the first name): a data file, a
``datasets`` folder (``save_to_disk``'s, known by its metadata files), or a *party folder*
of any number of such files, read in sorted name order. Each file is read by
:func:`fedit.data.load.load_rows`, so it may be any format that reads: ``.jsonl``,
``.json``, ``.csv``, ``.parquet`` (the text ones gzipped too). The optional
``clients.toml`` names a client's label and its own field mapping (a party folder's for
all its files); clients it does not name use ``data.fields`` and are labelled by their
name (a file's without the extension)::

    [files."hospital_a.jsonl"]
    label = "A"
    fields = {instruction = "q", response = "a"}
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.config import RunConfig
from fedit.data.invalid import RowCounts
from fedit.data.load import FILE_TYPES, load_rows
from fedit.data.partition import write_partitions
from fedit.errors import DataError

SPEC_FILE = "clients.toml"
SPEC_KEYS = ("label", "fields")
DATASETS_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")  # save_to_disk's


@dataclass
class ClientFile:
    """One client of a folder: its entry (a file, a ``datasets`` folder or a party
    folder), its label, its field mapping and the data sources it reads, in order."""

    path: Path
    label: str
    fields: dict[str, str] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)  # [path] unless a party folder
    counts: RowCounts = field(default_factory=RowCounts)  # invalid rows, dropped turns


def client_files(folder: str | Path) -> list[Path]:
    """The clients' entries of ``folder`` (files and folders), sorted by name.

    Raises
    ------
    DataError
        When the folder does not exist or holds no data file.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data.clients_dir = {str(folder)!r}: folder not found; give a folder "
                        "holding one data file (or folder of files) per client")
    files = sorted(p for p in root.iterdir()
                   if not p.name.startswith(".") and p.name != SPEC_FILE)
    if not files:
        raise DataError(f"data.clients_dir = {str(folder)!r}: the folder holds no data file; "
                        "put one file (or folder of files) per client in it (.jsonl, .json, "
                        ".csv, .parquet)")
    return files


def count_clients(folder: str | Path, otherwise: int) -> int:
    """The number of clients in ``folder``; ``otherwise`` when there is no such folder.

    A config is also read where its data is not (``fedit eval`` or ``export`` of a run whose
    resolved config.toml holds the count): loading the rows names a missing folder."""
    return len(client_files(folder)) if Path(folder).expanduser().is_dir() else otherwise


def with_client_count(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``partition.clients`` set from its client folder (``data.clients_dir``,
    one client an entry), checked again (``lora.client_ranks``: one rank per client); the
    same ``cfg`` when it names no folder. Called where a run is set up, not when a config
    is built (building one reads no disk)."""
    if not cfg.data.clients_dir:
        return cfg
    n = count_clients(cfg.data.clients_dir, cfg.partition.clients)
    cfg = dataclasses.replace(cfg, partition=dataclasses.replace(cfg.partition, clients=n))
    cfg.check_client_ranks()
    return cfg


def party_sources(entry: Path) -> list[Path]:
    """The data sources of one client entry: itself (a file, a ``datasets`` folder), or
    the data files (and ``datasets`` folders) of a party folder in sorted name order.

    Raises
    ------
    DataError
        Naming a party folder with no data file, or an entry in it that is none.
    """
    if not entry.is_dir() or _saved_dataset(entry):
        return [entry]
    inside = sorted(p for p in entry.iterdir() if not p.name.startswith("."))
    data = [p for p in inside if (_saved_dataset(p) if p.is_dir() else _data_file(p))]
    if not data:
        raise DataError(f"{entry}: a client folder with no data file; put the party's files in "
                        "it (.jsonl, .json, .csv, .parquet, gzipped too) or remove it")
    other = [p for p in inside if p not in data]
    if other:
        raise DataError(f"{other[0]}: not a data file of client folder {entry.name!r}; use "
                        ".jsonl, .json, .csv, .parquet (gzipped too) or a datasets folder, or "
                        "start its name with a dot to leave it out")
    return data


def _saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (one client, never a party's)."""
    return any((path / f).is_file() for f in DATASETS_METADATA)


def _data_file(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return path.is_file() and name.endswith(FILE_TYPES)


def _default_label(path: Path) -> str:
    """``hospital_a.jsonl.gz`` -> ``hospital_a``; a folder's name as it is."""
    if path.is_dir():
        return path.name
    name = path.name.removesuffix(".gz").removesuffix(".GZ")
    ext = next((e for e in FILE_TYPES if name.lower().endswith(e)), "")
    return name[: len(name) - len(ext)] if ext else name


def _read_spec(root: Path) -> dict[str, Any]:
    """The ``[files."name"]`` tables of ``clients.toml`` ({} when there is none)."""
    spec_path = root / SPEC_FILE
    if not spec_path.is_file():
        return {}
    try:
        spec = tomllib.loads(spec_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{spec_path}: not valid TOML ({e})") from None
    unknown = sorted(set(spec) - {"files"})
    if unknown:
        raise DataError(f"{spec_path}: unknown key {unknown[0]!r}; per-file settings go in "
                        '[files."NAME"] tables')
    files = spec.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise DataError(f'{spec_path}: "files" must hold one table per file: [files."NAME"]')
    return files


def _client(path: Path, entry: Mapping[str, Any], default_fields: Mapping[str, str],
            spec_path: Path) -> ClientFile:
    """A checked :class:`ClientFile` from its ``clients.toml`` table (possibly empty)."""
    where = f'{spec_path}: [files."{path.name}"]'
    bad = sorted(set(entry) - set(SPEC_KEYS))
    if bad:
        raise DataError(f"{where}: unknown key {bad[0]!r}; use {' or '.join(SPEC_KEYS)}")
    label = entry.get("label", _default_label(path))
    if not isinstance(label, str) or not label.strip():
        raise DataError(f"{where}: label must be a non-empty string")
    fields = entry.get("fields", default_fields)
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise DataError(f'{where}: fields must be a table of strings, e.g. {{instruction = "q"}}')
    return ClientFile(path, label, dict(fields), party_sources(path))


def read_client_folder(folder: str | Path,
                       default_fields: Mapping[str, str] | None = None) -> list[ClientFile]:
    """The clients of a folder with their labels and field mappings (nothing read yet).

    Raises
    ------
    DataError
        For a missing or empty folder, a bad ``clients.toml``, a table naming a file that
        is not there, or two clients with one label.
    """
    files = client_files(folder)
    root = Path(folder).expanduser()
    spec = _read_spec(root)
    names = {p.name for p in files}
    missing = sorted(set(spec) - names)
    if missing:
        raise DataError(f'{root / SPEC_FILE}: [files."{missing[0]}"] names no file in {folder} '
                        f"(files: {', '.join(sorted(names))})")
    clients = [_client(p, spec.get(p.name, {}), default_fields or {}, root / SPEC_FILE)
               for p in files]
    seen: dict[str, str] = {}
    for c in clients:
        if c.label in seen:
            raise DataError(f"{root / SPEC_FILE}: {c.path.name} and {seen[c.label]} share the "
                            f"label {c.label!r}; give each client its own label")
        seen[c.label] = c.path.name
    return clients


def load_client_folder(folder: str | Path, default_fields: Mapping[str, str] | None = None,
                       invalid: RowCounts | None = None,
                       ) -> tuple[list[ClientFile], list[list[dict[str, Any]]]]:
    """Every client's rows, in sorted file-name order; ``invalid`` gives the policy for
    invalid rows (``data.invalid_rows``), and each client's ``counts`` what it met.

    Returns
    -------
    (clients, rows) : tuple
        ``rows[i]`` are the validated rows of ``clients[i].path`` (a party folder's files
        one after another, in name order).

    Raises
    ------
    DataError
        Naming the file (and line) that cannot be read.
    """
    clients = read_client_folder(folder, default_fields)
    for c in clients:
        c.counts = (invalid or RowCounts()).fresh()
    return clients, [_load(c) for c in clients]


def _load(client: ClientFile) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for source in client.sources or [client.path]:
        try:
            rows += load_rows(str(source), client.fields or None, invalid=client.counts)
        except OSError as e:  # no permission, a broken link: load_rows names format errors
            raise DataError(f"{source}: cannot read the file ({e.strerror or e})") from None
    return rows


def write_folder_partitions(folder: str | Path, out: str | Path,
                            label_field: str | None = "category") -> dict[str, Any]:
    """``stats.json`` and ``clients.png`` of a client folder (one client an entry), in ``out``.

    The heatmap counts ``label_field`` values when every row has one, else rows only;
    clients are named by their labels. Returns the statistics written.
    """
    clients, per_client = load_client_folder(folder)
    rows = [r for rows in per_client for r in rows]
    starts = [sum(len(r) for r in per_client[:c]) for c in range(len(per_client))]
    parts = [list(range(s, s + len(r))) for s, r in zip(starts, per_client, strict=True)]
    label = label_field if label_field and all(label_field in r for r in rows) else None
    return write_partitions(out, rows, parts, label, write_rows=False,
                            names=[c.label for c in clients])
