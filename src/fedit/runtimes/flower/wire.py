"""What crosses the wire, as Flower records, and the exchange of messages on the Grid.

Only adapter arrays (float32, in ``fedit.model.adapter.adapter_names`` order), a few numbers and
the run config travel; the base model and the data never do. Flower 1.42 splits every
array into chunks of at most 5 MiB (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``) on its own, so a
large adapter stays below the transport's message limit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedit.algorithms import payload as P
from fedit.algorithms.strategies import Instruction, Reply
from fedit.federation.replies import BadReply

EXTRA_PREFIX = "x:"  # record name prefix of a strategy's named arrays (instruction, reply)
#: metrics a train reply must carry, as numbers
REPLY_METRICS = (P.NUM_EXAMPLES, P.TRAIN_LOSS, P.STEPS, P.TOKENS, P.SECONDS)


def arrays_to_record(arrays: list[np.ndarray]) -> ArrayRecord:
    """An ArrayRecord keyed "0", "1", ... in the adapter's order."""
    return ArrayRecord([np.ascontiguousarray(a) for a in arrays])


def record_to_arrays(record: ArrayRecord) -> list[np.ndarray]:
    """The arrays of an ArrayRecord made by :func:`arrays_to_record`, in order."""
    return [record[str(i)].numpy() for i in range(len(record))]


def train_content(
    global_arrays: list[np.ndarray], server_round: int, client: int, config_toml: str,
    instruction: Instruction,
) -> RecordDict:
    """A train message: the global adapter and one client's instruction for the round
    (its config values, and its named arrays as records ``x:<name>``)."""
    config: dict[str, Any] = {P.SERVER_ROUND: server_round, P.CLIENT: client,
                              P.RUN_CONFIG: config_toml}
    content = RecordDict({
        P.ARRAYS: arrays_to_record(global_arrays),
        P.CONFIG_RECORD: ConfigRecord({**instruction.config, **config}),
    })
    for name, arrays in instruction.arrays.items():
        content[EXTRA_PREFIX + name] = arrays_to_record(arrays)
    return content


def named_arrays(content: RecordDict) -> dict[str, list[np.ndarray]]:
    """The ``x:<name>`` array records of a message, by name."""
    return {key[len(EXTRA_PREFIX):]: record_to_arrays(rec)
            for key, rec in content.array_records.items() if key.startswith(EXTRA_PREFIX)}


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's payload as serialised: its arrays' data and its strings."""
    n = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in content.config_records.values():
        for v in rec.values():
            items = v if isinstance(v, list) else [v]
            n += sum(len(x) for x in items if isinstance(x, bytes | str))
    return n


POLL_SECONDS = 0.5  # between pulls for replies (Grid.send_and_receive sleeps 3 s)


def exchange(grid: Grid, messages: Sequence[Message], timeout: float) -> list[Message | None]:
    """Send ``messages``; their replies, in order, None where none came within ``timeout``.

    Returns early when every message has a reply; a node the SuperLink declares gone
    (no heartbeat for ~60 s) gets an error reply, so a dead node costs at most that.
    """
    ids = list(grid.push_messages(messages))
    replies: dict[str, Message] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(ids):
        pending = [i for i in ids if i not in replies]
        for reply in grid.pull_messages(pending):
            replies[reply.metadata.reply_to_message_id] = reply
        if len(replies) == len(ids) or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    return [replies.get(i) for i in ids]


def reply_content(reply: Reply) -> RecordDict:
    """A train reply: the client's adapter and its numbers (examples first: FedAvg's weight)."""
    metrics: dict[str, int | float] = {P.NUM_EXAMPLES: int(reply.num_examples)}
    metrics |= {k: float(v) for k, v in reply.metrics.items()}
    content = RecordDict({
        P.ARRAYS: arrays_to_record(reply.arrays),
        P.METRICS_RECORD: MetricRecord(metrics),  # type: ignore[arg-type]
    })
    for name, arrays in reply.extra.items():
        content[EXTRA_PREFIX + name] = arrays_to_record(arrays)
    return content


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
        extra = named_arrays(content)
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
    return Reply(client, arrays, num_examples, numbers, extra)
