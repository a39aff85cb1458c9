"""Held-out split, client partitions, their statistics, plot and files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedit.data import partition as part_mod
from fedit.data.partition import (
    holdout_split,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_natural,
    partition_shards,
    partition_stats,
    plot_partitions,
    write_partitions,
)
from tests.conftest import make_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _labels(per_label: dict[str, int], seed: int = 0) -> list[str]:
    """Labels with the given counts, in a shuffled order."""
    labels = [k for k, n in per_label.items() for _ in range(n)]
    order = np.random.default_rng(seed).permutation(len(labels))
    return [labels[i] for i in order]


def _assert_each_row_once(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


LABELS = _labels({"a": 40, "b": 30, "c": 20, "d": 10})


# --- every row exactly once ----------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.sampled_from("abcde"), min_size=6, max_size=80),
    num_clients=st.integers(1, 3),
    method=st.sampled_from(["iid", "shards", "dirichlet", "natural"]),
    seed=st.integers(0, 2**31),
)
def test_every_row_in_exactly_one_client(labels, num_clients, method, seed):
    parts = partition(labels, method, num_clients, alpha=0.5, min_size=1, seed=seed)
    _assert_each_row_once(parts, len(labels))
    if method != "natural":
        assert len(parts) == num_clients
    assert all(p == sorted(p) for p in parts)


@pytest.mark.parametrize("method", ["iid", "shards", "dirichlet"])
def test_same_seed_same_partition_other_seed_other_partition(method):
    a = partition(LABELS, method, 5, seed=1)
    b = partition(LABELS, method, 5, seed=1)
    c = partition(LABELS, method, 5, seed=2)
    assert a == b
    assert a != c


# --- iid -----------------------------------------------------------------------------


def test_iid_sizes_differ_by_at_most_one():
    parts = partition_iid(103, 10, seed=0)
    sizes = [len(p) for p in parts]
    assert sorted(sizes) == [10] * 7 + [11] * 3
    _assert_each_row_once(parts, 103)


def test_iid_through_dispatcher_needs_only_n():
    assert partition(None, "iid", 4, seed=3, n=20) == partition_iid(20, 4, seed=3)
    with pytest.raises(ValueError, match="partition 'iid' needs labels_or_values or n"):
        partition(None, "iid", 4)


def test_more_clients_than_rows_is_an_error():
    with pytest.raises(ValueError, match="cannot give 10 clients 1 row"):
        partition_iid(5, 10, seed=0)
    with pytest.raises(ValueError, match="num_clients must be at least 1"):
        partition_iid(5, 0, seed=0)


# --- shards --------------------------------------------------------------------------


def test_shards_of_one_label_each_give_each_client_exactly_two_labels():
    # 4 labels x 10 rows cut into 2 clients x 2 shards = 4 shards of 10: one label a shard
    labels = _labels({"a": 10, "b": 10, "c": 10, "d": 10})
    parts = partition_shards(labels, 2, shards_per_client=2, seed=5)
    per_client = [Counter(labels[i] for i in p) for p in parts]
    assert [sorted(c.values()) for c in per_client] == [[10, 10], [10, 10]]
    assert set(per_client[0]) | set(per_client[1]) == {"a", "b", "c", "d"}


@pytest.mark.parametrize("seed", range(5))
def test_shards_give_few_labels_a_client(seed):
    # Shards (10 rows) are smaller than any label: a shard spans at most 2 labels.
    labels = _labels({"a": 40, "b": 30, "c": 20, "d": 10}, seed)
    parts = partition_shards(labels, 5, shards_per_client=2, seed=seed)
    assert all(len({labels[i] for i in p}) <= 2 * 2 for p in parts)
    assert [len(p) for p in parts] == [20] * 5
    # and far fewer than iid gives (every client sees all 4 labels there)
    assert np.mean([len({labels[i] for i in p}) for p in parts]) < 4


def test_shards_need_enough_rows():
    with pytest.raises(ValueError, match="cannot give 10 clients 2 row"):
        partition_shards(["a"] * 15, 10, shards_per_client=2)


# --- dirichlet -----------------------------------------------------------------------


def _mean_label_entropy(labels: list[str], parts: list[list[int]]) -> float:
    """Mean over clients of the entropy (nats) of a client's label distribution."""
    entropies = []
    for p in parts:
        counts = np.array(list(Counter(labels[i] for i in p).values()), dtype=float)
        q = counts / counts.sum()
        entropies.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_label_skew_grows_as_alpha_shrinks():
    # Prepare: 8 labels, 10 clients; average over seeds so one draw cannot decide
    labels = _labels({f"l{i}": 150 for i in range(8)})
    # Execute
    entropy = {
        alpha: np.mean(
            [
                _mean_label_entropy(labels, partition_dirichlet(labels, 10, alpha, 5, seed))
                for seed in range(5)
            ]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    # Assert: uniform over 8 labels is ln 8 = 2.08 nats
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.95 * np.log(8)
    assert entropy[0.1] < 0.6 * np.log(8)


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_min_size_is_honoured(seed):
    parts = partition_dirichlet(LABELS, 8, alpha=0.3, min_size=8, seed=seed)
    assert min(len(p) for p in parts) >= 8
    _assert_each_row_once(parts, len(LABELS))


def test_dirichlet_without_balance_still_covers_every_row():
    parts = partition_dirichlet(LABELS, 4, alpha=0.5, min_size=1, seed=0, balance=False)
    _assert_each_row_once(parts, len(LABELS))


def test_dirichlet_impossible_or_unreached_min_size(monkeypatch):
    with pytest.raises(ValueError, match="cannot give 11 clients 10 row"):
        partition_dirichlet(LABELS, 11, alpha=1.0, min_size=10)
    # 10 rows, 5 clients, 2 rows each: only an exactly even draw works; alpha=0.01 never is
    monkeypatch.setattr(part_mod, "MAX_DIRICHLET_TRIES", 20)
    with pytest.raises(ValueError, match=r"no Dirichlet\(alpha=0.01\) draw in 20 gave each of 5"):
        partition_dirichlet(["a"] * 10, 5, alpha=0.01, min_size=2, seed=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_dirichlet(LABELS, 2, alpha=0.0)


# --- natural and the dispatcher ------------------------------------------------------


def test_natural_one_client_per_value_sorted():
    values = ["bob", "amy", "bob", "cid", "amy", "bob"]
    parts, names = partition_natural(values)
    assert names == ["amy", "bob", "cid"]
    assert parts == [[1, 4], [0, 2, 5], [3]]
    assert partition(values, "natural", num_clients=99) == parts


def test_natural_with_ints_sorts_numerically():
    parts, names = partition_natural([10, 2, 10, 1])
    assert names == [1, 2, 10]
    assert parts == [[3], [1], [0, 2]]


def test_dispatcher_unknown_method_and_missing_labels():
    with pytest.raises(ValueError, match=r"unknown partition method 'label'; use one of iid, "):
        partition(LABELS, "label", 3)
    with pytest.raises(ValueError, match="partition 'dirichlet' needs one label a row"):
        partition(None, "dirichlet", 3, n=10)


def test_dispatcher_passes_its_arguments():
    assert partition(LABELS, "shards", 5, shards_per_client=4, seed=7) == partition_shards(
        LABELS, 5, 4, 7
    )
    assert partition(LABELS, "dirichlet", 5, alpha=0.2, min_size=3, seed=7) == (
        partition_dirichlet(LABELS, 5, 0.2, 3, 7)
    )


# --- hold-out ------------------------------------------------------------------------


def test_holdout_takes_per_label_rows_of_each_label():
    # Prepare
    labels = _labels({"a": 30, "b": 12, "c": 3})
    # Execute
    train, test = holdout_split(labels, len(labels), per_label=5, seed=0)
    # Assert: 5 of a, 5 of b, all 3 of c (it has fewer than 5)
    assert Counter(labels[i] for i in test) == {"a": 5, "b": 5, "c": 3}
    assert set(train).isdisjoint(test)
    assert sorted(train + test) == list(range(len(labels)))
    assert train == sorted(train) and test == sorted(test)


def test_holdout_is_seeded():
    a = holdout_split(LABELS, len(LABELS), 3, seed=0)
    assert a == holdout_split(LABELS, len(LABELS), 3, seed=0)
    assert a != holdout_split(LABELS, len(LABELS), 3, seed=1)


def test_holdout_without_labels_takes_per_label_rows_in_all():
    train, test = holdout_split(None, 50, per_label=7, seed=0)
    assert len(test) == 7 and len(train) == 43
    assert sorted(train + test) == list(range(50))
    assert holdout_split(None, 50, per_label=0, seed=0) == (list(range(50)), [])


def test_holdout_errors():
    with pytest.raises(ValueError, match="got 3 labels for 4 rows"):
        holdout_split(["a", "b", "c"], 4, 1, seed=0)
    with pytest.raises(ValueError, match="leaves no training rows"):
        holdout_split(["a", "b"], 2, 1, seed=0)


# --- stats, plot, files --------------------------------------------------------------


def test_partition_stats_by_hand():
    labels = ["x", "y", "x", "z", "y"]
    stats = partition_stats(labels, [[0, 2, 4], [1, 3]])
    assert stats == {
        "num_clients": 2,
        "num_rows": 5,
        "labels": ["x", "y", "z"],
        "clients": [
            {"client": 0, "rows": 3, "labels": {"x": 2, "y": 1}},
            {"client": 1, "rows": 2, "labels": {"y": 1, "z": 1}},
        ],
    }
    assert partition_stats(None, [[0], [1, 2]])["clients"][1] == {
        "client": 1,
        "rows": 2,
        "labels": {},
    }


@pytest.mark.parametrize("num_clients", [10, 100, 400])  # 400: one outline, not 400 bars
def test_plot_partitions_writes_a_png(tmp_path, num_clients):
    import matplotlib.image

    labels = _labels({f"category_{i}": 60 * max(1, num_clients // 100) for i in range(8)})
    stats = partition_stats(labels, partition_dirichlet(labels, num_clients, 0.5, 1, seed=0))
    path = plot_partitions(stats, tmp_path / "p.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > height > 200  # clients run along the x axis
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_write_partitions_round_trip(tmp_path):
    # Prepare: a stale client file from an earlier, larger partition
    rows = make_rows(40)
    labels = [r["category"] for r in rows]
    parts = partition_dirichlet(labels, 3, alpha=1.0, min_size=2, seed=0)
    (tmp_path / "client_0007.jsonl").write_text("{}\n")
    # Execute
    stats = write_partitions(tmp_path, rows, parts, "category")
    # Assert
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "client_0000.jsonl",
        "client_0001.jsonl",
        "client_0002.jsonl",
        "clients.png",
        "stats.json",
    ]
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert stats["label_field"] == "category" and stats["num_rows"] == 40
    for client, p in zip(stats["clients"], parts, strict=True):
        lines = (tmp_path / f"client_{client['client']:04d}.jsonl").read_text().splitlines()
        back = [json.loads(line) for line in lines]
        assert back == [rows[i] for i in p]
        assert len(back) == client["rows"]
        assert Counter(r["category"] for r in back) == client["labels"]
    assert (tmp_path / "clients.png").read_bytes()[:8] == PNG_MAGIC


def test_write_partitions_stats_only(tmp_path):
    rows = make_rows(10)
    stats = write_partitions(tmp_path, rows, partition_iid(10, 2, 0), None, write_rows=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clients.png", "stats.json"]
    assert stats["labels"] == [] and [c["rows"] for c in stats["clients"]] == [5, 5]
