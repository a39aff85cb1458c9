"""End to end: `fedit train` on the tiny model, 2 rounds x 2 clients, everything read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fedit.cli import app
from fedit.config import load_config
from fedit.model.adapter import load_adapter_arrays
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl


def _config(tmp_path, model_dir, data_file, rounds=2):
    return write_config(tmp_path / "tiny.toml", model_dir, data_file, name="tiny",
                        rounds=rounds, data={"test_per_label": 3, "cutoff_len": 256},
                        train={"local_epochs": 2, "batch_size": 8, "micro_batch_size": 4})


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "rows.jsonl", make_rows(96, seed=3))


def test_train_cli_end_to_end(tmp_path, tiny_model_dir, data_file):
    # Execute: the real CLI, as a user runs it
    cfg_path = _config(tmp_path, tiny_model_dir, data_file)
    result = CliRunner().invoke(app, ["train", str(cfg_path), "--set", "train.lr=4e-3"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    # Assert: the summary names the run folder and both losses
    assert f"run folder: {run}" in result.output
    assert "held-out response loss on 12 rows" in result.output
    # metrics.jsonl: the base line, then one line per round with every field
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        assert m["clients"] == [0, 1]
        assert set(m) >= {"train_loss", "eval_loss", "seconds", "bytes_up", "bytes_down"}
        assert m["bytes_up"] == m["bytes_down"] > 0
    assert lines[2]["eval_loss"] < lines[1]["eval_loss"] < lines[0]["eval_loss"]
    # FlowerTune's communication cost: the adapter's nbytes, to and from each of 2 clients
    adapter = sum(a.nbytes for a in load_adapter_arrays(run / "final" / "adapter"))
    total = 0.0
    for m in lines[1:]:
        assert m["weights_mb_down"] == m["weights_mb_up"] == pytest.approx(2 * adapter / 2**20)
        assert m["bytes_down"] == 2 * adapter  # uncompressed in-process: the same arrays
        total += m["weights_mb_down"] + m["weights_mb_up"]
        assert m["weights_mb_total"] == pytest.approx(total)
        assert m["lr"] == 4e-3  # the constant round schedule
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights_mb_total"] == pytest.approx(8 * adapter / 2**20)
    assert summary["weights_mb_down"] == pytest.approx(4 * adapter / 2**20)
    assert (f"weights {8 * adapter / 2**20:.2f} MB as FlowerTune counts them "
            f"({4 * adapter / 2**20:.2f} down + {4 * adapter / 2**20:.2f} up)") in result.output
    assert summary["final_eval_loss"] == lines[2]["eval_loss"]
    assert summary["base_eval_loss"] == lines[0]["eval_loss"]
    # The resolved config, the held-out rows and the partitions are in the run folder
    cfg = load_config(run / "config.toml")
    assert cfg.train.lr == 4e-3 and cfg.name == "tiny"
    test_rows = [json.loads(x) for x in (run / "test.jsonl").read_text().splitlines()]
    assert len(test_rows) == 12
    stats = json.loads((run / "partitions" / "stats.json").read_text())
    assert sum(c["rows"] for c in stats["clients"]) == 96 - 12
    assert (run / "partitions" / "clients.png").read_bytes()[:4] == b"\x89PNG"
    # Every round checkpoint and the final adapter are in PEFT format
    for sub in ["rounds/0001/adapter", "rounds/0002/adapter", "final/adapter"]:
        assert (run / sub / "adapter_config.json").is_file()
        assert (run / sub / "adapter_model.safetensors").is_file()
    final = load_adapter_arrays(run / "final" / "adapter")
    last = load_adapter_arrays(run / "rounds" / "0002" / "adapter")
    for a, b in zip(final, last, strict=True):
        np.testing.assert_array_equal(a, b)


def test_held_out_rows_never_reach_a_client(tmp_path, tiny_model_dir, data_file):
    cfg = load_config(_config(tmp_path, tiny_model_dir, data_file))
    sim = Simulation(cfg, make_run_dir(cfg))
    rows = make_rows(96, seed=3)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    test = [key(r) for r in sim.data.test_rows]
    seen = [key(r) for part in sim.data.client_rows for r in part]
    # Every row lands once: in the held-out set or in exactly one client
    assert sorted(test + seen) == sorted(key(r) for r in rows)
    assert len(set(test + seen)) == 96  # the rows are unique, so no held-out row is a client's
    assert len(test) == 12


def test_final_adapter_reloads_with_plain_peft(tmp_path, tiny_model_dir, data_file):
    cfg = load_config(_config(tmp_path, tiny_model_dir, data_file, rounds=1))
    sim = Simulation(cfg, make_run_dir(cfg))
    sim.run()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        in_memory = sim.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, sim.run_dir / "final" / "adapter").eval()
        plain = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            untuned = reloaded(input_ids=ids).logits
    torch.testing.assert_close(plain, in_memory, rtol=1e-5, atol=1e-5)
    assert (plain - untuned).abs().max() > 1e-3  # the adapter is not a no-op


def test_a_folder_with_committed_rounds_is_refused_and_resume_is_named(
        tmp_path, tiny_model_dir, data_file):
    # Prepare: a finished one-round run
    cfg_path = _config(tmp_path, tiny_model_dir, data_file, rounds=1)
    assert CliRunner().invoke(app, ["train", str(cfg_path)]).exit_code == 0
    # Execute: the same command again
    result = CliRunner().invoke(app, ["train", str(cfg_path)])
    # Assert: one line that names --resume
    run = tmp_path / "runs" / "tiny"
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: run folder {run} holds a run that already committed rounds: continue it "
        f"with `fedit train --resume {run}`, or choose another name (--set name=...)")


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, tiny_model_dir, data_file):
    cfg_path = _config(tmp_path, tiny_model_dir, data_file)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "notes.txt").write_text("mine\n")
    result = CliRunner().invoke(app, ["train", str(cfg_path)])
    assert result.exit_code == 2
    assert "runs/tiny exists and is not a fedit run folder (it holds notes.txt)" in result.output
    assert (tmp_path / "runs" / "tiny" / "notes.txt").read_text() == "mine\n"  # untouched


def test_a_run_that_failed_on_its_data_can_be_run_again(tmp_path, tiny_model_dir, data_file):
    # Prepare: a typo in data.path
    cfg_path = _config(tmp_path, tiny_model_dir, data_file, rounds=1)
    bad = CliRunner().invoke(app, ["train", str(cfg_path), "--set",
                                   f"data.path={tmp_path / 'rowz.jsonl'}"])
    assert bad.exit_code == 2 and "rowz.jsonl" in bad.output
    # Execute: the same command with the typo fixed
    good = CliRunner().invoke(app, ["train", str(cfg_path)])
    # Assert: no "already exists", the run completes in the same folder
    assert good.exit_code == 0, good.output
    assert (tmp_path / "runs" / "tiny" / "summary.json").is_file()


def test_a_run_that_failed_on_its_model_can_be_run_again(tmp_path, tiny_model_dir, data_file):
    # Prepare: the data split is written, then the model fails to load
    cfg_path = _config(tmp_path, tiny_model_dir, data_file, rounds=1)
    bad = CliRunner().invoke(app, ["train", str(cfg_path), "--set",
                                   f"model.name={tmp_path / 'no-model'}"])
    assert bad.exit_code == 2 and "no-model does not exist" in bad.output
    assert (tmp_path / "runs" / "tiny" / "test.jsonl").is_file()
    # Execute / Assert: the same command with the model fixed runs in that folder
    good = CliRunner().invoke(app, ["train", str(cfg_path)])
    assert good.exit_code == 0, good.output


def test_no_held_out_set_trains_and_says_so(tmp_path, tiny_model_dir, data_file):
    cfg_path = _config(tmp_path, tiny_model_dir, data_file, rounds=1)
    result = CliRunner().invoke(app, ["train", str(cfg_path), "--set",
                                      "data.test_per_label=0"])
    assert result.exit_code == 0, result.output
    assert "no held-out rows (data.test_per_label = 0): no held-out loss" in result.output
    run = tmp_path / "runs" / "tiny"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["eval_loss"] for m in lines] == [None, None]
    assert (run / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_override_is_one_line(tmp_path, tiny_model_dir, data_file):
    cfg_path = _config(tmp_path, tiny_model_dir, data_file)
    result = CliRunner().invoke(app, ["train", str(cfg_path), "--set", "train.lrr=1"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: --set: unknown key 'train.lrr'; did you mean 'train.lr'?"
    )


def test_a_run_without_held_out_rows_has_a_report(tmp_path, tiny_model_dir, data_file):
    cfg_path = _config(tmp_path, tiny_model_dir, data_file, rounds=1)
    assert CliRunner().invoke(app, ["train", str(cfg_path), "--set",
                                    "data.test_per_label=0"]).exit_code == 0
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs" / "tiny")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "tiny" / "report.html").read_text().startswith("<!")
