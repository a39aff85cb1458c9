"""Round checkpoints: state blobs, the manifest that commits a round, and finding where to
resume.

A run folder holds::

    rounds/NNNN/adapter/          the round's global adapter as a PEFT folder (for users)
    rounds/NNNN/manifest.json     written LAST: the round is committed once this exists
    checkpoint/blobs/<sha256>.safetensors
                                  global arrays, strategy state, client states: named by
                                  the SHA-256 of their bytes, shared across rounds
    metrics.jsonl                 one line per committed round

The manifest names every file of the round with its SHA-256 and holds the round's metrics
line. ``latest_manifest`` walks the manifests newest first and returns the first whose
files all match their checksums (a truncated or corrupt one is skipped with a warning);
``discard_after`` removes what a killed run wrote after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedit.algorithms.contract import Arrays, ClientState, ServerState
from fedit.errors import FeditError
from fedit.io import (
    atomic_write_bytes,
    atomic_write_jsonl,
    canonical_safetensors,
    file_sha256,
)

MANIFEST = "manifest.json"
BLOBS = Path("checkpoint") / "blobs"
FORMAT = 1  # manifest format version
ON_NODE = "node:"  # a client state kept on its Flower node: "node:<round>", no file here

Log = Callable[[str], None]
State = TypeVar("State", ServerState, ClientState)


class CheckpointError(FeditError):
    """A checkpoint that cannot be used; the message says which file and why."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- blobs: named arrays + scalars as one safetensors file ---------------------------------
def encode_state(arrays: dict[str, Arrays], scalars: dict[str, Any]) -> bytes:
    """Named lists of arrays and JSON scalars as safetensors bytes (deterministic)."""
    from safetensors.numpy import save

    tensors = {f"{name}/{i}": np.ascontiguousarray(a)
               for name, items in arrays.items() for i, a in enumerate(items)}
    counts = {name: len(items) for name, items in arrays.items()}
    meta = {"fedit.scalars": json.dumps(scalars, sort_keys=True),
            "fedit.counts": json.dumps(counts, sort_keys=True)}
    return canonical_safetensors(bytes(save(tensors, metadata=meta)))


def decode_state(data: bytes) -> tuple[dict[str, Arrays], dict[str, Any]]:
    """The inverse of :func:`encode_state`."""
    from safetensors.numpy import load

    tensors = load(data)
    # safetensors' numpy API returns no metadata: read it from the header (8-byte length)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    counts = json.loads(meta.get("fedit.counts", "{}"))
    arrays = {name: [tensors[f"{name}/{i}"] for i in range(n)] for name, n in counts.items()}
    return arrays, json.loads(meta.get("fedit.scalars", "{}"))


@dataclass
class Blob:
    """A file of the run folder and its checksum, as a manifest names it."""

    path: str  # relative to the run folder
    sha256: str

    def read(self, run_dir: Path) -> bytes:
        data = (run_dir / self.path).read_bytes()
        if sha256(data) != self.sha256:
            raise CheckpointError(f"{run_dir / self.path}: checksum mismatch")
        return data


def write_blob(run_dir: Path, data: bytes) -> Blob:
    """Store ``data`` under its checksum (once: an identical blob is reused)."""
    digest = sha256(data)
    rel = BLOBS / f"{digest}.safetensors"
    if not (run_dir / rel).is_file() or file_sha256(run_dir / rel) != digest:
        atomic_write_bytes(run_dir / rel, data)
    return Blob(str(rel), digest)


def write_state(run_dir: Path, state: ServerState | ClientState) -> Blob:
    """A strategy's or a client's state as a blob."""
    return write_blob(run_dir, encode_state(state.arrays, state.scalars))


def read_state(run_dir: Path, blob: Blob, kind: type[State]) -> State:
    """The state in ``blob`` (checksum checked), as ``kind`` (ServerState or ClientState)."""
    arrays, scalars = decode_state(blob.read(run_dir))
    return kind(arrays, scalars)


# -- manifests -------------------------------------------------------------------------------
@dataclass
class Manifest:
    """What commits round ``round``: every file it needs, with checksums, and its line."""

    round: int
    global_arrays: Blob
    strategy_state: Blob
    client_states: dict[int, Blob] = field(default_factory=dict)
    adapter: Blob | None = None  # the PEFT folder's weights (for users; resume reads global)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def b(x: Blob | None) -> dict[str, str] | None:
            return None if x is None else {"path": x.path, "sha256": x.sha256}

        return {
            "format": FORMAT,
            "round": self.round,
            "global_arrays": b(self.global_arrays),
            "strategy_state": b(self.strategy_state),
            "client_states": {str(c): b(x) for c, x in sorted(self.client_states.items())},
            "adapter": b(self.adapter),
            "metrics": self.metrics,
            "metrics_sha256": sha256(metrics_bytes(self.metrics)),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        def b(x: dict[str, str] | None) -> Blob | None:
            return None if x is None else Blob(x["path"], x["sha256"])

        if d.get("format") != FORMAT:
            raise CheckpointError(f"unknown manifest format {d.get('format')!r}")
        m = cls(int(d["round"]), b(d["global_arrays"]), b(d["strategy_state"]),  # type: ignore[arg-type]
                {int(c): b(x) for c, x in d["client_states"].items()},  # type: ignore[misc]
                b(d.get("adapter")), d["metrics"])
        if sha256(metrics_bytes(m.metrics)) != d.get("metrics_sha256"):
            raise CheckpointError("the metrics line does not match its checksum")
        return m

    def blobs(self) -> Iterable[Blob]:
        """The files of the run folder this round needs (not a state kept on a node)."""
        yield self.global_arrays
        yield self.strategy_state
        yield from (b for b in self.client_states.values() if not b.path.startswith(ON_NODE))
        if self.adapter is not None:
            yield self.adapter


def metrics_bytes(line: dict[str, Any]) -> bytes:
    """A metrics line as metrics.jsonl holds it (one JSON line)."""
    return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")


def round_dir(run_dir: Path, rnd: int) -> Path:
    return run_dir / "rounds" / f"{rnd:04d}"


PAUSE_ENV = "FEDIT_PAUSE"  # tests: "POINT:ROUND" makes the process wait for a signal there
FAULT_ENV = "FEDIT_FAULT"  # tests: "POINT:ROUND" makes the process SIGKILL itself there


def fault_point(point: str, rnd: int) -> None:
    """Where the kill-and-resume tests stop a real run: when ``$FEDIT_FAULT`` is
    ``POINT:ROUND`` the process kills itself (SIGKILL: no cleanup, no flush), as a crash or
    an out-of-memory kill would. Points: ``mid-client``, ``before-metrics``,
    ``before-manifest``, ``after-manifest``. Unset (always, outside tests): nothing.

    ``$FEDIT_PAUSE`` = ``POINT:ROUND`` makes the process wait there for a signal instead,
    so that a test's Ctrl-C lands at a known point however fast the rounds are."""
    import signal

    if os.environ.get(FAULT_ENV) == f"{point}:{rnd}":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == f"{point}:{rnd}":
        signal.pause()


def write_manifest(run_dir: Path, manifest: Manifest) -> Path:
    """Commit the round: the manifest is written last (temp file, fsync, rename)."""
    path = round_dir(run_dir, manifest.round) / MANIFEST
    atomic_write_bytes(path, (json.dumps(manifest.to_json(), indent=1) + "\n").encode())
    _fsync_dir(path.parent)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(run_dir: Path, rnd: int) -> Manifest:
    """Round ``rnd``'s manifest, every file it names checked; CheckpointError if not usable."""
    path = round_dir(run_dir, rnd) / MANIFEST
    try:
        manifest = Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    for blob in manifest.blobs():
        file = run_dir / blob.path
        if not file.is_file():
            raise CheckpointError(f"{path}: {file} is missing")
        if file_sha256(file) != blob.sha256:
            raise CheckpointError(f"{path}: {file} does not match its checksum")
    return manifest


def committed_rounds(run_dir: Path) -> list[int]:
    """Rounds with a manifest file, newest first (not yet checked)."""
    rounds = run_dir / "rounds"
    if not rounds.is_dir():
        return []
    found = [int(p.parent.name) for p in rounds.glob(f"*/{MANIFEST}") if p.parent.name.isdigit()]
    return sorted(found, reverse=True)


def latest_manifest(run_dir: Path, log: Log = print) -> Manifest | None:
    """The newest round whose checkpoint is whole; a corrupt newer one is skipped, with a
    warning. None when no round was ever committed."""
    for rnd in committed_rounds(run_dir):
        try:
            return read_manifest(run_dir, rnd)
        except CheckpointError as e:
            log(f"warning: round {rnd}'s checkpoint is not usable ({e}); trying the one before")
    return None


def discard_after(run_dir: Path, manifest: Manifest | None) -> None:
    """Remove what was written after ``manifest`` (None: after nothing): newer round
    folders, metrics lines of later rounds, unreferenced blobs, the summary, the final
    adapter; metrics.jsonl ends with the manifest's own line."""
    last = -1 if manifest is None else manifest.round
    for rnd in _round_folders(run_dir):  # with or without a manifest
        if rnd > last:
            shutil.rmtree(round_dir(run_dir, rnd))
    (run_dir / "summary.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    metrics = run_dir / "metrics.jsonl"
    kept: list[dict[str, Any]] = []
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if int(row.get("round", -1)) < last and all(r["round"] != row["round"] for r in kept):
                kept.append(row)
    if manifest is not None:
        kept.append(manifest.metrics)
    atomic_write_jsonl(metrics, kept)
    prune_blobs(run_dir)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of metrics.jsonl (round 0 first)."""
    text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _round_folders(run_dir: Path) -> list[int]:
    rounds = run_dir / "rounds"
    return [int(p.name) for p in rounds.iterdir() if p.name.isdigit()] if rounds.is_dir() else []


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` committed rounds (0: all); when rounds went, the blobs
    only they named go too (reading the ``keep_last`` manifests left, not every round's)."""
    if keep_last <= 0:
        return
    old = committed_rounds(run_dir)[keep_last:]
    for rnd in old:
        shutil.rmtree(round_dir(run_dir, rnd), ignore_errors=True)
    if old:
        prune_blobs(run_dir)


def prune_blobs(run_dir: Path) -> None:
    """Delete blobs no manifest names (a killed round's, or of pruned rounds)."""
    folder = run_dir / BLOBS
    if not folder.is_dir():
        return
    referenced: set[str] = set()
    for rnd in committed_rounds(run_dir):
        path = round_dir(run_dir, rnd) / MANIFEST
        try:  # the files are not checked here: a blob named by any manifest is kept
            manifest = Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, CheckpointError):
            continue
        referenced |= {Path(b.path).name for b in manifest.blobs()}
    for file in folder.iterdir():
        if file.name not in referenced:
            file.unlink(missing_ok=True)
