"""The round loop, written once: both runtimes only move a round's messages.

Each round reads top to bottom (see docs/architecture.md)::

    clients      = strategy.sample(round, runtime.available())
    instructions = {c: strategy.configure(round, c, global, state)}
    result       = runtime.train(round, global, instructions)     # in-process | Flower Grid
    replies      = the replies that pass check_reply; the others are dropped, with a reason
    combined     = strategy.combine(replies)                     # SecAgg+: the runtime's mean
    global, state = strategy.server_update(global, combined, state)
    evaluate; checkpoint: adapter, state blobs, metrics line, manifest LAST
    loggers.round(round, line); loggers.client_steps(...)         # TensorBoard, W&B

A round is committed by its manifest (:mod:`fedit.federation.checkpoint`); ``run(resume=True)``
continues after the newest whole one and ends with the same adapter, byte for byte, as a
run never interrupted: sampling, client seeds and evaluation depend only on the config
and the round number, and everything else a round needs is in the checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedit.algorithms import payload as P
from fedit.algorithms.contract import Arrays, Combined, Instruction, Reply, ServerState
from fedit.config import to_toml
from fedit.federation import checkpoint as ckpt
from fedit.federation.loggers import RunLoggers
from fedit.federation.replies import BadReply, Dropped, check_arrays, check_reply
from fedit.federation.setup import Log, Run
from fedit.io import append_jsonl, atomic_write_json, atomic_write_text

MB = 1024**2  # FlowerTune's megabyte for its communication cost (weights_mb_*)


@dataclass
class RoundResult:
    """What a runtime brings back from a round.

    ``replies``: decoded replies (under SecAgg+ without arrays: only their numbers);
    ``dropped``: sampled clients that failed, were silent or sent something unreadable;
    ``combined``: under SecAgg+ the masked mean the server learnt, else None;
    ``bytes_up``/``bytes_down``: what crossed the wire (the serialised payloads);
    ``step_losses``: each client's optimizer-step losses (in-process; a Flower node logs
    its own)."""

    replies: list[Reply]
    dropped: list[Dropped] = field(default_factory=list)
    combined: Combined | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    step_losses: dict[int, list[float]] = field(default_factory=dict)


class Runtime(Protocol):
    """How a round's instructions reach the clients and how their replies come back."""

    def start(self) -> None:
        """Before round 1 (Flower: wait for the nodes)."""

    def available(self) -> list[int]:
        """The client ids that can be sampled now."""

    def train(self, server_round: int, global_arrays: Arrays,
              instructions: dict[int, Instruction], secure: bool) -> RoundResult:
        """Train the instructed clients; ``secure``: the server may only learn the mean."""

    def client_states(self) -> dict[int, ckpt.Blob]:
        """Where each client's state is, as of the last round (for the manifest)."""

    def restore_client_states(self, refs: dict[int, ckpt.Blob]) -> None:
        """Continue from a manifest's client states (resume)."""


# -- the loop ---------------------------------------------------------------------------------
class RoundLoop:
    """A federated run: ``run()`` returns the summary (also written to summary.json)."""

    def __init__(self, run: Run, runtime: Runtime, log: Log = print) -> None:
        self.cfg, self.run_dir, self.pipe = run.cfg, run.run_dir, run.pipeline
        self.runtime = runtime
        self.model, self.log = run.model, log
        self.evaluate = run.model.evaluate
        self.secure = self.cfg.flower.secure_aggregation
        self.weights_mb_total = 0.0  # FlowerTune's count so far (resume: the last line's)
        self.loggers = RunLoggers()  # TensorBoard, W&B: opened by run()

    def run(self, resume: bool = False) -> dict[str, Any]:
        start = time.perf_counter()
        self.runtime.start()
        manifest = ckpt.latest_manifest(self.run_dir, self.log) if resume else None
        ckpt.discard_after(self.run_dir, manifest)
        atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
        self.loggers = RunLoggers.open(self.cfg, self.run_dir, manifest)
        try:
            summary = self._rounds(manifest, start)
        except BaseException:  # Ctrl-C too: the events written so far are kept
            self.loggers.close(failed=True)
            raise
        self.loggers.close()
        return summary

    def _rounds(self, manifest: ckpt.Manifest | None, start: float) -> dict[str, Any]:
        if manifest is None:
            global_arrays, state = self._round_zero()
            first = 1
        else:
            global_arrays = ckpt.decode_state(manifest.global_arrays.read(self.run_dir))[0]["g"]
            state = ckpt.read_state(self.run_dir, manifest.strategy_state, ServerState)
            self.runtime.restore_client_states(manifest.client_states)
            first = manifest.round + 1
            self.weights_mb_total = float(manifest.metrics.get("weights_mb_total", 0.0))
            self.log(f"resumed {self.run_dir} after round {manifest.round} of {self.cfg.rounds}")
        for rnd in range(first, self.cfg.rounds + 1):
            global_arrays, state = self.round(rnd, global_arrays, state)
        return self._finish(global_arrays, time.perf_counter() - start)

    def _round_zero(self) -> tuple[Arrays, ServerState]:
        # LoRA B = 0 (exactly the base model), or the lora.init_from adapter
        global_arrays = list(self.model.initial)
        state = self.pipe.init_state(global_arrays)
        loss, by_cat = self.evaluate(global_arrays)
        if loss is None:
            self.log("no held-out rows (data.test_per_label = 0): rounds report no eval loss")
        else:
            start = "starting adapter" if self.cfg.lora.init_from else "base model"
            self.log(f"{start} held-out loss {loss:.4f} on {self.model.held_out_rows} rows")
        line = {"round": 0, "clients": [], "eval_loss": loss, "eval_loss_by_category": by_cat,
                **(self.model.eval_metrics() if loss is not None else {}),
                **self.pipe.round_metrics(state)}
        self._commit(0, global_arrays, state, line)
        return global_arrays, state

    def round(self, rnd: int, global_arrays: Arrays, state: ServerState
              ) -> tuple[Arrays, ServerState]:
        """One round, committed to disk before it returns."""
        cfg, t0 = self.cfg, time.perf_counter()
        # Sample among the clients available now; configure each
        clients = self.pipe.sample(rnd, self.runtime.available())
        instructions = {c: self.pipe.instruct(rnd, c, global_arrays, state) for c in clients}
        # Train (in-process or over the Grid)
        result = self.runtime.train(rnd, global_arrays, instructions, self.secure)
        weights = self._weights_mb(instructions, result, global_arrays)
        # Check the replies: drop what cannot be combined, with a reason
        replies, dropped, norms = self._checked(result, instructions, global_arrays)
        for d in dropped:
            self.log(f"round {rnd}: client {d.client} dropped: {d.reason}")
        # Combine and step; too few valid replies keep the global adapter
        combined, info = self._combined(rnd, result, replies, instructions, global_arrays,
                                        state)
        aggregated = combined is not None and len(replies) >= cfg.strategy.min_replies
        if aggregated:
            assert combined is not None
            global_arrays, state = self.pipe.update(rnd, global_arrays, combined, state, info)
        else:
            self.log(f"round {rnd}: {len(replies)} valid replies < strategy.min_replies = "
                     f"{cfg.strategy.min_replies}: the global adapter is kept")
            replies = []  # the line's clients, losses and examples are of what was combined
        # Evaluate when due; commit the round
        due = rnd == cfg.rounds or (cfg.eval.every and rnd % cfg.eval.every == 0)
        loss, by_cat = self.evaluate(global_arrays) if due else (None, None)
        line = {
            "round": rnd,
            "sampled": clients,
            "clients": [r.client for r in replies],
            "dropped": [d.as_dict() for d in dropped],
            "aggregated": aggregated,
            "train_loss": _mean_train_loss(replies),
            "eval_loss": loss,
            "eval_loss_by_category": by_cat,
            **(self.model.eval_metrics() if loss is not None else {}),
            "seconds": time.perf_counter() - t0,
            "lr": self.pipe.round_lr(rnd),
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            **weights,
            "num_examples": sum(r.num_examples for r in replies),
            "client_steps": [int(r.metrics.get(P.STEPS, 0)) for r in replies],
            "update_norms": norms,
            "held_out_duplicates": _held_out_duplicates(result.replies),
            **({"secure_aggregation": True} if self.secure else {}),
            **{k: v for k, v in info.items() if not k.startswith("dp_")},
            **self.pipe.round_metrics(state),
        }
        self._commit(rnd, global_arrays, state, line)
        self.loggers.client_steps(rnd, result.step_losses)
        self.log(round_message(line, cfg.rounds))
        return global_arrays, state

    def _weights_mb(self, instructions: dict[int, Instruction], result: RoundResult,
                    global_arrays: Arrays) -> dict[str, float]:
        """FlowerTune's communication cost of the round: the weight arrays sent to every
        sampled client and received from every client that replied, uncompressed, in MB of
        1024**2 bytes; ``weights_mb_total`` adds both directions of every round so far."""
        down = sum(self.pipe.weight_bytes(i, global_arrays)[0] for i in instructions.values())
        up = sum(self.pipe.weight_bytes(instructions[r.client], global_arrays)[1]
                 for r in result.replies)
        self.weights_mb_total += (down + up) / MB
        return {"weights_mb_down": down / MB, "weights_mb_up": up / MB,
                "weights_mb_total": self.weights_mb_total}

    def _checked(self, result: RoundResult, instructions: dict[int, Instruction],
                 global_arrays: Arrays) -> tuple[list[Reply], list[Dropped], dict[str, float]]:
        """Decode each upload and check it against the adapter its client started from."""
        if self.secure:  # single replies are masked: the mean is checked in _combined
            return result.replies, list(result.dropped), {}
        replies, dropped, norms = [], list(result.dropped), {}
        for reply in result.replies:
            instruction = instructions[reply.client]
            try:
                try:
                    reply = self.pipe.receive(reply, instruction, global_arrays)
                except (ValueError, KeyError, IndexError) as e:
                    raise BadReply(f"upload cannot be decoded: {e}") from None
                start = self.pipe.start_of(instruction, global_arrays)
                norms[str(reply.client)] = check_reply(reply, start,
                                                       self.cfg.strategy.max_update_norm)
            except BadReply as e:
                dropped.append(Dropped(reply.client, str(e)))
                continue
            replies.append(reply)
        return replies, sorted(dropped, key=lambda d: d.client), norms

    def _combined(self, rnd: int, result: RoundResult, replies: list[Reply],
                  instructions: dict[int, Instruction], global_arrays: Arrays,
                  state: ServerState) -> tuple[Combined | None, dict[str, Any]]:
        if not replies:
            return None, {}
        if not self.secure:
            try:
                return self.pipe.combine(rnd, replies, instructions, global_arrays, state)
            except ValueError as e:  # e.g. Krum with too few replies: the round is skipped
                self.log(f"round {rnd}: cannot aggregate: {e}")
                return None, {}
        if result.combined is None:
            return None, {}
        try:
            check_arrays(result.combined.arrays, global_arrays)
        except BadReply as e:
            self.log(f"round {rnd}: the secure mean is rejected: {e}")
            return None, {}
        return self.pipe.secure_combined(rnd, result.combined, global_arrays, state), {}

    def _commit(self, rnd: int, global_arrays: Arrays, state: ServerState,
                line: dict[str, Any]) -> None:
        """Adapter, blobs, metrics line; the manifest last. Then prune old rounds and hand
        the committed line to the loggers."""
        folder = ckpt.round_dir(self.run_dir, rnd)
        adapter = self.model.save_adapter(global_arrays, folder / "adapter")
        manifest = ckpt.Manifest(
            round=rnd,
            global_arrays=ckpt.write_blob(self.run_dir, ckpt.encode_state({"g": global_arrays},
                                                                          {})),
            strategy_state=ckpt.write_state(self.run_dir, state),
            client_states=self.runtime.client_states(),
            adapter=ckpt.Blob(str(adapter.relative_to(self.run_dir)),
                              ckpt.file_sha256(adapter)),
            metrics=line,
        )
        ckpt.fault_point("before-metrics", rnd)
        append_jsonl(self.run_dir / "metrics.jsonl", line)
        ckpt.fault_point("before-manifest", rnd)
        ckpt.write_manifest(self.run_dir, manifest)
        ckpt.fault_point("after-manifest", rnd)
        ckpt.prune(self.run_dir, self.cfg.checkpoint.keep_last)
        self.loggers.round(rnd, line)

    def _finish(self, global_arrays: Arrays, seconds: float) -> dict[str, Any]:
        lines = ckpt.read_metrics(self.run_dir)
        final = self.model.save_adapter(global_arrays, self.run_dir / "final" / "adapter").parent
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "rounds": self.cfg.rounds,
            "strategy": self.pipe.describe(),
            "objective": self.model.objective,
            "init_from": self.cfg.lora.init_from or None,  # round 0: this adapter, not the base
            "base_eval_loss": lines[0]["eval_loss"],
            "final_eval_loss": lines[-1]["eval_loss"],
            "test_rows": self.model.held_out_rows,
            "clients": self.cfg.partition.clients,
            "dropped": sum(len(m.get("dropped", [])) for m in lines),
            "seconds": seconds,
            "final_adapter": str(final),
            "bytes_up": sum(m.get("bytes_up", 0) for m in lines),
            "bytes_down": sum(m.get("bytes_down", 0) for m in lines),
            **{k: sum(m.get(k, 0.0) for m in lines) for k in ("weights_mb_down",
                                                               "weights_mb_up")},
            "weights_mb_total": lines[-1].get("weights_mb_total", 0.0),
            **{k: lines[-1][k] for k in ("epsilon", "delta") if k in lines[-1]},
            "held_out_duplicates": _reported_duplicates(lines),
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


def _held_out_duplicates(replies: list[Reply]) -> dict[str, int]:
    """Client -> its training rows dropped because a held-out row asks the same prompt, as
    each replying client reported it."""
    return {str(r.client): int(r.metrics[P.HELD_OUT_DUPLICATES]) for r in replies
            if P.HELD_OUT_DUPLICATES in r.metrics}


def _reported_duplicates(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's count: rows removed from the training of every client that replied
    (``per_client`` lists those that lost any), from the metrics lines (so a resumed run
    counts the rounds before it too)."""
    per_client: dict[str, int] = {}
    for line in lines:
        per_client.update(line.get("held_out_duplicates") or {})
    return {"removed": sum(per_client.values()),
            "per_client": {c: n for c, n in sorted(per_client.items(), key=lambda kv: int(kv[0]))
                           if n}}


def _mean_train_loss(replies: list[Reply]) -> float | None:
    if not replies:
        return None
    n = sum(r.num_examples for r in replies)
    return sum(r.metrics[P.TRAIN_LOSS] * r.num_examples for r in replies) / max(1, n)


def round_message(m: dict[str, Any], rounds: int) -> str:
    """One log line for a committed round."""
    ev = f"{m['eval_loss']:.4f}" if m["eval_loss"] is not None else "-"
    tl = f"{m['train_loss']:.4f}" if m["train_loss"] is not None else "-"
    dropped = f", dropped {[d['client'] for d in m['dropped']]}" if m.get("dropped") else ""
    pref = (f", preference accuracy {m['preference_accuracy']:.3f}"
            if m.get("preference_accuracy") is not None else "")
    return (f"round {m['round']}/{rounds}: clients {m['clients']}{dropped} train loss "
            f"{tl}, held-out loss {ev}{pref} ({m['seconds']:.0f} s)")


def communication_text(m: dict[str, Any]) -> str | None:
    """The run's communication (a summary): what crossed the wire as fedit counts it, and
    the weight arrays as FlowerTune's leaderboard counts them; None for a summary written
    before the count existed."""
    if "weights_mb_total" not in m:
        return None
    return (f"{m['bytes_down'] / MB:.2f} MiB down, {m['bytes_up'] / MB:.2f} MiB up (the "
            f"payloads sent); weights {m['weights_mb_total']:.2f} MB as FlowerTune counts "
            f"them ({m['weights_mb_down']:.2f} down + {m['weights_mb_up']:.2f} up)")
