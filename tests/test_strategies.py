"""FedAvg and client sampling, checked against numbers worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fedit.algorithms.strategies import (
    STRATEGIES,
    Combined,
    FedAvg,
    FedAvgM,
    FedAvgMParams,
    Reply,
    StrategyParams,
    aggregate_weighted,
    combine_weighted,
    num_sampled,
    sample_clients,
    strategy_from_config,
)


def test_fedavg_weights_by_example_count():
    # Prepare: two clients, two layers, 1 and 3 examples
    w0 = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
    w1 = [np.array([5.0, 6.0], np.float32), np.array([[4.0]], np.float32)]
    replies = [Reply(0, w0, num_examples=1), Reply(1, w1, num_examples=3)]
    # Execute
    s = FedAvg()
    out, _ = s.server_update(1, w0, s.combine(1, replies), s.init_state(w0))
    # Assert: (w0 * 1 + w1 * 3) / 4
    np.testing.assert_allclose(out[0], [(1 + 15) / 4, (2 + 18) / 4])
    np.testing.assert_allclose(out[1], [[12 / 4]])
    assert out[0].dtype == np.float32


def test_fedavg_equal_weights_is_plain_mean():
    arrays = [[np.full(3, float(k))] for k in range(4)]
    out = aggregate_weighted(arrays, [10, 10, 10, 10])
    np.testing.assert_allclose(out[0], [1.5, 1.5, 1.5])


def test_aggregate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"client 1 array 0 has shape \(3,\), expected \(2,\)"):
        aggregate_weighted([[np.zeros(2)], [np.zeros(3)]], [1, 1])
    with pytest.raises(ValueError, match="client 1 sent 2 arrays, expected 1"):
        aggregate_weighted([[np.zeros(2)], [np.zeros(2), np.zeros(2)]], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        aggregate_weighted([[np.zeros(2)]], [0])
    with pytest.raises(ValueError, match="no client replies"):
        aggregate_weighted([], [])


@pytest.mark.parametrize(
    ("n", "fraction", "min_clients", "expected"),
    [(10, 0.1, 1, 1), (10, 0.3, 1, 3), (10, 0.05, 2, 2), (3, 1.0, 1, 3), (5, 0.5, 1, 2),
     (4, 0.5, 9, 4)],
)
def test_num_sampled(n, fraction, min_clients, expected):
    assert num_sampled(n, fraction, min_clients) == expected


def test_sampling_is_seeded_per_round():
    clients = list(range(20))
    a = [sample_clients(clients, r, 0.2, 1, seed=7) for r in range(1, 6)]
    b = [sample_clients(clients, r, 0.2, 1, seed=7) for r in range(1, 6)]
    c = [sample_clients(clients, r, 0.2, 1, seed=8) for r in range(1, 6)]
    assert a == b
    assert a != c
    assert len({tuple(x) for x in a}) > 1  # rounds differ from each other
    for picked in a:
        assert len(picked) == 4 and len(set(picked)) == 4 and set(picked) <= set(clients)


def test_fedavg_samples_with_numpy_seeded_by_its_seed_and_the_round():
    # Prepare: six clients whose ids are not their positions
    clients = [10, 11, 12, 13, 14, 15]

    def by_hand(seed, server_round, k):
        """k positions drawn without replacement by numpy's generator on [seed, round]."""
        rng = np.random.default_rng([seed, server_round])
        return sorted(clients[i] for i in rng.choice(len(clients), size=k, replace=False))

    def fedavg(**params):
        return FedAvg(StrategyParams(**({"fraction": 0.5, "min_clients": 1, "seed": 3} | params)))

    # Execute
    picked = fedavg().sample(2, clients)
    # Assert: half of six is 3 clients, the ids at the drawn positions, sorted
    assert picked == by_hand(3, 2, 3)
    assert fedavg().sample(3, clients) == by_hand(3, 3, 3)  # the next round: its own draw
    other_seed = fedavg(seed=4).sample(2, clients)
    assert other_seed == by_hand(4, 2, 3) and other_seed != picked
    assert fedavg(fraction=1 / 3).sample(2, clients) == by_hand(3, 2, 2)
    assert fedavg(min_clients=5).sample(2, clients) == by_hand(3, 2, 5)  # 3 raised to 5


# -- FedAvgM: server momentum, worked by hand ------------------------------------------------
def test_fedavgm_two_rounds_by_hand():
    # Prepare: eta = 0.5, beta = 0.9; global 1.0; the clients' means 0.0 then 0.5
    s = FedAvgM(FedAvgMParams(server_lr=0.5, server_momentum=0.9))
    g0 = [np.array([1.0], np.float32)]
    state = s.init_state(g0)
    np.testing.assert_array_equal(state.arrays["momentum"][0], [0.0])
    # Round 1: d = 1 - 0 = 1; v = 0.9 * 0 + 1 = 1; w = 1 - 0.5 * 1 = 0.5
    g1, state = s.server_update(1, g0, Combined([np.array([0.0], np.float32)], 1, 1), state)
    np.testing.assert_allclose(g1[0], [0.5])
    np.testing.assert_allclose(state.arrays["momentum"][0], [1.0])
    # Round 2: d = 0.5 - 0.5 = 0; v = 0.9 * 1 + 0 = 0.9; w = 0.5 - 0.5 * 0.9 = 0.05
    g2, state = s.server_update(2, g1, Combined([np.array([0.5], np.float32)], 1, 1), state)
    np.testing.assert_allclose(g2[0], [0.05], rtol=1e-6)
    np.testing.assert_allclose(state.arrays["momentum"][0], [0.9], rtol=1e-6)
    assert g2[0].dtype == np.float32


def test_fedavgm_without_momentum_and_unit_step_is_fedavg():
    w0 = [np.array([1.0, 2.0], np.float32)]
    replies = [Reply(0, [np.array([3.0, 4.0], np.float32)], 1),
               Reply(1, [np.array([5.0, 8.0], np.float32)], 3)]
    m = FedAvgM(FedAvgMParams(server_lr=1.0, server_momentum=0.0))
    out, _ = m.server_update(1, w0, m.combine(1, replies), m.init_state(w0))
    np.testing.assert_allclose(out[0], [(3 + 15) / 4, (4 + 24) / 4])


def test_combine_weights_extra_arrays_like_the_adapter():
    replies = [Reply(0, [np.zeros(1, np.float32)], 1, extra={"c": [np.array([2.0])]}),
               Reply(1, [np.ones(1, np.float32)], 3, extra={"c": [np.array([6.0])]})]
    c = combine_weighted(replies)
    assert (c.num_examples, c.num_replies) == (4, 2)
    np.testing.assert_allclose(c.arrays[0], [0.75])
    np.testing.assert_allclose(c.extra["c"][0], [(2 + 18) / 4])


def test_build_strategy_takes_its_keys_from_the_strategy_table():
    from fedit.config import STRATEGY_NAMES, load_config

    assert set(STRATEGY_NAMES) == set(STRATEGIES)  # the config's list and the registry agree
    cfg = load_config(None, ["strategy.name=fedavgm", "strategy.server_lr=0.3",
                             "strategy.fraction=0.5", "seed=7"])
    s = strategy_from_config(cfg)
    assert isinstance(s, FedAvgM)
    assert (s.params.server_lr, s.params.server_momentum, s.params.fraction, s.params.seed) == \
        (0.3, 0.9, 0.5, 7)
    assert s.describe()["name"] == "fedavgm"


def test_secure_aggregation_policy_is_checked_before_the_run():
    from fedit.algorithms.setup import check_compatible as check_secure_policy
    from fedit.config import load_config
    from fedit.errors import ConfigError

    cfg = load_config(None, ["flower.secure_aggregation=true", "strategy.max_update_norm=5"])
    with pytest.raises(ConfigError, match="strategy.max_update_norm cannot be checked under "
                                          "SecAgg"):
        check_secure_policy(cfg, FedAvg())

    class NeedsEachReply(FedAvg):
        name = "krum-like"
        secure_aggregation = False

    cfg = load_config(None, ["flower.secure_aggregation=true"])
    with pytest.raises(ConfigError, match="strategy.name = krum-like needs each client's reply"):
        check_secure_policy(cfg, NeedsEachReply())
    check_secure_policy(cfg, FedAvgM())  # the mean is all FedAvgM needs


def test_old_flower_keys_point_to_their_new_place():
    from fedit.config import load_config
    from fedit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'flower.min_replies'; did you mean "
                                          "'strategy.min_replies'"):
        load_config(None, ["flower.min_replies=2"])


def test_fedit_strategies_prints_the_dataclasses_defaults_and_help():
    """Every ``key = default`` ``fedit strategies`` prints is the field's own default (a
    strategy's parameters under its name, the config's dataclasses elsewhere), and each
    listed key's help is printed beside it: the listing cannot drift."""
    import ast
    import dataclasses
    import re

    from fedit.algorithms.catalog import RULE_KEYS, catalog_lines
    from fedit.config import (
        AGGREGATOR_NAMES,
        CompressConfig,
        LoraConfig,
        PrivacyConfig,
        StrategyConfig,
    )

    def default(cls, name):
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    sections = {"strategy": StrategyConfig, "privacy": PrivacyConfig,
                "compress": CompressConfig, "lora": LoraConfig}
    text = "\n".join(catalog_lines())
    seen, params = set(), None
    for line in text.splitlines():
        first = line.split()[0] if line.strip() else ""
        if line.startswith("  ") and not line.startswith("   ") and first in STRATEGIES:
            params = STRATEGIES[first][1]  # the keys on the next line are its own
        elif not line.startswith(" "):
            params = None  # a new group: the config's dataclasses
        for prefix, key, value in re.findall(r"\b(\w+)\.(\w+) = ('[^']*'|\[[^]]*\]|[^\s,;]+)",
                                             line):
            cls = params if (params is not None and prefix == "strategy") else sections[prefix]
            assert ast.literal_eval(value) == default(cls, key), (line, key)
            seen.add((prefix, key))
    for prefix in ("privacy", "compress"):  # every key of these tables, with its help
        for f in dataclasses.fields(sections[prefix]):
            assert (prefix, f.name) in seen
            assert " ".join(f.metadata["help"].split()) in " ".join(text.split())
    assert {("lora", "client_ranks"), ("lora", "freeze_a"), ("strategy", "krum_m")} <= seen
    assert set(RULE_KEYS) == set(AGGREGATOR_NAMES) - {"mean"}
    for f in dataclasses.fields(StrategyConfig):
        if f.name not in ("name", "aggregator", "params"):  # the others are listed with help
            assert " ".join(f.metadata["help"].split()) in " ".join(text.split()), f.name
