"""The embedded runtime: every client in one process, one base model shared by all.

A round reads top to bottom: sample clients, train each in turn on the shared base model
by swapping its adapter in, aggregate, evaluate, checkpoint. Memory stays flat however
many clients are configured: only the adapters of the clients of the current round and
the tokenised data of clients already seen live in memory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedit.client import run_client_round
from fedit.config import DataConfig, RunConfig, to_toml
from fedit.data.batching import tokenize_rows
from fedit.data.load import load_rows
from fedit.data.partition import holdout_split, partition, write_partitions
from fedit.data.prompts import Example
from fedit.errors import ConfigError, DataError
from fedit.evaluate.evaluation import loss_by_category, row_label, tokenize_held_out
from fedit.io import append_jsonl, atomic_write_json, atomic_write_jsonl, atomic_write_text
from fedit.model import (
    LoraSpec,
    attach_lora,
    get_adapter_arrays,
    load_base_model,
    load_tokenizer,
    pick_device,
    save_adapter,
    set_adapter_arrays,
)
from fedit.strategies import Reply, StrategyParams, build_strategy
from fedit.train import example_losses, mean_token_loss

Log = Callable[[str], None]


@dataclass
class FederatedData:
    """The rows of a run: the held-out test set and each client's training rows."""

    test_rows: list[dict[str, Any]]
    client_rows: list[list[dict[str, Any]]]


def make_run_dir(cfg: RunConfig, stem: str = "run") -> Path:
    """``<output_dir>/<name>``; a new name from the config stem and time when none is set."""
    if not cfg.name:
        cfg.name = f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / cfg.name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run folder {run_dir} already exists; choose another name (--set name=...)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    return run_dir


def _labels(rows: list[dict[str, Any]], field: str, needed: bool) -> list[str] | None:
    if not rows or field not in rows[0]:
        if needed:
            raise DataError(f"data: rows have no field '{field}' to split on "
                            "(set data.label_field or partition.by to an existing field)")
        return None
    return [str(r.get(field, "")) for r in rows]


def _split(cfg: RunConfig) -> tuple[FederatedData, list[dict[str, Any]], list[list[int]],
                                     str | None]:
    """Load, subsample, hold out the test set, partition (no files written)."""
    rows = load_rows(cfg.data.path, cfg.data.fields or None)
    if cfg.data.max_rows and cfg.data.max_rows < len(rows):
        keep = np.random.default_rng(cfg.seed).choice(len(rows), cfg.data.max_rows, replace=False)
        rows = [rows[i] for i in sorted(keep)]
    labels = _labels(rows, cfg.data.label_field, needed=False)
    train_idx, test_idx = holdout_split(labels, len(rows), cfg.data.test_per_label, cfg.seed)
    test_rows, train_rows = [rows[i] for i in test_idx], [rows[i] for i in train_idx]
    p = cfg.partition
    by = p.by or cfg.data.label_field
    part_labels = _labels(train_rows, by, needed=p.method != "iid")
    keys = part_labels if part_labels is not None else [""] * len(train_rows)
    parts = partition(keys, p.method, p.clients, p.alpha, p.min_size, p.shards_per_client,
                      cfg.seed)
    data = FederatedData(test_rows, [[train_rows[i] for i in part] for part in parts])
    return data, train_rows, parts, by if part_labels else None


def split_data(cfg: RunConfig) -> FederatedData:
    """The held-out rows and each client's rows, as ``prepare_data`` makes them, but
    without writing anything: what a Flower SuperNode computes to find its partition."""
    return _split(cfg)[0]


def prepare_data(cfg: RunConfig, run_dir: Path) -> FederatedData:
    """Load, subsample, hold out the test set, partition; write test.jsonl and partitions/."""
    data, train_rows, parts, by = _split(cfg)
    atomic_write_jsonl(run_dir / "test.jsonl", data.test_rows)
    write_partitions(run_dir / "partitions", train_rows, parts, by, write_rows=False)
    return data


def load_model(cfg: RunConfig) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and the base model with a fresh LoRA adapter (loaded once per process)."""
    tokenizer = load_tokenizer(cfg.model.name)
    device = pick_device(cfg.model.device)
    base = load_base_model(cfg.model.name, dtype=cfg.model.dtype, device=device,
                           quantization=cfg.model.quantization or None)
    lora = cfg.lora
    spec = LoraSpec(r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                    target_modules=tuple(lora.target_modules))
    return tokenizer, attach_lora(base, spec, seed=cfg.seed)


def tokenize_examples(
    tokenizer: Any, rows: list[dict[str, Any]], data: DataConfig, who: str, log: Log = print
) -> list[Example]:
    """Tokenise rows as the run's data config says; say how many did not fit."""
    out = tokenize_rows(tokenizer, rows, template=data.template,
                        cutoff_len=data.cutoff_len, train_on_inputs=data.train_on_inputs)
    if len(out) < len(rows):
        log(f"{who}: {len(rows) - len(out)} of {len(rows)} rows skipped: the prompt "
            f"alone fills data.cutoff_len = {data.cutoff_len}, leaving no response token")
    return out


def _mean_train_loss(replies: list[Reply]) -> float | None:
    if not replies:
        return None
    n = sum(r.num_examples for r in replies)
    return sum(r.metrics["train-loss"] * r.num_examples for r in replies) / max(1, n)


def _nbytes(arrays: list[np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays))


class Simulation:
    """A federated run in one process. ``run()`` returns the run summary (a dict)."""

    def __init__(
        self, cfg: RunConfig, run_dir: Path, log: Log = print,
        loaded: tuple[Any, torch.nn.Module] | None = None,
    ) -> None:
        """``loaded``: (tokenizer, model with LoRA) already in memory, e.g. shared by the
        arms of an experiment; its adapter is used as the initial global adapter."""
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.data = prepare_data(cfg, run_dir)
        self.tokenizer, self.model = loaded if loaded is not None else load_model(cfg)
        self.pad_id = int(self.tokenizer.pad_token_id)
        s = cfg.strategy
        self.strategy = build_strategy(s.name, StrategyParams(s.fraction, s.min_clients, cfg.seed))
        self._examples: dict[int, list[Example]] = {}  # tokenised once per client
        self.test_examples, kept = tokenize_held_out(self.tokenizer, self.data.test_rows,
                                                     cfg.data, self.log)
        self.test_labels = [row_label(self.data.test_rows[i], cfg.data.label_field) for i in kept]
        self.eval_loss_by_category: dict[str, float] = {}  # of the last evaluate()

    def _tokenize(self, rows: list[dict[str, Any]], who: str) -> list[Example]:
        return tokenize_examples(self.tokenizer, rows, self.cfg.data, who, self.log)

    def client_examples(self, client: int) -> list[Example]:
        if client not in self._examples:
            self._examples[client] = self._tokenize(self.data.client_rows[client],
                                                    f"client {client}")
        return self._examples[client]

    def evaluate(self, arrays: list[np.ndarray]) -> float:
        set_adapter_arrays(self.model, arrays)
        # One pass gives both: the loss of fedit.train.evaluate_loss, and by label
        sums, counts = example_losses(self.model, self.test_examples, self.cfg.eval.batch_size,
                                      self.pad_id)
        self.eval_loss_by_category = loss_by_category(sums, counts, self.test_labels)
        return mean_token_loss(sums, counts)

    def train_round(self, server_round: int, global_arrays: list[np.ndarray]) -> list[Reply]:
        # Sample clients, then train each in turn on the one shared base model
        clients = self.strategy.sample(server_round, range(len(self.data.client_rows)))
        round_config = self.strategy.configure_train(server_round)
        replies = []
        for c in clients:
            bar = _progress_bar(f"round {server_round}/{self.cfg.rounds} client {c}")
            reply = run_client_round(
                self.model, global_arrays, self.client_examples(c), self.cfg.train,
                client=c, server_round=server_round, seed=self.cfg.seed, pad_id=self.pad_id,
                round_config=round_config, progress=bar,
            )
            bar.close()
            replies.append(reply)
        return replies

    def aggregate(
        self, server_round: int, global_arrays: list[np.ndarray], replies: list[Reply]
    ) -> list[np.ndarray]:
        """The next global adapter; the current one when no reply is usable."""
        if not replies:
            return global_arrays
        return self.strategy.aggregate_train(server_round, global_arrays, replies)

    def round_fields(self, server_round: int) -> dict[str, Any]:
        """Fields a runtime adds to the round's metrics line (Flower: missing replies)."""
        return {}

    def run(self) -> dict[str, Any]:
        cfg, metrics_path = self.cfg, self.run_dir / "metrics.jsonl"
        start = time.perf_counter()
        global_arrays = get_adapter_arrays(self.model)  # LoRA B = 0: exactly the base model
        base_loss = self.evaluate(global_arrays)
        self.log(f"base model held-out loss {base_loss:.4f} on {len(self.test_examples)} rows")
        append_jsonl(metrics_path, {"round": 0, "clients": [], "eval_loss": base_loss,
                                    "eval_loss_by_category": self.eval_loss_by_category})
        eval_loss: float | None = base_loss
        for rnd in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            replies = self.train_round(rnd, global_arrays)
            global_arrays = self.aggregate(rnd, global_arrays, replies)
            due = rnd == cfg.rounds or (cfg.eval.every and rnd % cfg.eval.every == 0)
            eval_loss = self.evaluate(global_arrays) if due else None
            set_adapter_arrays(self.model, global_arrays)
            save_adapter(self.model, self.run_dir / "rounds" / f"{rnd:04d}" / "adapter")
            line = {
                "round": rnd,
                "clients": [r.client for r in replies],
                "train_loss": _mean_train_loss(replies),
                "eval_loss": eval_loss,
                "eval_loss_by_category": self.eval_loss_by_category if due else None,
                "seconds": time.perf_counter() - t0,
                "bytes_up": sum(_nbytes(r.arrays) for r in replies),
                "bytes_down": _nbytes(global_arrays) * len(replies),
                "num_examples": sum(r.num_examples for r in replies),
                **self.round_fields(rnd),
            }
            append_jsonl(metrics_path, line)
            self.log(_round_line(line, cfg.rounds))
        final = self.run_dir / "final" / "adapter"
        save_adapter(self.model, final)
        summary = {
            "run_dir": str(self.run_dir),
            "rounds": cfg.rounds,
            "base_eval_loss": base_loss,
            "final_eval_loss": eval_loss,
            "test_rows": len(self.test_examples),
            "clients": len(self.data.client_rows),
            "seconds": time.perf_counter() - start,
            "final_adapter": str(final),
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


def _round_line(m: dict[str, Any], rounds: int) -> str:
    ev = f"{m['eval_loss']:.4f}" if m["eval_loss"] is not None else "-"
    tl = f"{m['train_loss']:.4f}" if m["train_loss"] is not None else "-"
    missing = f", missing {m['missing']}" if m.get("missing") else ""
    return (f"round {m['round']}/{rounds}: clients {m['clients']}{missing} train loss "
            f"{tl}, held-out loss {ev} ({m['seconds']:.0f} s)")


def _progress_bar(desc: str) -> Any:
    """A tqdm bar that the trainer moves once per optimizer step."""
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=desc, leave=False, unit="step", dynamic_ncols=True)

    def update(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(1)

    update.close = bar.close  # type: ignore[attr-defined]
    return update


def run_federated(cfg: RunConfig, *, stem: str = "run", log: Log = print) -> dict[str, Any]:
    """Make the run folder, then run the whole simulation; returns the summary."""
    cfg = dataclasses.replace(cfg)
    run_dir = make_run_dir(cfg, stem)
    log(f"run folder {run_dir}")
    return Simulation(cfg, run_dir, log).run()
