"""Aggregation math and client sampling shared by the strategies (plain functions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedit.algorithms.contract import Combined, Reply


def check_clients(arrays_per_client: Sequence[Sequence[np.ndarray]],
                  weights: Sequence[float]) -> None:
    """ValueError unless there are clients, one weight each, and every client sent arrays
    of the first client's count and shapes."""
    if not arrays_per_client:
        raise ValueError("nothing to aggregate: no client replies")
    if len(weights) != len(arrays_per_client):
        raise ValueError(f"{len(weights)} weights for {len(arrays_per_client)} clients")
    first = arrays_per_client[0]
    for k, arrays in enumerate(arrays_per_client):
        if len(arrays) != len(first):
            raise ValueError(f"client {k} sent {len(arrays)} arrays, expected {len(first)}")
        for i, (a, b) in enumerate(zip(arrays, first, strict=True)):
            if a.shape != b.shape:
                raise ValueError(f"client {k} array {i} has shape {a.shape}, expected {b.shape}")


def aggregate_weighted(
    arrays_per_client: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
) -> list[np.ndarray]:
    """Weighted mean, layer by layer: ``sum_k w_k * x_k / sum_k w_k`` (in float64).

    Raises ValueError when clients disagree on the number or shapes of the arrays, or
    when the weights do not sum to a positive number.
    """
    check_clients(arrays_per_client, weights)
    first = arrays_per_client[0]
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    return [
        sum(wk * np.asarray(arrays[i], dtype=np.float64)
            for wk, arrays in zip(w, arrays_per_client, strict=True)).astype(first[i].dtype)
        for i in range(len(first))
    ]


def num_sampled(num_clients: int, fraction: float, min_clients: int = 1) -> int:
    """Clients per round: ``int(fraction * num_clients)``, at least ``min_clients``, at most
    all of them (Shepherd: ``max(int(frac * n), 1)``)."""
    return min(num_clients, max(min_clients, int(fraction * num_clients + 1e-9)))


def sample_clients(
    clients: Sequence[int], server_round: int, fraction: float, min_clients: int, seed: int
) -> list[int]:
    """Seeded per round: the same (seed, round) always picks the same clients, sorted."""
    k = num_sampled(len(clients), fraction, min_clients)
    rng = np.random.default_rng([seed, server_round])
    picked = rng.choice(len(clients), size=k, replace=False)
    return sorted(int(clients[i]) for i in picked)


def combine_weighted(replies: Sequence[Reply]) -> Combined:
    """The example-weighted mean of the replies' adapters and of each extra array."""
    if not replies:
        raise ValueError("nothing to combine: no client replies")
    weights = [r.num_examples for r in replies]
    extra = {name: aggregate_weighted([r.extra[name] for r in replies], weights)
             for name in replies[0].extra}
    return Combined(aggregate_weighted([r.arrays for r in replies], weights),
                    num_examples=int(sum(weights)), num_replies=len(replies), extra=extra)
