"""Data files read as streams: one row at a time, whatever the file's size.

Each reader yields ``(location, object)``: a 1-based line for JSON lines and CSV, a
0-based index for a JSON list and parquet. A JSON list is parsed by ``ijson`` (memory holds
one row, never the file's text). A file cut short inside a row (a failed copy) stops with
its name, the row reached and :data:`TRUNCATED`. Turning objects into rows is
:mod:`fedit.data.load`'s work.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from io import BufferedIOBase
from pathlib import Path
from typing import IO, Any

import ijson

from fedit.errors import DataError

TRUNCATED = ("the file ends inside a row (truncated?); copy the whole file again or cut it "
             "after its last complete row")
REPARSE_BELOW = 64 << 20  # bytes: a JSON list ijson refuses is parsed again whole below this
_JSON_START = {b"{": "object", b'"': "string", b"t": "boolean", b"f": "boolean", b"n": "null"}


def open_text(path: Path) -> IO[str]:
    """A text file, gunzipped when its name ends in .gz."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")  # utf-8-sig: a BOM some editors add is dropped


def read_jsonl(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """(line, object) of each non-blank line; a last line cut short is named truncated."""
    # Bytes, decoded a line at a time, so that a bad byte is reported on its own line.
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines (a trailing one, say) carry no row
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    if _cut_short(e) and not any(rest.strip() for rest in f):
                        raise DataError(f"{name}:{lineno}: {TRUNCATED}") from None
                    raise
                yield lineno, row
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                "each line must hold one JSON object"
            ) from None
        except UnicodeDecodeError as e:
            where = f"{name}:{lineno}"
            raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except EOFError:  # a gzip stream cut short
            raise DataError(f"{name}:{lineno + 1}: {TRUNCATED}") from None
        except OSError as e:
            raise DataError(f"{name}:{lineno + 1}: cannot read the file ({e})") from None


def _cut_short(e: json.JSONDecodeError) -> bool:
    """True when a line's JSON is a valid start that stops early: what a file cut in the
    middle of its last row leaves (an open string, or the end reached while a value or a
    closing brace was still due)."""
    return e.msg.startswith("Unterminated string") or e.pos >= len(e.doc.rstrip())


def read_json_list(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """The objects of a JSON list, parsed one at a time (``ijson``): memory holds one row,
    never the file's text, however large the file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    i, reason = 0, ""
    try:
        with opener(path, "rb") as f:
            first = _first_json_byte(f)
            if first == b"":
                return  # an empty file: load_rows names it
            if first != b"[":
                got = _JSON_START.get(first, "number" if first in b"-0123456789" else "text")
                raise DataError(f"{name}: expected a JSON list of objects, got {got} "
                                "(for one object per line name the file .jsonl)")
            for row in ijson.items(f, "item", use_float=True):
                yield i, row
                i += 1  # the row being read when an error comes
            return
    except ijson.JSONError as e:
        text = e.args[0] if e.args else type(e).__name__
        reason = (text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text))
        reason = reason.splitlines()[0]
        if "premature EOF" in reason or "Incomplete" in reason:
            raise DataError(f"{name}[{i}]: {TRUNCATED}") from None
    except EOFError:  # a gzip stream cut short
        raise DataError(f"{name}[{i}]: {TRUNCATED}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"{name}: cannot read the file ({e})") from None
    yield from _json_list_again(path, name, i, reason)


def _first_json_byte(f: BufferedIOBase) -> bytes:
    """The first byte of the JSON text (b"" for an empty file); ``f`` is left at the
    text's start, past a UTF-8 byte-order mark some editors add."""
    start = 3 if f.read(3) == b"\xef\xbb\xbf" else 0
    f.seek(start)
    skipped = start
    while chunk := f.read(1 << 16):
        text = chunk.lstrip()
        if text:
            f.seek(skipped)  # ijson skips the leading white space itself
            return text[:1]
        skipped += len(chunk)
    return b""


def _json_list_again(path: Path, name: str, i: int, reason: str) -> Iterator[tuple[int, Any]]:
    """Rows ``i`` on of a JSON list ``ijson`` refused, parsed whole by ``json`` when the
    file is small enough: it reads what ijson does not (NaN, integers past 64 bits), and
    names the line and column of an error; a larger file's error names the row."""
    if path.stat().st_size >= REPARSE_BELOW:
        raise DataError(f"{name}[{i}]: invalid JSON ({reason}); fix row {i} of the list")
    try:
        with open_text(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"{name}: cannot read the file ({e})") from None
    yield from enumerate(data[i:], start=i)


def read_csv(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    with open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            while True:
                start = reader.line_num + 1  # a quoted cell may span lines: name the first
                cells = next(reader, None)
                if cells is None:
                    return
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise DataError(
                        f"{name}:{start}: row has {len(cells)} cells, the header has "
                        f"{len(header)} (quote cells that hold commas or newlines)"
                    )
                yield start, dict(zip(header, cells, strict=True))
        except csv.Error as e:
            raise DataError(f"{name}:{reader.line_num}: invalid CSV ({e})") from None
        except (UnicodeDecodeError, OSError, EOFError) as e:
            raise DataError(f"{name}: cannot read the file ({e})") from None


def read_parquet(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """A parquet file's rows, a record batch at a time (never the whole table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        rows = (row for batch in batches for row in batch.to_pylist())
        yield from enumerate(rows)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable parquet file ({e})") from None
