"""Aggregating LoRA adapters of different ranks: pure numpy on ``dW = (alpha / r) B A``.

A client of rank ``r_k`` trains ``A_k`` (r_k x in) and ``B_k`` (out x r_k) with the same
``alpha``; its update of a module is ``dW_k = (alpha / r_k) B_k A_k``. Averaging the ``A``'s
and the ``B``'s separately (FedAvg) is not the mean of the ``dW``'s, and the shapes differ.

- **flexlora** -- stack the factors (FLoRA, https://arxiv.org/abs/2409.05976):
  ``B_s = [w_1 (alpha/r_1) B_1, ..., w_K (alpha/r_K) B_K]``, ``A_s = [A_1; ...; A_K]``, so
  ``B_s A_s = sum_k w_k dW_k`` exactly; then back to LoRA factors of the global rank by a
  truncated SVD (FlexLoRA, https://arxiv.org/abs/2402.11505): exact when
  ``sum_k r_k <= r_global``, the best rank-``r_global`` approximation otherwise. A client of
  a lower rank gets the truncated SVD of the global ``dW``.
- **hetlora** -- the zero-padding baseline of HetLoRA (https://arxiv.org/abs/2306.09914; its
  rank self-pruning is not implemented): pad every ``A_k`` / ``B_k`` to ``r_max`` and take
  the example-weighted mean of the ``A``'s and of the ``B``'s separately. Inexact by design.

All the mathematics is in float64; every array returned to the wire is float32. Adapters
are lists of arrays in the wire order of ``fedit.model.adapter.adapter_names``: for each module
``...lora_A.weight`` then ``...lora_B.weight``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RANK_METHODS = ("flexlora", "hetlora")
_A, _B = ".lora_A.weight", ".lora_B.weight"
# singular values below this share of the largest carry nothing: their slot is reset
_DEAD = 1e-10


# --- names -----------------------------------------------------------------------------


def lora_pairs(names: Sequence[str]) -> list[tuple[int, int]]:
    """The (A index, B index) of each LoRA module, in the order its A appears.

    Parameters
    ----------
    names : sequence of str
        PEFT state-dict keys in wire order (``fedit.model.adapter.adapter_names``).

    Raises
    ------
    ValueError
        Naming the first tensor (in wire order) that is not one half of an A/B pair.
    """
    a_of: dict[str, int] = {}
    b_of: dict[str, int] = {}
    for i, name in enumerate(names):
        for suffix, table in ((_A, a_of), (_B, b_of)):
            if name.endswith(suffix):
                table.setdefault(name[: -len(suffix)], i)
    paired = {a_of[m] for m in a_of if m in b_of} | {b_of[m] for m in b_of if m in a_of}
    for i, name in enumerate(names):
        if i not in paired:
            raise ValueError(f"adapter tensor {name} is not one half of a lora_A/lora_B pair")
    return sorted((a_of[m], b_of[m]) for m in a_of)


# --- one module --------------------------------------------------------------------------


def delta_w(A: np.ndarray, B: np.ndarray, alpha: float, r: int) -> np.ndarray:
    """The dense update ``(alpha / r) B A`` (out x in, float64)."""
    return (alpha / r) * (np.asarray(B, np.float64) @ np.asarray(A, np.float64))


def _check_factors(A: np.ndarray, B: np.ndarray, r: int) -> None:
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
        raise ValueError(f"LoRA factors of rank {r} need A (r x in) and B (out x r), "
                         f"got A {A.shape} and B {B.shape}")


def _normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or not len(w) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    return w / w.sum()


def stack_factors(
    As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], ranks: Sequence[int],
    weights: Sequence[float], alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA's stacked factors: ``B_s @ A_s`` is the weighted mean of the clients' ``dW``.

    Parameters
    ----------
    As, Bs : sequences of arrays
        Each client's ``A_k`` (r_k x in) and ``B_k`` (out x r_k).
    ranks : sequence of int
        Each client's ``r_k``.
    weights : sequence of float
        Example counts (normalised here).
    alpha : float
        The LoRA ``alpha`` every client shares.

    Returns
    -------
    A_s : (sum r_k) x in, float64
    B_s : out x (sum r_k), float64, with each block scaled by ``w_k alpha / r_k``
        (the scaling lives in ``B_s``: ``B_s @ A_s = sum_k w_k dW_k``).

    References
    ----------
    FLoRA, https://arxiv.org/abs/2409.05976
    """
    if not (len(As) == len(Bs) == len(ranks) == len(weights)):
        raise ValueError("As, Bs, ranks and weights must have one entry per client")
    w = _normalised(weights)
    for A, B, r in zip(As, Bs, ranks, strict=True):
        _check_factors(np.asarray(A), np.asarray(B), r)
    A_s = np.concatenate([np.asarray(A, np.float64) for A in As], axis=0)
    B_s = np.concatenate([np.asarray(B, np.float64) * (wk * alpha / r)
                          for B, r, wk in zip(Bs, ranks, w, strict=True)], axis=1)
    return A_s, B_s


def _thin_svd(A_s: np.ndarray, B_s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, S, Vt`` with ``U diag(S) Vt = B_s A_s``, from QR of ``B_s`` and ``A_s^T`` and
    the SVD of their small (at most k x k) core: the out x in product is never formed."""
    q_b, r_b = np.linalg.qr(B_s)  # out x m, m x k   (m = min(out, k))
    q_a, r_a = np.linalg.qr(A_s.T)  # in x n, n x k  (n = min(in, k))
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vt @ q_a.T


def svd_factors(
    A_s: np.ndarray, B_s: np.ndarray, rank: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` LoRA factors of the best rank-``rank`` approximation of ``B_s @ A_s``.

    With the truncated SVD ``U_r S_r V_r^T`` of ``B_s A_s`` the split is balanced::

        B = sqrt(r / alpha) * U_r sqrt(S_r)      A = sqrt(r / alpha) * sqrt(S_r) V_r^T

    so that ``(alpha / r) B A = U_r S_r V_r^T`` exactly. A slot whose singular value is zero
    (fewer than ``rank`` directions carry anything) gets ``B``'s column zero and a fixed,
    seeded random row of ``A`` in LoRA's init range ``+-1/sqrt(in)``: the product is
    unchanged, and the slot can still learn (with both factors zero it never would).

    Parameters
    ----------
    A_s, B_s : arrays
        Factors whose product (k inner dimensions) is the update, e.g. ``stack_factors``'.
    rank : int
        The LoRA rank ``r`` of the result.
    alpha : float
        The LoRA ``alpha``.

    Returns
    -------
    A : rank x in, float32
    B : out x rank, float32

    References
    ----------
    FlexLoRA, https://arxiv.org/abs/2402.11505
    """
    if rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}")
    out, n_in = B_s.shape[0], A_s.shape[1]
    u, s, vt = _thin_svd(np.asarray(A_s, np.float64), np.asarray(B_s, np.float64))
    keep = min(rank, len(s))
    s = s[:keep]
    live = s > _DEAD * (s[0] if keep else 0.0)
    root = np.sqrt(np.where(live, s, 0.0) * rank / alpha)
    A = np.zeros((rank, n_in))
    B = np.zeros((out, rank))
    A[:keep] = root[:, None] * vt[:keep]
    B[:, :keep] = u[:, :keep] * root[None, :]
    dead = np.flatnonzero(np.concatenate([~live, np.ones(rank - keep, bool)]))
    rng = np.random.default_rng(0)  # fixed: the same rows whatever the clients' order
    bound = 1.0 / np.sqrt(n_in)
    A[dead] = rng.uniform(-bound, bound, (rank, n_in))[dead]
    return A.astype(np.float32), B.astype(np.float32)


def pad_mean(
    As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], ranks: Sequence[int],
    weights: Sequence[float], r_max: int, alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    """HetLoRA's zero-padding aggregation to rank ``r_max`` (inexact: the baseline).

    Each ``A_k`` is padded with zero rows to ``r_max`` and each ``B_k`` with zero columns,
    ``B_k`` first multiplied by ``r_max / r_k`` so that the client's own update is kept
    under the global scaling: ``(alpha/r_max) (r_max/r_k) B_k A_k = dW_k``. Forks that skip
    this rescaling shrink a rank-``r_k`` client's update by ``r_k / r_max`` (the known
    ``alpha / r`` scaling mistake). Then ``A`` and ``B`` are averaged separately with the
    normalised ``weights``: ``(alpha/r_max) B A`` is *not* ``sum_k w_k dW_k`` in general.

    Returns
    -------
    A : r_max x in, float32
    B : out x r_max, float32

    References
    ----------
    HetLoRA, https://arxiv.org/abs/2306.09914
    """
    if not (len(As) == len(Bs) == len(ranks) == len(weights)):
        raise ValueError("As, Bs, ranks and weights must have one entry per client")
    w = _normalised(weights)
    A = np.zeros((r_max, np.shape(As[0])[1]))
    B = np.zeros((np.shape(Bs[0])[0], r_max))
    for Ak, Bk, r, wk in zip(As, Bs, ranks, w, strict=True):
        _check_factors(np.asarray(Ak), np.asarray(Bk), r)
        if r > r_max:
            raise ValueError(f"client rank {r} exceeds r_max = {r_max}")
        A[:r] += wk * np.asarray(Ak, np.float64)
        B[:, :r] += wk * (r_max / r) * np.asarray(Bk, np.float64)
    return A.astype(np.float32), B.astype(np.float32)


def truncate(A: np.ndarray, B: np.ndarray, r_from: int, r_to: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """HetLoRA's client adapter: the first ``r_to`` rows of ``A`` and columns of ``B``,
    ``B`` scaled by ``r_to / r_from`` so that ``(alpha/r_to) B' A'`` is the global update
    restricted to those slots, ``(alpha/r_from) B[:, :r_to] A[:r_to]``."""
    if not 0 < r_to <= r_from:
        raise ValueError(f"cannot truncate rank {r_from} to rank {r_to}")
    _check_factors(np.asarray(A), np.asarray(B), r_from)
    A_t = np.asarray(A, np.float64)[:r_to]
    B_t = np.asarray(B, np.float64)[:, :r_to] * (r_to / r_from)
    return A_t.astype(np.float32), B_t.astype(np.float32)


# --- whole adapters ----------------------------------------------------------------------


def _check_method(method: str) -> None:
    if method not in RANK_METHODS:
        raise ValueError(f"unknown rank aggregation {method!r}: use one of "
                         f"{', '.join(RANK_METHODS)}")


def exact_delta(
    adapters: Sequence[Sequence[np.ndarray]], ranks: Sequence[int], weights: Sequence[float],
    names: Sequence[str], alpha: float,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each module's stacked factors ``(A_s, B_s)`` (``stack_factors``), in ``lora_pairs``
    order: ``B_s @ A_s`` is the exact weighted mean of the clients' updates of it."""
    if len(adapters) != len(ranks):
        raise ValueError(f"{len(adapters)} adapters but {len(ranks)} ranks")
    return [
        stack_factors([ad[a] for ad in adapters], [ad[b] for ad in adapters], ranks,
                      weights, alpha)
        for a, b in lora_pairs(names)
    ]


def aggregate_ranks(
    method: str, adapters: Sequence[Sequence[np.ndarray]], ranks: Sequence[int],
    weights: Sequence[float], names: Sequence[str], alpha: float, r_global: int,
) -> list[np.ndarray]:
    """The global adapter, at rank ``r_global``, from clients' adapters of mixed ranks.

    Parameters
    ----------
    method : {"flexlora", "hetlora"}
        ``flexlora``: stack (exact mean of the ``dW``'s), then truncated SVD to
        ``r_global`` (exact when ``sum(ranks) <= r_global``); ``hetlora``: ``pad_mean``.
    adapters : sequence of lists of arrays
        Each client's adapter in wire order, at its own rank.
    ranks : sequence of int
        Each client's rank (each <= ``r_global``).
    weights : sequence of float
        Example counts.
    names : sequence of str
        The wire order's tensor names (any rank's: PEFT's keys do not name the adapter).
    alpha : float
        The LoRA ``alpha`` all clients share.
    r_global : int
        The global adapter's rank (the largest one).

    Returns
    -------
    list of float32 arrays, in wire order
    """
    _check_method(method)
    if any(r > r_global for r in ranks):
        raise ValueError(f"client ranks {list(ranks)} exceed the global rank {r_global}")
    out: list[np.ndarray] = [np.empty(0, np.float32)] * len(names)
    pairs = lora_pairs(names)
    if method == "flexlora":
        stacked = exact_delta(adapters, ranks, weights, names, alpha)
        factors = [svd_factors(A_s, B_s, r_global, alpha) for A_s, B_s in stacked]
    else:
        factors = [pad_mean([ad[a] for ad in adapters], [ad[b] for ad in adapters], ranks,
                            weights, r_global, alpha) for a, b in pairs]
    for (a, b), (A, B) in zip(pairs, factors, strict=True):
        out[a], out[b] = A, B
    return out


def client_adapter(
    method: str, global_adapter: Sequence[np.ndarray], names: Sequence[str], r_global: int,
    r_client: int, alpha: float,
) -> list[np.ndarray]:
    """The adapter a client of rank ``r_client`` starts from, given the global one.

    ``flexlora``: the truncated SVD of each module's global ``dW`` to ``r_client``
    (``svd_factors``); ``hetlora``: its first ``r_client`` slots (``truncate``). At
    ``r_client == r_global`` the global adapter itself (float32 copies).
    """
    _check_method(method)
    if r_client == r_global:
        return [np.asarray(x, np.float32).copy() for x in global_adapter]
    out: list[np.ndarray] = [np.empty(0, np.float32)] * len(names)
    for a, b in lora_pairs(names):
        A, B = global_adapter[a], global_adapter[b]
        if method == "flexlora":
            _check_factors(np.asarray(A), np.asarray(B), r_global)
            B_scaled = np.asarray(B, np.float64) * (alpha / r_global)
            out[a], out[b] = svd_factors(np.asarray(A, np.float64), B_scaled, r_client, alpha)
        else:
            out[a], out[b] = truncate(A, B, r_global, r_client)
    return out
