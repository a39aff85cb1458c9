"""The ClientApp's side: a SuperNode trains the global adapter on its own data.

A train message brings the global adapter, the round number, the client id the server
gave this node and the resolved run config (model, LoRA, trainer, seed). The data never
comes from the server: the node config says where it is, either

- ``data-path=FILE``: the party's own training file, all of it (``partition-id`` may give
  the party a fixed client id), or
- ``partition-id=K num-partitions=N`` (demos): partition K of the run's own split of
  ``data.path``, exactly the rows the in-process simulation gives client K.

Either way the node drops its rows whose prompt a held-out row also asks: the train
message carries the held-out prompts' hashes (``held-out-prompts``), never the prompts,
and the reply says how many rows went (``held-out-duplicates``; for a partition, the
split's own count: the same rows the simulation removes).

The base model and the tokenised data are kept per process: with a long-lived process
(``fedit flower worker``, the recommended mode) they are loaded once; with Flower's
default isolation a process lives for one message. A client's state (a strategy's
``ClientState``) is saved on this machine, under the node config's ``state-dir``, one
file per round, and never sent; so are its step losses, as TensorBoard events.

torch, transformers and the trainer are imported inside the handlers that need them: under
Flower's default isolation every message starts a new process, and the server's hello
(``handle_query``) must not pay for them.
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedit.algorithms import payload as P
from fedit.algorithms.contract import ClientState, Instruction, Reply
from fedit.algorithms.strategies import load_strategy_class
from fedit.config import RunConfig, config_from_dict
from fedit.errors import ConfigError
from fedit.runtimes.flower import wire

log = logging.getLogger("flwr")

_models: dict[str, tuple[Any, Any]] = {}  # model/LoRA key -> (tokenizer, model); one kept
_examples: dict[str, tuple[list[Any], int]] = {}  # data key -> (examples, rows dropped)


def run_config_from_text(text: str) -> RunConfig:
    """The RunConfig the server sent (``to_toml`` text), checked like a config file."""
    try:
        return config_from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"the run config sent by the server is not valid TOML: {e}") from None


def node_partition_id(node_config: dict[str, Any]) -> int | None:
    """The client id a node claims in its node config (``partition-id``), if any."""
    pid = node_config.get(P.PARTITION_ID)
    if pid is None:
        return None
    if not isinstance(pid, int) or pid < 0:
        raise ConfigError(f"node config: {P.PARTITION_ID} must be an integer >= 0, got {pid!r}")
    return pid


def node_rows(cfg: RunConfig, node_config: dict[str, Any]) -> list[dict[str, Any]]:
    """This node's training rows, found through its node config (see the module doc)."""
    return _node_split(cfg, node_config)[0]


def node_training_rows(cfg: RunConfig, node_config: dict[str, Any], held_out: set[str]
                       ) -> tuple[list[dict[str, Any]], int]:
    """This node's rows less those whose prompt hash is in ``held_out``, and how many went
    (a partition's count includes the rows its split already removed)."""
    from fedit.data.dedup import drop_held_out

    rows, removed = _node_split(cfg, node_config)
    rows, dropped = drop_held_out(rows, held_out)
    return rows, removed + dropped


def _node_split(cfg: RunConfig, node_config: dict[str, Any]
                ) -> tuple[list[dict[str, Any]], int]:
    """The node's rows, and how many held-out duplicates the run's split removed of them."""
    from fedit.data.federated import split_data
    from fedit.data.invalid import RowCounts
    from fedit.data.load import load_rows

    path = node_config.get(P.DATA_PATH)
    if path:
        counts = RowCounts.from_config(cfg.data)  # data.invalid_rows, on the node's own file
        rows = load_rows(str(path), cfg.data.fields or None, invalid=counts)
        for line in counts.log_lines(str(path)):
            log.info("fedit: %s", line)
        return rows, 0
    pid = node_partition_id(node_config)
    if pid is None:
        raise ConfigError(f"node config: give {P.DATA_PATH}=FILE, or {P.PARTITION_ID}=K and "
                          f"{P.NUM_PARTITIONS}=N for a partition of the run's data")
    n = node_config.get(P.NUM_PARTITIONS, cfg.partition.clients)
    if n != cfg.partition.clients:
        raise ConfigError(f"node config: {P.NUM_PARTITIONS}={n} but the run has "
                          f"partition.clients = {cfg.partition.clients}")
    if pid >= n:
        raise ConfigError(f"node config: {P.PARTITION_ID}={pid} is not below {n}")
    data = split_data(cfg)
    return data.client_rows[pid], data.held_out_duplicates[pid]


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _model(cfg: RunConfig) -> tuple[Any, Any]:
    from fedit.client.load import load_model, model_notes

    key = _key(asdict(cfg.model), asdict(cfg.lora))
    if key not in _models:
        _models.clear()  # one base model per process: memory stays flat
        _models[key] = load_model(cfg)
        for note in model_notes(_models[key][1], cfg.lora.target_modules, cfg.train.fused):
            log.info("fedit: %s", note)
    return _models[key]


def _node_examples(cfg: RunConfig, node_config: dict[str, Any], tokenizer: Any,
                   held_out: set[str]) -> tuple[list[Any], int]:
    """This node's rows less the held-out prompts, checked against the chat template (the
    node holds the rows, so the check is here) and made into the objective's examples;
    kept per process. Also: how many rows were dropped as held-out duplicates."""
    from fedit.client.objective import objective_for
    from fedit.data.conversations import check_chat_template

    key = _key(cfg.model.name, asdict(cfg.data), asdict(cfg.partition), cfg.seed,
               dict(node_config), sorted(held_out))
    if key not in _examples:
        _examples.clear()
        rows, removed = node_training_rows(cfg, node_config, held_out)
        if removed:
            log.info("fedit: %d training rows dropped: a held-out row asks the same prompt",
                     removed)
        check_chat_template(tokenizer, [rows], cfg.data.template)
        _examples[key] = (objective_for(cfg).examples(
            tokenizer, rows, cfg.data, "this node's data",
            lambda m: log.warning("fedit: %s", m))[0], removed)
    return _examples[key]


def state_folder(cfg: RunConfig, node_config: dict[str, Any], client: int) -> Path:
    """Where this node keeps client ``client``'s state for this run: ``state-dir`` from
    the node config (default ``$FEDIT_CACHE/client-state``) / run name / client."""
    from fedit.model.convert import cache_dir

    root = node_config.get(P.STATE_DIR) or cache_dir() / "client-state"
    return Path(str(root)).expanduser() / (cfg.name or "run") / f"client_{client:05d}"


def load_node_state(folder: Path, state_round: int) -> ClientState:
    """The state saved in round ``state_round`` (0: a new client)."""
    from fedit.federation.checkpoint import decode_state

    if state_round <= 0:
        return ClientState()
    path = folder / f"round_{state_round:04d}.safetensors"
    if not path.is_file():
        raise ConfigError(f"client state {path} is missing: the server expects this node's "
                          f"state of round {state_round}")
    return ClientState(*decode_state(path.read_bytes()))


def save_node_state(folder: Path, server_round: int, state: ClientState) -> None:
    """Save this round's state; keep only it and the newest older one (a resumed server
    may ask for the round before)."""
    from fedit.federation.checkpoint import encode_state
    from fedit.io import atomic_write_bytes

    atomic_write_bytes(folder / f"round_{server_round:04d}.safetensors",
                       encode_state(state.arrays, state.scalars))
    for old in sorted(folder.glob("round_*.safetensors"))[:-2]:
        old.unlink(missing_ok=True)


def train_on_node(
    global_arrays: list[Any], config: dict[str, Any], node_config: dict[str, Any],
    instruction_arrays: dict[str, list[Any]] | None = None,
) -> Reply:
    """One client round on this node: the same ``run_client_round`` as in-process.

    ``config``: the round's config record (round, client id, run config, and the
    strategy's instruction); ``node_config``: this SuperNode's ``--node-config``; the
    client's state stays on this machine (``state-dir``)."""
    from fedit.algorithms.setup import pipeline_from_config
    from fedit.client.objective import objective_for
    from fedit.client.round import run_client_round
    from fedit.model.adapter import adapter_names

    config = dict(config)
    cfg = run_config_from_text(str(config.pop(P.RUN_CONFIG)))
    server_round, client = int(config.pop(P.SERVER_ROUND)), int(config.pop(P.CLIENT))
    held_out = set(str(config.pop(P.HELD_OUT, "") or "").split())
    claimed = node_partition_id(node_config)
    if claimed is not None and claimed != client:
        raise ConfigError(f"the server sent client id {client}, this node is {claimed}")
    tokenizer, model = _model(cfg)
    examples, removed = _node_examples(cfg, node_config, tokenizer, held_out)
    folder = state_folder(cfg, node_config, client)
    state = load_node_state(folder, int(config.pop(P.STATE_ROUND, 0)))
    log.info("fedit: client %d round %d: training on %d examples", client, server_round,
             len(examples))
    losses: list[float] = []
    reply = run_client_round(
        model, global_arrays, examples, cfg.train, client=client, server_round=server_round,
        seed=cfg.seed, pad_id=int(tokenizer.pad_token_id),
        strategy=pipeline_from_config(cfg, adapter_names(model)),
        instruction=Instruction(config, instruction_arrays or {}), state=state,
        personalize=cfg.personalize, objective=objective_for(cfg),
        progress=lambda step, total, loss: losses.append(loss),
    )
    log_node_steps(cfg, folder, client, server_round, losses)
    reply.metrics[P.HELD_OUT_DUPLICATES] = float(removed)
    if state:
        save_node_state(folder, server_round, state)
        reply.metrics[P.STATE_SAVED] = 1.0
    save_node_personal(model, folder, state)
    return reply


def log_node_steps(cfg: RunConfig, folder: Path, client: int, server_round: int,
                   losses: list[float]) -> None:
    """The round's step losses as TensorBoard events on this machine, ``<state folder>/
    tensorboard`` (``log.tensorboard``; not set: when this node has tensorboard)."""
    from fedit.federation.loggers import TENSORBOARD_DIR, installed, write_node_steps

    if cfg.log.tensorboard is False:
        return
    if not installed("tensorboard"):
        if cfg.log.tensorboard:
            log.warning("fedit: log.tensorboard = true but this node has no tensorboard "
                        "package: no events here (pip install tensorboard)")
        return
    write_node_steps(folder / TENSORBOARD_DIR, client, server_round, losses)


def save_node_personal(model: Any, folder: Path, state: ClientState) -> None:
    """Ditto: the personal adapter as a PEFT folder on this machine, ``<state folder>/
    personal/adapter`` (replaced each round the client trains; never sent)."""
    from fedit.client.personalize import PERSONAL
    from fedit.model.adapter import save_adapter, set_adapter_arrays

    if PERSONAL in state.arrays:
        set_adapter_arrays(model, state.arrays[PERSONAL])
        save_adapter(model, folder / "personal" / "adapter")


def handle_train(message: Message, context: Context) -> Message:
    """The ClientApp's train handler (SecAgg+ stages go to the legacy client)."""
    from fedit.runtimes.flower import secagg

    if secagg.is_secagg_message(message):
        return secagg.legacy_client_app(train_on_node)(message, context)
    content = message.content
    reply = train_on_node(wire.record_to_arrays(content.array_records[P.ARRAYS]),
                          dict(content.config_records[P.CONFIG_RECORD]),
                          dict(context.node_config), wire.named_arrays(content))
    return Message(wire.reply_content(reply), reply_to=message)


def handle_query(message: Message, context: Context) -> Message:
    """Answer the server's hello: the client id this node claims (-1: none), or, when the
    run's strategy is a user's class this node cannot import, why it refuses (one line)."""
    asked = dict(message.content.config_records.get(P.CONFIG_RECORD, {}))
    answer: dict[str, Any] = {}
    ref = str(asked.get(P.STRATEGY, "") or "")
    if ref:
        try:
            load_strategy_class(ref)
        except ConfigError as e:
            answer[P.REFUSED] = str(e)
    pid = node_partition_id(dict(context.node_config))
    answer[P.PARTITION_ID] = -1 if pid is None else pid
    return Message(RecordDict({P.CONFIG_RECORD: ConfigRecord(answer)}), reply_to=message)
