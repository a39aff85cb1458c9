"""Personal adapters (``[personalize]``): Ditto's v_k trained alongside federation and
kept in client state, finetune after the last round; both saved as PEFT folders and each
better than the global adapter on its own client's rows when the clients differ sharply."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedit.client.personalize import PERSONAL, personal_adapter_dir
from fedit.config import load_config
from fedit.errors import ConfigError
from fedit.model.adapter import get_adapter_arrays, load_adapter_arrays
from tests.conftest import _WORDS, FakeGrid, run_server_app, write_config, write_jsonl

FINAL = "final/adapter/adapter_model.safetensors"


def two_minded_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Half the rows answer "yes ..." (label yes), half "no ..." (label no): a natural
    partition by label gives two clients whose answers differ sharply."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(_WORDS, 2)
        word = "yes" if i % 2 == 0 else "no"
        rows.append({"instruction": f"Tell me about the {a} and the {b}.", "context": "",
                     "response": f"{word} {word} {word}, {word} {word}.", "category": word})
    return rows


def _config(root: Path, model_dir: Path, method: str, **extra: object) -> Path:
    data = write_jsonl(root / "rows.jsonl", two_minded_rows(48, seed=3))
    return write_config(
        root / f"{method}.toml", model_dir, data, rounds=3, seed=5,
        partition={"method": "natural", "clients": 2}, data={"test_per_client": 6},
        train={"max_steps": 3, "lr": 1e-2, "batch_size": 4, "micro_batch_size": 4},
        personalize={"method": method, "lam": 0.05, "epochs": 2}, **extra)


def _run(cfg_path: Path, name: str) -> Path:
    from fedit.runtimes.inprocess import run_federated

    cfg = load_config(cfg_path, [f"name={name}"])
    summary = run_federated(cfg, log=lambda m: None)
    return Path(summary["run_dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """One run per method on the same two-minded data (in-process)."""
    root = tmp_path_factory.mktemp("personal")
    return {m: _run(_config(root, tiny_model_dir, m), m) for m in ("none", "ditto", "finetune")}


@pytest.mark.parametrize("method", ["ditto", "finetune"])
def test_personal_adapter_beats_the_global_one_on_its_own_client(runs, method):
    from fedit.evaluate.runner import run_eval

    run = runs[method]
    final = load_adapter_arrays(run / "final" / "adapter")
    # Execute: fedit eval on the run (losses only)
    result, _, out = run_eval(str(run), generate=False, log=lambda m: None)
    # Assert: per client, on its own held-out rows, the personal adapter is better
    per_client = result["per_client"]
    assert [e["client"] for e in per_client] == [0, 1]
    for e in per_client:
        assert e["rows"] == e["rows_with_loss"] == 6
        assert e["personal_adapter"] == f"personal/client_{e['client']:04d}/adapter"
        assert e["personal_loss"] < e["global_loss"], (method, e)
        personal = load_adapter_arrays(personal_adapter_dir(run, e["client"]))
        assert any(not np.array_equal(p, g) for p, g in zip(personal, final, strict=True))
    assert json.loads((out / "eval.json").read_text())["per_client"] == per_client
    table = (out / "per_client.txt").read_text().splitlines()
    assert table[0].split() == ["client", "rows", "global", "personal", "change"]
    assert table[-1].split()[:3] == ["mean", "of", "2"]
    info = json.loads((run / "personal" / "personal.json").read_text())
    assert info["method"] == method
    assert info["clients"] == {"0": "personal/client_0000/adapter",
                               "1": "personal/client_0001/adapter"}
    assert json.loads((run / "summary.json").read_text())["personal"] == str(run / "personal")


def test_personalisation_leaves_the_global_adapter_unchanged(runs):
    # v_k trains with its own seed after the upload is taken: the federation is the same
    final = {m: (runs[m] / FINAL).read_bytes() for m in runs}
    assert final["ditto"] == final["none"] == final["finetune"]
    assert not (runs["none"] / "personal").exists()


def test_ditto_keeps_v_k_in_client_state_never_in_the_reply(tiny_model_dir, tmp_path):
    from fedit.algorithms.strategies import ClientState
    from fedit.client.load import load_model
    from fedit.client.round import run_client_round
    from fedit.config import PersonalizeConfig
    from fedit.data.batching import tokenize_for_run

    cfg = load_config(_config(tmp_path, tiny_model_dir, "ditto"))
    tokenizer, model = load_model(cfg)
    examples = tokenize_for_run(tokenizer, two_minded_rows(16, 0), cfg.data, "c", None)[0]
    start = get_adapter_arrays(model)
    kw = dict(client=0, server_round=1, seed=cfg.seed, pad_id=int(tokenizer.pad_token_id))
    # Execute: one round without personalisation, the same round with ditto
    plain = run_client_round(model, start, examples, cfg.train, state=ClientState(), **kw)
    state = ClientState()
    ditto = run_client_round(model, start, examples, cfg.train, state=state,
                             personalize=PersonalizeConfig(method="ditto", lam=0.05), **kw)
    # Assert: the same upload, nothing extra in it; v_k only in the state, and trained
    assert ditto.extra == plain.extra == {}
    assert all(np.array_equal(a, b) for a, b in zip(ditto.arrays, plain.arrays, strict=True))
    assert list(state.arrays) == [PERSONAL]
    v_k = state.arrays[PERSONAL]
    assert any(not np.array_equal(v, a) for v, a in zip(v_k, ditto.arrays, strict=True))
    # Its next round starts from v_k, not from the global adapter again
    again = ClientState(arrays={PERSONAL: [v.copy() for v in v_k]})
    run_client_round(model, start, examples, cfg.train, state=again,
                     personalize=PersonalizeConfig(method="ditto", lam=0.05), **kw)
    fresh = ClientState()
    run_client_round(model, start, examples, cfg.train, state=fresh,
                     personalize=PersonalizeConfig(method="ditto", lam=0.05), **kw)
    assert any(not np.array_equal(a, b) for a, b in
               zip(again.arrays[PERSONAL], fresh.arrays[PERSONAL], strict=True))


def test_lambda_pulls_v_k_towards_the_global_adapter(tiny_model_dir, tmp_path):
    from fedit.algorithms.strategies import ClientState
    from fedit.client.load import load_model
    from fedit.client.personalize import ditto_update
    from fedit.config import PersonalizeConfig
    from fedit.data.batching import tokenize_for_run

    cfg = load_config(_config(tmp_path, tiny_model_dir, "ditto"))
    tokenizer, model = load_model(cfg)
    examples = tokenize_for_run(tokenizer, two_minded_rows(16, 0), cfg.data, "c", None)[0]
    rng = np.random.default_rng(0)
    glob = [(0.05 * rng.standard_normal(a.shape)).astype(np.float32)
            for a in get_adapter_arrays(model)]
    dist = {}
    for lam in (0.0, 100.0):
        state = ClientState()
        ditto_update(model, glob, examples, cfg.train, PersonalizeConfig("ditto", lam=lam),
                     state, seed=1, pad_id=int(tokenizer.pad_token_id))
        dist[lam] = sum(float(((v - g) ** 2).sum())
                        for v, g in zip(state.arrays[PERSONAL], glob, strict=True))
    assert dist[100.0] < dist[0.0]


@pytest.mark.parametrize("key,value,message", [
    ("method", "fedper", "personalize.method: use one of none, finetune, ditto"),
    ("lam", -1, "personalize.lam: must be >= 0"),
    ("epochs", 0, "personalize.epochs: must be >= 1"),
])
def test_bad_personalize_values_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"personalize.{key}={json.dumps(value)}"])


def test_mixed_ranks_with_personalisation_are_refused(tiny_model_dir, tmp_path):
    from fedit.runtimes.inprocess import run_federated

    cfg = load_config(_config(tmp_path, tiny_model_dir, "ditto"),
                      ["lora.client_ranks=[4, 8]", "name=mixed"])
    with pytest.raises(ConfigError, match="with lora.client_ranks set personalize.method"):
        run_federated(cfg, log=lambda m: None)


# -- resume ----------------------------------------------------------------------------------
def _fedit(*args: str, cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FEDIT_FAULT", None)
    if fault:
        env["FEDIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "fedit", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_killed_ditto_run_resumes_to_the_same_personal_adapters(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "ditto", strategy={"fraction": 0.5})
    whole = _fedit("train", str(cfg), "--set", "name=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    # Execute: killed before round 2's manifest (v_k of round 2 written, not committed)
    killed = _fedit("train", str(cfg), "--set", "name=killed", fault="before-manifest:2",
                    cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = tmp_path / "runs" / "killed"
    resumed = _fedit("train", "--resume", str(run), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    # Assert: the global adapter and every personal adapter, byte for byte
    ref = tmp_path / "runs" / "whole"
    assert (run / FINAL).read_bytes() == (ref / FINAL).read_bytes()
    info = json.loads((ref / "personal" / "personal.json").read_text())
    assert [k for k, v in info["clients"].items() if v] != []
    for k, folder in info["clients"].items():
        if folder:
            f = f"{folder}/adapter_model.safetensors"
            assert (run / f).read_bytes() == (ref / f).read_bytes(), k


def test_report_shows_global_vs_personal_per_client(runs):
    from fedit.evaluate.runner import run_eval
    from fedit.report import build_report

    run = runs["ditto"]
    run_eval(str(run), generate=False, log=lambda m: None)
    page = build_report(run).read_text()
    assert (run / "report-per_client.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Per client: global vs personal adapter" in page
    assert "<th>personal loss</th>" in page


# -- Flower ----------------------------------------------------------------------------------
def test_under_flower_v_k_stays_on_the_node_and_equals_the_simulation(
        flower_task_identity, runs, tmp_path, tiny_model_dir):
    from fedit.runtimes.flower import wire

    cfg = _config(tmp_path, tiny_model_dir, "ditto", flower={"node_timeout": 0})
    nodes = [tmp_path / f"node{k}" for k in range(2)]
    grid = FakeGrid(2, node_configs=[{"partition-id": k, "num-partitions": 2,
                                      "state-dir": str(d)} for k, d in enumerate(nodes)])
    # Execute: the ditto run of the fixture, over a (fake) Flower Grid
    run_dir, _ = run_server_app(cfg, grid, "name=ditto")
    # Assert: the global adapter of the simulation; each node's personal adapter is the
    # simulation's, saved on the node; no reply carried more than the adapter
    sim = runs["ditto"]
    assert (run_dir / FINAL).read_bytes() == (sim / FINAL).read_bytes()
    for k, node in enumerate(nodes):
        folder = node / "ditto" / f"client_{k:05d}" / "personal" / "adapter"
        mine = load_adapter_arrays(folder)
        ref = load_adapter_arrays(personal_adapter_dir(sim, k))
        assert all(np.array_equal(a, b) for a, b in zip(mine, ref, strict=True))
    n_arrays = len(load_adapter_arrays(sim / "final" / "adapter"))
    for reply in grid.replies.values():
        content = reply.content
        assert not any(k.startswith("x:") for k in content.array_records)
        assert len(wire.record_to_arrays(content.array_records["arrays"])) == n_arrays
    assert not (run_dir / "personal").exists()  # v_k never reached the server


def test_finetune_is_refused_under_flower(flower_task_identity, tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "finetune", flower={"node_timeout": 0})
    with pytest.raises(ConfigError, match="finetune trains after the last round in the "
                                          "simulation only"):
        run_server_app(cfg, FakeGrid(2), "name=ft")


def test_eval_of_a_run_with_only_per_client_rows(runs, tmp_path):
    import shutil

    from fedit.evaluate.runner import format_per_client, run_eval

    # Prepare: the ditto run as if data.test_per_label = 0 (an empty test.jsonl)
    run = tmp_path / "ditto"
    shutil.copytree(runs["ditto"], run)
    (run / "test.jsonl").write_text("")
    # Execute
    result, answers, _ = run_eval(str(run), generate=False, log=lambda m: None)
    # Assert: no global rows, every client's own rows all the same
    assert result["overall"]["rows"] == 0 and answers == []
    assert [e["client"] for e in result["per_client"]] == [0, 1]
    named = [{**e, "name": "clinic B"} for e in result["per_client"]]
    assert format_per_client(named).splitlines()[2].startswith("0 clinic B ")


def test_personal_adapters_are_served_and_evaluated_with_their_run(runs):
    from fedit.evaluate.runner import resolve_target, run_of_adapter
    from fedit.serve.models import build_catalog

    run = runs["ditto"]
    catalog = build_catalog([str(run)])
    assert {"ditto", "ditto/personal-0000", "ditto/personal-0001"} <= set(catalog.models)
    assert catalog.models["ditto/personal-0001"].adapter == personal_adapter_dir(run, 1).resolve()
    assert run_of_adapter(personal_adapter_dir(run, 0)) == run.resolve()
    target = resolve_target(str(personal_adapter_dir(run, 0)))
    assert target.kind == "adapter" and target.run_dir == run.resolve()
