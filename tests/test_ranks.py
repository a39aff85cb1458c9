"""Mixed LoRA ranks (FLoRA stacking, FlexLoRA SVD, HetLoRA padding) and FFA-LoRA's frozen A:
the mathematics on hand-sized arrays, then the same adapters in the tiny PEFT model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedit.algorithms import ranks as rk
from fedit.algorithms.hooks import FreezeA
from fedit.client import fused as fz
from fedit.client.trainer import train_adapter
from fedit.config import TrainConfig
from fedit.data.batching import tokenize_rows
from fedit.model import adapter
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer
from fedit.model.lora_rank import use_rank

ALPHA = 16.0
NAMES = [f"m.layers.{i}.{p}.lora_{f}.weight" for i in range(2) for p in ("q", "v")
         for f in ("A", "B")]  # two layers x two modules, A then B: the wire order
OUT, IN = 16, 20  # sum of the ranks below (12) < min(out, in): the QR path


def _factors(rng, r, out=OUT, n_in=IN):
    return rng.normal(size=(r, n_in)), rng.normal(size=(out, r))


def _adapter(rng, r):
    return [x for _ in range(len(NAMES) // 2) for x in _factors(rng, r)]


def _deltas(arrays, r, alpha=ALPHA):
    """Each module's dense update, in pair order."""
    return [rk.delta_w(arrays[a], arrays[b], alpha, r) for a, b in rk.lora_pairs(NAMES)]


def _truncated(m, r):
    u, s, vt = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vt[:r]


# ---------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------


def test_lora_pairs_follow_the_wire_order():
    assert rk.lora_pairs(NAMES) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    swapped = ["x.lora_B.weight", "y.lora_A.weight", "x.lora_A.weight", "y.lora_B.weight"]
    assert rk.lora_pairs(swapped) == [(1, 3), (2, 0)]
    with pytest.raises(ValueError, match="m.layers.0.v.lora_A.weight is not one half"):
        rk.lora_pairs(NAMES[:3])
    with pytest.raises(ValueError, match="x.bias is not one half"):
        rk.lora_pairs(["x.bias", *NAMES])


# ---------------------------------------------------------------------------------------
# Stacking (exact) and the SVD (FlexLoRA)
# ---------------------------------------------------------------------------------------


def test_stacked_factors_are_the_weighted_mean_of_the_updates():
    # Prepare: a rank-4 client with 3 examples, a rank-8 client with 1
    rng = np.random.default_rng(0)
    (A4, B4), (A8, B8) = _factors(rng, 4), _factors(rng, 8)
    expected = 0.75 * (16 / 4) * B4 @ A4 + 0.25 * (16 / 8) * B8 @ A8
    # Execute
    A_s, B_s = rk.stack_factors([A4, A8], [B4, B8], [4, 8], [3, 1], ALPHA)
    # Assert
    assert A_s.shape == (12, IN) and B_s.shape == (OUT, 12)
    np.testing.assert_allclose(B_s @ A_s, expected, rtol=0, atol=1e-6)


def test_flexlora_is_exact_when_the_global_rank_holds_every_client():
    # Prepare
    rng = np.random.default_rng(1)
    clients = [_adapter(rng, 4), _adapter(rng, 8)]
    expected = [0.75 * d4 + 0.25 * d8
                for d4, d8 in zip(_deltas(clients[0], 4), _deltas(clients[1], 8), strict=True)]
    # Execute
    stacked = rk.exact_delta(clients, [4, 8], [3, 1], NAMES, ALPHA)
    out = rk.aggregate_ranks("flexlora", clients, [4, 8], [3, 1], NAMES, ALPHA, r_global=12)
    # Assert: float32 factors of rank 12 whose update is the exact mean
    assert all(x.dtype == np.float32 for x in out)
    assert [x.shape for x in out[:2]] == [(12, IN), (OUT, 12)]
    for (A_s, B_s), want, got in zip(stacked, expected, _deltas(out, 12), strict=True):
        np.testing.assert_allclose(B_s @ A_s, want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_flexlora_below_the_sum_of_ranks_is_the_truncated_svd_of_the_mean():
    # Prepare
    rng = np.random.default_rng(2)
    clients = [_adapter(rng, 4), _adapter(rng, 8)]
    mean = [0.75 * d4 + 0.25 * d8
            for d4, d8 in zip(_deltas(clients[0], 4), _deltas(clients[1], 8), strict=True)]
    # Execute
    out = rk.aggregate_ranks("flexlora", clients, [4, 8], [3, 1], NAMES, ALPHA, r_global=8)
    # Assert: numpy's SVD of the dense mean is the independent check
    assert [x.shape for x in out[:2]] == [(8, IN), (OUT, 8)]
    for dense, got in zip(mean, _deltas(out, 8), strict=True):
        want = _truncated(dense, 8)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert np.abs(got - dense).max() > 1e-2  # the rank-12 mean really was cut


def test_svd_factors_split_evenly_and_revive_empty_slots():
    # Prepare: a rank-2 update asked for at rank 4
    rng = np.random.default_rng(3)
    A, B = _factors(rng, 2)
    target = B @ A
    # Execute
    A4, B4 = rk.svd_factors(A, B, 4, ALPHA)
    # Assert: the product is exact; the two empty slots have B = 0 and A != 0 (trainable)
    np.testing.assert_allclose(rk.delta_w(A4, B4, ALPHA, 4), target, rtol=0,
                               atol=1e-5 * np.abs(target).max())
    assert not B4[:, 2:].any() and np.abs(A4[2:]).min() > 0
    assert np.abs(A4[2:]).max() <= 1 / np.sqrt(IN)
    np.testing.assert_allclose(np.linalg.norm(A4[:2], axis=1), np.linalg.norm(B4[:, :2], axis=0),
                               rtol=1e-5)  # balanced: sqrt(S) on each side


def test_flexlora_client_adapter_is_the_truncated_global_update():
    # Prepare
    rng = np.random.default_rng(4)
    global8 = [x.astype(np.float32) for x in _adapter(rng, 8)]
    # Execute
    out = rk.client_adapter("flexlora", global8, NAMES, 8, 4, ALPHA)
    same = rk.client_adapter("flexlora", global8, NAMES, 8, 8, ALPHA)
    # Assert
    assert [x.shape for x in out[:2]] == [(4, IN), (OUT, 4)]
    for dense, got in zip(_deltas(global8, 8), _deltas(out, 4), strict=True):
        want = _truncated(dense, 4)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert all(np.array_equal(a, b) and a is not b for a, b in zip(same, global8, strict=True))


def test_unknown_method_and_too_large_a_rank_are_refused():
    rng = np.random.default_rng(5)
    clients = [_adapter(rng, 4)]
    with pytest.raises(ValueError, match="unknown rank aggregation 'fedavg'"):
        rk.aggregate_ranks("fedavg", clients, [4], [1], NAMES, ALPHA, 8)
    with pytest.raises(ValueError, match="exceed the global rank 2"):
        rk.aggregate_ranks("flexlora", clients, [4], [1], NAMES, ALPHA, 2)
    with pytest.raises(ValueError, match="need A"):
        rk.stack_factors([clients[0][0]], [clients[0][1]], [3], [1], ALPHA)


# ---------------------------------------------------------------------------------------
# Zero padding (HetLoRA)
# ---------------------------------------------------------------------------------------


def test_hetlora_by_hand_is_not_the_exact_mean():
    # Prepare: alpha 2; a rank-1 client with 3 examples, a rank-2 client with 1
    A1, B1 = np.array([[1.0, 2.0]]), np.array([[1.0], [0.0]])
    A2, B2 = np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]])
    # Execute
    A, B = rk.pad_mean([A1, A2], [B1, B2], [1, 2], [3, 1], r_max=2, alpha=2.0)
    # Assert: B1 padded and scaled by r_max / r_1 = 2 -> [[2, 0], [0, 0]]
    np.testing.assert_allclose(A, [[1.0, 1.5], [0.0, 0.25]])  # .75 [[1,2],[0,0]] + .25 I
    np.testing.assert_allclose(B, [[1.5, 0.25], [0.25, 0.0]])  # .75 [[2,0],[0,0]] + .25 B2
    het = rk.delta_w(A, B, 2.0, 2)
    exact = 0.75 * (2 / 1) * B1 @ A1 + 0.25 * (2 / 2) * B2 @ A2  # [[1.5, 3.25], [.25, 0]]
    np.testing.assert_allclose(het, [[1.5, 2.3125], [0.25, 0.375]])
    np.testing.assert_allclose(exact, [[1.5, 3.25], [0.25, 0.0]])
    assert np.abs(het - exact).max() == pytest.approx(0.9375)


def test_hetlora_padding_keeps_a_lone_clients_update():
    # the alpha/r fix: without the r_max / r_k factor this update would shrink by r_k / r_max
    A1, B1 = np.array([[1.0, 2.0]]), np.array([[1.0], [3.0]])
    A, B = rk.pad_mean([A1], [B1], [1], [5], r_max=4, alpha=2.0)
    np.testing.assert_allclose(rk.delta_w(A, B, 2.0, 4), rk.delta_w(A1, B1, 2.0, 1))


def test_hetlora_client_takes_the_first_slots_rescaled():
    # Prepare: the global adapter of the hand example above, at rank 2
    A = np.array([[1.0, 1.5], [0.0, 0.25]])
    B = np.array([[1.5, 0.25], [0.25, 0.0]])
    names = ["l.lora_A.weight", "l.lora_B.weight"]
    # Execute
    A1, B1 = rk.client_adapter("hetlora", [A, B], names, r_global=2, r_client=1, alpha=2.0)
    # Assert: B scaled by r_client / r_global; the update is the global one's first slot
    np.testing.assert_allclose(A1, [[1.0, 1.5]])
    np.testing.assert_allclose(B1, [[0.75], [0.125]])
    np.testing.assert_allclose(rk.delta_w(A1, B1, 2.0, 1), [[1.5, 2.25], [0.25, 0.375]])
    with pytest.raises(ValueError, match="cannot truncate rank 2 to rank 3"):
        rk.truncate(A, B, 2, 3)


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------

_rank_lists = st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=4)
_methods = st.sampled_from(rk.RANK_METHODS)


def _clients(seed, ranks):
    rng = np.random.default_rng(seed)
    return [_adapter(rng, r) for r in ranks], list(rng.integers(1, 20, len(ranks)))


@settings(max_examples=25, deadline=None)
@given(_methods, _rank_lists, st.integers(0, 2**16), st.randoms(use_true_random=False))
def test_client_order_does_not_matter(method, ranks, seed, random):
    clients, weights = _clients(seed, ranks)
    order = list(range(len(ranks)))
    random.shuffle(order)
    a = rk.aggregate_ranks(method, clients, ranks, weights, NAMES, ALPHA, 4)
    b = rk.aggregate_ranks(method, [clients[i] for i in order], [ranks[i] for i in order],
                           [weights[i] for i in order], NAMES, ALPHA, 4)
    for x, y in zip(_deltas(a, 4), _deltas(b, 4), strict=True):  # SVD signs may differ
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * max(1.0, np.abs(x).max()))


@settings(max_examples=25, deadline=None)
@given(_methods, st.sampled_from([1, 2, 4]), st.integers(1, 4), st.integers(0, 2**16))
def test_identical_clients_give_back_their_update(method, r, k, seed):
    clients, weights = _clients(seed, [r])
    out = rk.aggregate_ranks(method, clients * k, [r] * k, weights * k, NAMES, ALPHA, 4)
    for want, got in zip(_deltas(clients[0], r), _deltas(out, 4), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@settings(max_examples=25, deadline=None)
@given(_methods, _rank_lists, st.integers(0, 2**16), st.sampled_from([0.5, 3.0, 1000.0]))
def test_a_common_weight_factor_changes_nothing(method, ranks, seed, factor):
    clients, weights = _clients(seed, ranks)
    a = rk.aggregate_ranks(method, clients, ranks, weights, NAMES, ALPHA, 4)
    b = rk.aggregate_ranks(method, clients, ranks, [w * factor for w in weights], NAMES,
                           ALPHA, 4)
    for x, y in zip(_deltas(a, 4), _deltas(b, 4), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * max(1.0, np.abs(x).max()))


# ---------------------------------------------------------------------------------------
# The tiny model at rank 4
# ---------------------------------------------------------------------------------------

SPEC = LoraSpec(r=8, alpha=16, dropout=0.0)
PROMPT = torch.tensor([[1, 5, 7, 9, 11, 13, 2]])


@pytest.fixture
def tiny(tiny_model_dir, tiny_rows):
    tok = load_tokenizer(str(tiny_model_dir))
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"), SPEC, seed=0)
    return model, tokenize_rows(tok, tiny_rows, cutoff_len=128), tok.pad_token_id


def _random_adapter(model, seed, scale=0.2):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, scale, a.shape).astype(np.float32)
            for a in adapter.get_adapter_arrays(model)]


def _logits(model):
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


def test_use_rank_switches_the_active_adapter(tiny, tmp_path):
    # Prepare
    model, _, _ = tiny
    names8 = adapter.adapter_names(model)
    default = _random_adapter(model, 0)
    adapter.set_adapter_arrays(model, default)
    # Execute
    use_rank(model, 4, SPEC)
    shapes4 = [a.shape for a in adapter.get_adapter_arrays(model)]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    config = adapter.save_adapter(model, tmp_path / "r4") / "adapter_config.json"
    # Assert: same names, rank-4 shapes, only rank4 trains, eval mode kept, r=4 saved
    assert adapter.adapter_names(model) == names8
    assert shapes4[:2] == [(4, 64), (64, 4)] and len(shapes4) == 16
    assert len(trainable) == 16 and all(".rank4." in n for n in trainable)
    assert not any(m.training for m in model.modules())
    assert '"r": 4' in config.read_text()
    # back at the default rank: its weights untouched, no second rank-4 adapter
    use_rank(model, 8, SPEC)
    assert model.active_adapter == "default"
    assert all(np.array_equal(a, b)
               for a, b in zip(default, adapter.get_adapter_arrays(model), strict=True))
    use_rank(model, 4, SPEC)
    assert sorted(model.peft_config) == ["default", "rank4"]


def test_a_client_adapter_gives_the_same_model_at_rank_4(tiny):
    # Prepare: a rank-4 update, written at rank 8 by padding (exact) and back to rank 4
    model, _, _ = tiny
    names = adapter.adapter_names(model)
    use_rank(model, 4, SPEC)
    own4 = _random_adapter(model, 1)
    global8 = rk.aggregate_ranks("hetlora", [own4], [4], [1], names, SPEC.alpha, 8)
    back4 = rk.client_adapter("flexlora", global8, names, 8, 4, SPEC.alpha)
    # Execute
    adapter.set_adapter_arrays(model, back4)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x)
    logits4 = _logits(model)
    use_rank(model, 8, SPEC)
    adapter.set_adapter_arrays(model, global8)
    logits8 = _logits(model)
    # Assert: base + (alpha / r) B A by hand for one layer; the same logits at either rank
    A, B = (torch.from_numpy(a) for a in back4[:2])
    by_hand = x @ layer.base_layer.weight.T + (16 / 4) * x @ A.T @ B.T
    torch.testing.assert_close(y, by_hand, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits4, logits8, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_training_at_rank_4_moves_only_the_rank_4_adapter(tiny, fused, monkeypatch):
    # Prepare: count the fused LoRA kernel's calls (it must serve the rank-4 adapter)
    model, examples, pad_id = tiny
    calls = []
    real = fz.LoraLinearFunction.apply
    monkeypatch.setattr(fz.LoraLinearFunction, "apply",
                        lambda *args: calls.append(args[3].shape) or real(*args))
    default = adapter.get_adapter_arrays(model)
    use_rank(model, 4, SPEC)
    start = adapter.get_adapter_arrays(model)
    cfg = TrainConfig(batch_size=4, micro_batch_size=4, max_steps=2, lr=1e-2, fused=fused)
    # Execute
    result = train_adapter(model, examples[:8], cfg, pad_id=pad_id)
    trained = adapter.get_adapter_arrays(model)
    # Assert
    assert result.steps == 2 and np.isfinite(result.train_loss)
    assert all(not np.array_equal(a, b) for a, b in zip(start, trained, strict=True))
    use_rank(model, 8, SPEC)
    assert all(np.array_equal(a, b)
               for a, b in zip(default, adapter.get_adapter_arrays(model), strict=True))
    assert (len(calls) > 0) == fused and all(s == (4, 64) for s in calls)


@pytest.mark.parametrize("fused", [True, False])
def test_freeze_a_keeps_a_bit_identical_and_trains_b(tiny, fused):
    # Prepare: weight decay on, so a zero gradient would still move A
    model, examples, pad_id = tiny
    names = adapter.adapter_names(model)
    adapter.set_adapter_arrays(model, _random_adapter(model, 2, scale=0.05))
    start = adapter.get_adapter_arrays(model)
    cfg = TrainConfig(batch_size=4, micro_batch_size=4, max_steps=2, lr=1e-2,
                      weight_decay=0.1, fused=fused)
    # Execute
    train_adapter(model, examples[:8], cfg, pad_id=pad_id, hook=FreezeA(names))
    trained = adapter.get_adapter_arrays(model)
    # Assert
    for (a, b) in rk.lora_pairs(names):
        assert np.array_equal(trained[a], start[a])
        assert not np.array_equal(trained[b], start[b])
    with pytest.raises(ValueError, match="FreezeA: 15 trainable tensors, expected 16"):
        FreezeA(names).correct([torch.zeros(1)] * 15)
