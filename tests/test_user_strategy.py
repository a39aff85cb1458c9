"""Strategies users write: ``from fedit import Strategy``, named in a run config as
``path/to/file.py:Class`` or ``module:Class``, its own parameters under
``[strategy.params]``; the Flower run of the same is in test_flower_local.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import fedit
import fedit.config.schema as schema
from fedit.algorithms import contract
from fedit.algorithms.strategies import STRATEGIES, build_strategy, load_strategy_class
from fedit.algorithms.strategies.base import Strategy, StrategyParams
from fedit.config import load_config
from fedit.errors import ConfigError
from fedit.model.adapter import load_adapter_arrays
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "strategies" / "nesterov.py"


@pytest.fixture
def user_file(tmp_path) -> Path:
    """The documented example, copied to a temporary .py file as a user would write it."""
    path = tmp_path / "user_code" / "my_strategy.py"
    path.parent.mkdir()
    path.write_text(EXAMPLE.read_text())
    return path


@pytest.fixture
def cfg_path(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(48, seed=3))
    return write_config(tmp_path / "job.toml", tiny_model_dir, data, seed=4, rounds=3,
                        partition={"clients": 3, "min_size": 4}, strategy={"fraction": 0.67},
                        train={"max_steps": 2, "lr": 5e-3})


def _final(cfg_path: Path, *sets: str) -> list[np.ndarray]:
    cfg = load_config(cfg_path, list(sets))
    run_dir = make_run_dir(cfg)
    Simulation(cfg, run_dir, log=lambda m: None).run()
    return load_adapter_arrays(run_dir / "final" / "adapter")


def test_the_public_api_is_the_internal_one():
    assert fedit.Strategy is Strategy and fedit.StrategyParams is StrategyParams
    for name in ("Instruction", "Reply", "ServerState", "ClientState", "TrainHook",
                 "TrainInfo", "Combined"):
        assert getattr(fedit, name) is getattr(contract, name)


def test_a_file_strategy_equals_the_same_class_registered_in_tree(cfg_path, user_file,
                                                                  monkeypatch):
    # Prepare: the user's class by file name; the very same class registered in-tree
    ref = f"{user_file}:NesterovFedAvgM"
    cls = load_strategy_class(ref)
    # Execute
    by_file = _final(cfg_path, f"strategy.name={ref}", "strategy.params.momentum=0.5",
                     "name=by-file")
    monkeypatch.setitem(STRATEGIES, "nesterov", (cls, cls.params_class))
    monkeypatch.setattr(schema, "STRATEGY_NAMES", (*schema.STRATEGY_NAMES, "nesterov"))
    in_tree = _final(cfg_path, "strategy.name=nesterov", "strategy.params.momentum=0.5",
                     "name=in-tree")
    fedavg = _final(cfg_path, "name=fedavg")
    # Assert: equal to 1e-6; and the momentum did move the adapter away from FedAvg's
    for a, b in zip(by_file, in_tree, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert max(float(np.abs(a - b).max()) for a, b in zip(by_file, fedavg, strict=True)) > 1e-4


def test_the_parameter_comes_from_strategy_params(user_file):
    ref = f"{user_file}:NesterovFedAvgM"
    s = build_strategy(ref, {"fraction": 0.5, "seed": 9, "server_lr": None},
                       {"momentum": 0.25})
    assert type(s).__name__ == "NesterovFedAvgM"
    assert (s.params.momentum, s.params.server_lr, s.params.fraction, s.params.seed) == (
        0.25, 1.0, 0.5, 9)  # its own default server_lr; the shared keys from [strategy]


def test_a_module_on_the_path_by_name(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    monkeypatch.delitem(sys.modules, "my_strategy", raising=False)
    cls = load_strategy_class("my_strategy:NesterovFedAvgM")
    assert cls.__module__ == "my_strategy" and issubclass(cls, Strategy)


@pytest.mark.parametrize(("ref", "params", "message"), [
    ("no_such_module_xyz:S", {}, r"cannot import no_such_module_xyz \(ModuleNotFoundError"),
    ("{file}:Missing", {}, "has no Strategy subclass named Missing"),
    ("{file}:NesterovParams", {}, "has no Strategy subclass named NesterovParams"),
    ("{dir}/nope.py:S", {}, "nope.py: no such file"),
    ("{file}:NesterovFedAvgM", {"momentun": 0.5},
     "strategy.params.momentun: NesterovParams has no such field; it has fraction, "
     "min_clients, momentum, seed, server_lr"),
    ("{file}:NesterovFedAvgM", {"momentum": 1.5}, r"momentum must be in \[0, 1\), got 1.5"),
])
def test_bad_strategies_are_refused_in_one_line(user_file, ref, params, message):
    ref = ref.format(file=user_file, dir=user_file.parent)
    with pytest.raises(ConfigError, match=message) as e:
        build_strategy(ref, {"seed": 1}, params)
    assert "\n" not in str(e.value)


def test_a_config_names_a_user_strategy_and_checks_the_rest(cfg_path, user_file):
    cfg = load_config(cfg_path, [f"strategy.name={user_file}:NesterovFedAvgM",
                                 "strategy.params.momentum=0.5"])
    assert cfg.strategy.params == {"momentum": 0.5}
    with pytest.raises(ConfigError, match="strategy.name: use one of fedavg, .*'module:Class'"):
        load_config(cfg_path, ["strategy.name=nesterov"])
    with pytest.raises(ConfigError, match="strategy.params.x: expected a value, got a table"):
        load_config(cfg_path, ["strategy.params.x.y=1"])


def test_a_bad_parameter_stops_the_run_before_anything_is_written(cfg_path, user_file):
    cfg = load_config(cfg_path, [f"strategy.name={user_file}:NesterovFedAvgM",
                                 "strategy.params.momentun=0.5", "name=typo"])
    run_dir = make_run_dir(cfg)
    with pytest.raises(ConfigError, match="strategy.params.momentun"):
        Simulation(cfg, run_dir, log=lambda m: None)
    assert list(run_dir.iterdir()) == []
