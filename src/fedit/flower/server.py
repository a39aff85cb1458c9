"""The ServerApp's round loop, on Flower's Grid, with fedit's strategies.

It is the simulation's loop (``fedit.simulation.Simulation.run``: evaluation, checkpoints,
metrics.jsonl, summary.json) with one step swapped: instead of training the sampled
clients in turn, a round sends each sampled node the global adapter and waits for the
replies at most ``flower.round_timeout`` seconds. A node that is gone, silent, or sends
an error counts as missing; a reply with wrong shapes, non-finite values or an update
norm above ``flower.max_update_norm`` is rejected; both are logged and written in the
round's metrics line. The round aggregates when at least ``flower.min_replies`` valid
replies came, and keeps the global adapter otherwise.

Clients are identified as in the simulation: a node that claims ``partition-id=K`` is
client K (so the same seed gives the same sampling and the same per-client training
seeds); nodes without one get the lowest free ids in node-id order.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedit.config import RunConfig, load_config, to_toml
from fedit.errors import FeditError
from fedit.flower import wire
from fedit.simulation import Log, Simulation, make_run_dir
from fedit.strategies import Reply
from fedit.strategies import payload as P

HELLO_TIMEOUT = 60.0  # seconds a new node has to say which client it is
POLL_SECONDS = 0.5  # between pulls for replies (Grid.send_and_receive sleeps 3 s)
TTL_MARGIN = 5.0  # a message outlives the round's wait a little: our timeout speaks first


def exchange(
    grid: Grid, messages: Sequence[Message], timeout: float
) -> list[Message | None]:
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


class FlowerServer(Simulation):
    """A federated run whose clients are Flower SuperNodes reached through ``grid``."""

    def __init__(self, grid: Grid, cfg: RunConfig, run_dir: Path, log: Log = print) -> None:
        super().__init__(cfg, run_dir, log)
        self.grid = grid
        self.config_toml = to_toml(cfg)
        self.nodes: dict[int, int] = {}  # client id -> node id
        self._fields: dict[int, dict[str, Any]] = {}  # round -> what it adds to metrics
        self._secure_mean: dict[int, list[np.ndarray]] = {}  # round -> SecAgg+ result

    # -- nodes ---------------------------------------------------------------------------
    def refresh_nodes(self) -> None:
        """Forget nodes the SuperLink no longer lists; ask new ones which client they are."""
        live = set(self.grid.get_node_ids())
        for client, node in sorted(self.nodes.items()):
            if node not in live:
                self.log(f"client {client} (node {node}) left the federation")
                del self.nodes[client]
        new = sorted(live - set(self.nodes.values()))
        if not new:
            return
        hello = [Message(RecordDict({P.CONFIG_RECORD: ConfigRecord({})}), dst_node_id=n,
                         message_type=MessageType.QUERY, group_id="hello",
                         ttl=HELLO_TIMEOUT) for n in new]
        answers = exchange(self.grid, hello, min(HELLO_TIMEOUT, self.cfg.flower.round_timeout))
        claims: list[tuple[int, int]] = []  # (node, claimed client id or -1)
        for node, answer in zip(new, answers, strict=True):
            if answer is None or answer.has_error():
                why = "no answer" if answer is None else wire.error_reason(answer)
                self.log(f"node {node} did not say which client it is ({why}); asked again "
                         "next round")
                continue
            claims.append((node, int(answer.content.config_records[P.CONFIG_RECORD]
                                     [P.PARTITION_ID])))  # type: ignore[arg-type]
        for node, client in claims:
            if client >= 0:
                if client in self.nodes:
                    self.log(f"client {client} rejoined as node {node} "
                             f"(was node {self.nodes[client]})")
                self.nodes[client] = node
        for node, client in claims:
            if client < 0:
                client = next(c for c in range(len(self.nodes) + 1) if c not in self.nodes)
                self.nodes[client] = node
        self.log(f"clients -> nodes: {dict(sorted(self.nodes.items()))}")

    def wait_for_nodes(self) -> None:
        """Wait up to ``flower.node_timeout`` s for ``partition.clients`` nodes to join."""
        f, want = self.cfg.flower, self.cfg.partition.clients
        deadline = time.monotonic() + f.node_timeout
        while True:
            self.refresh_nodes()
            if len(self.nodes) >= want or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if len(self.nodes) < f.min_replies:
            raise FeditError(f"only {len(self.nodes)} node(s) joined within flower.node_timeout"
                             f" = {f.node_timeout:g} s; flower.min_replies = {f.min_replies}")
        if len(self.nodes) < want:
            self.log(f"starting with {len(self.nodes)} of {want} nodes")

    # -- a round -------------------------------------------------------------------------
    def train_round(self, server_round: int, global_arrays: list[np.ndarray]) -> list[Reply]:
        # Sample among the clients whose nodes are connected now
        self.refresh_nodes()
        clients = self.strategy.sample(server_round, sorted(self.nodes))
        round_config = self.strategy.configure_train(server_round)
        if self.cfg.flower.secure_aggregation:
            from fedit.flower import secagg

            secure, mean, fields = secagg.secure_round(self, server_round, clients,
                                                       global_arrays, round_config)
            if mean is not None:
                self._secure_mean[server_round] = mean
            self._fields[server_round] = fields
            return secure  # type: ignore[no-any-return]
        # Send each sampled node the global adapter; wait at most round_timeout
        f = self.cfg.flower
        messages = [
            Message(wire.train_content(global_arrays, server_round, c, self.config_toml,
                                       round_config),
                    dst_node_id=self.nodes[c], message_type=MessageType.TRAIN,
                    group_id=str(server_round), ttl=f.round_timeout + TTL_MARGIN)
            for c in clients
        ]
        answers = exchange(self.grid, messages, f.round_timeout)
        # Keep the replies that pass the checks; log and record the others
        replies: list[Reply] = []
        missing: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        bytes_up = 0
        for client, answer in zip(clients, answers, strict=True):
            if answer is None:
                missing.append({"client": client, "reason": f"no reply in {f.round_timeout:g} s"})
                continue
            try:
                reply = wire.decode_reply(answer, client)
                bytes_up += sum(a.nbytes for a in reply.arrays)
                reply.metrics["update-norm"] = wire.check_reply(reply, global_arrays,
                                                                f.max_update_norm)
            except wire.BadReply as e:
                bad = missing if answer.has_error() else rejected
                bad.append({"client": client, "reason": str(e)})
                continue
            replies.append(reply)
        for kind, items in (("missing", missing), ("rejected", rejected)):
            for item in items:
                self.log(f"round {server_round}: client {item['client']} {kind}: "
                         f"{item['reason']}")
        aggregated = len(replies) >= f.min_replies
        if not aggregated:
            self.log(f"round {server_round}: {len(replies)} valid replies < flower.min_replies "
                     f"= {f.min_replies}: the global adapter is kept")
        self._fields[server_round] = {
            "sampled": clients,
            "missing": [m["client"] for m in missing],
            "missing_reasons": missing,
            "rejected": rejected,
            "aggregated": aggregated,
            "bytes_up": bytes_up,
            "bytes_down": sum(a.nbytes for a in global_arrays) * len(clients),
            "update_norms": {str(r.client): r.metrics["update-norm"] for r in replies},
        }
        return replies if aggregated else []

    def aggregate(
        self, server_round: int, global_arrays: list[np.ndarray], replies: list[Reply]
    ) -> list[np.ndarray]:
        if self.cfg.flower.secure_aggregation:  # the server only ever saw the weighted mean
            return self._secure_mean.pop(server_round, global_arrays)
        return super().aggregate(server_round, global_arrays, replies)

    def round_fields(self, server_round: int) -> dict[str, Any]:
        return self._fields.pop(server_round, {})

    def run(self) -> dict[str, Any]:
        self.wait_for_nodes()
        return super().run()


def server_main(grid: Grid, context: Context, log: Log = print) -> dict[str, Any]:
    """What the ServerApp runs: the run config names the fedit config file (``config``) and
    optional overrides (``set``: "key=value key=value", like ``fedit train --set``)."""
    run_config = dict(context.run_config)
    if not run_config.get("config"):
        raise FeditError("flwr run: set the fedit config file, e.g. "
                         "-c 'config=\"/abs/path/run.toml\"'")
    path = Path(str(run_config["config"]))
    cfg = load_config(path, shlex.split(str(run_config.get("set", ""))))
    cfg = dataclasses.replace(cfg)
    run_dir = make_run_dir(cfg, path.stem)
    log(f"run folder {run_dir}")
    summary = FlowerServer(grid, cfg, run_dir, log).run()
    log(f"final adapter: {summary['final_adapter']}")
    return summary
