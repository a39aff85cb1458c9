"""Codecs for a client's upload: what crosses the wire instead of its float32 adapter.

Client side ``payload, residual = codec.encode(start, trained, residual)``; the payload's
arrays are what the runtime sends (their bytes are what ``bytes_up`` counts); server side
``codec.decode(payload, start)`` gives back float32 arrays shaped like ``start`` (the
adapter the client started the round from, which the server has too).

- ``none``: the trained weights as they are.
- ``delta``: ``trained - start`` in float32, the basis of the lossy ones (decode adds the
  start back; lossless up to float32 rounding).
- ``fp16`` / ``bf16``: the delta cast (bf16: round to nearest even on the float32 bits,
  stored as uint16 since numpy has no bfloat16): relative error <= 2^-11 / 2^-8.
- ``int8``: per row (a 2-D array's rows; a 1-D array is one row) symmetric quantisation:
  ``scale = max|x| / 127`` (float32, extra ``codec.scale``), ``q = round(x / scale)``;
  error <= scale / 2 per element.
- ``topk``: the ``ceil(fraction * size)`` largest-|x| entries of each array of
  ``delta + residual`` (flat int32 indices in ``codec.index``, float32 values); with error
  feedback (Stich et al. 2018, https://arxiv.org/abs/1809.07599) what was not sent is the
  next round's residual, kept in the client's state.

Only ``none`` runs under SecAgg+, which sums masked, quantised vectors itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Arrays = list[np.ndarray]


@dataclass
class Payload:
    """What travels: the main arrays (any dtype) and side arrays named ``codec.*``."""

    arrays: Arrays
    extra: dict[str, Arrays] = field(default_factory=dict)


def payload_bytes(p: Payload) -> int:
    """Bytes of every array in the payload."""
    return int(sum(a.nbytes for a in p.arrays) + sum(a.nbytes for v in p.extra.values()
                                                     for a in v))


def _delta(start: Arrays, trained: Arrays) -> list[np.ndarray]:
    if len(start) != len(trained):
        raise ValueError(f"{len(trained)} arrays for a start of {len(start)}")
    return [t.astype(np.float32) - s.astype(np.float32) for s, t in zip(start, trained,
                                                                      strict=True)]


def _shapes_ok(arrays: Arrays, start: Arrays) -> None:
    if len(arrays) != len(start):
        raise ValueError(f"{len(arrays)} arrays, expected {len(start)}")


class Codec:
    """The identity (``none``); subclasses encode the delta."""

    name = "none"
    secure_reason = ""

    def encode(self, start: Arrays, trained: Arrays, residual: Arrays | None
               ) -> tuple[Payload, Arrays | None]:
        return Payload([np.asarray(t, np.float32) for t in trained]), None

    def decode(self, payload: Payload, start: Arrays) -> Arrays:
        _shapes_ok(payload.arrays, start)
        return [np.asarray(a, np.float32).reshape(s.shape) for a, s in zip(payload.arrays, start,
                                                                          strict=True)]


class DeltaCodec(Codec):
    name = "delta"
    secure_reason = ("SecAgg+ already sends a quantised, masked vector; the server would "
                     "have to add the start back to a mean it cannot check")

    def encode(self, start: Arrays, trained: Arrays, residual: Arrays | None
               ) -> tuple[Payload, Arrays | None]:
        return Payload(self._pack(_delta(start, trained))), None

    def decode(self, payload: Payload, start: Arrays) -> Arrays:
        _shapes_ok(payload.arrays, start)
        return [(s.astype(np.float32) + self._unpack(a).reshape(s.shape)).astype(np.float32)
                for a, s in zip(payload.arrays, start, strict=True)]

    def _pack(self, delta: Arrays) -> Arrays:
        return delta

    def _unpack(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32)


class Fp16Codec(DeltaCodec):
    name = "fp16"
    secure_reason = "SecAgg+ quantises the update itself; a cast first only adds error"

    def _pack(self, delta: Arrays) -> Arrays:
        return [d.astype(np.float16) for d in delta]


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even (NaN kept NaN)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32."""
    return (np.asarray(b, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


class Bf16Codec(DeltaCodec):
    name = "bf16"
    secure_reason = Fp16Codec.secure_reason

    def _pack(self, delta: Arrays) -> Arrays:
        return [to_bf16_bits(d) for d in delta]

    def _unpack(self, a: np.ndarray) -> np.ndarray:
        return from_bf16_bits(a)


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(1, -1) if x.ndim < 2 else x.reshape(x.shape[0], -1)


class Int8Codec(Codec):
    name = "int8"
    secure_reason = "SecAgg+ quantises the update itself; per-row scales cannot be summed masked"

    def encode(self, start: Arrays, trained: Arrays, residual: Arrays | None
               ) -> tuple[Payload, Arrays | None]:
        codes, scales = [], []
        for d in _delta(start, trained):
            rows = _rows(d)
            scale = (np.abs(rows).max(axis=1) / 127.0).astype(np.float32)
            safe = np.where(scale > 0, scale, 1.0)[:, None]
            codes.append(np.clip(np.rint(rows / safe), -127, 127).astype(np.int8))
            scales.append(scale)
        return Payload(codes, {"codec.scale": scales}), None

    def decode(self, payload: Payload, start: Arrays) -> Arrays:
        _shapes_ok(payload.arrays, start)
        scales = payload.extra["codec.scale"]
        _shapes_ok(scales, start)
        return [(s.astype(np.float32) + (q.astype(np.float32) * sc[:, None]).reshape(s.shape)
                 ).astype(np.float32)
                for q, sc, s in zip(payload.arrays, scales, start, strict=True)]


class TopKCodec(Codec):
    name = "topk"
    secure_reason = ("each client's kept indices differ, so masked sums of sparse uploads "
                     "neither add up nor hide which entries a client sent")

    def __init__(self, fraction: float = 0.01, error_feedback: bool = True) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"compress.topk_fraction must be in (0, 1], got {fraction}")
        self.fraction, self.error_feedback = fraction, error_feedback

    def encode(self, start: Arrays, trained: Arrays, residual: Arrays | None
               ) -> tuple[Payload, Arrays | None]:
        delta = _delta(start, trained)
        if residual is not None and self.error_feedback:
            delta = [d + r.astype(np.float32).reshape(d.shape)
                     for d, r in zip(delta, residual, strict=True)]
        values, indices, left = [], [], []
        for d in delta:
            flat = d.ravel()
            k = max(1, math.ceil(self.fraction * flat.size))
            # stable order: by |x| descending, ties by index, so a run is reproducible
            idx = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k]).astype(np.int32)
            values.append(flat[idx].astype(np.float32))
            indices.append(idx)
            rest = flat.copy()
            rest[idx] = 0.0
            left.append(rest.reshape(d.shape))
        return (Payload(values, {"codec.index": indices}),
                left if self.error_feedback else None)

    def decode(self, payload: Payload, start: Arrays) -> Arrays:
        _shapes_ok(payload.arrays, start)
        indices = payload.extra["codec.index"]
        _shapes_ok(indices, start)
        out = []
        for v, i, s in zip(payload.arrays, indices, start, strict=True):
            flat = s.astype(np.float32).ravel().copy()
            if i.size and (i.min() < 0 or i.max() >= flat.size):
                raise ValueError(f"top-k index out of range for an array of {flat.size}")
            flat[i.astype(np.int64)] += v.astype(np.float32)
            out.append(flat.reshape(s.shape))
        return out


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Codec, DeltaCodec, Fp16Codec, Bf16Codec,
                                                      Int8Codec, TopKCodec)}


def make_codec(name: str, topk_fraction: float = 0.01, error_feedback: bool = True) -> Codec:
    """The codec ``name`` (``compress.method``)."""
    if name not in CODECS:
        raise ValueError(f"compress.method = {name!r}: use one of {', '.join(CODECS)}")
    if name == "topk":
        return TopKCodec(topk_fraction, error_feedback)
    return CODECS[name]()
