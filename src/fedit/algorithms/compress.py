"""Codecs for a client's upload: what crosses the wire instead of its float32 adapter.

Client side ``payload, residual = codec.encode(start, trained, residual)``; the payload's
arrays are what the runtime sends (their bytes are what ``bytes_up`` counts); server side
``codec.decode(payload, start)`` gives back float32 arrays shaped like ``start``, the
adapter the client started the round from (the server has it too). Pure numpy.

======  ==============================================  ===============================
name    what travels                                    error of ``decode`` (per entry)
======  ==============================================  ===============================
none    the trained weights, float32                    0
delta   ``d = trained - start``, float32                float32 rounding
fp16    ``d`` cast to float16                           ``<= 2^-11 |d| + 2^-25``
bf16    ``d`` rounded to bfloat16 (uint16 bits)         ``<= 2^-8 |d|`` (+ subnormals)
int8    ``round(d / scale)`` per row + float32 scales   ``<= scale / 2``
topk    ``k`` largest ``|d + residual|`` + int32 index  the unsent entries (fed back)
======  ==============================================  ===============================

``delta`` is the basis of the lossy codecs: each encodes ``trained - start`` and
``decode`` adds ``start`` back. One codec per run (no stacking of top-k and int8).

Under SecAgg+ (which sums masked, quantised vectors itself) only ``none`` and ``delta``
make sense: they are linear, so the masked mean of the uploads decodes to the mean adapter
when every client starts from the same global adapter. ``Codec.secure_reason`` says why in
one line for each codec.

Measured once (``python bench/compress.py``: 240 arrays, 1,536,000 float32, SmolLM2-360M's
q/k/v/o widths at r=8, 30 layers; 2 shared CPU cores under load), encode + decode in ms,
payload bytes as a share of ``delta``'s:
none 3.7 + 5.9 (1.00), delta 4.3 + 8.9 (1.00), fp16 18.5 + 9.5 (0.50),
bf16 7.4 + 8.6 (0.50), int8 21.7 + 8.1 (0.30), topk 0.01 28.5 + 3.1 (0.020).
int8 is 0.30, not 0.25: a B factor's rows are r = 8 wide, so each pays a 4-byte scale
per 8 one-byte codes (A's long rows come to 0.25).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

Arrays = list[np.ndarray]


@dataclass
class Payload:
    """What travels: the main arrays (any dtype) and side arrays named ``codec.*``."""

    arrays: Arrays
    extra: dict[str, Arrays] = field(default_factory=dict)


def payload_bytes(p: Payload) -> int:
    """Bytes of every array in the payload (main and side arrays)."""
    side = sum(a.nbytes for arrays in p.extra.values() for a in arrays)
    return int(sum(a.nbytes for a in p.arrays) + side)


def _check_count(arrays: Arrays, start: Arrays, what: str = "arrays") -> None:
    if len(arrays) != len(start):
        raise ValueError(f"upload has {len(arrays)} {what}, expected {len(start)}")


def _check_size(a: np.ndarray, s: np.ndarray, i: int) -> None:
    if a.size != s.size:
        raise ValueError(f"upload array {i} has {a.size} entries, expected {s.size} "
                         f"(shape {s.shape})")


def delta_of(start: Arrays, trained: Arrays) -> Arrays:
    """``trained - start`` array by array, in float32 (new arrays; inputs untouched)."""
    _check_count(trained, start)
    out = []
    for i, (s, t) in enumerate(zip(start, trained, strict=True)):
        if s.shape != t.shape:
            raise ValueError(f"trained array {i} has shape {t.shape}, start {s.shape}")
        out.append(np.asarray(t, np.float32) - np.asarray(s, np.float32))
    return out


class Codec:
    """The identity (``none``): the trained weights travel as float32, as without a codec.

    Attributes
    ----------
    name : str
        The ``compress.method`` that selects it.
    lossless : bool
        ``decode(encode(x))`` gives ``x`` back (up to float32 rounding).
    secure_aggregation : bool
        The codec still works when the server only sees the masked sum (SecAgg+).
    secure_reason : str
        One line: why it does or does not work under SecAgg+.
    error_feedback : bool
        ``encode`` returns a residual that the client keeps and passes to the next round.
    """

    name: ClassVar[str] = "none"
    lossless: ClassVar[bool] = True
    secure_aggregation: ClassVar[bool] = True
    secure_reason: ClassVar[str] = ("the plain adapter: SecAgg+ masks and sums it like any "
                                    "upload")
    error_feedback: bool = False

    def encode(self, start: Arrays, trained: Arrays, residual: Arrays | None
               ) -> tuple[Payload, Arrays | None]:
        """The payload for ``trained`` (started from ``start``) and the new residual."""
        _check_count(trained, start)
        return Payload([np.array(t, np.float32) for t in trained]), None

    def decode(self, payload: Payload, start: Arrays) -> Arrays:
        """The client's adapter, float32 and shaped like ``start``.

        Raises ValueError (one line) for an upload that does not fit ``start``."""
        _check_count(payload.arrays, start)
        out = []
        for i, (a, s) in enumerate(zip(payload.arrays, start, strict=True)):
            _check_size(a, s, i)
            out.append(np.array(a, np.float32).reshape(s.shape))
        return out

    def describe(self) -> dict[str, object]:
        """Name and settings, for logs and the run summary."""
        return {"name": self.name, "error_feedback": self.error_feedback}


class DeltaCodec(Codec):
    """``trained - start`` in float32: lossless up to float32 rounding, and the basis of the
    lossy codecs, which override ``_pack`` / ``_unpack``; ``decode`` adds ``start`` back."""

    name: ClassVar[str] = "delta"
    secure_reason: ClassVar[str] = ("linear: the masked mean of the deltas plus the common "
                                    "start is the mean adapter")

    def encode(self, start: Arrays, trained: Arrays, residual: Arrays | None
               ) -> tuple[Payload, Arrays | None]:
        return self._pack(delta_of(start, trained)), None

    def decode(self, payload: Payload, start: Arrays) -> Arrays:
        _check_count(payload.arrays, start)
        deltas = self._unpack(payload, start)
        return [np.asarray(s, np.float32) + d for s, d in zip(start, deltas, strict=True)]

    def _pack(self, delta: Arrays) -> Payload:
        """The payload of the float32 deltas."""
        return Payload(delta)

    def _unpack(self, payload: Payload, start: Arrays) -> Arrays:
        """The float32 deltas, shaped like ``start``."""
        out = []
        for i, (a, s) in enumerate(zip(payload.arrays, start, strict=True)):
            _check_size(a, s, i)
            out.append(np.asarray(a).astype(np.float32).reshape(s.shape))
        return out


class Fp16Codec(DeltaCodec):
    """The delta cast to float16: ``|err| <= 2^-11 |d|`` for ``|d| >= 2^-14``, else
    ``<= 2^-25`` (fp16 subnormals); ``|d| > 65504`` becomes inf."""

    name: ClassVar[str] = "fp16"
    lossless: ClassVar[bool] = False
    secure_aggregation: ClassVar[bool] = False
    secure_reason: ClassVar[str] = ("SecAgg+ quantises the update to integers itself; a "
                                    "float16 cast before it only adds error")

    def _pack(self, delta: Arrays) -> Payload:
        return Payload([d.astype(np.float16) for d in delta])


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits as uint16, round to nearest, ties to even (what
    ``torch.Tensor.to(torch.bfloat16)`` does); NaN becomes the quiet NaN 0x7FC0."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    # add 0x7FFF plus the lowest kept bit: carries exactly when the dropped half > 0x8000,
    # or == 0x8000 with an odd kept part (ties to even); overflow rounds to inf, as it should
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    out = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly (the bits become the high half)."""
    return (np.asarray(b, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


class Bf16Codec(DeltaCodec):
    """The delta rounded to bfloat16 (float32's range, 8 significant bits), stored as uint16
    since numpy has no bfloat16: ``|err| <= 2^-8 |d|`` (normal numbers)."""

    name: ClassVar[str] = "bf16"
    lossless: ClassVar[bool] = False
    secure_aggregation: ClassVar[bool] = False
    secure_reason: ClassVar[str] = ("SecAgg+ quantises the update to integers itself; "
                                    "bfloat16 rounding before it only adds error")

    def _pack(self, delta: Arrays) -> Payload:
        return Payload([to_bf16_bits(d) for d in delta])

    def _unpack(self, payload: Payload, start: Arrays) -> Arrays:
        out = []
        for i, (a, s) in enumerate(zip(payload.arrays, start, strict=True)):
            _check_size(a, s, i)
            out.append(from_bf16_bits(a).reshape(s.shape))
        return out


def _rows(x: np.ndarray) -> np.ndarray:
    """A 2-D view: a 2-D array's rows, or a 1-D array as one row."""
    return x.reshape(1, -1) if x.ndim < 2 else x.reshape(x.shape[0], -1)


def int8_scales(rows: np.ndarray) -> np.ndarray:
    """Per row ``max|x| / 127`` in float32, stepped up one ulp where float rounding left
    ``127 * scale < max|x|`` (so no code is clipped: matters only for subnormal rows)."""
    amax = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), np.float32)
    scale = (amax / np.float32(127)).astype(np.float32)
    low = scale * np.float32(127) < amax
    scale[low] = np.nextafter(scale[low], np.float32(np.inf))
    return scale


class Int8Codec(DeltaCodec):
    """Per-row symmetric int8: ``scale = max|row| / 127`` (float32, extra ``codec.scale``),
    ``q = round(d / scale)`` in [-127, 127]; a row of zeros has scale 0 and decodes to 0.
    ``|d - q * scale| <= scale / 2`` per entry (up to float32 rounding)."""

    name: ClassVar[str] = "int8"
    lossless: ClassVar[bool] = False
    secure_aggregation: ClassVar[bool] = False
    secure_reason: ClassVar[str] = ("each client's per-row scales differ, so masked sums of "
                                    "int8 codes do not add up to the sum of the updates")

    def _pack(self, delta: Arrays) -> Payload:
        codes, scales = [], []
        for d in delta:
            rows = _rows(d)
            scale = int8_scales(rows)
            safe = np.where(scale > 0, scale, np.float32(1))[:, None]
            q = np.clip(np.rint(rows / safe), -127, 127).astype(np.int8)
            codes.append(q.reshape(d.shape))
            scales.append(scale)
        return Payload(codes, {"codec.scale": scales})

    def _unpack(self, payload: Payload, start: Arrays) -> Arrays:
        scales = payload.extra.get("codec.scale", [])
        _check_count(scales, start, "codec.scale arrays")
        out = []
        for i, (q, sc, s) in enumerate(zip(payload.arrays, scales, start, strict=True)):
            _check_size(q, s, i)
            rows = _rows(np.asarray(q).reshape(s.shape))
            if sc.shape != (len(rows),):
                raise ValueError(f"upload array {i}: {sc.size} scales for {len(rows)} rows")
            out.append((rows.astype(np.float32) * sc.astype(np.float32)[:, None])
                       .reshape(s.shape))
        return out


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Flat indices (ascending, int32) of the ``k`` largest ``|x|``.

    Ties at the cut go to the lowest indices, as a stable sort by ``-|x|`` would keep them,
    so a run is reproducible; NaN counts as the largest, so it is sent, not hidden in the
    residual. ``np.partition`` finds the cut value in O(n); only its value is needed, since
    the entries above it and the first ties are then read off in index order."""
    a = np.abs(x.ravel())
    n = a.size
    if k >= n:
        return np.arange(n, dtype=np.int32)
    nan = np.isnan(a)
    if nan.any():
        a[nan] = np.inf
    cut = np.partition(a, n - k)[n - k]
    above = np.flatnonzero(a > cut)
    ties = np.flatnonzero(a == cut)[: k - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.int32)


class TopKCodec(DeltaCodec):
    """The ``k = max(1, ceil(fraction * size))`` largest ``|delta + residual|`` entries of
    each array: float32 values plus their flat int32 indices (extra ``codec.index``);
    ``decode`` scatters them into zeros and adds ``start``.

    With error feedback (Seide et al. 2014, "1-bit SGD"; Stich et al. 2018, "Sparsified
    SGD with memory", https://arxiv.org/abs/1809.07599) the new residual is
    ``(delta + residual) - sent``: nothing is lost, only delayed, so over T rounds the sum of
    what was sent is ``sum of deltas - residual``. Without it the residual is None and the
    unsent entries are dropped (a residual passed in is ignored).

    Parameters
    ----------
    fraction : float, default 0.01
        Share of each array's entries sent (``compress.topk_fraction``), in (0, 1].
    error_feedback : bool, default True
        Carry what was not sent into the next round (``compress.error_feedback``).
    """

    name: ClassVar[str] = "topk"
    lossless: ClassVar[bool] = False
    secure_aggregation: ClassVar[bool] = False
    secure_reason: ClassVar[str] = ("each client's kept indices differ, so masked sums of "
                                    "sparse uploads neither add up nor hide the index sets")

    def __init__(self, fraction: float = 0.01, error_feedback: bool = True) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"compress.topk_fraction must be in (0, 1], got {fraction}")
        self.fraction, self.error_feedback = fraction, error_feedback

    def k_of(self, size: int) -> int:
        """Entries sent of an array of ``size``."""
        return min(size, max(1, math.ceil(self.fraction * size - 1e-9)))

    def encode(self, start: Arrays, trained: Arrays, residual: Arrays | None
               ) -> tuple[Payload, Arrays | None]:
        acc = delta_of(start, trained)
        if self.error_feedback and residual is not None:
            _check_count(residual, start, "residual arrays")
            acc = [d + np.asarray(r, np.float32).reshape(d.shape)
                   for d, r in zip(acc, residual, strict=True)]
        values, indices, left = [], [], []
        for d in acc:
            flat = d.ravel()  # acc is ours: editing it in place is safe
            idx = topk_indices(flat, self.k_of(flat.size))
            values.append(flat[idx])
            indices.append(idx)
            flat[idx] = 0.0  # what is left is the residual
            left.append(d)
        return (Payload(values, {"codec.index": indices}),
                left if self.error_feedback else None)

    def _unpack(self, payload: Payload, start: Arrays) -> Arrays:
        indices = payload.extra.get("codec.index", [])
        _check_count(indices, start, "codec.index arrays")
        out = []
        for i, (v, idx, s) in enumerate(zip(payload.arrays, indices, start, strict=True)):
            if v.shape != idx.shape or v.ndim != 1:
                raise ValueError(f"upload array {i}: {v.shape} values for {idx.shape} indices")
            if idx.size and (idx.min() < 0 or idx.max() >= s.size):
                raise ValueError(f"upload array {i}: top-k index out of range for {s.size}")
            d = np.zeros(s.size, np.float32)
            d[idx.astype(np.int64)] = v
            out.append(d.reshape(s.shape))
        return out

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "topk_fraction": self.fraction}


CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (Codec, DeltaCodec, Fp16Codec, Bf16Codec, Int8Codec, TopKCodec)
}


def make_codec(name: str, topk_fraction: float = 0.01, error_feedback: bool = True) -> Codec:
    """The codec ``name`` (``compress.method``); ``topk_fraction`` and ``error_feedback``
    apply to ``topk`` only (the others keep no residual)."""
    if name not in CODECS:
        raise ValueError(f"compress.method = {name!r}: use one of {', '.join(CODECS)}")
    if name == "topk":
        return TopKCodec(topk_fraction, error_feedback)
    return CODECS[name]()
