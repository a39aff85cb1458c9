"""A run's data as both runtimes see it: the held-out rows and each client's rows.

``split_data`` is one function for the in-process runtime, the Flower ServerApp (its
held-out set) and a Flower SuperNode that finds its own partition (``partition-id``):
the same config and seed give the same rows everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedit.config import RunConfig
from fedit.data.load import load_rows
from fedit.data.partition import holdout_split, partition, write_partitions
from fedit.errors import DataError
from fedit.io import atomic_write_jsonl


@dataclass
class FederatedData:
    """The rows of a run: the held-out test set and each client's training rows."""

    test_rows: list[dict[str, Any]]
    client_rows: list[list[dict[str, Any]]]
    train_rows: list[dict[str, Any]]  # every client's rows, in partition order
    parts: list[list[int]]  # each client's indices into train_rows
    label: str | None  # the field the partition was made on (None: iid, no label)


def _labels(rows: list[dict[str, Any]], field: str, needed: bool) -> list[str] | None:
    if not rows or field not in rows[0]:
        if needed:
            raise DataError(f"data: rows have no field '{field}' to split on "
                            "(set data.label_field or partition.by to an existing field)")
        return None
    return [str(r.get(field, "")) for r in rows]


def split_data(cfg: RunConfig) -> FederatedData:
    """Load, subsample, hold out the test set, partition: nothing is written."""
    rows = load_rows(cfg.data.path, cfg.data.fields or None)
    if cfg.data.max_rows and cfg.data.max_rows < len(rows):
        keep = np.random.default_rng(cfg.seed).choice(len(rows), cfg.data.max_rows, replace=False)
        rows = [rows[i] for i in sorted(keep)]
    labels = _labels(rows, cfg.data.label_field, needed=False)
    train_idx, test_idx = holdout_split(labels, len(rows), cfg.data.test_per_label, cfg.seed)
    test_rows, train_rows = [rows[i] for i in test_idx], [rows[i] for i in train_idx]
    p = cfg.partition
    by = p.by or cfg.data.label_field
    part_labels = _labels(train_rows, by, needed=p.method != "iid")
    keys = part_labels if part_labels is not None else [""] * len(train_rows)
    parts = partition(keys, p.method, p.clients, p.alpha, p.min_size, p.shards_per_client,
                      cfg.seed)
    return FederatedData(test_rows, [[train_rows[i] for i in part] for part in parts],
                         train_rows, parts, by if part_labels else None)


def write_split(data: FederatedData, folder: Path) -> None:
    """test.jsonl and partitions/ (stats, plot) of a split, into ``folder``."""
    atomic_write_jsonl(folder / "test.jsonl", data.test_rows)
    write_partitions(folder / "partitions", data.train_rows, data.parts, data.label,
                     write_rows=False)
