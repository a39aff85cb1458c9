"""Client-level differential privacy for federated rounds: clipping, noise, accounting.

DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963): each client's update
(its adapter minus the global one) is clipped to L2 norm ``C``; in ``central`` mode the
server adds Gaussian noise of std ``sigma * C`` to the sum of the clipped updates (of std
``sigma * C / m`` on their mean over the ``m`` expected clients); in ``local`` mode each
client adds noise of std ``sigma * C`` to its own clipped update before sending it.
Adaptive clipping (Andrew et al. 2021, https://arxiv.org/abs/1905.03871) moves ``C``
towards a quantile of the update norms, using a noisy count of the unclipped clients.

The privacy cost comes from Google's ``dp_accounting`` (its RDP accountant), never from
formulas written here.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import dp_accounting
import numpy as np
from dp_accounting import rdp

from fedit.config import PrivacyConfig


def count_stddev_for(p: PrivacyConfig, num_expected: int) -> float:
    """``privacy.count_stddev``, or the paper's default ``num_expected / 20`` when it is 0."""
    return p.count_stddev or num_expected / 20


# -- clipping and noise ---------------------------------------------------------------------
def clip_update(delta: list[np.ndarray], clip: float) -> tuple[list[np.ndarray], float]:
    """Scale the whole update to L2 norm at most ``clip`` (McMahan et al. 2018,
    https://arxiv.org/abs/1710.06963).

    The norm is taken over all arrays together. Returns the clipped arrays (in their
    dtypes; an update already within the bound comes back unchanged) and the original norm.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norm = math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in delta))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return [(np.asarray(a, np.float64) * scale).astype(a.dtype) for a in delta], norm


def gaussian_noise(shapes_like: list[np.ndarray], std: float,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Independent N(0, std^2) noise shaped and typed like each array of ``shapes_like``."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return [rng.normal(0.0, std, size=a.shape).astype(a.dtype) for a in shapes_like]


def noisy_unclipped_fraction(count_unclipped: int, num_clients: int, count_stddev: float,
                             rng: np.random.Generator) -> float:
    """``b = (count + N(0, sigma_b^2)) / m``: the noisy share of clients whose update norm
    was at most the clip (Andrew et al. 2021, https://arxiv.org/abs/1905.03871, Alg. 1).

    ``num_clients`` is the expected number of clients per round, as in the paper.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    noise = rng.normal(0.0, count_stddev) if count_stddev > 0 else 0.0
    return (count_unclipped + noise) / num_clients


def adaptive_clip(clip: float, unclipped_fraction_noisy: float, target_quantile: float,
                  lr: float) -> float:
    """Geometric clip update ``C <- C * exp(-lr * (b - gamma))`` (Andrew et al. 2021,
    https://arxiv.org/abs/1905.03871, Algorithm 1).

    More clients unclipped than the target (``b > gamma``) shrinks ``C``; fewer grows it.
    """
    return clip * math.exp(-lr * (unclipped_fraction_noisy - target_quantile))


def effective_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier the updates need so that updates and count together cost
    ``noise_multiplier``: ``sigma_u = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)``.

    Andrew et al. 2021 (https://arxiv.org/abs/1905.03871, Sec. 3.1): releasing the count
    of unclipped clients (each bit centred to +-1/2, sensitivity 1/2) with noise
    ``sigma_b`` is a Gaussian mechanism of multiplier ``2 sigma_b``; composed with the
    updates' mechanism of multiplier ``sigma_u`` it costs as much as one of multiplier
    ``(sigma_u^-2 + (2 sigma_b)^-2)^(-1/2)``. Account with ``noise_multiplier``, add
    ``sigma_u * C`` to the updates.

    Raises ValueError when ``2 sigma_b <= sigma``: the count alone would spend the budget.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"privacy.noise_multiplier must be > 0 for adaptive clipping, "
                         f"got {noise_multiplier}")
    if 2 * count_stddev <= noise_multiplier:
        raise ValueError(f"privacy.count_stddev = {count_stddev} is too small for "
                         f"privacy.noise_multiplier = {noise_multiplier}: it must exceed "
                         f"{noise_multiplier / 2}")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


# -- accounting -----------------------------------------------------------------------------
@contextmanager
def _quiet_absl() -> Iterator[None]:
    """Raise absl's logger to ERROR for the block: dp_accounting logs a warning for every
    RDP order whose series does not converge (it drops that order; the bound stays valid)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=256)
def _rdp_per_round(noise_multiplier: float, sample_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """The RDP orders and the RDP of one Poisson-sampled Gaussian round (cached: the series
    behind it take up to ~0.1 s; composing ``T`` rounds multiplies it by ``T``)."""
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    with _quiet_absl():
        accountant.compose(event)
    orders, curve = accountant.orders, accountant.rdp
    orders.setflags(write=False)
    curve.setflags(write=False)
    return orders, curve


def epsilon_spent(noise_multiplier: float, sample_rate: float, rounds: int,
                  delta: float) -> float:
    """Epsilon of ``rounds`` rounds of DP-FedAvg, each client sampled with probability
    ``sample_rate`` (Poisson) and noise multiplier ``noise_multiplier``.

    From ``dp_accounting``'s RDP accountant on ``PoissonSampledDpEvent(q,
    GaussianDpEvent(sigma))`` composed ``rounds`` times (add-or-remove-one client); the
    RDP of one round is cached, so a call costs well under a millisecond once its
    ``(sigma, q)`` has been seen. ``sample_rate = 1`` is the plain Gaussian mechanism.
    RDP gives an upper bound: 7-14% above the tight (PRV) value in our tests.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"privacy.delta must be in (0, 1), got {delta}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    orders, curve = _rdp_per_round(float(noise_multiplier), float(sample_rate))
    with _quiet_absl():
        eps, _ = rdp.compute_epsilon(orders, rounds * curve, delta)
    return float(eps)


def epsilon_local(noise_multiplier: float, participations: int, delta: float) -> float:
    """Epsilon of local DP for one client that took part ``participations`` times.

    Each client clips its update to ``C`` and adds noise ``sigma * C`` itself; no sampling
    amplification is assumed (the server sees every reply of the client). Local DP
    protects any two inputs of the client, whose clipped updates differ by up to ``2C``,
    so each release is a Gaussian mechanism of multiplier ``sigma / 2``, composed
    ``participations`` times by :func:`epsilon_spent` with ``sample_rate = 1``.
    """
    return epsilon_spent(noise_multiplier / 2, 1.0, participations, delta)
