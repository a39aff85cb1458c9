"""Held-out split and client partitions of a data set, their statistics and their plot.

Every function here is pure and deterministic for a seed (one ``numpy`` Generator a call),
works on row indices only, and puts every row in exactly one client. Index lists come back
sorted: a client's training order is the trainer's business, not the partition's.

Label values may be any hashable values (strings, ints); they are ordered by sorting (by
their text where they cannot be compared) and named by their text in statistics.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedit.data.dedup import duplicates_stats, prompt_hashes, remove_held_out
from fedit.data.load import load_rows
from fedit.errors import DataError
from fedit.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl

METHODS = ("iid", "shards", "dirichlet", "natural")
MAX_DIRICHLET_TRIES = 1000


def _sorted_values(labels: Sequence[Hashable]) -> list[Any]:
    """Distinct values in sorted order (by text when the values cannot be compared)."""
    distinct = set(labels)
    try:
        return sorted(distinct)  # type: ignore[type-var]
    except TypeError:
        return sorted(distinct, key=str)


def _groups(labels: Sequence[Hashable]) -> list[tuple[Any, np.ndarray]]:
    """(value, ascending row indices) for each distinct value, values sorted."""
    index: dict[Any, list[int]] = {}
    for i, value in enumerate(labels):
        index.setdefault(value, []).append(i)
    return [(v, np.asarray(index[v], dtype=np.int64)) for v in _sorted_values(labels)]


def _check_clients(n: int, num_clients: int, per_client: int = 1) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if n < num_clients * per_client:
        raise ValueError(
            f"cannot give {num_clients} clients {per_client} row(s) or shard(s) each "
            f"from {n} rows; use fewer clients"
        )


def _as_lists(parts: Sequence[np.ndarray]) -> list[list[int]]:
    return [sorted(int(i) for i in p) for p in parts]


def holdout_split(
    labels: Sequence[Hashable] | None, n: int, per_label: int, seed: int
) -> tuple[list[int], list[int]]:
    """Split rows into train and a held-out test set of ``per_label`` rows per label.

    This is FederatedGPT-Shepherd's test set (10 random rows per dolly category). A label
    with at most ``per_label`` rows goes wholly to the test set. With ``labels=None`` the
    data set counts as one label: ``per_label`` random rows in all.

    Parameters
    ----------
    labels : sequence or None
        One label a row (``len(labels) == n``), or None.
    n : int
        Number of rows.
    per_label : int
        Test rows drawn from each label value (0 gives an empty test set).
    seed : int
        Seed of the draw.

    Returns
    -------
    (train, test) : tuple of lists of int
        Sorted, disjoint row indices whose union is ``range(n)``.
    """
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} rows")
    if per_label < 0:
        raise ValueError(f"per_label must be >= 0, got {per_label}")
    rng = np.random.default_rng(seed)
    groups = _groups(labels) if labels is not None else [(None, np.arange(n, dtype=np.int64))]
    test = [rng.permutation(idx)[:per_label] for _, idx in groups]
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(n, dtype=np.int64), test_idx, assume_unique=True)
    if n and train_idx.size == 0:
        raise ValueError(f"holding out {per_label} row(s) a label leaves no training rows")
    return [int(i) for i in train_idx], [int(i) for i in test_idx]


def partition_iid(n: int, num_clients: int, seed: int) -> list[list[int]]:
    """Equal random shards: client sizes differ by at most one row."""
    _check_clients(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return _as_lists(np.array_split(perm, num_clients))


def partition_shards(
    labels: Sequence[Hashable], num_clients: int, shards_per_client: int = 2, seed: int = 0
) -> list[list[int]]:
    """Pathological non-IID (McMahan et al. 2017; Shepherd's default non-IID split).

    Rows are sorted by label (ties in random order), cut into
    ``num_clients * shards_per_client`` contiguous shards, and each client gets
    ``shards_per_client`` of them at random. A shard spans one label, or two where it
    straddles a boundary, so a client sees few labels.
    """
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be at least 1, got {shards_per_client}")
    n = len(labels)
    _check_clients(n, num_clients, shards_per_client)
    rng = np.random.default_rng(seed)
    codes = _codes(labels)
    perm = rng.permutation(n)  # shuffle first, then a stable sort keeps the ties shuffled
    order = perm[np.argsort(codes[perm], kind="stable")]
    shards = np.array_split(order, num_clients * shards_per_client)
    owners = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return _as_lists([np.concatenate([shards[s] for s in row]) for row in owners])


def _codes(labels: Sequence[Hashable]) -> np.ndarray:
    """Integer code of each row's label, codes in sorted-label order."""
    code = {v: i for i, v in enumerate(_sorted_values(labels))}
    return np.fromiter((code[v] for v in labels), dtype=np.int64, count=len(labels))


def partition_dirichlet(
    labels: Sequence[Hashable],
    num_clients: int,
    alpha: float,
    min_size: int = 1,
    seed: int = 0,
    *,
    balance: bool = True,
) -> list[list[int]]:
    """Label skew: each label's rows spread over clients by proportions ~ Dir(alpha).

    The usual recipe (NIID-Bench, FedLab, Shepherd's ``client_data_allocation.py``): for
    each label, draw proportions over clients from a symmetric Dirichlet(alpha) and split
    the label's shuffled rows by them; draw again (from the same generator) until every
    client has at least ``min_size`` rows. Small ``alpha`` gives each client few labels;
    large ``alpha`` approaches IID.

    Parameters
    ----------
    balance : bool
        As in those implementations, a client that already holds ``n / num_clients`` rows
        gets no share of the later labels, which keeps client sizes comparable.

    Raises
    ------
    ValueError
        When ``min_size * num_clients > n``, or no draw in ``MAX_DIRICHLET_TRIES`` gave
        every client ``min_size`` rows (lower ``min_size`` or raise ``alpha``).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    n = len(labels)
    _check_clients(n, num_clients, max(min_size, 0))
    rng = np.random.default_rng(seed)
    groups = [idx for _, idx in _groups(labels)]
    for _ in range(MAX_DIRICHLET_TRIES):
        parts = _dirichlet_draw(groups, n, num_clients, alpha, rng, balance)
        if min(len(p) for p in parts) >= min_size:
            return _as_lists(parts)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_TRIES} gave each of "
        f"{num_clients} clients at least {min_size} rows; lower min_size or raise alpha"
    )


def _dirichlet_draw(
    groups: list[np.ndarray],
    n: int,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    balance: bool,
) -> list[np.ndarray]:
    """One draw: split each label's shuffled rows over the clients."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for idx in groups:
        idx = rng.permutation(idx)
        open_ = sizes < n / num_clients if balance else np.ones(num_clients, dtype=bool)
        p = np.nan_to_num(rng.dirichlet(np.full(num_clients, alpha))) * open_
        # A tiny alpha can underflow every open client's share to zero: spread evenly then.
        p = p / p.sum() if p.sum() > 0 else open_ / open_.sum()
        cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].append(chunk)
            sizes[client] += len(chunk)
    return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]


def partition_natural(values: Sequence[Hashable]) -> tuple[list[list[int]], list[Any]]:
    """One client per distinct value (a user id, a source, a category), values sorted.

    Returns
    -------
    (parts, names) : tuple
        ``parts[i]`` are the rows whose value is ``names[i]``.
    """
    if len(values) == 0:
        raise ValueError("cannot partition zero rows")
    groups = _groups(values)
    return _as_lists([idx for _, idx in groups]), [v for v, _ in groups]


def partition(
    labels_or_values: Sequence[Hashable] | None,
    method: str,
    num_clients: int,
    alpha: float = 0.5,
    min_size: int = 1,
    shards_per_client: int = 2,
    seed: int = 0,
    *,
    n: int | None = None,
) -> list[list[int]]:
    """Split rows over clients with one of :data:`METHODS`.

    ``labels_or_values`` holds one label a row; ``iid`` ignores it (pass None and ``n``
    then) and ``natural`` ignores ``num_clients`` (one client per distinct value, so
    ``len(result)`` is the number of clients).
    """
    if method not in METHODS:
        raise ValueError(f"unknown partition method {method!r}; use one of {', '.join(METHODS)}")
    if method == "iid":
        size = len(labels_or_values) if labels_or_values is not None else n
        if size is None:
            raise ValueError("partition 'iid' needs labels_or_values or n")
        return partition_iid(size, num_clients, seed)
    if labels_or_values is None:
        raise ValueError(f"partition {method!r} needs one label a row (choose a label field)")
    if method == "shards":
        return partition_shards(labels_or_values, num_clients, shards_per_client, seed)
    if method == "dirichlet":
        return partition_dirichlet(labels_or_values, num_clients, alpha, min_size, seed)
    return partition_natural(labels_or_values)[0]


def partition_stats(
    labels: Sequence[Hashable] | None, parts: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Rows and label counts per client (labels named by their text, sorted).

    Returns
    -------
    dict
        ``{"num_clients", "num_rows", "labels": [...], "clients": [{"client": i,
        "rows": n, "labels": {label: count}}]}``; without labels, ``"labels"`` are empty.
    """
    names = [str(v) for v in _sorted_values(labels)] if labels is not None else []
    clients = []
    for i, part in enumerate(parts):
        counts = Counter(str(labels[j]) for j in part) if labels is not None else Counter()
        clients.append(
            {"client": i, "rows": len(part), "labels": {k: counts[k] for k in names if counts[k]}}
        )
    return {
        "num_clients": len(parts),
        "num_rows": sum(len(p) for p in parts),
        "labels": names,
        "clients": clients,
    }


def label_matrix(stats: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """Label names and the (labels x clients) count matrix of ``partition_stats``."""
    names = list(stats["labels"]) or ["(all rows)"]
    counts = np.zeros((len(names), len(stats["clients"])), dtype=np.int64)
    for j, client in enumerate(stats["clients"]):
        if stats["labels"]:
            for i, name in enumerate(names):
                counts[i, j] = client["labels"].get(name, 0)
        else:
            counts[0, j] = client["rows"]
    return names, counts


def plot_partitions(stats: dict[str, Any], path: str | Path) -> Path:
    """Heatmap of rows per (label, client) under a bar chart of rows per client, as PNG.

    Clients run along the x axis so that a hundred of them still fit; counts are written
    in the cells while the grid is small enough to read them.
    """
    names, counts = label_matrix(stats)
    fig = _draw_partitions(names, counts, stats)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


def _draw_partitions(names: list[str], counts: np.ndarray, stats: dict[str, Any]) -> Any:
    """The bar chart and heatmap on one figure, sized to the number of clients and labels."""
    # The object API, never pyplot: no global figure state, no GUI backend, thread-safe.
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    n_labels, n_clients = counts.shape
    width = min(max(6.0, 2.5 + 0.45 * n_clients + 0.08 * max(map(len, names))), 20.0)
    height = 1.2 + 0.35 * n_labels
    fig = Figure(figsize=(width, height + 2.2), layout="constrained")
    ax_bar, ax_map = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.6, height]})
    x = np.arange(n_clients)
    totals = counts.sum(axis=0)
    if n_clients <= 200:
        ax_bar.bar(x, totals, color="#4c72b0", width=0.85)
    else:  # one filled outline, not a rectangle a client (10,000 bars: ~10 s, ~150 MB)
        ax_bar.stairs(totals, np.arange(n_clients + 1) - 0.5, fill=True, color="#4c72b0")
    ax_bar.set_ylabel("rows")
    by = f", by {stats.get('label_field') or 'label'}" if stats["labels"] else ""
    ax_bar.set_title(f"{stats['num_rows']} rows over {n_clients} clients{by}")
    # A square-root colour scale keeps small counts visible beside one very large client.
    norm = PowerNorm(gamma=0.5, vmin=0, vmax=max(1, int(counts.max(initial=0))))
    image = ax_map.imshow(counts, aspect="auto", cmap="YlGnBu", norm=norm, interpolation="nearest")
    ax_map.set_yticks(range(n_labels), names)
    step = max(1, int(np.ceil(n_clients / 25)))  # at most ~25 client ticks stay legible
    ticks = [str(c.get("name", i)) for i, c in enumerate(stats["clients"])]
    ax_map.set_xticks(x[::step], [ticks[i] for i in x[::step]], rotation=90 if n_clients > 8
                      and max(map(len, ticks), default=0) > 4 else 0)
    ax_map.set_xlabel("client")
    fig.colorbar(image, ax=ax_map, label="rows", pad=0.01)
    if n_clients <= 30 and n_labels <= 30:
        for (i, j), value in np.ndenumerate(counts):
            # White text where the cell is dark (the colour scale, not the count, decides).
            color = "white" if norm(value) > 0.55 else "black"
            ax_map.text(j, i, str(value), ha="center", va="center", fontsize=8, color=color)
    return fig


def write_partitions(
    out_dir: str | Path,
    rows: Sequence[dict[str, Any]],
    parts: Sequence[Sequence[int]],
    label_field: str | None,
    write_rows: bool = True,
    names: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``client_NNNN.jsonl`` (0-based), ``stats.json`` and ``clients.png``.

    Every file is written atomically. Client files of an earlier, larger partition in the
    same folder are removed, so the folder never mixes two partitions. ``names`` (one a
    client, e.g. the labels of a client folder) go into the statistics and the plot;
    ``extra`` entries (e.g. ``held_out_duplicates``) go into the statistics.

    Returns
    -------
    dict
        The statistics written to ``stats.json`` (``partition_stats`` plus ``label_field``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [row.get(label_field) for row in rows] if label_field else None
    stats = {"label_field": label_field, **partition_stats(labels, parts), **(extra or {})}
    if names is not None:
        for client, name in zip(stats["clients"], names, strict=True):
            client["name"] = str(name)
    if write_rows:
        for i, part in enumerate(parts):
            atomic_write_jsonl(out / f"client_{i:04d}.jsonl", [rows[j] for j in part])
        keep = {f"client_{i:04d}.jsonl" for i in range(len(parts))}
        for old in out.glob("client_[0-9][0-9][0-9][0-9].jsonl"):
            if old.name not in keep:
                old.unlink()
    atomic_write_json(out / "stats.json", stats)
    plot_partitions(stats, out / "clients.png")
    return stats


def partition_file(
    source: str,
    out_dir: str | Path,
    method: str = "dirichlet",
    num_clients: int = 10,
    label_field: str = "category",
    alpha: float = 0.5,
    min_size: int = 1,
    shards_per_client: int = 2,
    test_per_label: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Split a data set over clients and write them: ``fedit partition``'s work.

    Loads ``source`` (a file, a folder or ``dolly-15k``: :func:`fedit.data.load.load_rows`),
    first holds out ``test_per_label`` rows per ``label_field`` value into ``test.jsonl``
    (per data set when the rows have no such field), then partitions the rest with
    :func:`partition` and writes them with :func:`write_partitions`. A training row that
    asks a held-out row's prompt (:mod:`fedit.data.dedup`) is removed from its client,
    counted under ``held_out_duplicates``.

    Returns
    -------
    dict
        The statistics written to ``stats.json``: ``num_rows`` (the training rows),
        ``num_clients`` and one ``{"rows": n, ...}`` per client.

    Raises
    ------
    DataError
        When a method other than ``iid`` needs ``label_field`` and the rows lack it.
    """
    out = Path(out_dir)
    rows = load_rows(source)
    held: set[str] = set()
    if test_per_label:
        has_labels = bool(rows) and label_field in rows[0]
        labels = [str(r.get(label_field, "")) for r in rows] if has_labels else None
        train_idx, test_idx = holdout_split(labels, len(rows), test_per_label, seed)
        atomic_write_jsonl(out / "test.jsonl", [rows[i] for i in test_idx])
        held = prompt_hashes(rows[i] for i in test_idx)
        rows = [rows[i] for i in train_idx]
    if method != "iid" and rows and label_field not in rows[0]:
        raise DataError(f"{source}: rows have no field '{label_field}' (choose one with --by)")
    keys = [str(r.get(label_field, "")) for r in rows]
    parts = partition(keys, method, num_clients, alpha, min_size, shards_per_client, seed)
    rows, parts, removed = remove_held_out(rows, parts, held)
    names = [f"client_{c:04d}" for c in range(len(parts))]
    return write_partitions(out, rows, parts, label_field if method != "iid" else None,
                            extra={"held_out_duplicates": duplicates_stats(removed, names)})
