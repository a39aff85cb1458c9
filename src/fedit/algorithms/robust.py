"""Byzantine-robust aggregation rules on lists of adapters (plain functions).

Every rule takes ``arrays_per_client`` (each client's adapter: a list of arrays, the same
shapes across clients) and ``weights`` (example counts), does its math in float64 and
returns the aggregate in the inputs' dtype. The round loop drops replies with NaN or inf
before aggregating; a rule given non-finite values anyway raises ValueError.

All rules are translation-equivariant, ``rule(x + t) = rule(x) + t`` for the same ``t``
added to every client, so they work on adapters or on deltas from the global adapter
alike. None of them can run under SecAgg+: each needs every client's reply in the clear.

References
----------
Yin et al. 2018, Byzantine-Robust Distributed Learning, https://arxiv.org/abs/1803.01498
Blanchard et al. 2017, Machine Learning with Adversaries, https://arxiv.org/abs/1703.02757
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedit.algorithms.aggregate import aggregate_weighted, check_clients

ClientArrays = Sequence[Sequence[np.ndarray]]


def _stack(arrays_per_client: ClientArrays, weights: Sequence[float]) -> list[np.ndarray]:
    """Layer ``i`` of every client stacked as a float64 array of shape ``(n, *shape_i)``.

    Raises ValueError on no clients, a weight count that differs from the client count,
    mismatched shapes or non-finite values.
    """
    check_clients(arrays_per_client, weights)
    for k, arrays in enumerate(arrays_per_client):
        for i, a in enumerate(arrays):
            if not np.isfinite(a).all():
                raise ValueError(f"client {k} array {i} has NaN or inf values; drop such "
                                 "replies before aggregating")
    return [np.stack([np.asarray(arrays[i], dtype=np.float64) for arrays in arrays_per_client])
            for i in range(len(arrays_per_client[0]))]


def _like(stats: list[np.ndarray], arrays_per_client: ClientArrays) -> list[np.ndarray]:
    """``stats`` cast back to the dtypes of the first client's arrays."""
    return [s.astype(a.dtype) for s, a in zip(stats, arrays_per_client[0], strict=True)]


def coordinate_median(arrays_per_client: ClientArrays,
                      weights: Sequence[float]) -> list[np.ndarray]:
    """Coordinate-wise median of the clients' arrays (Yin et al. 2018,
    https://arxiv.org/abs/1803.01498).

    Unweighted: ``weights`` are checked for their count but not used. With an even number
    of clients a coordinate's median is the mean of its two middle values.
    """
    stacks = _stack(arrays_per_client, weights)
    return _like([np.median(s, axis=0) for s in stacks], arrays_per_client)


def trimmed_mean(arrays_per_client: ClientArrays, weights: Sequence[float],
                 beta: float) -> list[np.ndarray]:
    """Coordinate-wise trimmed mean (Yin et al. 2018, https://arxiv.org/abs/1803.01498).

    Per coordinate, drop the ``floor(beta * n)`` largest and smallest of the ``n`` values
    and average the rest. Unweighted: ``weights`` are checked for their count but not used.
    ``beta = 0`` is the plain mean.

    Raises ValueError unless ``0 <= beta < 0.5``.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction beta = {beta} must be in [0, 0.5)")
    stacks = _stack(arrays_per_client, weights)
    n = len(arrays_per_client)
    k = int(math.floor(beta * n + 1e-9))  # 0.29 * 100 is 28.999...: still trim 29
    return _like([np.sort(s, axis=0)[k:n - k].mean(axis=0) for s in stacks], arrays_per_client)


def krum_scores(arrays_per_client: ClientArrays, weights: Sequence[float],
                f: int) -> list[float]:
    """Krum's score of each client (Blanchard et al. 2017, https://arxiv.org/abs/1703.02757).

    The score of client ``i`` is the sum of the squared L2 distances, over the whole
    flattened adapter, to its ``n - f - 2`` nearest other clients. ``weights`` are checked
    for their count but not used.

    Raises ValueError unless ``f >= 0`` and ``n > 2f + 2``.
    """
    n = len(arrays_per_client)
    if f < 0:
        raise ValueError(f"krum: f = {f} Byzantine clients must be >= 0")
    if n <= 2 * f + 2:
        raise ValueError(f"krum needs n > 2f + 2 clients: got {n} with f = {f}, "
                         f"needs at least {2 * f + 3}")
    stacks = _stack(arrays_per_client, weights)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = sum(float(np.sum((s[i] - s[j]) ** 2)) for s in stacks)
    neighbours = n - f - 2
    return [float(np.sort(np.delete(dist[i], i))[:neighbours].sum()) for i in range(n)]


def krum_select(arrays_per_client: ClientArrays, weights: Sequence[float], f: int,
                m: int = 1) -> list[int]:
    """The ``m`` clients with the lowest Krum scores, best first (ties: lower position).

    Positions index ``arrays_per_client``. ``m = 1`` is Krum, ``m > 1`` Multi-Krum and
    ``m = 0`` means ``n - f`` (Blanchard et al. 2017, https://arxiv.org/abs/1703.02757).

    Raises ValueError unless ``f >= 0``, ``n > 2f + 2`` and ``0 <= m <= n``.
    """
    n = len(arrays_per_client)
    if not 0 <= m <= n:
        raise ValueError(f"krum: m = {m} selected clients must be in [0, n = {n}]")
    scores = krum_scores(arrays_per_client, weights, f)
    keep = n - f if m == 0 else m
    return [int(i) for i in np.argsort(scores, kind="stable")[:keep]]


def krum(arrays_per_client: ClientArrays, weights: Sequence[float], f: int,
         m: int = 1) -> list[np.ndarray]:
    """Krum (``m = 1``: the best-scored client's adapter) or Multi-Krum (the
    example-weighted mean of the ``m`` best-scored; ``m = 0`` means ``n - f``).

    Blanchard et al. 2017, https://arxiv.org/abs/1703.02757. Uses ``weights`` only to
    average the selected clients; :func:`krum_select` says which ones those are.
    """
    selected = krum_select(arrays_per_client, weights, f, m)
    return aggregate_weighted([arrays_per_client[i] for i in selected],
                              [weights[i] for i in selected])


# -- one entry point for Strategy.combine ---------------------------------------------------
Aggregator = Callable[..., tuple[list[np.ndarray], dict[str, Any]]]


def _mean(arrays: ClientArrays, weights: Sequence[float],
          **_: Any) -> tuple[list[np.ndarray], dict[str, Any]]:
    _stack(arrays, weights)  # the same finite-value check as the robust rules
    return aggregate_weighted(arrays, weights), {}


def _krum(arrays: ClientArrays, weights: Sequence[float], *, krum_f: int, m: int,
          **_: Any) -> tuple[list[np.ndarray], dict[str, Any]]:
    selected = krum_select(arrays, weights, krum_f, m)
    out = aggregate_weighted([arrays[i] for i in selected], [weights[i] for i in selected])
    return out, {"selected": selected}


#: name -> rule(arrays_per_client, weights, *, trim_fraction, krum_f, krum_m) -> (arrays, info)
AGGREGATORS: dict[str, Aggregator] = {
    "mean": _mean,
    "median": lambda a, w, **_: (coordinate_median(a, w), {}),
    "trimmed_mean": lambda a, w, *, trim_fraction, **_: (trimmed_mean(a, w, trim_fraction), {}),
    "krum": lambda a, w, *, krum_f, **_: _krum(a, w, krum_f=krum_f, m=1),
    "multikrum": lambda a, w, *, krum_f, krum_m, **_: _krum(a, w, krum_f=krum_f, m=krum_m),
}


def robust_aggregate(name: str, arrays_per_client: ClientArrays, weights: Sequence[float], *,
                     trim_fraction: float = 0.1, krum_f: int = 1,
                     krum_m: int = 0) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Aggregate with the rule registered under ``name`` in :data:`AGGREGATORS`.

    Parameters
    ----------
    name : {"mean", "median", "trimmed_mean", "krum", "multikrum"}
        ``mean`` is FedAvg's example-weighted mean; the others are described above.
    arrays_per_client, weights
        Each client's adapter (or delta) and its example count.
    trim_fraction : float, default 0.1
        ``beta`` of :func:`trimmed_mean`.
    krum_f : int, default 1
        Byzantine clients Krum and Multi-Krum tolerate (needs ``n > 2f + 2``).
    krum_m : int, default 0
        Clients Multi-Krum averages; 0 means ``n - f``.

    Returns
    -------
    (arrays, info)
        The aggregate, and ``{"selected": [positions, best first]}`` for Krum and
        Multi-Krum (``{}`` for the other rules).
    """
    try:
        rule = AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; choose one of "
                         f"{', '.join(AGGREGATORS)}") from None
    return rule(arrays_per_client, weights, trim_fraction=trim_fraction, krum_f=krum_f,
                krum_m=krum_m)
