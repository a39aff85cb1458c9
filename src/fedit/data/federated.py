"""A run's data as both runtimes see it: the held-out rows and each client's rows.

``split_data`` is one function for the in-process runtime, the Flower ServerApp (its
held-out set) and a Flower SuperNode that finds its own partition (``partition-id``):
the same config and seed give the same rows everywhere.

Two sources: ``data.path`` split over ``partition.clients`` clients by
``partition.method``, or a client folder (``data.clients_dir``, :mod:`fedit.data.clients`):
one client a file. Either way ``data.test_per_client`` rows of each client are held out
for that client alone (``client_test_rows``, never trained on), then ``data.test_per_label``
rows a label of what is left form the global held-out set.

No held-out prompt is trained on (:mod:`fedit.data.dedup`): after the split, a client's
training row that asks the same prompt (normalised) as any held-out row, global or any
client's own, is removed; the held-out side keeps its copy. ``held_out_duplicates`` counts
the rows each client lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedit.config import RunConfig
from fedit.data.clients import load_client_folder
from fedit.data.dedup import duplicates_stats, prompt_hashes, remove_held_out
from fedit.data.invalid import RowCounts, invalid_stats
from fedit.data.load import load_rows
from fedit.data.partition import holdout_split, partition, write_partitions
from fedit.errors import DataError
from fedit.io import atomic_write_jsonl

Rows = list[dict[str, Any]]


@dataclass
class FederatedData:
    """The rows of a run: the held-out test set and each client's training rows."""

    test_rows: Rows
    client_rows: list[Rows]
    train_rows: Rows  # every client's rows, in partition order
    parts: list[list[int]]  # each client's indices into train_rows
    label: str | None  # the field the partition was made on (None: iid, no label)
    # each client's own held-out rows (data.test_per_client of them; [] each when 0)
    client_test_rows: list[Rows] = field(default_factory=list)
    # each client's name: its label in a client folder, else "client_NNNN"
    client_names: list[str] = field(default_factory=list)
    # each client's training rows removed because a held-out row asks the same prompt
    held_out_duplicates: list[int] = field(default_factory=list)
    # invalid rows and dropped turns met loading: per client label, or data.path's
    invalid: dict[str, RowCounts] = field(default_factory=dict)

    def held_out_hashes(self) -> set[str]:
        """Prompt hashes of every held-out row: the global set and each client's own."""
        return prompt_hashes([r for rows in [self.test_rows, *self.client_test_rows]
                              for r in rows])


def _labels(rows: Rows, field_: str, needed: bool) -> list[str] | None:
    if not rows or field_ not in rows[0]:
        if needed:
            raise DataError(f"data: rows have no field '{field_}' to split on "
                            "(set data.label_field or partition.by to an existing field)")
        return None
    return [str(r.get(field_, "")) for r in rows]


def _subsample(n: int, max_rows: int, seed: int) -> list[int]:
    """Indices of a seeded random subset of ``max_rows`` rows (all when 0), in order."""
    if not max_rows or max_rows >= n:
        return list(range(n))
    return [int(i) for i in sorted(np.random.default_rng(seed).choice(n, max_rows, replace=False))]


def _by_owner(owner: list[int], n_clients: int) -> list[list[int]]:
    """Each client's row indices, ascending."""
    groups: list[list[int]] = [[] for _ in range(n_clients)]
    for i, c in enumerate(owner):
        groups[c].append(i)
    return groups


def _hold_out_per_client(owner: list[int], n_clients: int, per_client: int, seed: int
                         ) -> tuple[list[list[int]], list[int]]:
    """``per_client`` random row indices of each client, and the indices left (in order)."""
    rng = np.random.default_rng([seed, 1])  # its own stream: the global draw is unchanged
    held = [sorted(int(i) for i in rng.permutation(np.asarray(mine, dtype=np.int64))[:per_client])
            for mine in _by_owner(owner, n_clients)]
    out = {i for h in held for i in h}
    return held, [i for i in range(len(owner)) if i not in out]


def split_data(cfg: RunConfig, log: Callable[[str], None] | None = None) -> FederatedData:
    """Load, subsample, hold out the test sets, partition: nothing is written.

    ``log`` hears one line about a client folder (partition settings that do not apply),
    and the invalid rows skipped (``data.invalid_rows = "skip"``) and conversation turns
    dropped, per client of a folder (else for ``data.path``), the first few named.
    """
    invalid: dict[str, RowCounts] = {}
    data = (_split_folder(cfg, log, invalid) if cfg.data.clients_dir
            else _split_path(cfg, invalid))
    data.invalid = invalid
    for line in [x for who, counts in invalid.items() for x in counts.log_lines(who)]:
        if log is not None:
            log(line)
    return data


def _split_path(cfg: RunConfig, invalid: dict[str, RowCounts]) -> FederatedData:
    """``data.path`` split over ``partition.clients`` clients."""
    invalid[cfg.data.path] = RowCounts.from_config(cfg.data)
    rows = load_rows(cfg.data.path, cfg.data.fields or None, invalid=invalid[cfg.data.path])
    rows = [rows[i] for i in _subsample(len(rows), cfg.data.max_rows, cfg.seed)]
    if cfg.data.test_per_client:
        # Each client's own held-out rows come from its partition: partition everything first.
        parts, label = _partition(rows, cfg)
        owner = [0] * len(rows)
        for c, part in enumerate(parts):
            for i in part:
                owner[i] = c
        return _from_owners(cfg, rows, owner, len(parts), label,
                            [f"client_{c:04d}" for c in range(len(parts))])
    labels = _labels(rows, cfg.data.label_field, needed=False)
    train_idx, test_idx = holdout_split(labels, len(rows), cfg.data.test_per_label, cfg.seed)
    test_rows, train_rows = [rows[i] for i in test_idx], [rows[i] for i in train_idx]
    parts, label = _partition(train_rows, cfg)
    return _without_held_out(test_rows, train_rows, parts, label, [[] for _ in parts],
                             [f"client_{c:04d}" for c in range(len(parts))])


def _without_held_out(test_rows: Rows, train_rows: Rows, parts: list[list[int]],
                      label: str | None, client_test_rows: list[Rows], names: list[str]
                      ) -> FederatedData:
    """The split, less every training row whose prompt is held out (see the module doc)."""
    data = FederatedData(test_rows, [], train_rows, parts, label, client_test_rows, names)
    train_rows, kept, removed = remove_held_out(train_rows, parts, data.held_out_hashes())
    for c, part in enumerate(kept):
        if removed[c] and not part:
            raise DataError(f"client {names[c]}: all {removed[c]} of its training rows ask a "
                            "prompt of the held-out set, so none is left to train on; lower "
                            "data.test_per_label / data.test_per_client or add rows")
    return FederatedData(test_rows, [[train_rows[i] for i in part] for part in kept],
                         train_rows, kept, label, client_test_rows, names, removed)


def _partition(rows: Rows, cfg: RunConfig) -> tuple[list[list[int]], str | None]:
    """``partition.method`` over ``rows``: the parts and the field they were made on."""
    p = cfg.partition
    by = p.by or cfg.data.label_field
    part_labels = _labels(rows, by, needed=p.method != "iid")
    keys = part_labels if part_labels is not None else [""] * len(rows)
    parts = partition(keys, p.method, p.clients, p.alpha, p.min_size, p.shards_per_client,
                      cfg.seed)
    return parts, by if part_labels else None


def _split_folder(cfg: RunConfig, log: Callable[[str], None] | None,
                  invalid: dict[str, RowCounts]) -> FederatedData:
    """One client a file of ``data.clients_dir``."""
    d = cfg.data
    clients, per_client = load_client_folder(d.clients_dir, d.fields or None,
                                             RowCounts.from_config(d))
    invalid.update({c.label: c.counts for c in clients})
    if log is not None:
        log(f"clients: {len(clients)} files in {d.clients_dir}, one client each "
            "(partition.method and partition.clients do not apply; data.path is not read)")
    rows = [r for rows in per_client for r in rows]
    owner = [c for c, rows in enumerate(per_client) for _ in rows]
    keep = _subsample(len(rows), d.max_rows, cfg.seed)
    rows, owner = [rows[i] for i in keep], [owner[i] for i in keep]
    label = d.label_field if rows and all(d.label_field in r for r in rows) else None
    data = _from_owners(cfg, rows, owner, len(clients), label, [c.label for c in clients])
    for c, part in enumerate(data.parts):
        if not part:
            raise DataError(f"{clients[c].path}: no training rows left after the held-out "
                            f"rows (data.test_per_client = {d.test_per_client}, data."
                            f"test_per_label = {d.test_per_label}); lower them or add rows")
    return data


def _from_owners(cfg: RunConfig, rows: Rows, owner: list[int], n_clients: int,
                 label: str | None, names: list[str]) -> FederatedData:
    """Per-client held-out rows, then the global held-out set, from rows tagged by client."""
    d = cfg.data
    held, rest = _hold_out_per_client(owner, n_clients, d.test_per_client, cfg.seed)
    pool = [rows[i] for i in rest]
    labels = _labels(pool, d.label_field, needed=False)
    train_idx, test_idx = holdout_split(labels, len(pool), d.test_per_label, cfg.seed)
    train_rows = [pool[i] for i in train_idx]
    train_owner = [owner[rest[i]] for i in train_idx]
    parts = _by_owner(train_owner, n_clients)
    return _without_held_out([pool[i] for i in test_idx], train_rows, parts, label,
                             [[rows[i] for i in h] for h in held], names)


def write_split(data: FederatedData, folder: Path) -> None:
    """test.jsonl, partitions/ (stats, plot) and, when there are any, each client's own
    held-out rows (client_test/client_NNNN.jsonl) of a split, into ``folder``."""
    atomic_write_jsonl(folder / "test.jsonl", data.test_rows)
    names = data.client_names or [f"client_{c:04d}" for c in range(len(data.parts))]
    removed = data.held_out_duplicates or [0] * len(data.parts)
    write_partitions(folder / "partitions", data.train_rows, data.parts, data.label,
                     write_rows=False, names=data.client_names or None,
                     extra={"held_out_duplicates": duplicates_stats(removed, names),
                            **({"invalid": invalid_stats(data.invalid)} if data.invalid
                               else {})})
    if any(data.client_test_rows):
        for c, rows in enumerate(data.client_test_rows):
            atomic_write_jsonl(folder / "client_test" / f"client_{c:04d}.jsonl", rows)
