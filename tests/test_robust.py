"""Robust aggregation rules: numbers worked by hand, properties, and a poisoned client."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedit.algorithms.robust import (
    AGGREGATORS,
    coordinate_median,
    krum,
    krum_scores,
    krum_select,
    robust_aggregate,
    trimmed_mean,
)


def clients_of(*rows):
    """One client per row: its adapter is two arrays, the row's first value and the rest."""
    return [[np.array([r[0]], np.float32), np.array(r[1:], np.float32)] for r in rows]


def flat(adapter):
    """An adapter's values as one float64 vector, to compare with hand-worked numbers."""
    return np.concatenate([np.ravel(a) for a in adapter]).astype(np.float64)


# -- by hand --------------------------------------------------------------------------------
def test_median_by_hand():
    # Prepare: 3 clients, then a 4th (even n: the mean of the two middle values)
    three = clients_of((1, 5), (2, -1), (10, 0))
    four = three + clients_of((4, 7))
    # Execute
    out3 = coordinate_median(three, [1, 1, 1])
    out4 = coordinate_median(four, [1, 1, 1, 100])  # weights unused
    # Assert: sorted (1, 2, 10) -> 2; (-1, 0, 5) -> 0; (1, 2, 4, 10) -> 3; (-1, 0, 5, 7) -> 2.5
    np.testing.assert_array_equal(flat(out3), [2, 0])
    np.testing.assert_array_equal(flat(out4), [3, 2.5])
    assert out3[0].dtype == np.float32


def test_trimmed_mean_by_hand():
    # Prepare: 5 clients, coordinate values (1, 2, 3, 4, 100) and (-50, 0, 1, 2, 3)
    arrays = clients_of((3, 1), (100, -50), (1, 3), (4, 0), (2, 2))
    # Execute / Assert: beta = 0.2 drops floor(0.2 * 5) = 1 value at each end
    out = trimmed_mean(arrays, [1] * 5, beta=0.2)
    np.testing.assert_allclose(flat(out), [(2 + 3 + 4) / 3, (0 + 1 + 2) / 3], rtol=1e-6)
    # beta = 0.1 drops floor(0.5) = 0: the plain mean
    out = trimmed_mean(arrays, [1] * 5, beta=0.1)
    np.testing.assert_allclose(flat(out), [110 / 5, -44 / 5], rtol=1e-6)


# Five clients at (0, 0), (1, 0), (0, 1), (2, 2), (10, 10); the adapter's two arrays hold
# the two coordinates, so distances are taken over the whole adapter. Squared distances:
#   d01 = 1, d02 = 1, d03 = 8, d04 = 200, d12 = 2, d13 = 5, d14 = 181,
#   d23 = 5, d24 = 181, d34 = 128.
# With f = 1 each score sums the n - f - 2 = 2 nearest:
#   s0 = 1 + 1 = 2, s1 = 1 + 2 = 3, s2 = 1 + 2 = 3, s3 = 5 + 5 = 10, s4 = 128 + 181 = 309.
KRUM_POINTS = clients_of((0, 0), (1, 0), (0, 1), (2, 2), (10, 10))
KRUM_WEIGHTS = [1, 1, 2, 4, 1]


def test_krum_scores_and_selection_by_hand():
    assert krum_scores(KRUM_POINTS, KRUM_WEIGHTS, f=1) == [2, 3, 3, 10, 309]
    assert krum_select(KRUM_POINTS, KRUM_WEIGHTS, f=1, m=1) == [0]
    assert krum_select(KRUM_POINTS, KRUM_WEIGHTS, f=1, m=3) == [0, 1, 2]  # tie: lower first
    assert krum_select(KRUM_POINTS, KRUM_WEIGHTS, f=1, m=0) == [0, 1, 2, 3]  # n - f = 4


def test_krum_and_multikrum_aggregate_by_hand():
    # Krum: client 0's adapter itself
    out = krum(KRUM_POINTS, KRUM_WEIGHTS, f=1)
    np.testing.assert_array_equal(flat(out), [0, 0])
    # Multi-Krum m = 3: clients 0, 1, 2 with weights 1, 1, 2:
    #   ((0, 0) * 1 + (1, 0) * 1 + (0, 1) * 2) / 4 = (0.25, 0.5)
    out, info = robust_aggregate("multikrum", KRUM_POINTS, KRUM_WEIGHTS, krum_f=1, krum_m=3)
    np.testing.assert_allclose(flat(out), [0.25, 0.5])
    assert info == {"selected": [0, 1, 2]} and out[0].dtype == np.float32
    # m = 0 -> n - f = 4: ((0,0) + (1,0) + (0,1) * 2 + (2,2) * 4) / 8 = (9/8, 10/8)
    out, info = robust_aggregate("multikrum", KRUM_POINTS, KRUM_WEIGHTS, krum_f=1, krum_m=0)
    np.testing.assert_allclose(flat(out), [9 / 8, 10 / 8])
    assert info == {"selected": [0, 1, 2, 3]}
    _, info = robust_aggregate("krum", KRUM_POINTS, KRUM_WEIGHTS, krum_f=1, krum_m=3)
    assert info == {"selected": [0]}  # krum ignores krum_m


def test_registry_names_and_the_mean():
    assert set(AGGREGATORS) == {"mean", "median", "trimmed_mean", "krum", "multikrum"}
    out, info = robust_aggregate("mean", clients_of((1, 2), (5, 6)), [1, 3])
    np.testing.assert_allclose(flat(out), [(1 + 15) / 4, (2 + 18) / 4])
    assert info == {}
    with pytest.raises(ValueError, match="unknown aggregator 'geomedian'; choose one of mean, "):
        robust_aggregate("geomedian", clients_of((1, 2)), [1])


# -- what the rules refuse ------------------------------------------------------------------
def test_parameters_the_rules_cannot_work_with():
    four = clients_of((0, 0), (1, 1), (2, 2), (3, 3))
    with pytest.raises(ValueError, match=r"krum needs n > 2f \+ 2 clients: got 4 with f = 1, "
                                         "needs at least 5"):
        krum_select(four, [1] * 4, f=1)
    with pytest.raises(ValueError, match="f = -1"):
        krum(four, [1] * 4, f=-1)
    with pytest.raises(ValueError, match=r"m = 5 selected clients must be in \[0, n = 4\]"):
        krum(four, [1] * 4, f=0, m=5)
    for beta in (0.5, -0.1):
        with pytest.raises(ValueError, match=rf"beta = {beta} must be in \[0, 0.5\)"):
            trimmed_mean(four, [1] * 4, beta)
    with pytest.raises(ValueError, match="3 weights for 4 clients"):
        coordinate_median(four, [1] * 3)
    with pytest.raises(ValueError, match="no client replies"):
        coordinate_median([], [])
    with pytest.raises(ValueError, match=r"client 1 array 1 has shape \(2,\), expected \(1,\)"):
        coordinate_median(clients_of((0, 0), (1, 1, 1)), [1, 1])


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_rule_refuses_non_finite_values(name, bad):
    # The round loop drops such replies first; a rule given one anyway says so
    arrays = clients_of((0, 0), (1, 1), (2, 2), (3, 3), (4, bad))
    with pytest.raises(ValueError, match="client 4 array 1 has NaN or inf values"):
        robust_aggregate(name, arrays, [1] * 5, trim_fraction=0.2, krum_f=1, krum_m=0)


# -- one poisoned client among five honest ones ---------------------------------------------
@pytest.mark.parametrize("attack", [1e6, -10.0], ids=["huge", "sign-flipped"])
def test_robust_rules_resist_one_poisoned_client(attack):
    # Prepare: 5 honest clients near p (noise 0.01), a 6th sends attack * p
    rng = np.random.default_rng(0)
    p = np.array([1.0, -2.0, 0.5, 3.0])
    honest = [[p[:1] + 0.01 * rng.standard_normal(1), p[1:] + 0.01 * rng.standard_normal(3)]
              for _ in range(5)]
    poisoned = [attack * p[:1], attack * p[1:]]
    honest_mean = np.concatenate(robust_aggregate("mean", honest, [1] * 5)[0])

    def distance(name, **kw):
        out, _ = robust_aggregate(name, [*honest, poisoned], [1] * 6, **kw)
        return float(np.linalg.norm(np.concatenate(out) - honest_mean))

    # Execute / Assert: the robust rules stay within 0.05 of the honest mean, the mean not
    assert distance("median") < 0.05
    assert distance("trimmed_mean", trim_fraction=0.2) < 0.05  # drops 1 at each end
    assert distance("krum", krum_f=1) < 0.05
    assert distance("multikrum", krum_f=1, krum_m=0) < 0.05
    assert distance("mean") > 5.0


# -- properties ------------------------------------------------------------------------------
RULES = {
    "median": lambda a, w: coordinate_median(a, w),
    "trimmed_mean": lambda a, w: trimmed_mean(a, w, 0.25),
    "multikrum": lambda a, w: krum(a, w, f=1, m=2),
}
finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def adapters(draw, n_min=5, n_max=7):
    """n clients, each two float64 arrays of shapes (2,) and (2, 3), values in [-100, 100]."""
    n = draw(st.integers(n_min, n_max))
    first = draw(hnp.arrays(np.float64, (n, 2), elements=finite))
    second = draw(hnp.arrays(np.float64, (n, 2, 3), elements=finite))
    return [[first[k], second[k]] for k in range(n)]


def krum_has_a_clear_cut(arrays, f=1, m=2):
    """Multi-Krum's selection is a well-defined set: no near-tie at the m-th score."""
    s = np.sort(krum_scores(arrays, [1] * len(arrays), f))
    return s[m] - s[m - 1] > 1e-6 * (1 + s[m])


def assert_close(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rule", sorted(RULES))
@settings(max_examples=40, deadline=None)
@given(arrays=adapters(), seed=st.integers(0, 2**32 - 1))
def test_permuting_the_clients_changes_nothing(rule, arrays, seed):
    assume(rule != "multikrum" or krum_has_a_clear_cut(arrays))
    weights = list(range(1, len(arrays) + 1))
    order = np.random.default_rng(seed).permutation(len(arrays))
    assert_close(RULES[rule](arrays, weights),
                 RULES[rule]([arrays[i] for i in order], [weights[i] for i in order]))


@pytest.mark.parametrize("rule", sorted(RULES))
@settings(max_examples=30, deadline=None)
@given(adapter=adapters(1, 1), n=st.integers(5, 7))
def test_identical_clients_give_back_their_adapter(rule, adapter, n):
    out = RULES[rule](adapter * n, [3] * n)
    assert_close(out, adapter[0])


@pytest.mark.parametrize("rule", sorted(RULES))
@settings(max_examples=30, deadline=None)
@given(arrays=adapters(), factor=st.floats(0.01, 1000))
def test_scaling_all_weights_changes_nothing(rule, arrays, factor):
    weights = [float(k) for k in range(1, len(arrays) + 1)]
    assert_close(RULES[rule](arrays, weights), RULES[rule](arrays, [w * factor for w in weights]))


@pytest.mark.parametrize("rule", sorted(RULES))
@settings(max_examples=40, deadline=None)
@given(arrays=adapters(), shift=adapters(1, 1))
def test_rules_are_translation_equivariant(rule, arrays, shift):
    # rule(x + t) = rule(x) + t, so the rules work on adapters and on deltas alike
    assume(rule != "multikrum" or krum_has_a_clear_cut(arrays))
    weights = list(range(1, len(arrays) + 1))
    t = shift[0]
    moved = [[x + s for x, s in zip(client, t, strict=True)] for client in arrays]
    expected = [x + s for x, s in zip(RULES[rule](arrays, weights), t, strict=True)]
    for x, y in zip(RULES[rule](moved, weights), expected, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9 * 200)
