"""Config: TOML + overrides, every bad key and value named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedit.config import RunConfig, load_config, to_toml
from fedit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_shepherds_lora():
    cfg = RunConfig()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.data.train_on_inputs is False


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('rounds = 2\n[train]\nlr = 1e-3\n')
    cfg = load_config(p, ["train.lr=2e-4", "rounds=7", "model.name=/some/dir",
                          "data.fields.context=input", "lora.target_modules=['q_proj']"])
    assert cfg.train.lr == 2e-4 and cfg.rounds == 7
    assert cfg.model.name == "/some/dir"
    assert cfg.data.fields == {"context": "input"}
    assert cfg.lora.target_modules == ["q_proj"]


def test_int_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1e-4", "unknown key 'train.lrr'; did you mean 'train.lr'"),
        ("lr=1e-4", "unknown key 'lr'; did you mean 'train.lr'"),
        ("roundz=3", "unknown key 'roundz'; did you mean 'rounds'"),
        ("train.lr=fast", "train.lr: expected float, got 'fast'"),
        ("rounds=2.5", "rounds: expected int, got 2.5"),
        ("rounds=0", "rounds: must be >= 1"),
        ("partition.method=random", "partition.method: use one of iid, shards, dirichlet"),
        ("strategy.fraction=1.5", r"strategy.fraction: must be in \(0, 1\]"),
        ("train.micro_batch_size=3", "train.micro_batch_size: must divide train.batch_size"),
        ("train.round_schedule=step", "train.round_schedule: use one of constant, cosine"),
        ("train.min_lr=1e-3", r"train.min_lr: must be in \[0, train.lr = 0.0003\]"),
        ("train.min_lr=-1e-6", r"train.min_lr: must be in \[0, train.lr"),
        ("data.fields.output=answer", "data.fields: unknown canonical field"),
        ("train=3", r"train: expected a table \[train\]"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_file_names_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nbatchsize = 4\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key 'train.batchsize'; did you "
                       r"mean 'train.batch_size'"):
        load_config(p)
    p.write_text("rounds = \n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_config(None, ["name=x", 'data.fields.context="in put"', "train.lr=3e-4"])
    p = tmp_path / "resolved.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("sets", [[], ["strategy.server_lr=0.25"], ["strategy.server_lr=1"]])
def test_an_optional_key_round_trips_set_or_not(sets, tmp_path):
    cfg = load_config(None, sets)
    text = to_toml(cfg)
    assert ("server_lr" in text) == bool(sets)  # None (not set) is left out: TOML has no null
    p = tmp_path / "config.toml"
    p.write_text(text)
    assert load_config(p) == cfg
    assert cfg.strategy.server_lr in (None, 0.25, 1.0)
    assert isinstance(cfg.strategy.server_lr, float | None)  # an int is read as a float


def test_the_fields_fedit_strategies_lists_carry_help():
    import dataclasses

    from fedit.config import (
        AGGREGATOR_NAMES,
        COMPRESS_METHODS,
        CompressConfig,
        LoraConfig,
        PrivacyConfig,
        StrategyConfig,
    )

    for cls in (StrategyConfig, PrivacyConfig, CompressConfig, LoraConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(StrategyConfig)}
    assert helps["aggregator"] == " | ".join(AGGREGATOR_NAMES)
    assert dataclasses.fields(CompressConfig)[0].metadata["help"] == " | ".join(COMPRESS_METHODS)


@pytest.mark.parametrize("name", ["quickstart.toml", "fedit-dolly.toml", "conversations.toml"])
def test_shipped_configs_load_and_open_with_their_command(name):
    path = ROOT / "configs" / name
    cfg = load_config(path)
    assert path.read_text().splitlines()[1].strip().startswith("#   fedit train configs/" + name)
    assert cfg.model.name == "smollm2-135m"


def test_fedit_dolly_is_the_reference_setting():
    cfg = load_config(ROOT / "configs" / "fedit-dolly.toml")
    assert (cfg.partition.clients, cfg.rounds, cfg.strategy.fraction) == (10, 10, 0.1)
    assert (cfg.train.local_epochs, cfg.train.batch_size, cfg.train.micro_batch_size) == (2, 64, 32)
    assert (cfg.train.lr, cfg.data.cutoff_len, cfg.data.test_per_label) == (3e-4, 512, 10)
    assert cfg.data.train_on_inputs and cfg.train.group_by_length
