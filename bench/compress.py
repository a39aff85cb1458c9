"""Upload codecs: encode/decode times and payload bytes against ``delta`` on a
SmolLM2-360M-sized r=8 adapter (the numbers quoted in ``fedit.algorithms.compress``).

Run: ``.venv/bin/python bench/compress.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedit.algorithms.compress import CODECS, DeltaCodec, make_codec, payload_bytes


def main(repeats: int = 5) -> None:
    """Print encode/decode times and byte ratios on a SmolLM2-sized r=8 adapter."""
    rng = np.random.default_rng(0)
    # 30 layers x (q, k, v, o) x (A, B) at SmolLM2-360M's widths (960, k/v 320)
    shapes = [s for o in (960, 320, 320, 960) for s in ((8, 960), (o, 8))] * 30
    start = [rng.normal(0, 0.02, s).astype(np.float32) for s in shapes]
    trained = [s + rng.normal(0, 1e-3, s.shape).astype(np.float32) for s in start]
    base = payload_bytes(DeltaCodec().encode(start, trained, None)[0])
    print(f"{len(shapes)} arrays, {sum(s.size for s in start):,} floats")
    for name in CODECS:
        codec = make_codec(name)
        t0 = time.perf_counter()
        for _ in range(repeats):
            payload, _ = codec.encode(start, trained, None)
        t1 = time.perf_counter()
        for _ in range(repeats):
            codec.decode(payload, start)
        t2 = time.perf_counter()
        print(f"{name:6s} encode {(t1 - t0) / repeats * 1e3:6.1f} ms  decode "
              f"{(t2 - t1) / repeats * 1e3:6.1f} ms  bytes {payload_bytes(payload) / base:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    main(parser.parse_args().repeats)
