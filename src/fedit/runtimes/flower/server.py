"""The Flower runtime: a round's instructions go to SuperNodes over the Grid.

The round loop is :class:`fedit.federation.loop.RoundLoop`, the same as in-process; this runtime
only sends each sampled node the global adapter and its instruction and waits for the
replies at most ``flower.round_timeout`` seconds. A node that is gone, silent, or sends an
error is dropped from the round with a reason (the loop writes it in the metrics line).
Under SecAgg+ (``flower.secure_aggregation``) the round goes through
:mod:`fedit.runtimes.flower.secagg` and the loop only learns the masked mean.

Clients are identified as in-process: a node that claims ``partition-id=K`` is client K
(so the same seed gives the same sampling and the same per-client training seeds); nodes
without one get the lowest free ids in node-id order. A client's state stays on its node;
the server only records the round of each client's newest committed state
(``state-round``), so a resumed run asks every node for the state it had then.

No held-out prompt is trained on: every train instruction carries the prompt hashes of the
held-out rows (``held-out-prompts``; sha256 of the normalised prompt, never a prompt), and
each node drops its own matching rows and reports how many (``held-out-duplicates``).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedit.algorithms import payload as P
from fedit.algorithms.contract import Instruction, Reply
from fedit.algorithms.pipeline import start_of
from fedit.client.load import load_model
from fedit.config import RunConfig, load_config, to_toml
from fedit.config.schema import is_strategy_ref
from fedit.data.federated import FederatedData
from fedit.errors import ConfigError, FeditError
from fedit.federation import checkpoint as ckpt
from fedit.federation.loop import Log, RoundLoop, RoundResult
from fedit.federation.replies import BadReply, Dropped
from fedit.federation.rundir import new_run, resumed_run
from fedit.federation.setup import ModelSide, prepare_run
from fedit.runtimes.flower import secagg, wire
from fedit.runtimes.model_side import model_side

HELLO_TIMEOUT = 60.0  # seconds a new node has to say which client it is
TTL_MARGIN = 5.0  # a message outlives the round's wait a little: our timeout speaks first


class FlowerRuntime:
    """The clients are Flower SuperNodes reached through ``grid``."""

    def __init__(self, grid: Grid, cfg: RunConfig, log: Log = print,
                 held_out: set[str] | None = None) -> None:
        """``held_out``: the prompt hashes of the run's held-out rows, sent to every node."""
        self.grid, self.cfg, self.log = grid, cfg, log
        self.held_out = " ".join(sorted(held_out or ()))
        self.config_toml = to_toml(cfg)
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.state_rounds: dict[int, int] = {}  # client -> round of its newest state
        self.refused: dict[int, str] = {}  # node id -> why it cannot take part

    # -- nodes ---------------------------------------------------------------------------
    def refresh_nodes(self) -> None:
        """Forget nodes the SuperLink no longer lists; ask new ones which client they are
        (and, for a user's strategy, whether they can import it: a node that cannot is
        refused, with its one-line reason, and not asked again)."""
        live = set(self.grid.get_node_ids())
        for client, node in sorted(self.nodes.items()):
            if node not in live:
                self.log(f"client {client} (node {node}) left the federation")
                del self.nodes[client]
        new = sorted(live - set(self.nodes.values()) - set(self.refused))
        if not new:
            return
        ask = {P.STRATEGY: self.cfg.strategy.name} if is_strategy_ref(
            self.cfg.strategy.name) else {}
        hello = [Message(RecordDict({P.CONFIG_RECORD: ConfigRecord(dict(ask))}), dst_node_id=n,
                         message_type=MessageType.QUERY, group_id="hello",
                         ttl=HELLO_TIMEOUT) for n in new]
        answers = wire.exchange(self.grid, hello, min(HELLO_TIMEOUT, self.cfg.flower.round_timeout))
        claims: list[tuple[int, int]] = []  # (node, claimed client id or -1)
        for node, answer in zip(new, answers, strict=True):
            if answer is None or answer.has_error():
                why = "no answer" if answer is None else wire.error_reason(answer)
                self.log(f"node {node} did not say which client it is ({why}); asked again "
                         "next round")
                continue
            said = answer.content.config_records[P.CONFIG_RECORD]
            if P.REFUSED in said:
                self.refused[node] = str(said[P.REFUSED])
                self.log(f"node {node} refused: {self.refused[node]}")
                continue
            claims.append((node, int(said[P.PARTITION_ID])))  # type: ignore[arg-type]
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
        """Wait up to ``flower.node_timeout`` s for ``partition.clients`` nodes to join (or
        be refused)."""
        f, want = self.cfg.flower, self.cfg.partition.clients
        deadline = time.monotonic() + f.node_timeout
        while True:
            self.refresh_nodes()
            if len(self.nodes) + len(self.refused) >= want or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        need = self.cfg.strategy.min_replies
        if len(self.nodes) < need:
            why = "".join(f"; node {n} refused: {r}" for n, r in sorted(self.refused.items()))
            raise FeditError(f"only {len(self.nodes)} node(s) joined within flower.node_timeout"
                             f" = {f.node_timeout:g} s; strategy.min_replies = {need}{why}")
        if len(self.nodes) < want:
            self.log(f"starting with {len(self.nodes)} of {want} nodes")

    def start(self) -> None:
        self.wait_for_nodes()

    def available(self) -> list[int]:
        # Sample among the clients whose nodes are connected now
        self.refresh_nodes()
        return sorted(self.nodes)

    def train(self, server_round: int, global_arrays: list[np.ndarray],
              instructions: dict[int, Instruction], secure: bool) -> RoundResult:
        for c, instruction in instructions.items():
            instruction.config[P.STATE_ROUND] = self.state_rounds.get(c, 0)
            instruction.config[P.HELD_OUT] = self.held_out
        if secure:
            result = secagg.secure_round(self.grid, self.nodes, self.cfg, self.config_toml,
                                         server_round, global_arrays, instructions)
        else:
            result = self._exchange(server_round, global_arrays, instructions)
        for r in result.replies:
            if r.metrics.get(P.STATE_SAVED):
                self.state_rounds[r.client] = server_round
        return result

    def _exchange(self, server_round: int, global_arrays: list[np.ndarray],
                  instructions: dict[int, Instruction]) -> RoundResult:
        # Send each sampled node the global adapter and its instruction
        f = self.cfg.flower
        clients = sorted(instructions)
        messages = [
            Message(wire.train_content(start_of(instructions[c], global_arrays), server_round, c,
                                       self.config_toml, instructions[c]),
                    dst_node_id=self.nodes[c], message_type=MessageType.TRAIN,
                    group_id=str(server_round), ttl=f.round_timeout + TTL_MARGIN)
            for c in clients
        ]
        down = sum(wire.content_bytes(m.content) for m in messages)
        answers = wire.exchange(self.grid, messages, f.round_timeout)
        # Decode what came back; the loop checks the replies
        replies: list[Reply] = []
        dropped: list[Dropped] = []
        up = 0
        for client, answer in zip(clients, answers, strict=True):
            if answer is None:
                dropped.append(Dropped(client, f"no reply in {f.round_timeout:g} s"))
                continue
            try:
                if answer.has_content():
                    up += wire.content_bytes(answer.content)
                replies.append(wire.decode_reply(answer, client))
            except BadReply as e:
                dropped.append(Dropped(client, str(e)))
        return RoundResult(replies, dropped, bytes_up=up, bytes_down=down)

    def client_states(self) -> dict[int, ckpt.Blob]:
        return {c: ckpt.Blob(f"{ckpt.ON_NODE}{r}", "") for c, r in self.state_rounds.items()}

    def restore_client_states(self, refs: dict[int, ckpt.Blob]) -> None:
        self.state_rounds = {c: int(b.path.removeprefix(ckpt.ON_NODE)) for c, b in refs.items()}


def server_main(grid: Grid, context: Context, log: Log = print) -> dict[str, Any]:
    """What the ServerApp runs: the run config names the fedit config file (``config``),
    optional overrides (``set``: "key=value key=value", like ``fedit train --set``) and
    ``resume`` (a run folder: continue it after its last committed round)."""
    run_config = dict(context.run_config)
    resume = str(run_config.get("resume", "") or "")
    if resume:
        run_dir = Path(resume)
        cfg = resumed_run(run_dir, option="resume=")
    else:
        if not run_config.get("config"):
            raise FeditError("flwr run: set the fedit config file, e.g. "
                             "-c 'config=\"/abs/path/run.toml\"'")
        path = Path(str(run_config["config"]))
        cfg, run_dir = new_run(load_config(path, shlex.split(str(run_config.get("set", "")))),
                               path.stem)
    if cfg.personalize.method == "finetune":
        raise ConfigError("personalize.method = finetune trains after the last round in the "
                         "simulation only; under Flower use ditto (each node keeps its "
                         "personal adapter in its state-dir)")

    def build_model(cfg: RunConfig, data: FederatedData, run_dir: Path) -> ModelSide:
        log(f"run folder {run_dir}")
        tokenizer, model = load_model(cfg)  # the server evaluates the global adapter
        return model_side(cfg, tokenizer, model, data.test_rows, run_dir, log, fused=False)

    run = prepare_run(cfg, run_dir, build_model, log)
    runtime = FlowerRuntime(grid, run.cfg, log, held_out=run.data.held_out_hashes())
    loop = RoundLoop(run, runtime, log)
    summary = loop.run(resume=bool(resume))
    log(f"final adapter: {summary['final_adapter']}")
    return summary
