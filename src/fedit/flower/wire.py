"""What crosses the wire, as Flower records, and the checks a reply passes before averaging.

Only adapter arrays (float32, in ``fedit.model.adapter_names`` order), a few numbers and
the run config travel; the base model and the data never do. Flower 1.42 splits every
array into chunks of at most 5 MiB (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``) on its own, so a
large adapter stays below the transport's message limit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedit.strategies import Reply
from fedit.strategies import payload as P

#: metrics a train reply must carry, as numbers
REPLY_METRICS = (P.NUM_EXAMPLES, P.TRAIN_LOSS, P.STEPS, P.TOKENS, P.SECONDS)


class BadReply(ValueError):
    """A reply that cannot be averaged; the message says why, in one line."""


def arrays_to_record(arrays: list[np.ndarray]) -> ArrayRecord:
    """An ArrayRecord keyed "0", "1", ... in the adapter's order."""
    return ArrayRecord([np.ascontiguousarray(a) for a in arrays])


def record_to_arrays(record: ArrayRecord) -> list[np.ndarray]:
    """The arrays of an ArrayRecord made by :func:`arrays_to_record`, in order."""
    return [record[str(i)].numpy() for i in range(len(record))]


def train_content(
    global_arrays: list[np.ndarray], server_round: int, client: int, config_toml: str,
    round_config: dict[str, Any],
) -> RecordDict:
    """A train message: the global adapter, and the round's config for one client."""
    config: dict[str, Any] = {P.SERVER_ROUND: server_round, P.CLIENT: client,
                              P.RUN_CONFIG: config_toml}
    return RecordDict({
        P.ARRAYS: arrays_to_record(global_arrays),
        P.CONFIG_RECORD: ConfigRecord({**round_config, **config}),
    })


def reply_content(reply: Reply) -> RecordDict:
    """A train reply: the client's adapter and its numbers (examples first: FedAvg's weight)."""
    metrics: dict[str, int | float] = {P.NUM_EXAMPLES: int(reply.num_examples)}
    metrics |= {k: float(v) for k, v in reply.metrics.items()}
    return RecordDict({
        P.ARRAYS: arrays_to_record(reply.arrays),
        P.METRICS_RECORD: MetricRecord(metrics),  # type: ignore[arg-type]
    })


def error_reason(message: Message) -> str:
    """One line saying why an error reply failed."""
    reason = message.error.reason or f"error code {message.error.code}"
    return reason.strip().splitlines()[-1][:200] if reason.strip() else reason


def decode_reply(message: Message, client: int) -> Reply:
    """The Reply inside a train reply; BadReply when it is an error or malformed."""
    if message.has_error():
        raise BadReply(f"error reply: {error_reason(message)}")
    content = message.content
    try:
        arrays = record_to_arrays(content.array_records[P.ARRAYS])
        metrics = content.metric_records[P.METRICS_RECORD]
    except (KeyError, ValueError, TypeError) as e:
        raise BadReply(f"malformed reply: {type(e).__name__} {e}") from None
    missing = [k for k in REPLY_METRICS if k not in metrics]
    if missing:
        raise BadReply(f"malformed reply: no metric {missing[0]!r}")
    num_examples = metrics[P.NUM_EXAMPLES]
    if not isinstance(num_examples, int) or num_examples <= 0:
        raise BadReply(f"num-examples must be a positive integer, got {num_examples!r}")
    numbers = {k: float(v) for k, v in metrics.items()  # type: ignore[arg-type]
               if k != P.NUM_EXAMPLES and isinstance(v, int | float)}
    return Reply(client, arrays, num_examples, numbers)


def check_reply(
    reply: Reply, global_arrays: list[np.ndarray], max_update_norm: float = 0.0
) -> float:
    """The L2 distance of ``reply`` to the global adapter; BadReply unless it can be averaged.

    Its arrays must match the global adapter's count, shapes and dtype, hold only finite
    values, and (when ``max_update_norm`` > 0) lie within that distance of it; its train
    loss must be finite.
    """
    if len(reply.arrays) != len(global_arrays):
        raise BadReply(f"{len(reply.arrays)} arrays, expected {len(global_arrays)}")
    sq = 0.0
    for i, (a, g) in enumerate(zip(reply.arrays, global_arrays, strict=True)):
        if a.shape != g.shape or a.dtype != g.dtype:
            raise BadReply(f"array {i} is {a.dtype}{list(a.shape)}, "
                           f"expected {g.dtype}{list(g.shape)}")
        if not np.isfinite(a).all():
            raise BadReply(f"array {i} has non-finite values")
        sq += float(np.sum((a.astype(np.float64) - g) ** 2))
    norm = sq ** 0.5
    if max_update_norm and norm > max_update_norm:
        raise BadReply(f"update norm {norm:.4g} > flower.max_update_norm {max_update_norm:g}")
    if not np.isfinite(reply.metrics.get(P.TRAIN_LOSS, 0.0)):
        raise BadReply("non-finite train loss")
    return norm
