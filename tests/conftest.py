"""Shared fixtures: a tiny random Llama with its own tiny tokenizer, and tiny instruction data.

Nothing here touches the network; the model folder is a plain transformers folder, so any
code path that accepts "a local transformers folder" accepts it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from fedit import Instruction, ServerState, Strategy

CATEGORIES = ["open_qa", "closed_qa", "classification", "brainstorming"]
_WORDS = (
    "red blue green apple river mountain city cloud paper stone music light small large "
    "quick slow bright dark north south east west summer winter garden ocean forest bird"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Tiny, learnable instruction rows: the response repeats a pattern of the instruction."""
    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in _WORDS for b in _WORDS if a != b], n)  # rows unique
    rows = []
    for i, (a, b) in enumerate(pairs):
        cat = CATEGORIES[i % len(CATEGORIES)]
        context = f"The {a} is near the {b}." if cat == "closed_qa" else ""
        rows.append(
            {
                "instruction": f"Tell me about the {a} and the {b}.",
                "context": context,
                "response": f"The {a} goes with the {b}. {a} {b} {a}.",
                "category": cat,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v)) if isinstance(v, Path) else json.dumps(v)


def write_config(path: Path, model_dir: Path, data_file: Path, **sections: object) -> Path:
    """A run config for the tiny model, written as TOML: the defaults below, with each
    keyword merged in (``rounds=3``, ``train={"max_steps": 2}``, ``flower={...}``)."""
    cfg: dict[str, object] = {
        "output_dir": path.parent / "runs", "rounds": 2, "seed": 1,
        "model": {"name": model_dir, "dtype": "fp32"},
        "data": {"path": data_file, "test_per_label": 2, "cutoff_len": 128},
        "partition": {"method": "iid", "clients": 2},
        "train": {"batch_size": 4, "micro_batch_size": 4, "lr": 3e-3},
        "strategy": {"fraction": 1.0},
        "eval": {"batch_size": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}  # type: ignore[dict-item]
        else:
            cfg[key] = value
    top = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "".join(f"{kk} = {_toml_value(vv)}\n" for kk, vv in v.items())
              for k, v in cfg.items() if isinstance(v, dict)]
    path.write_text("\n".join(top) + "\n" + "".join(tables), encoding="utf-8")
    return path


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedit.data.prompts import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT]
    corpus += [json.dumps(r) for r in make_rows(200)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama + tokenizer saved as a local transformers folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def talking_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model, but its greedy answers are visible text: the embedding (tied to the
    output) rows of special and whitespace-only tokens are zeroed, so the random model's
    argmax is some other token (the plain tiny model answers ``"\\n"`` over and over,
    which an answer's strip() leaves empty)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path_factory.mktemp("talking-llama")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for i in range(len(tok)):
            if not tok.decode([i]).strip():
                model.model.embed_tokens.weight[i] = 0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_rows() -> list[dict[str, str]]:
    return make_rows(64)


@pytest.fixture
def tiny_data_file(tmp_path, tiny_rows) -> Path:
    return write_jsonl(tmp_path / "tiny.jsonl", tiny_rows)


SHARED_DOLLY = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "databricks-dolly-15k.jsonl"
)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A fresh fedit cache holding the converted SmolLM2, and how many conversions that
    took (1).

    Slow (one GGUF conversion, ~45 s on 2 cores): shared by every ``slow`` test."""
    from fedit.model import convert

    cache = tmp_path_factory.mktemp("fedit-cache")
    conversions = []
    real = convert._convert_gguf

    def counted(*args):
        conversions.append(args)
        real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDIT_CACHE", str(cache))
        mp.setattr(convert, "_convert_gguf", counted)
        convert.resolve_model("smollm2-135m")
    return cache, len(conversions)


def make_run_dir(cfg, stem: str = "run") -> Path:
    """A new run's folder, checked (no committed round) and made, as `fedit train` does; a
    config without a name gets one (set on ``cfg``, which the test then runs)."""
    from fedit.federation.rundir import new_run

    named, run_dir = new_run(cfg, stem)
    cfg.name = named.name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# -- a strategy with client state and instruction arrays (tests name it, as a user would:
#    strategy.name = "tests.conftest:Tally") ----------------------------------------------
class Killed(BaseException):
    """Stands for a SIGKILL inside a client's round."""


KILL: dict[str, int] = {}  # round -> kill the first client that finishes training in it


class Tally(Strategy):
    """Counts, per client, the rounds it trained (client state) and sends each client an
    array (its instruction); the server keeps the sum of the replies' tallies (state)."""

    name = "tally"

    def init_state(self, global_arrays):
        return ServerState(arrays={"sum": [np.zeros(1)]}, scalars={"rounds": 0})

    def configure(self, server_round, client, global_arrays, state):
        return Instruction({"r": server_round}, {"c": [np.full(2, float(client))]})

    def after_train(self, instruction, state, global_arrays, trained, info):
        if KILL.get("round") == instruction.config["r"]:
            KILL.clear()
            raise Killed
        assert instruction.arrays["c"][0].shape == (2,)
        state.scalars["n"] = int(state.scalars.get("n", 0)) + 1
        state.arrays["c_seen"] = [instruction.arrays["c"][0].copy()]
        return {"n": [np.array([float(state.scalars["n"])])]}

    def server_update(self, server_round, global_arrays, combined, state):
        return combined.arrays, ServerState(
            {"sum": [state.arrays["sum"][0] + combined.extra["n"][0]]},
            {"rounds": int(state.scalars["rounds"]) + 1})




# -- a fake Flower Grid: the ServerApp's round loop in this process, no SuperLink, no nodes.
#    Shared by the tests that drive the ServerApp (import it from here, never from another
#    test file). flwr is an optional extra, so it is imported when a grid is used: call
#    ``pytest.importorskip("flwr")`` first, and set Flower's TaskIdentity for the test
#    (``flower_task_identity``). --------------------------------------------------------
class FakeGrid:
    """Nodes 101, 102, ... run the real ClientApp handlers in-process (partition-id 0, 1,
    ..., or ``node_configs[client]``), then ``behaviours[client]`` (message, good reply)
    may alter, drop (None) or replace the reply. ``replies`` holds the replies not yet
    pulled, ``sent`` every (node, message) pushed."""

    def __init__(self, clients: int, behaviours: dict | None = None,
                 node_configs: list[dict] | None = None) -> None:
        self.node_ids = [101 + k for k in range(clients)]
        self.behaviours = behaviours or {}
        self.node_configs = node_configs
        self.replies: dict = {}
        self.sent: list = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages) -> list[str]:
        from flwr.app import Context, MessageType, RecordDict

        from fedit.runtimes.flower.client import handle_query, handle_train

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append((msg.metadata.dst_node_id, msg))
            client = self.node_ids.index(msg.metadata.dst_node_id)
            node_config = ({"partition-id": client, "num-partitions": len(self.node_ids)}
                           if self.node_configs is None else self.node_configs[client])
            ctx = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config=node_config,
                          state=RecordDict(), run_config={})
            train = msg.metadata.message_type == MessageType.TRAIN
            reply = (handle_train if train else handle_query)(msg, ctx)
            if train and client in self.behaviours:
                reply = self.behaviours[client](msg, reply)
            if reply is not None:
                self.replies[msg.object_id] = reply
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, ids) -> list:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def run_server_app(cfg_path: Path, grid: FakeGrid, *sets: str,
                   resume: str = "") -> tuple[Path, list[dict]]:
    """What `flwr run` makes the ServerApp do, over ``grid``: the run folder and its
    metrics lines."""
    from flwr.app import Context, RecordDict

    from fedit.runtimes.flower.server import server_main

    run_config = {"config": str(cfg_path), "set": " ".join(sets), "resume": resume}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    summary = server_main(grid, context, log=lambda m: None)  # type: ignore[arg-type]
    run_dir = Path(summary["run_dir"])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return run_dir, [json.loads(x) for x in lines]


@pytest.fixture
def flower_task_identity(monkeypatch):
    """Flower stamps every new Message with the identity of the task running it: one, for
    a test that runs the ServerApp and the ClientApp handlers in its own process."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


# -- what the serving tests serve -------------------------------------------------------
KEY = "sk-test-fedit"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """A 2-round tiny run (rounds 1 and 2 kept, final adapter, metrics.jsonl), served by
    the serving tests (test_serve, test_chat_page, test_judge_serve)."""
    from fedit.config import load_config
    from fedit.runtimes.inprocess import Simulation

    tmp = tmp_path_factory.mktemp("serve-run")
    data = write_jsonl(tmp / "rows.jsonl", make_rows(64, seed=5))
    config = write_config(tmp / "tiny.toml", tiny_model_dir, data, name="tiny",
                          train={"max_steps": 2})
    cfg = load_config(config)
    Simulation(cfg, make_run_dir(cfg)).run()
    return tmp / "runs" / "tiny"


@pytest.fixture(scope="module")
def loud(tmp_path_factory, tiny_model_dir) -> Path:
    """A stand-alone adapter with large random weights: it changes every answer."""
    from fedit.model.adapter import get_adapter_arrays, save_adapter, set_adapter_arrays
    from fedit.model.base import LoraSpec, attach_lora, load_base_model

    rng = np.random.default_rng(0)
    lm = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"), LoraSpec(), seed=3)
    set_adapter_arrays(lm, [rng.normal(0, 0.5, a.shape) for a in get_adapter_arrays(lm)])
    return save_adapter(lm, tmp_path_factory.mktemp("adapters") / "loud",
                        base_model=str(tiny_model_dir))


@pytest.fixture
def reference_calls(monkeypatch) -> list[int]:
    """The size of every reference computation in this process (clients and held-out)."""
    calls: list[int] = []
    from fedit.client import dpo as dpo_module

    real = dpo_module.reference_logps

    def counted(model, pairs, *args, **kwargs):
        calls.append(len(pairs))
        return real(model, pairs, *args, **kwargs)

    monkeypatch.setattr(dpo_module, "reference_logps", counted)
    return calls
