"""Load instruction rows from the embedded corpus, a local file or folder, or the hub.

Every source ends as a list of plain dicts with the canonical keys ``instruction``,
``context`` (``""`` when absent or null) and ``response``, plus every other column of the
source unchanged (``category``, say). A conversation row (a ``messages`` column, or
ShareGPT's ``conversations``, or the column ``data.fields.messages`` names) carries
``messages`` instead, as :func:`fedit.data.conversations.canonical_conversation` gives.

A row that fails validation stops the load (``data.invalid_rows = "error"``, the default;
``"skip"`` drops and counts it instead, :mod:`fedit.data.invalid`) with a
one-line :class:`~fedit.errors.DataError` naming where it is and what to do:

- ``data/x.jsonl:17: ...``: a line number (1-based) in a JSON-lines or CSV file (the CSV
  header is line 1);
- ``data/x.json[16]: ...``: an index (0-based) into a JSON list, a parquet file or a
  ``datasets`` table.

Long rows are not errors: truncation happens at tokenisation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from fedit.data.conversations import canonical_conversation
from fedit.data.files import read_csv, read_json_list, read_jsonl, read_parquet
from fedit.data.invalid import (
    EMPTY_FIELD,
    MAPPING_HINT,
    MISSING_FIELD,
    MISSING_LABEL,
    NOT_AN_OBJECT,
    WRONG_TYPE,
    RowCounts,
    RowError,
    json_type,
)
from fedit.data.preferences import (
    PREFERENCE_FIELDS,
    PairColumns,
    canonical_preference,
    is_preference_record,
)
from fedit.errors import DataError
from fedit.hub import hub_reachable

DOLLY = "dolly-15k"
DOLLY_FILE = "databricks-dolly-15k.jsonl.gz"
CANONICAL = ("instruction", "context", "response")
MESSAGES = "messages"  # the canonical conversation field
CONVERSATION_COLUMNS = ("messages", "conversations")  # OpenAI's, ShareGPT's: found unmapped
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")

Records = Iterable[tuple[int, Any]]
Where = Callable[[int], str]


def load_rows(
    source: str, fields: Mapping[str, str] | None = None, *, required_label: str | None = None,
    invalid: RowCounts | None = None,
) -> list[dict[str, Any]]:
    """Load and validate instruction rows.

    Parameters
    ----------
    source : str
        ``"dolly-15k"`` (the corpus shipped in the package), a path to a ``.jsonl``,
        ``.json`` (a list of objects), ``.csv`` or ``.parquet`` file (the text ones may end
        in ``.gz``), a folder written by ``datasets``' ``save_to_disk``, or else a hub id
        loaded with ``datasets.load_dataset``.
    fields : mapping, optional
        Canonical name -> source column, e.g. alpaca's
        ``{"context": "input", "response": "output"}``. Unmapped names read their own column.
    required_label : str, optional
        A column every row must have non-empty (the label a partition or hold-out uses).
    invalid : RowCounts, optional
        The policy for invalid rows (``data.invalid_rows``; default: the first one stops
        the load), and where this file's counts are added (:mod:`fedit.data.invalid`).

    Returns
    -------
    list of dict
        One dict a row: the canonical keys first, then the other columns as they were.

    Raises
    ------
    DataError
        Naming file, line or row, field and what to do; under ``skip``, when more than
        ``max_invalid_fraction`` of the rows are invalid.
    """
    rows = list(iter_rows(source, fields, required_label=required_label, invalid=invalid))
    if not rows:
        raise DataError(f"{source}: no rows (the file is empty); give a file with at least one row")
    return rows


def iter_rows(
    source: str, fields: Mapping[str, str] | None = None, *, required_label: str | None = None,
    invalid: RowCounts | None = None,
) -> Iterator[dict[str, Any]]:
    """The rows :func:`load_rows` returns, validated one at a time as the file is read.

    A file is read as a stream (a JSON list too), so a caller that keeps only what it
    counts (``fedit data inspect``) holds one row at a time, never the file. Yields
    nothing for an empty source: :func:`load_rows` names that.
    """
    mapping = _field_map(fields)
    conversation = (fields or {}).get(MESSAGES)
    pairs = PairColumns.from_fields(fields)
    records, where = _read_source(source)
    counts = (invalid or RowCounts()).fresh()  # this file's; added to ``invalid`` at the end
    for loc, rec in records:  # the one place a row is made: every invalid row passes here
        counts.rows += 1
        try:
            row = _canonical(rec, where, loc, mapping, required_label, conversation,
                             counts.dropped_turns, pairs)
        except RowError as e:
            counts.skip(e)  # raises under data.invalid_rows = "error"
            continue
        yield row
    counts.check_fraction(source)
    if invalid is not None:
        invalid.add(counts)
    if counts.rows and counts.invalid == counts.rows:
        raise DataError(f"{source}: all {counts.rows} rows are invalid (the first: "
                        f"{counts.named[0]}); {MAPPING_HINT}")


def dolly_path() -> Path:
    """Path of the gzipped databricks-dolly-15k shipped inside the package."""
    return Path(str(resources.files("fedit") / "resources" / DOLLY_FILE))


def _field_map(fields: Mapping[str, str] | None) -> dict[str, str]:
    """Canonical name -> source column for all three canonical names."""
    fields = dict(fields or {})
    for name, column in fields.items():
        if name not in (*CANONICAL, MESSAGES, *PREFERENCE_FIELDS):
            raise DataError(f"data.fields.{name}: unknown field; map one of "
                            f"{', '.join((*CANONICAL, MESSAGES, *PREFERENCE_FIELDS))}")
        if not isinstance(column, str) or not column:
            raise DataError(f"data.fields.{name}: the column name must be a non-empty string")
    return {name: fields.get(name, name) for name in CANONICAL}


def _canonical(
    rec: Any, where: Where, loc: int, mapping: dict[str, str], label: str | None,
    conversation: str | None = None, dropped_turns: Counter[str] | None = None,
    pairs: PairColumns | None = None,
) -> dict[str, Any]:
    """One validated row: canonical keys first, then the source's other columns.
    ``dropped_turns`` hears the turns a kept conversation lost (leading, trailing)."""
    if not isinstance(rec, dict):
        got = json_type(rec)
        raise RowError(f"{where(loc)}: expected an object with named fields, got {got}",
                       NOT_AN_OBJECT)
    column = conversation or next((c for c in CONVERSATION_COLUMNS if c in rec), None)
    if pairs is not None and is_preference_record(rec, pairs):  # fedit.data.preferences
        row = canonical_preference(rec, where(loc), pairs)
        consumed, column = set(pairs.columns().values()), None
    elif column is not None:
        if column not in rec:
            have = ", ".join(map(str, rec)) or "none"
            raise RowError(f"{where(loc)}: field {column!r} is missing (data.fields.messages "
                           f"= {column!r} asks for it; columns: {have})", MISSING_FIELD)
        dropped: Counter[str] = Counter()
        row = canonical_conversation(rec[column], where(loc), column, dropped)
        consumed = {column}
    else:
        row = {name: _field(rec, where, loc, name, col) for name, col in mapping.items()}
        consumed = set(mapping.values())
    for key, value in rec.items():
        if key not in consumed and key not in row:
            row[key] = value
    if label is not None:
        value = row.get(label)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise RowError(
                f"{where(loc)}: field {label!r} is missing or empty (every row needs it to "
                "partition or hold out by it; fill it in or choose another label field)",
                MISSING_LABEL)
    if column is not None and dropped_turns is not None:
        dropped_turns.update(dropped)  # counted once the row is kept
    return row


def _field(rec: dict[str, Any], where: Where, loc: int, name: str, column: str) -> str:
    """The string value of one canonical field, checked."""
    value = rec.get(column)
    if name == "context" and value is None and (column in rec or column == name):
        # Context is optional: absent or null means "no context". A column the user mapped
        # by name must exist, though: a typo there would silently drop every context.
        return ""
    if column not in rec:
        hint = (
            f'map another column with data.fields.{name} = "..."'
            if column == name
            else f"data.fields.{name} = {column!r} asks for it; fix the row or map another column"
        )
        have = ", ".join(map(str, rec)) or "none"
        raise RowError(f"{where(loc)}: field {column!r} is missing ({hint}; columns: {have})",
                       MISSING_FIELD)
    if not isinstance(value, str):
        raise RowError(
            f"{where(loc)}: field {column!r} must be a string, got {json_type(value)} "
            f"(fix the row or map another column with data.fields.{name})", WRONG_TYPE)
    if name != "context" and not value.strip():
        raise RowError(
            f"{where(loc)}: field {column!r} is empty (every row needs a non-empty "
            "instruction and response; fix or remove the row)", EMPTY_FIELD)
    return value


def _read_source(source: str) -> tuple[Records, Where]:
    """Records (location, object) of a source and how to name a location in it."""
    if not source.strip():
        raise DataError(f"no data source given; pass a file path, a folder or {DOLLY!r}")
    if source == DOLLY:
        return _read_file(dolly_path(), DOLLY)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, source)
    if path.is_file():
        return _read_file(path, source)
    if _looks_like_path(source):
        raise DataError(f"{source}: file not found; check the path (or use {DOLLY!r})")
    return _read_hub(source)


def _looks_like_path(source: str) -> bool:
    """True for strings that can only be meant as local paths, never as a hub id."""
    if source.startswith(("/", "./", "../", "~", "\\")) or "\\" in source:
        return True
    if source.count("/") > 1 or not source.strip():
        return True
    return _file_type(source) is not None


def _file_type(name: str) -> str | None:
    """The data file type of a name (``.jsonl`` for ``x.jsonl.gz``), or None."""
    lower = name.lower().removesuffix(".gz")
    return next((ext for ext in FILE_TYPES if lower.endswith(ext)), None)


def _read_file(path: Path, name: str) -> tuple[Records, Where]:
    """Dispatch on the file's extension."""
    kind = _file_type(path.name)
    if kind is None or (kind == ".parquet" and path.name.lower().endswith(".gz")):
        raise DataError(
            f"{name}: unknown file type; use .jsonl, .json (a list of objects), .csv or "
            ".parquet (the text ones may be gzipped: .jsonl.gz), or a datasets folder"
        )
    if kind == ".parquet":
        return read_parquet(path, name), lambda i: f"{name}[{i}]"
    if kind == ".json":
        return read_json_list(path, name), lambda i: f"{name}[{i}]"
    reader = read_jsonl if kind == ".jsonl" else read_csv
    return reader(path, name), lambda i: f"{name}:{i}"


def _read_saved_dataset(path: Path, name: str) -> tuple[Records, Where]:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    import datasets

    if not any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        raise DataError(
            f"{name}: a folder, but not one written by datasets' save_to_disk "
            "(no dataset_dict.json or state.json); give a data file or such a folder"
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{name}: cannot load the datasets folder ({e})") from None
    return _dataset_records(ds, name)


def _dataset_records(ds: Any, name: str) -> tuple[Records, Where]:
    """Rows of a Dataset, or of the "train" (or only) split of a DatasetDict."""
    if hasattr(ds, "keys"):  # a DatasetDict
        splits = sorted(ds.keys())
        if "train" in splits:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise DataError(
                f"{name}: several splits ({', '.join(splits)}) and none is 'train'; "
                "save the split you want on its own"
            )
        ds, name = ds[split], f"{name}[{split}]"
    return enumerate(_batch_rows(ds.iter(batch_size=1024))), lambda i: f"{name}[{i}]"


def _batch_rows(batches: Iterable[dict[str, list[Any]]]) -> Iterator[dict[str, Any]]:
    """Row dicts of column batches (``{"a": [1, 2], "b": [3, 4]}``): a table read a
    batch at a time, never whole."""
    for batch in batches:
        for values in zip(*batch.values(), strict=True):
            yield dict(zip(batch, values, strict=True))


def _read_hub(source: str) -> tuple[Records, Where]:
    """Load a hub data set, failing fast (no retries) when the hub cannot be reached."""
    import datasets

    hint = "pass a local file path (.jsonl, .json, .csv, .parquet or a save_to_disk folder)"
    # datasets retries an unreachable hub for ~30 s; a quick probe says the same at once.
    # In offline mode it fails fast by itself and may find a cached copy, so let it try.
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise DataError(
            f"{source}: not a local file or folder, and the Hugging Face hub cannot be reached "
            f"to load it as a data set; {hint} (or set HF_HUB_OFFLINE=1 to use a cached copy)"
        )
    try:
        ds = datasets.load_dataset(source)
    except Exception as e:  # any failure here means "cannot load this id"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{source}: not a local file or folder, and loading it from the Hugging Face "
            f"hub failed ({reason}); {hint}"
        ) from None
    return _dataset_records(ds, source)
