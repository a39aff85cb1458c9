"""The checks every reply passes before it is combined, the same in both runtimes, and
the record of a client dropped from its round."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedit.algorithms import payload as P
from fedit.algorithms.strategies import Reply


class BadReply(ValueError):
    """A reply that cannot be combined; the message says why, in one line."""


@dataclass
class Dropped:
    """A sampled client whose reply is not used this round, and why (one line)."""

    client: int
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"client": self.client, "reason": self.reason}


def check_arrays(arrays: list[np.ndarray], global_arrays: list[np.ndarray]) -> float:
    """The L2 distance of ``arrays`` to the global adapter; BadReply unless they match its
    count, shapes and dtypes and hold only finite values."""
    if len(arrays) != len(global_arrays):
        raise BadReply(f"{len(arrays)} arrays, expected {len(global_arrays)}")
    sq = 0.0
    for i, (a, g) in enumerate(zip(arrays, global_arrays, strict=True)):
        if a.shape != g.shape or a.dtype != g.dtype:
            raise BadReply(f"array {i} is {a.dtype}{list(a.shape)}, "
                           f"expected {g.dtype}{list(g.shape)}")
        if not np.isfinite(a).all():
            raise BadReply(f"array {i} has non-finite values")
        sq += float(np.sum((a.astype(np.float64) - g) ** 2))
    return sq ** 0.5


def check_reply(
    reply: Reply, global_arrays: list[np.ndarray], max_update_norm: float = 0.0
) -> float:
    """The reply's update norm (L2 distance to the global adapter); BadReply unless it can
    be combined: arrays as :func:`check_arrays` wants, finite extra arrays, a finite train
    loss, a positive example count and (``max_update_norm`` > 0) a norm within the bound."""
    if reply.num_examples <= 0:
        raise BadReply(f"num-examples must be > 0, got {reply.num_examples}")
    norm = check_arrays(reply.arrays, global_arrays)
    if max_update_norm and norm > max_update_norm:
        raise BadReply(f"update norm {norm:.4g} > strategy.max_update_norm {max_update_norm:g}")
    for name, extra in reply.extra.items():
        if not all(np.isfinite(a).all() for a in extra):
            raise BadReply(f"extra array {name!r} has non-finite values")
    if not np.isfinite(reply.metrics.get(P.TRAIN_LOSS, 0.0)):
        raise BadReply("non-finite train loss")
    return norm
