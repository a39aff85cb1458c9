"""Upload codecs: round trips worked by hand, error feedback over rounds, payload sizes,
bfloat16 rounding against torch, and hypothesis properties for every codec."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedit.algorithms.compress import (
    CODECS,
    Bf16Codec,
    Codec,
    DeltaCodec,
    Int8Codec,
    Payload,
    TopKCodec,
    from_bf16_bits,
    make_codec,
    payload_bytes,
    to_bf16_bits,
    topk_indices,
)


def f32(x):
    return np.array(x, np.float32)


def roundtrip(codec, start, trained, residual=None):
    payload, new_residual = codec.encode(start, trained, residual)
    return codec.decode(payload, start), payload, new_residual


# -- lossless: none and delta --------------------------------------------------------------
def test_none_sends_the_trained_weights_as_they_are():
    start, trained = [f32([1.0, 2.0]), f32([[3.0]])], [f32([1.5, -2.0]), f32([[0.25]])]
    out, payload, residual = roundtrip(make_codec("none"), start, trained)
    np.testing.assert_array_equal(payload.arrays[0], trained[0])  # the weights, not a delta
    assert payload.extra == {} and residual is None
    for o, t in zip(out, trained, strict=True):
        np.testing.assert_array_equal(o, t)
        assert o.dtype == np.float32 and o.shape == t.shape


def test_delta_sends_trained_minus_start_and_decode_adds_it_back():
    start, trained = [f32([[1.0, 2.0]])], [f32([[1.5, -2.0]])]
    out, payload, _ = roundtrip(make_codec("delta"), start, trained)
    np.testing.assert_array_equal(payload.arrays[0], [[0.5, -4.0]])
    np.testing.assert_array_equal(out[0], trained[0])
    # not exactly representable: within float32 rounding (1e-6 of the values)
    start, trained = [f32([0.1, 1e3, -7.3])], [f32([0.3, -1e-3, 2.9])]
    out, _, _ = roundtrip(DeltaCodec(), start, trained)
    np.testing.assert_allclose(out[0], trained[0], rtol=0, atol=1e-6 * 1e3)


# -- fp16 / bf16 -----------------------------------------------------------------------------
def test_fp16_and_bf16_round_the_delta_within_their_relative_error():
    start = [np.zeros(5, np.float32)]
    trained = [f32([1.0, 1 + 2**-12, 1 + 2**-9, -3.14159, 1e-3])]
    out16, p16, _ = roundtrip(make_codec("fp16"), start, trained)
    outbf, pbf, _ = roundtrip(make_codec("bf16"), start, trained)
    assert p16.arrays[0].dtype == np.float16 and pbf.arrays[0].dtype == np.uint16
    # 1 + 2^-12 is half an fp16 ulp above 1: ties to even gives 1; 1 + 2^-9 is kept by fp16
    np.testing.assert_array_equal(out16[0][:3], [1.0, 1.0, 1 + 2**-9])
    np.testing.assert_array_equal(outbf[0][:3], [1.0, 1.0, 1.0])  # bf16's ulp at 1 is 2^-7
    d = np.abs(trained[0])
    assert (np.abs(out16[0] - trained[0]) <= 2**-11 * d).all()
    assert (np.abs(outbf[0] - trained[0]) <= 2**-8 * d).all()


def test_bf16_rounding_matches_torch_bit_for_bit():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    # exact ties (low half 0x8000) with even and odd kept parts, overflow to inf, infinities
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F8000, 0x7F7FFFFF,
                     0x00008000, 0x00018000, 0x7F800000, 0xFF800000, 0], np.uint32)
    x = np.concatenate([bits, ties]).view(np.float32)
    ours = to_bf16_bits(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs.view(np.uint16)[~nan])
    assert np.isnan(from_bf16_bits(ours[nan])).all()  # NaN stays NaN (0x7FC0)
    # and back: the bits are the high half of a float32
    np.testing.assert_array_equal(from_bf16_bits(ours[~nan]),
                                  torch.from_numpy(theirs).view(torch.bfloat16).float()
                                  .numpy()[~nan])


# -- int8 --------------------------------------------------------------------------------------
def test_int8_by_hand_on_a_2x3_delta():
    # Prepare: row 0 has max |x| = 127, so scale = 1; row 1 is zeros
    start = [f32([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])]
    delta = f32([[127.0, -63.5, 2.25], [0.0, 0.0, 0.0]])
    # Execute
    out, payload, residual = roundtrip(Int8Codec(), start, [start[0] + delta])
    # Assert: codes round half to even (-63.5 -> -64); a zero row has scale 0
    np.testing.assert_array_equal(payload.arrays[0], [[127, -64, 2], [0, 0, 0]])
    assert payload.arrays[0].dtype == np.int8
    np.testing.assert_array_equal(payload.extra["codec.scale"][0], [1.0, 0.0])
    np.testing.assert_array_equal(out[0], start[0] + f32([[127, -64, 2], [0, 0, 0]]))
    assert (np.abs(out[0] - start[0] - delta) <= f32([[0.5], [0.0]])).all()  # scale / 2
    assert residual is None


def test_int8_scale_is_max_over_127_per_row_and_a_1d_array_is_one_row():
    start = [np.zeros(4, np.float32), np.zeros((2, 2), np.float32)]
    trained = [f32([0.0, -2.54, 1.0, 0.01]), f32([[0.5, -0.25], [0.0, 12.7]])]
    out, payload, _ = roundtrip(Int8Codec(), start, trained)
    s1, s2 = payload.extra["codec.scale"]
    assert s1.shape == (1,) and s2.shape == (2,) and s1.dtype == np.float32
    np.testing.assert_allclose(s1, [2.54 / 127], rtol=1e-6)
    np.testing.assert_allclose(s2, [0.5 / 127, 12.7 / 127], rtol=1e-6)
    np.testing.assert_array_equal(payload.arrays[0], [0, -127, 50, 0])  # 1 / 0.02, 0.01/0.02
    np.testing.assert_array_equal(payload.arrays[1], [[127, -64], [0, 127]])  # -63.5 -> -64
    assert (np.abs(out[0] - trained[0]) <= s1[0] / 2 * (1 + 1e-5)).all()


# -- top-k and error feedback ------------------------------------------------------------------
def test_topk_keeps_the_largest_entries_by_hand():
    # k = ceil(6 / 3) = 2: |-3| and |3| are the largest
    start = [np.zeros((2, 3), np.float32)]
    d = f32([[0.5, -3.0, 1.0], [2.0, -0.1, 3.0]])
    out, payload, residual = roundtrip(TopKCodec(fraction=1 / 3), start, [d])
    np.testing.assert_array_equal(payload.extra["codec.index"][0], [1, 5])
    assert payload.extra["codec.index"][0].dtype == np.int32
    np.testing.assert_array_equal(payload.arrays[0], [-3.0, 3.0])
    np.testing.assert_array_equal(out[0], [[0, -3, 0], [0, 0, 3]])
    np.testing.assert_array_equal(residual[0], f32([[0.5, 0, 1.0], [2.0, -0.1, 0]]))


def test_topk_breaks_ties_by_the_lower_index_and_sends_nan():
    np.testing.assert_array_equal(topk_indices(f32([1, -1, 1, 1]), 2), [0, 1])
    np.testing.assert_array_equal(topk_indices(f32([0.5, 2, -2, 2, 0.1]), 2), [1, 2])
    np.testing.assert_array_equal(topk_indices(f32([1, np.nan, 5, 2]), 2), [1, 2])
    np.testing.assert_array_equal(topk_indices(f32([1, 2]), 3), [0, 1])
    c = TopKCodec(0.01)
    assert (c.k_of(1), c.k_of(100), c.k_of(101), c.k_of(10_000)) == (1, 1, 2, 100)
    assert TopKCodec(0.07).k_of(100) == 7  # not 8 from 0.07 * 100 = 7.000000000000001


def test_error_feedback_carries_the_unsent_mass_two_rounds_by_hand():
    # Prepare: the same delta d every round, from a zero start, k = 2 of 6
    codec, start = TopKCodec(fraction=1 / 3), [np.zeros((2, 3), np.float32)]
    d = f32([[0.5, -3.0, 1.0], [2.0, -0.1, 3.0]])
    # Round 1: send -3 and 3; carry the rest
    p1, r1 = codec.encode(start, [d], None)
    np.testing.assert_array_equal(r1[0], f32([[0.5, 0, 1.0], [2.0, -0.1, 0]]))
    # Round 2: d + r1 = [[1, -3, 2], [4, -0.2, 3]]: 4 first, then the tie |-3| = |3| goes to
    # the lower index 1
    p2, r2 = codec.encode(start, [d], r1)
    np.testing.assert_array_equal(p2.extra["codec.index"][0], [1, 3])
    np.testing.assert_array_equal(p2.arrays[0], [-3.0, 4.0])
    np.testing.assert_array_equal(r2[0], f32([[1.0, 0, 2.0], [0, -0.2, 3.0]]))
    # Assert: nothing lost: sent over two rounds + residual = 2 d
    sent = codec.decode(p1, start)[0] + codec.decode(p2, start)[0]
    np.testing.assert_array_equal(sent + r2[0], 2 * d)


def test_error_feedback_sends_t_times_d_over_t_rounds_and_its_residual_stays_bounded():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(10, 20)).astype(np.float32)
    codec, start, t_rounds = TopKCodec(fraction=0.05), [np.zeros_like(d)], 200
    sent, residual = np.zeros_like(d), None
    for _ in range(t_rounds):
        acc = d + (0 if residual is None else residual[0])
        payload, residual = codec.encode(start, [d], residual)
        sent += codec.decode(payload, start)[0]
        # what stays behind is no larger than the smallest entry sent
        assert np.abs(residual[0]).max() <= np.abs(payload.arrays[0]).min()
        assert np.abs(residual[0]).max() <= np.abs(acc).max()
    np.testing.assert_allclose(sent + residual[0], t_rounds * d, rtol=1e-4, atol=1e-3)
    # the residual is bounded, so the mean sent update approaches d
    assert np.abs(residual[0]).sum() <= d.size / 10 * np.abs(d).sum()
    np.testing.assert_allclose(sent / t_rounds, d, atol=np.abs(residual[0]).max() / t_rounds
                               + 1e-4)
    assert np.abs(sent / t_rounds - d).max() < 0.2 * np.abs(d).max()


def test_without_error_feedback_the_unsent_mass_is_lost():
    codec, start = TopKCodec(fraction=1 / 3, error_feedback=False), [np.zeros(6, np.float32)]
    d = f32([0.5, -3.0, 1.0, 2.0, -0.1, 3.0])
    sent = np.zeros(6, np.float32)
    for _ in range(3):
        payload, residual = codec.encode(start, [d], [np.ones(6, np.float32)])  # ignored
        assert residual is None
        sent += codec.decode(payload, start)[0]
    np.testing.assert_array_equal(sent, [0, -9, 0, 0, 0, 9])
    lost = 3 * f32([0.5, 0, 1, 2, -0.1, 0])  # gone for good
    np.testing.assert_array_equal(3 * d - sent, lost)


# -- payload sizes -----------------------------------------------------------------------------
def test_payload_bytes_of_each_codec():
    start = [np.zeros((100, 100), np.float32), np.zeros((2, 3), np.float32)]
    trained = [np.ones((100, 100), np.float32), np.ones((2, 3), np.float32)]
    size = {name: payload_bytes(make_codec(name).encode(start, trained, None)[0])
            for name in CODECS}
    assert size["none"] == size["delta"] == 4 * (10_000 + 6)
    assert size["fp16"] == size["bf16"] == size["delta"] // 2
    # int8: one byte a code plus a float32 scale a row
    assert size["int8"] == (10_000 + 100 * 4) + (6 + 2 * 4)
    # top-k 1%: 100 of 10,000 and 1 of 6, each an int32 index + a float32 value
    assert size["topk"] == (100 + 1) * 8
    assert abs(size["topk"] / size["delta"] - 0.02) < 0.001
    assert payload_bytes(Payload([np.zeros(3, np.int8)], {"codec.x": [np.zeros(2)]})) == 19


# -- registry and decode checks ----------------------------------------------------------------
def test_registry_flags_and_secure_reasons():
    assert list(CODECS) == ["none", "delta", "fp16", "bf16", "int8", "topk"]
    assert {n for n, c in CODECS.items() if c.secure_aggregation} == {"none", "delta"}
    assert {n for n, c in CODECS.items() if c.lossless} == {"none", "delta"}
    assert all(c.secure_reason for c in CODECS.values())
    topk = make_codec("topk", topk_fraction=0.1, error_feedback=False)
    assert isinstance(topk, TopKCodec) and (topk.fraction, topk.error_feedback) == (0.1, False)
    assert make_codec("topk").error_feedback and not make_codec("int8").error_feedback
    assert make_codec("bf16", error_feedback=True).describe() == {
        "name": "bf16", "error_feedback": False}
    with pytest.raises(ValueError, match="compress.method = 'zip': use one of none, delta"):
        make_codec("zip")
    with pytest.raises(ValueError, match=r"topk_fraction must be in \(0, 1\]"):
        TopKCodec(0.0)


def test_decode_refuses_an_upload_that_does_not_fit_the_start():
    start = [np.zeros((2, 3), np.float32)]
    with pytest.raises(ValueError, match="upload has 2 arrays, expected 1"):
        Codec().decode(Payload([np.zeros(6), np.zeros(1)]), start)
    with pytest.raises(ValueError, match=r"upload array 0 has 5 entries, expected 6 \(shape"):
        DeltaCodec().decode(Payload([np.zeros(5, np.float32)]), start)
    with pytest.raises(ValueError, match="upload has 0 codec.scale arrays, expected 1"):
        Int8Codec().decode(Payload([np.zeros((2, 3), np.int8)]), start)
    with pytest.raises(ValueError, match="top-k index out of range for 6"):
        TopKCodec().decode(Payload([f32([1.0])], {"codec.index": [np.array([6], np.int32)]}),
                           start)
    with pytest.raises(ValueError, match=r"trained array 0 has shape \(3, 2\), start \(2, 3\)"):
        Bf16Codec().encode(start, [np.zeros((3, 2), np.float32)], None)


# -- properties --------------------------------------------------------------------------------
_shape = st.one_of(st.tuples(st.integers(1, 12)),
                   st.tuples(st.integers(1, 5), st.integers(1, 7)))
_value = st.floats(-100, 100, width=32, allow_subnormal=False)


@st.composite
def adapters(draw):
    """A start, a trained adapter and a residual of the same random shapes (float32)."""
    shapes = draw(st.lists(_shape, min_size=1, max_size=3))

    def arrays():
        return [draw(hnp.arrays(np.float32, s, elements=_value)) for s in shapes]

    return arrays(), arrays(), arrays()


def _bound(name, payload, start, trained, i):
    """Each codec's stated error bound for array ``i``, plus float32 rounding."""
    s, t = start[i].astype(np.float64), trained[i].astype(np.float64)
    d, rnd = t - s, 2.0**-22 * (np.abs(t) + np.abs(s)) + 1e-30
    if name == "fp16":
        return 2.0**-11 * np.abs(d) + 2.0**-25 + rnd
    if name == "bf16":
        return 2.0**-8 * np.abs(d) + rnd
    if name == "int8":
        scale = payload.extra["codec.scale"][i].astype(np.float64)
        rows = scale[:, None] if t.ndim == 2 else scale  # a 1-D array: one scale
        return np.broadcast_to(rows / 2 * (1 + 1e-5), t.shape) + rnd
    return rnd if name != "none" else 0 * rnd


@settings(max_examples=60, deadline=None)
@given(adapters(), st.sampled_from(["none", "delta", "fp16", "bf16", "int8"]))
def test_decode_of_encode_is_within_each_codecs_bound(data, name):
    start, trained, _ = data
    before = [a.copy() for a in start + trained]
    out, payload, residual = roundtrip(make_codec(name), start, trained)
    for a, b in zip(start + trained, before, strict=True):  # inputs untouched
        np.testing.assert_array_equal(a, b)
    assert residual is None
    for i, (o, t) in enumerate(zip(out, trained, strict=True)):
        assert o.dtype == np.float32 and o.shape == t.shape
        assert (np.abs(o.astype(np.float64) - t) <= _bound(name, payload, start, trained,
                                                             i)).all()


@settings(max_examples=60, deadline=None)
@given(adapters(), st.sampled_from([0.01, 0.2, 0.5, 1.0]), st.booleans())
def test_topk_sends_k_entries_and_keeps_the_rest_as_residual(data, fraction, with_residual):
    start, trained, residual = data
    residual = residual if with_residual else None
    before = [a.copy() for a in start + trained + (residual or [])]
    codec = TopKCodec(fraction)
    out, payload, new = roundtrip(codec, start, trained, residual)
    for a, b in zip(start + trained + (residual or []), before, strict=True):
        np.testing.assert_array_equal(a, b)
    for i, (o, s) in enumerate(zip(out, start, strict=True)):
        assert o.dtype == np.float32 and o.shape == s.shape and new[i].shape == s.shape
        acc = (trained[i] - s) + (0 if residual is None else residual[i])
        sent, left = o.astype(np.float64) - s, new[i].astype(np.float64)
        assert payload.arrays[i].size == codec.k_of(s.size)
        # sent + residual = delta + old residual; nothing kept back is larger than what went
        tol = 2.0**-22 * (np.abs(o) + np.abs(s)) + 1e-30
        assert (np.abs(sent + left - acc) <= tol).all()
        assert np.abs(left).max() <= np.abs(payload.arrays[i]).min()
