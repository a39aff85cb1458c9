"""The in-process runtime: every client in one process, one base model shared by all.

The round loop is :class:`fedit.federation.loop.RoundLoop`; this runtime only trains a round's
instructed clients in turn on the shared base model, swapping each one's adapter in.
Memory stays flat however many clients are configured: only the replies of the current
round and the tokenised data of the last clients trained (``EXAMPLE_CACHE``) live in
memory, beside the rows themselves; a client's state
lives in the run folder (``checkpoint/blobs``) and is read when the client trains.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedit.algorithms import payload as P
from fedit.algorithms.contract import ClientState, Instruction, Reply
from fedit.algorithms.pipeline import Pipeline
from fedit.client.load import load_model
from fedit.client.objective import objective_for
from fedit.client.personalize import PERSONAL_DIR, write_personal_adapters
from fedit.client.round import run_client_round
from fedit.config import RunConfig
from fedit.data.batching import DATA_STATS
from fedit.data.conversations import check_chat_template
from fedit.data.federated import FederatedData
from fedit.federation import checkpoint as ckpt
from fedit.federation.loop import Log, RoundLoop, RoundResult
from fedit.federation.replies import Dropped
from fedit.federation.rundir import new_run, resumed_run
from fedit.federation.setup import ModelSide, prepare_run
from fedit.io import atomic_write_json
from fedit.model.adapter import load_adapter_arrays
from fedit.runtimes.model_side import model_side

EXAMPLE_CACHE = 1024  # tokenised clients kept in memory (least recently trained go first)


def nbytes(arrays: list[np.ndarray] | dict[str, list[np.ndarray]]) -> int:
    """Bytes of a list (or named lists) of arrays."""
    if isinstance(arrays, dict):
        return sum(nbytes(v) for v in arrays.values())
    return int(sum(a.nbytes for a in arrays))


class InProcessRuntime:
    """Trains the instructed clients one after another on the one model in memory."""

    def __init__(self, cfg: RunConfig, data: FederatedData, tokenizer: Any,
                 model: torch.nn.Module, pipeline: Pipeline, run_dir: Path,
                 log: Log = print) -> None:
        self.cfg, self.data, self.tokenizer, self.model = cfg, data, tokenizer, model
        self.pipe, self.run_dir, self.log = pipeline, run_dir, log
        self.pad_id = int(tokenizer.pad_token_id)
        self.objective = objective_for(cfg)
        # tokenised clients, the most recently trained EXAMPLE_CACHE of them: flat memory
        # in a cross-device run where every round meets new clients
        self._examples: OrderedDict[int, list[Any]] = OrderedDict()
        self._states: dict[int, ckpt.Blob] = {}  # client -> its state's blob

    def start(self) -> None:
        return None

    def available(self) -> list[int]:
        return list(range(len(self.data.client_rows)))

    def client_examples(self, client: int) -> list[Any]:
        if client not in self._examples:
            self._examples[client] = self.objective.examples(
                self.tokenizer, self.data.client_rows[client], self.cfg.data,
                f"client {client}", self.log, self.run_dir / DATA_STATS)[0]
            while len(self._examples) > EXAMPLE_CACHE:
                self._examples.popitem(last=False)
        self._examples.move_to_end(client)
        return self._examples[client]

    def train(self, server_round: int, global_arrays: list[np.ndarray],
              instructions: dict[int, Instruction], secure: bool) -> RoundResult:
        replies: list[Reply] = []
        dropped: list[Dropped] = []
        losses: dict[int, list[float]] = {}
        down = 0
        for c, instruction in sorted(instructions.items()):
            down += nbytes(self.pipe.start_of(instruction, global_arrays))
            down += nbytes(instruction.arrays)
            try:
                losses[c] = []
                replies.append(self._train_one(server_round, c, global_arrays, instruction,
                                               losses[c]))
            except Exception as e:  # a client that raises is dropped, the round goes on
                reason = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.log("".join(traceback.format_exception_only(e)).strip())
                dropped.append(Dropped(c, reason))
        up = sum(nbytes(r.arrays) + nbytes(r.extra) for r in replies)
        result = RoundResult(replies, dropped, bytes_up=up, bytes_down=down,
                             step_losses={r.client: losses[r.client] for r in replies})
        if secure and replies:  # what SecAgg+ gives the server: the mean, nothing else
            result.combined = self.pipe.secure_mean(
                server_round, [self.pipe.receive(r, instructions[r.client], global_arrays)
                               for r in replies])
            result.replies = [dataclasses.replace(r, arrays=[], extra={}) for r in replies]
        return result

    def _train_one(self, server_round: int, client: int, global_arrays: list[np.ndarray],
                   instruction: Instruction, losses: list[float]) -> Reply:
        """Train one client; ``losses`` gets its optimizer steps' losses (TensorBoard)."""
        ref = self._states.get(client)
        state = ckpt.read_state(self.run_dir, ref, ClientState) if ref else ClientState()
        bar = _progress_bar(f"round {server_round}/{self.cfg.rounds} client {client}",
                            losses)
        try:
            reply = run_client_round(
                self.model, self.pipe.start_of(instruction, global_arrays),
                self.client_examples(client), self.cfg.train,
                client=client, server_round=server_round, seed=self.cfg.seed,
                pad_id=self.pad_id, strategy=self.pipe, instruction=instruction,
                state=state, progress=bar, personalize=self.cfg.personalize,
                objective=self.objective,
            )
        finally:
            bar.close()
        ckpt.fault_point("mid-client", server_round)
        if self.data.held_out_duplicates:  # as a Flower node reports it
            reply.metrics[P.HELD_OUT_DUPLICATES] = float(self.data.held_out_duplicates[client])
        if state:
            self._states[client] = ckpt.write_state(self.run_dir, state)
        return reply

    def client_states(self) -> dict[int, ckpt.Blob]:
        return dict(self._states)

    def client_state(self, client: int) -> ClientState | None:
        """Client ``client``'s state as of the last round (None: it has none)."""
        ref = self._states.get(client)
        return ckpt.read_state(self.run_dir, ref, ClientState) if ref else None

    def restore_client_states(self, refs: dict[int, ckpt.Blob]) -> None:
        self._states = dict(refs)


def _progress_bar(desc: str, losses: list[float]) -> Any:
    """A tqdm bar that the trainer moves once per optimizer step; each step's loss is
    appended to ``losses``."""
    bar = tqdm(total=None, desc=desc, leave=False, unit="step", dynamic_ncols=True)

    def update(step: int, total: int, loss: float) -> None:
        losses.append(loss)
        bar.total = total
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(1)

    update.close = bar.close  # type: ignore[attr-defined]
    return update


class Simulation:
    """A federated run in one process: the run set-up (:func:`prepare_run`), the model, the
    in-process runtime and the round loop. ``run()`` returns the run summary (a dict)."""

    def __init__(
        self, cfg: RunConfig, run_dir: Path, log: Log = print,
        loaded: tuple[Any, torch.nn.Module] | None = None,
        data: FederatedData | None = None,
    ) -> None:
        """``loaded``: (tokenizer, model with LoRA) already in memory, e.g. shared by the
        arms of an experiment; its adapter is used as the initial global adapter.
        ``data``: the split, when the caller made it already."""
        self.run_dir, self.log, self._loaded = run_dir, log, loaded
        self.prepared = prepare_run(cfg, run_dir, self._build_model, log, data)
        self.cfg, self.data = self.prepared.cfg, self.prepared.data
        self.runtime = InProcessRuntime(self.cfg, self.data, self.tokenizer, self.model,
                                        self.prepared.pipeline, run_dir, log)
        self.pipe = self.prepared.pipeline
        self.loop = RoundLoop(self.prepared, self.runtime, log)

    def _build_model(self, cfg: RunConfig, data: FederatedData, run_dir: Path) -> ModelSide:
        self.tokenizer, self.model = self._loaded if self._loaded else load_model(cfg)
        check_chat_template(self.tokenizer, data.client_rows, cfg.data.template)
        return model_side(cfg, self.tokenizer, self.model, data.test_rows, run_dir, self.log,
                          fused=cfg.train.fused)

    def run(self, resume: bool = False) -> dict[str, Any]:
        summary = self.loop.run(resume=resume)
        if self.cfg.personalize.method != "none":
            summary = self._personalize(summary)
        return summary

    def _personalize(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Each client's personal adapter saved under ``<run>/personal`` (finetune trains
        them now); the summary names the folder."""
        final = load_adapter_arrays(summary["final_adapter"])
        write_personal_adapters(
            self.run_dir, self.cfg, self.model, final, self.runtime.available(),
            examples_of=self.runtime.client_examples, state_of=self.runtime.client_state,
            pad_id=self.runtime.pad_id, log=self.log)
        summary = {**summary, "personal": str(self.run_dir / PERSONAL_DIR)}
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


def run_federated(cfg: RunConfig, *, stem: str = "run", log: Log = print) -> dict[str, Any]:
    """A new run: name it and check its folder, then the whole simulation (the config and
    the data are checked before anything is written); returns the summary."""
    cfg, run_dir = new_run(cfg, stem)
    log(f"run folder {run_dir}")
    return Simulation(cfg, run_dir, log).run()


def resume_federated(run_dir: Path, *, log: Log = print) -> dict[str, Any]:
    """Continue the run in ``run_dir`` after its last committed round (its config.toml)."""
    cfg = resumed_run(run_dir)
    log(f"run folder {run_dir} (resume)")
    return Simulation(cfg, run_dir, log).run(resume=True)
