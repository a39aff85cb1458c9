"""configs/conversations.toml end to end on the tiny model: a folder of conversation files
in three formats, one client a file, Ditto's personal adapters, per-client evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from fedit.config import load_config
from fedit.data.clients import with_client_count
from fedit.evaluate.runner import run_eval
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_run_dir

ROOT = Path(__file__).resolve().parents[1]


def test_the_conversations_config_federates_and_personalises(tmp_path, tiny_model_dir):
    cfg = load_config(ROOT / "configs" / "conversations.toml", [
        f'model.name="{tiny_model_dir}"', 'model.dtype="fp32"', f'output_dir="{tmp_path}"',
        f'data.clients_dir="{ROOT / "examples" / "conversations"}"', "rounds=2",
        "train.max_steps=1"])
    assert with_client_count(cfg).partition.clients == 3  # one client a file
    run = make_run_dir(cfg, "conversations")
    Simulation(cfg, run).run()
    stats = json.loads((run / "partitions" / "stats.json").read_text())
    assert [c["rows"] for c in stats["clients"]] == [8, 8, 8]  # 2 of 10 held out a client
    assert [c["name"] for c in stats["clients"]] == ["bakery", "IT help desk", "travel agency"]
    for k in range(3):
        held_out = (run / "client_test" / f"client_{k:04d}.jsonl").read_text().splitlines()
        assert len(held_out) == 2 and "messages" in json.loads(held_out[0])
        assert (run / "personal" / f"client_{k:04d}" / "adapter" / "adapter_config.json").is_file()
    result, _, _ = run_eval(str(run), generate=False, log=lambda m: None)
    per_client = result["per_client"]
    assert [c["client"] for c in per_client] == [0, 1, 2]
    assert all(c["global_loss"] > 0 and c["personal_loss"] > 0 for c in per_client)
