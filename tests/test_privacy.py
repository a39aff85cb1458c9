"""Client-level DP: clipping and noise by hand, adaptive clipping, and the accountant
checked against independent values (PRV accountant, analytic Gaussian, a published run)."""

from __future__ import annotations

import logging
import math

import dp_accounting
import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedit.algorithms.privacy import (
    adaptive_clip,
    clip_update,
    count_stddev_for,
    effective_noise_multiplier,
    epsilon_local,
    epsilon_spent,
    gaussian_noise,
    noisy_unclipped_fraction,
)
from fedit.config import PrivacyConfig
from fedit.errors import ConfigError


# -- clipping and noise ---------------------------------------------------------------------
def test_clip_scales_the_whole_update_to_the_bound():
    # Prepare: an update of global norm 5 split over two arrays: (3) and (4)
    delta = [np.array([3.0], np.float32), np.array([[4.0]], np.float32)]
    # Execute
    clipped, norm_before = clip_update(delta, clip=1.0)
    # Assert: norm 1, same direction (3, 4) / 5, dtypes and shapes kept
    assert norm_before == 5.0
    np.testing.assert_allclose(clipped[0], [0.6], rtol=1e-6)
    np.testing.assert_allclose(clipped[1], [[0.8]], rtol=1e-6)
    assert [a.dtype for a in clipped] == [np.float32] * 2 and clipped[1].shape == (1, 1)


def test_clip_leaves_a_small_update_alone():
    delta = [np.array([0.3]), np.array([0.4])]  # norm 0.5
    clipped, norm_before = clip_update(delta, clip=1.0)
    assert norm_before == pytest.approx(0.5)
    assert [a.tolist() for a in clipped] == [[0.3], [0.4]]
    zero, n0 = clip_update([np.zeros(3)], clip=1.0)
    assert n0 == 0.0 and not zero[0].any()
    with pytest.raises(ValueError, match="clip must be > 0"):
        clip_update(delta, clip=0.0)


def test_gaussian_noise_has_the_asked_std_and_shapes():
    like = [np.zeros((200, 500), np.float32), np.zeros(3, np.float64)]
    noise = gaussian_noise(like, std=0.3, rng=np.random.default_rng(0))
    assert [(a.shape, a.dtype) for a in noise] == [((200, 500), np.float32), ((3,), np.float64)]
    assert float(np.std(noise[0])) == pytest.approx(0.3, rel=0.05)
    assert abs(float(np.mean(noise[0]))) < 0.01


def test_central_noise_std_on_the_mean():
    # DP-FedAvg's fixed denominator: noise sigma * C on the sum of clipped updates, divided
    # by the expected m = 10 clients a round, whoever replied: std 1.5 * 2.0 / 10 = 0.3
    from fedit.algorithms.contract import Reply
    from fedit.algorithms.pipeline import Pipeline, PipelineOptions
    from fedit.algorithms.strategies import FedAvg

    dp = PrivacyConfig(mode="central", clip=2.0, noise_multiplier=1.5)
    pipe = Pipeline(FedAvg(), PipelineOptions(privacy=dp, per_round=10, num_clients=100))
    g = [np.zeros((200, 500), np.float32)]
    replies = [Reply(c, [a.copy() for a in g], 5 + c) for c in range(3)]  # no update
    combined, _ = pipe.combine(1, replies, {}, g, pipe.init_state(g))
    assert float(np.std(combined.arrays[0])) == pytest.approx(0.3, rel=0.02)
    assert abs(float(np.mean(combined.arrays[0]))) < 0.01


def test_adaptive_clip_steps_by_hand():
    # b = 0.8 > gamma = 0.5: C = 1 * exp(-0.2 * 0.3) = exp(-0.06) = 0.94176...
    assert adaptive_clip(1.0, 0.8, 0.5, 0.2) == pytest.approx(0.9417645)
    # b = 0.2 < gamma: C = 2 * exp(0.06) = 2.12367...
    assert adaptive_clip(2.0, 0.2, 0.5, 0.2) == pytest.approx(2.1236729)
    assert adaptive_clip(3.0, 0.5, 0.5, 0.2) == 3.0


def test_adaptive_clip_converges_to_the_median_norm():
    # Prepare: five clients with fixed update norms, median 2; no count noise
    norms = np.array([0.5, 1.0, 2.0, 3.0, 4.0])
    rng = np.random.default_rng(0)
    clip, history = 0.1, []
    # Execute: 300 rounds of Algorithm 1's clip update
    for _ in range(300):
        b = noisy_unclipped_fraction(int((norms <= clip).sum()), 5, 0.0, rng)
        clip = adaptive_clip(clip, b, target_quantile=0.5, lr=0.2)
        history.append(clip)
    # Assert: it ends oscillating around 2 (b is 0.4 below it, 0.6 above: steps of e^0.02)
    assert all(abs(c / 2.0 - 1) < 0.03 for c in history[-50:])


def test_noisy_unclipped_fraction():
    rng = np.random.default_rng(1)
    assert noisy_unclipped_fraction(3, 10, 0.0, rng) == 0.3
    draws = np.array([noisy_unclipped_fraction(3, 10, 0.5, rng) for _ in range(20_000)])
    assert draws.mean() == pytest.approx(0.3, abs=0.002)
    assert draws.std() == pytest.approx(0.05, rel=0.05)  # sigma_b / m


def test_effective_noise_multiplier_spends_the_same_budget():
    # Prepare: z = 1, sigma_b = 5: sigma_u = (1 - 1/100) ** -0.5
    sigma_u = effective_noise_multiplier(1.0, 5.0)
    assert sigma_u == pytest.approx(0.99 ** -0.5)
    # Assert: updates (sigma_u) and count (2 sigma_b) composed by dp_accounting cost what z
    # alone costs
    both = dp_accounting.rdp.RdpAccountant()
    both.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma_u),
                                                dp_accounting.GaussianDpEvent(10.0)]))
    assert both.get_epsilon(1e-5) == pytest.approx(epsilon_spent(1.0, 1.0, 1, 1e-5), rel=1e-9)
    with pytest.raises(ValueError, match=r"privacy.count_stddev = 0.5 is too small for "
                                         r"privacy.noise_multiplier = 1.0: it must exceed 0.5"):
        effective_noise_multiplier(1.0, 0.5)


# -- the accountant -------------------------------------------------------------------------
def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism, sensitivity 1, noise std sigma (Balle &
    Wang 2018, https://arxiv.org/abs/1805.06530, Theorem 8), solved for epsilon:
    delta = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma)."""
    def excess(eps):
        return (norm.cdf(0.5 / sigma - eps * sigma)
                - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta)

    return brentq(excess, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
def test_one_gaussian_round_against_the_analytic_gaussian_mechanism(sigma):
    # q = 1, T = 1: RDP is an upper bound, 7-10% above the exact value for these sigmas
    exact = analytic_gaussian_epsilon(sigma, 1e-5)
    assert exact <= epsilon_spent(sigma, 1.0, 1, 1e-5) <= 1.12 * exact


@pytest.mark.parametrize(("q", "sigma", "rounds"), [(0.1, 1.0, 100), (0.01, 1.1, 1000),
                                                    (0.2, 1.5, 50)])
def test_subsampled_rounds_against_the_prv_accountant(q, sigma, rounds):
    # Prepare: the PRV accountant (Gopi et al. 2021) bounds the tight epsilon from both sides
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    prv = PRVAccountant(prvs=PoissonSubsampledGaussianMechanism(noise_multiplier=sigma,
                                                                sampling_probability=q),
                        max_self_compositions=rounds, eps_error=0.01, delta_error=1e-10)
    lower, _, upper = prv.compute_epsilon(delta=1e-5, num_self_compositions=rounds)
    # Execute
    eps = epsilon_spent(sigma, q, rounds, 1e-5)
    # Assert: RDP is an upper bound, measured 11-13% above the PRV value here
    assert lower <= eps <= 1.15 * upper


def test_published_mnist_run_is_reproduced():
    # TF-Privacy's tutorials/README.md (tensorflow/privacy): DP-SGD on MNIST with
    # noise_multiplier 1.12, batch 256 of 60000, 60 epochs of 60000 // 256 = 234 steps,
    # reports "For delta=1e-5, the current epsilon is: 2.92" (1.00 after epoch 1). That
    # script used the orders below and the classic RDP -> (eps, delta) conversion
    # eps = min_a rdp(a) - log(delta) / (a - 1) (Mironov 2017, Prop. 3).
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
    q = 256 / 60000
    for epochs, published in [(1, 1.00), (60, 2.92)]:
        accountant = dp_accounting.rdp.RdpAccountant(orders)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(1.12)), epochs * 234)
        classic = np.min(accountant.rdp - math.log(1e-5) / (accountant.orders - 1))
        assert round(float(classic), 2) == published
        # ours: the same RDP curve, the tighter conversion of Canonne et al. 2020
        assert epsilon_spent(1.12, q, epochs * 234, 1e-5) <= published
    assert epsilon_spent(1.12, q, 60 * 234, 1e-5) == pytest.approx(2.52, abs=0.01)  # 14% less


def test_cached_epsilon_equals_a_fresh_accountant():
    fresh = dp_accounting.rdp.RdpAccountant()
    fresh.compose(dp_accounting.PoissonSampledDpEvent(
        0.05, dp_accounting.GaussianDpEvent(0.8)), 200)
    assert epsilon_spent(0.8, 0.05, 200, 1e-5) == pytest.approx(fresh.get_epsilon(1e-5),
                                                                 rel=1e-12)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    by_rounds = [epsilon_spent(1.0, 0.1, t, 1e-5) for t in (0, 1, 10, 100, 300)]
    assert by_rounds[0] == 0.0 and by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 5
    by_sigma = [epsilon_spent(s, 0.1, 100, 1e-5) for s in (0.7, 1.0, 2.0, 4.0)]
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == 4
    assert epsilon_spent(0.0, 0.1, 5, 1e-5) == math.inf
    with pytest.raises(ValueError, match="sample_rate must be in"):
        epsilon_spent(1.0, 0.0, 5, 1e-5)


def test_the_rounds_rdp_is_computed_once_and_absl_warnings_are_silenced(caplog):
    # Prepare: q = 0.1, sigma = 1 makes dp_accounting warn about orders 1.1-1.5
    from fedit.algorithms.privacy import _rdp_per_round

    _rdp_per_round.cache_clear()
    caplog.set_level(logging.WARNING)
    # Execute: every round of a 300-round run
    eps = [epsilon_spent(1.0, 0.1, t, 1e-5) for t in range(1, 301)]
    # Assert: one RDP computation for the whole run (the rest composes it: rounds * rdp),
    # epsilon grows with the rounds, and dp_accounting's warnings stay quiet
    info = _rdp_per_round.cache_info()
    assert (info.misses, info.hits) == (1, 299)
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert not [r for r in caplog.records if r.name == "absl"]


def test_local_dp_is_a_gaussian_of_half_the_multiplier_per_participation():
    # Any two clipped updates differ by up to 2C and the noise is sigma * C
    assert epsilon_local(2.0, 1, 1e-5) == epsilon_spent(1.0, 1.0, 1, 1e-5)
    exact = analytic_gaussian_epsilon(1.0, 1e-5)
    assert exact <= epsilon_local(2.0, 1, 1e-5) <= 1.12 * exact
    assert epsilon_local(2.0, 10, 1e-5) > epsilon_local(2.0, 1, 1e-5)
    assert epsilon_local(2.0, 10, 1e-5) > epsilon_spent(2.0, 0.1, 10, 1e-5)  # no amplification


# -- settings -------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "message"), [
    ("mode", "global", "privacy.mode: use off, central or local"),
    ("clip", 0.0, "privacy.clip: must be > 0"),
    ("noise_multiplier", -1.0, "privacy.noise_multiplier: must be >= 0"),
    ("delta", 1.0, r"privacy.delta: must be in \(0, 1\)"),
    ("target_quantile", 1.5, r"privacy.target_quantile: must be in \(0, 1\)"),
    ("clip_lr", -0.1, "privacy.clip_lr: must be > 0"),
    ("count_stddev", -1.0, "privacy.count_stddev: must be >= 0"),
])
def test_privacy_config_names_the_bad_key(key, value, message):
    # the algorithms take [privacy] as it is (PrivacyConfig): one set of checks
    with pytest.raises(ConfigError, match=message):
        PrivacyConfig(**{key: value})


def test_default_count_noise_is_the_papers():
    assert count_stddev_for(PrivacyConfig(), 40) == 2.0  # m / 20
    assert count_stddev_for(PrivacyConfig(count_stddev=3.0), 40) == 3.0


def test_quieting_absl_keeps_its_errors(caplog):
    from fedit.algorithms.privacy import _quiet_absl

    caplog.set_level(logging.WARNING)
    absl = logging.getLogger("absl")
    before = absl.level
    with _quiet_absl():
        absl.warning("an order did not converge")
        absl.error("a real problem")
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == ["a real problem"]
    assert absl.level == before
