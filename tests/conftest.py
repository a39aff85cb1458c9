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
    """A new run's folder for a config that has a name: checked (no committed round) and
    made, as `fedit train` does."""
    from fedit.federation.rundir import new_run

    assert cfg.name, "tests name their runs (name=...)"
    _, run_dir = new_run(cfg, stem)
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


