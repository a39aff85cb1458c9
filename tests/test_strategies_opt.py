"""FedAdagrad / FedAdam / FedYogi, FedProx and SCAFFOLD: each rule against numbers worked
by hand, hypothesis properties of the server step, the trainer hooks with autograd, and a
2-round run on the tiny model that resumes exactly after a crash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedit.algorithms.strategies import (
    ClientState,
    FedAdagrad,
    FedAdam,
    FedOptParams,
    FedProx,
    FedProxParams,
    FedYogi,
    Instruction,
    Reply,
    Scaffold,
    ScaffoldParams,
    TrainInfo,
    build_strategy,
    strategy_from_config,
)
from fedit.algorithms.strategies.fedprox import PROXIMAL_MU


def f32(*values):
    return np.array(values, np.float32)


# -- FedOpt: Algorithm 2 of Reddi et al., two rounds by hand --------------------------------
# eta = 0.1, beta1 = 0.5, beta2 = 0.75, tau = 0.5; global x0 = [1, 0]; m starts 0, v tau^2
# Round 1: clients [2, 1] (1 example) and [4, -3] (3): mean = [(2 + 12) / 4, (1 - 9) / 4]
#   = [3.5, -2], d1 = [2.5, -2], d1^2 = [6.25, 4]; m1 = 0.5 * d1 = [1.25, -1]
# Round 2: clients x1 + [1, 0] (1) and x1 + [-1, 2] (3): d2 = [(1 - 3) / 4, 6 / 4]
#   = [-0.5, 1.5], d2^2 = [0.25, 2.25]; m2 = 0.5 * m1 + 0.5 * d2 = [0.375, 0.25]
V_BY_HAND = {
    # v1 = 0.25 + d1^2; v2 = v1 + d2^2
    FedAdagrad: ([6.5, 4.25], [6.75, 6.5]),
    # v1 = 0.75 * 0.25 + 0.25 * d1^2 = [0.1875 + 1.5625, 0.1875 + 1]
    # v2 = 0.75 * v1 + 0.25 * d2^2 = [1.3125 + 0.0625, 0.890625 + 0.5625]
    FedAdam: ([1.75, 1.1875], [1.375, 1.453125]),
    # v1 = 0.25 - 0.25 * d1^2 * sign(0.25 - d1^2) = 0.25 + 0.25 * d1^2 (both signs -1)
    # v2: sign(v1 - d2^2) = sign([1.5625, -1]) = [+1, -1]
    #   = [1.8125 - 0.25 * 0.25, 1.25 + 0.25 * 2.25]
    FedYogi: ([1.8125, 1.25], [1.75, 1.8125]),
}


@pytest.mark.parametrize("cls", [FedAdagrad, FedAdam, FedYogi])
def test_fedopt_two_rounds_by_hand(cls):
    # Prepare
    v1, v2 = (np.array(v) for v in V_BY_HAND[cls])
    s = cls(FedOptParams(server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.5))
    x0 = [f32(1.0, 0.0)]
    state = s.init_state(x0)
    np.testing.assert_array_equal(state.arrays["m"][0], [0.0, 0.0])
    np.testing.assert_array_equal(state.arrays["v"][0], [0.25, 0.25])  # tau^2
    # Execute: round 1
    replies = [Reply(0, [f32(2.0, 1.0)], 1), Reply(1, [f32(4.0, -3.0)], 3)]
    x1, state = s.server_update(1, x0, s.combine(1, replies), state)
    # Assert: x1 = x0 + eta * m1 / (sqrt(v1) + tau)
    m1 = np.array([1.25, -1.0])
    expect_x1 = np.array([1.0, 0.0]) + 0.1 * m1 / (np.sqrt(v1) + 0.5)
    np.testing.assert_allclose(x1[0], expect_x1, rtol=1e-6)
    np.testing.assert_allclose(state.arrays["m"][0], m1)
    np.testing.assert_allclose(state.arrays["v"][0], v1)
    # Execute: round 2, from the state of round 1
    replies = [Reply(0, [x1[0] + f32(1.0, 0.0)], 1), Reply(1, [x1[0] + f32(-1.0, 2.0)], 3)]
    x2, state = s.server_update(2, x1, s.combine(2, replies), state)
    # Assert
    m2 = np.array([0.375, 0.25])
    np.testing.assert_allclose(x2[0], expect_x1 + 0.1 * m2 / (np.sqrt(v2) + 0.5), rtol=1e-5)
    np.testing.assert_allclose(state.arrays["m"][0], m2, rtol=1e-5)
    np.testing.assert_allclose(state.arrays["v"][0], v2, rtol=1e-5)
    assert x2[0].dtype == state.arrays["m"][0].dtype == state.arrays["v"][0].dtype == np.float32


def test_fedopt_params_are_checked():
    with pytest.raises(ValueError, match="beta1 must be in"):
        FedOptParams(beta1=1.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        FedOptParams(tau=0.0)
    with pytest.raises(ValueError, match="server_lr must be > 0"):
        FedOptParams(server_lr=-1.0)


# -- FedProx -----------------------------------------------------------------------------------
def test_fedprox_sends_mu_and_the_client_reads_it_from_the_instruction():
    s = FedProx(FedProxParams(mu=0.3))
    instruction = s.configure(1, 0, [f32(0.0)], s.init_state([f32(0.0)]))
    assert instruction.config == {PROXIMAL_MU: 0.3}
    client_side = FedProx()  # a node's own default mu is not what it trains with
    assert client_side.train_hook(instruction, ClientState()).mu == 0.3
    assert client_side.train_hook(Instruction({PROXIMAL_MU: 0.0}), ClientState()) is None


def test_fedprox_term_is_zero_at_the_start_and_its_gradient_is_mu_times_the_drift():
    # Prepare: two adapter tensors; the hook's first call sees the start weights
    mu = 0.2
    params = [torch.tensor([1.0, 2.0], requires_grad=True),
              torch.tensor([[3.0]], requires_grad=True)]
    hook = FedProx(FedProxParams(mu=mu)).train_hook(Instruction({PROXIMAL_MU: mu}),
                                                     ClientState())
    assert float(hook.loss(params).detach()) == 0.0
    # Execute: the weights move by [0.5, -1] and [[2]]
    with torch.no_grad():
        params[0] += torch.tensor([0.5, -1.0])
        params[1] += torch.tensor([[2.0]])
    loss = hook.loss(params)
    loss.backward()
    # Assert: mu / 2 * (0.25 + 1 + 4); gradient mu * (w - w_start)
    assert float(loss.detach()) == pytest.approx(mu / 2 * 5.25)
    np.testing.assert_allclose(params[0].grad.numpy(), [mu * 0.5, mu * -1.0], rtol=1e-6)
    np.testing.assert_allclose(params[1].grad.numpy(), [[mu * 2.0]], rtol=1e-6)


# -- SCAFFOLD ----------------------------------------------------------------------------------
def test_scaffold_server_two_rounds_by_hand():
    # Prepare: eta_g = 0.5, N = 4 clients; x0 = [0, 2], c0 = 0
    s = Scaffold(ScaffoldParams(server_lr=0.5, num_clients=4))
    x0 = [f32(0.0, 2.0)]
    state = s.init_state(x0)
    np.testing.assert_array_equal(s.configure(1, 0, x0, state).arrays["c"][0], [0.0, 0.0])
    # Round 1: adapters [2, 2] (1 example) and [4, 6] (3); c_delta [1, 0] and [3, -2]
    replies = [Reply(0, [f32(2.0, 2.0)], 1, extra={"c_delta": [f32(1.0, 0.0)]}),
               Reply(1, [f32(4.0, 6.0)], 3, extra={"c_delta": [f32(3.0, -2.0)]})]
    combined = s.combine(1, replies)
    # adapters example-weighted: [(2 + 12) / 4, (2 + 18) / 4]; c_delta plain: [4 / 2, -2 / 2]
    np.testing.assert_allclose(combined.arrays[0], [3.5, 5.0])
    np.testing.assert_allclose(combined.extra["c_delta"][0], [2.0, -1.0])
    x1, state = s.server_update(1, x0, combined, state)
    # x1 = x0 + 0.5 * ([3.5, 5] - x0) = [1.75, 3.5]; c1 = 0 + 2 / 4 * [2, -1]
    np.testing.assert_allclose(x1[0], [1.75, 3.5])
    np.testing.assert_allclose(state.arrays["c"][0], [1.0, -0.5])
    np.testing.assert_allclose(s.configure(2, 3, x1, state).arrays["c"][0], [1.0, -0.5])
    # Round 2: one client, [2.75, 2.5] (5 examples), c_delta [4, 4]
    replies = [Reply(2, [f32(2.75, 2.5)], 5, extra={"c_delta": [f32(4.0, 4.0)]})]
    x2, state = s.server_update(2, x1, s.combine(2, replies), state)
    # x2 = x1 + 0.5 * ([2.75, 2.5] - x1) = [2.25, 3]; c2 = c1 + 1 / 4 * [4, 4]
    np.testing.assert_allclose(x2[0], [2.25, 3.0])
    np.testing.assert_allclose(state.arrays["c"][0], [2.0, 0.5])


def test_scaffold_without_num_clients_moves_c_by_the_full_mean():
    s = Scaffold()
    replies = [Reply(0, [f32(1.0)], 1, extra={"c_delta": [f32(2.0)]}),
               Reply(1, [f32(1.0)], 9, extra={"c_delta": [f32(4.0)]})]
    _, state = s.server_update(1, [f32(0.0)], s.combine(1, replies), s.init_state([f32(0.0)]))
    np.testing.assert_allclose(state.arrays["c"][0], [3.0])  # |S| / N = 1: (2 + 4) / 2


def test_scaffold_refuses_a_reply_without_c_delta():
    replies = [Reply(0, [f32(1.0)], 1, extra={"c_delta": [f32(2.0)]}), Reply(5, [f32(1.0)], 1)]
    with pytest.raises(ValueError, match="client 5 sent no c_delta"):
        Scaffold().combine(1, replies)


def test_scaffold_hook_shifts_each_gradient_by_c_minus_c_i():
    # Prepare: c = [1, -2] and [[0.25]]; c_i = [0.5, 0.5] and [[1]]
    instruction = Instruction(arrays={"c": [f32(1.0, -2.0), np.array([[0.25]], np.float32)]})
    state = ClientState(arrays={"c_i": [f32(0.5, 0.5), np.array([[1.0]], np.float32)]})
    params = [torch.zeros(2, requires_grad=True), torch.zeros(1, 1, requires_grad=True)]
    params[0].grad, params[1].grad = torch.tensor([1.0, 1.0]), torch.tensor([[2.0]])
    # Execute
    Scaffold().train_hook(instruction, state).correct(params)
    # Assert: grad + (c - c_i) = [1 + 0.5, 1 - 2.5], [[2 - 0.75]]
    np.testing.assert_allclose(params[0].grad.numpy(), [1.5, -1.5])
    np.testing.assert_allclose(params[1].grad.numpy(), [[1.25]])
    # No c_i yet (a client's first round): the shift is c itself
    params[0].grad = torch.zeros(2)
    Scaffold().train_hook(instruction, ClientState()).correct(params)
    np.testing.assert_allclose(params[0].grad.numpy(), [1.0, -2.0])


def test_scaffold_after_train_option_ii_by_hand():
    # Prepare: c = [1, -2], c_i = [0.5, 0.5]; x = [1, 1] trained to y = [0.6, 1.1] in two
    # steps of lr 0.1 (lr_sum = K * eta_l = 0.2)
    s = Scaffold()
    instruction = Instruction(arrays={"c": [f32(1.0, -2.0)]})
    state = ClientState(arrays={"c_i": [f32(0.5, 0.5)]})
    # Execute
    extra = s.after_train(instruction, state, [f32(1.0, 1.0)], [f32(0.6, 1.1)],
                          TrainInfo(steps=2, lr_sum=0.2))
    # Assert: (x - y) / 0.2 = [2, -0.5]; c_i+ = [0.5 - 1 + 2, 0.5 + 2 - 0.5] = [1.5, 2]
    np.testing.assert_allclose(state.arrays["c_i"][0], [1.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(extra["c_delta"][0], [1.0, 1.5], rtol=1e-6)  # c_i+ - c_i
    assert state.arrays["c_i"][0].dtype == extra["c_delta"][0].dtype == np.float32
    # No step taken: c_i stays, the delta is 0
    extra = s.after_train(instruction, state, [f32(1.0, 1.0)], [f32(1.0, 1.0)],
                          TrainInfo(steps=0, lr_sum=0.0))
    np.testing.assert_allclose(state.arrays["c_i"][0], [1.5, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(extra["c_delta"][0], [0.0, 0.0])


# -- properties of the server step ------------------------------------------------------------
NEW = ["fedadagrad", "fedadam", "fedyogi", "fedprox", "scaffold"]
_values = st.floats(-10, 10, allow_nan=False, width=32)
_array = hnp.arrays(np.float32, (3,), elements=_values)


@st.composite
def rounds_of_replies(draw):
    """A global adapter and 2-4 replies (adapter, c_delta, example count)."""
    k = draw(st.integers(2, 4))
    replies = [Reply(i, [draw(_array)], draw(st.integers(1, 20)),
                     extra={"c_delta": [draw(_array)]}) for i in range(k)]
    return [draw(_array)], replies


def _server(name, global_arrays, replies, rounds=2):
    """``rounds`` rounds with the same replies: combine and step, from the initial state."""
    s = build_strategy(name, {"num_clients": 6})
    state = s.init_state(global_arrays)
    for rnd in range(1, rounds + 1):
        global_arrays, state = s.server_update(rnd, global_arrays, s.combine(rnd, replies),
                                               state)
    return global_arrays, state


def _assert_same(a, b):
    (xa, sa), (xb, sb) = a, b
    np.testing.assert_allclose(xa[0], xb[0], rtol=1e-5, atol=1e-5)
    for key in sa.arrays:
        np.testing.assert_allclose(sa.arrays[key][0], sb.arrays[key][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NEW)
@settings(max_examples=25, deadline=None)
@given(data=rounds_of_replies(), order=st.randoms(use_true_random=False))
def test_the_order_of_the_replies_changes_nothing(name, data, order):
    global_arrays, replies = data
    shuffled = list(replies)
    order.shuffle(shuffled)
    _assert_same(_server(name, global_arrays, replies), _server(name, global_arrays, shuffled))


@pytest.mark.parametrize("name", NEW)
@settings(max_examples=25, deadline=None)
@given(data=rounds_of_replies(), factor=st.integers(2, 50))
def test_weights_scaled_by_a_common_factor_change_nothing(name, data, factor):
    global_arrays, replies = data
    scaled = [Reply(r.client, r.arrays, r.num_examples * factor, extra=r.extra) for r in replies]
    _assert_same(_server(name, global_arrays, replies), _server(name, global_arrays, scaled))


@pytest.mark.parametrize("name", ["fedprox", "scaffold"])
@settings(max_examples=25, deadline=None)
@given(start=_array, adapter=_array, counts=st.lists(st.integers(1, 20), min_size=1,
                                                     max_size=4))
def test_identical_clients_give_back_their_adapter(name, start, adapter, counts):
    replies = [Reply(i, [adapter.copy()], n, extra={"c_delta": [np.zeros(3, np.float32)]})
               for i, n in enumerate(counts)]
    out, _ = _server(name, [start], replies, rounds=1)
    np.testing.assert_allclose(out[0], adapter, rtol=1e-6, atol=1e-6)


# -- config ------------------------------------------------------------------------------------
def test_config_keys_reach_each_strategy_and_server_lr_not_set_keeps_its_default():
    from fedit.config import load_config

    cases = [("fedadam", [], {"server_lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
             ("fedyogi", ["strategy.server_lr=0.05", "strategy.beta2=0.9", "strategy.tau=0.01"],
              {"server_lr": 0.05, "beta2": 0.9, "tau": 0.01}),
             ("fedprox", ["strategy.mu=0.5"], {"mu": 0.5}),
             ("scaffold", [], {"server_lr": 1.0, "num_clients": 0}),
             ("fedavgm", [], {"server_lr": 1.0})]
    for name, sets, expected in cases:
        s = strategy_from_config(load_config(None, [f"strategy.name={name}", *sets]))
        assert s.name == name
        assert {k: getattr(s.params, k) for k in expected} == expected


@pytest.mark.parametrize(("name", "default"), [("fedavgm", 1.0), ("fedadam", 1e-2),
                                               ("scaffold", 1.0)])
def test_an_old_server_lr_0_still_means_the_default_with_a_notice(name, default, tmp_path,
                                                                    caplog, monkeypatch):
    from fedit.config import load_config, schema, to_toml

    monkeypatch.setattr(schema, "_NOTICED", set())
    old = tmp_path / "old.toml"  # a config (or a run's config.toml) from before: 0 = not set
    old.write_text(f'[strategy]\nname = "{name}"\nserver_lr = 0.0\n')
    with caplog.at_level("WARNING", logger="fedit.config.schema"):
        cfg = load_config(old, ["strategy.fraction=0.5"])  # the file is checked twice
    notices = [r.getMessage() for r in caplog.records]
    assert notices == ["fedit config: strategy.server_lr = 0 is read as not set (the "
                       "strategy's own default); leave the key out instead"]
    assert cfg.strategy.server_lr is None
    assert strategy_from_config(cfg).params.server_lr == default
    again = tmp_path / "config.toml"
    again.write_text(to_toml(cfg))
    assert "server_lr" not in again.read_text()  # not set: left out, and loads back the same
    assert load_config(again) == cfg


def test_server_lr_0_is_never_a_step_of_0():
    from fedit.algorithms.strategies import FedAvgMParams
    from fedit.errors import ConfigError

    # the config reads an old 0 as not set; anything else that passes 0 is refused
    with pytest.raises(ConfigError, match="strategy \\(fedavgm\\): server_lr must be > 0"):
        build_strategy("fedavgm", {"server_lr": 0.0})
    assert build_strategy("fedavgm", {"server_lr": None}).params.server_lr == 1.0
    for cls in (FedAvgMParams, FedOptParams, ScaffoldParams):
        with pytest.raises(ValueError, match="server_lr must be > 0"):
            cls(server_lr=0.0)


def test_fedavgm_and_scaffold_params_are_checked():
    from fedit.algorithms.strategies import FedAvgMParams

    for kwargs, msg in [({"server_lr": -1.0}, "server_lr must be > 0"),
                        ({"server_lr": float("nan")}, "server_lr must be > 0"),
                        ({"server_momentum": 1.0}, r"server_momentum must be in \[0, 1\)"),
                        ({"server_momentum": -0.1}, r"server_momentum must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=msg):
            FedAvgMParams(**kwargs)
    FedAvgMParams(server_momentum=0.0)  # 0 is FedAvg
    with pytest.raises(ValueError, match="server_lr must be > 0"):
        ScaffoldParams(server_lr=-0.5)
    with pytest.raises(ValueError, match="num_clients must be >= 0"):
        ScaffoldParams(num_clients=-1)


def test_config_refuses_bad_values_of_the_new_keys():
    from fedit.config import load_config
    from fedit.errors import ConfigError

    for key, value, msg in [("beta1", "1.0", "must be in"), ("beta2", "-0.1", "must be in"),
                            ("tau", "0", "must be > 0"), ("mu", "-1", "must be >= 0"),
                            ("server_lr", "-0.1", "must be > 0"),
                            ("server_lr", "fast", "expected float")]:
        with pytest.raises(ConfigError, match=f"strategy.{key}: {msg}"):
            load_config(None, [f"strategy.{key}={value}"])


def test_new_strategies_are_not_combined_with_secure_aggregation_when_they_cannot_be():
    assert not Scaffold.secure_aggregation
    assert FedAdam.secure_aggregation and FedProx.secure_aggregation


# -- end to end on the tiny model --------------------------------------------------------------
class Killed(BaseException):
    """Stands for a SIGKILL right after round 1 was committed."""


def _kill_after_round_1(point, rnd):
    if (point, rnd) == ("after-manifest", 1):
        raise Killed


def _saved_states(run_dir):
    """The last committed round's server state and client states."""
    from fedit.algorithms.strategies import ServerState
    from fedit.federation import checkpoint as ckpt

    m = ckpt.latest_manifest(run_dir, log=lambda x: None)
    clients = {c: ckpt.read_state(run_dir, b, ClientState).arrays
               for c, b in m.client_states.items()}
    return ckpt.read_state(run_dir, m.strategy_state, ServerState).arrays, clients


def _assert_same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name, sets", [
    ("fedadam", []), ("fedprox", []), ("scaffold", []),
    # the pieces around a strategy keep state too: DP's adaptive clip norm and rounds
    # spent (server), top-k's error-feedback residual (clients)
    ("fedavg", ["privacy.mode=central", "privacy.adaptive=true", "privacy.count_stddev=1",
                "privacy.clip=0.01"]),
    ("fedavgm", ["compress.method=topk"]),
])
def test_two_rounds_resume_to_the_same_bytes(name, sets, tmp_path, tiny_model_dir,
                                             monkeypatch):
    from fedit.config import load_config
    from fedit.federation import checkpoint as ckpt
    from fedit.runtimes.inprocess import resume_federated, run_federated
    from tests.conftest import make_rows, write_config, write_jsonl

    # Prepare
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(48, seed=3))
    path = write_config(tmp_path / "run.toml", tiny_model_dir, data, seed=4,
                        strategy={"name": name, "fraction": 1.0}, train={"max_steps": 2})
    runs = tmp_path / "runs"
    # Execute: straight, then crashed after round 1 and resumed
    whole = run_federated(load_config(path, ["name=whole", *sets]), log=lambda m: None)
    with monkeypatch.context() as mp:
        mp.setattr(ckpt, "fault_point", _kill_after_round_1)
        with pytest.raises(Killed):
            run_federated(load_config(path, ["name=crashed", *sets]), log=lambda m: None)
    resumed = resume_federated(runs / "crashed", log=lambda m: None)
    # Assert: the strategy named; the same final adapter bytes, server and client states
    assert whole["strategy"]["name"] == resumed["strategy"]["name"] == name
    final = "final/adapter/adapter_model.safetensors"
    assert (runs / "crashed" / final).read_bytes() == (runs / "whole" / final).read_bytes()
    (server_a, clients_a), (server_b, clients_b) = (_saved_states(runs / "crashed"),
                                                    _saved_states(runs / "whole"))
    _assert_same_arrays(server_a, server_b)
    assert clients_a.keys() == clients_b.keys()
    for c in clients_a:
        _assert_same_arrays(clients_a[c], clients_b[c])
    lines = [[{k: v for k, v in json.loads(x).items() if k != "seconds"}
              for x in (runs / r / "metrics.jsonl").read_text().splitlines()]
             for r in ("crashed", "whole")]
    assert lines[0] == lines[1]  # epsilon, clip norm, bytes: the same numbers
    if sets and sets[0].startswith("privacy"):  # the clip norm moved and was carried over
        assert lines[0][1]["dp_clip"] != lines[0][2]["dp_clip"]
        assert 0 < lines[0][1]["epsilon"] < lines[0][2]["epsilon"]
    if sets and sets[0].startswith("compress"):
        assert all(any(r.any() for r in s["codec.residual"]) for s in clients_a.values())
    if name == "scaffold":  # c and each c_i moved: the exactness is not trivial
        assert sorted(clients_a) == [0, 1]
        assert any(c.any() for c in server_a["c"])
        assert all(any(c.any() for c in s["c_i"]) for s in clients_a.values())
