"""The pieces a config adds around a strategy, end to end on the tiny model in-process:
robust aggregation, client-level DP with its epsilon, compressed uploads with measured
bytes, mixed LoRA ranks, FFA-LoRA; and what is refused before a run starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fedit.runtimes.inprocess as fs
from fedit.algorithms.strategies import Reply
from fedit.config import load_config
from fedit.errors import ConfigError
from fedit.model.adapter import load_adapter_arrays
from fedit.runtimes.inprocess import Simulation
from tests.conftest import make_rows, make_run_dir, write_config, write_jsonl


@pytest.fixture
def cfg_path(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(96, seed=3))
    return write_config(tmp_path / "pipe.toml", tiny_model_dir, data, name="pipe", seed=9,
                        rounds=2, partition={"clients": 4, "min_size": 4},
                        strategy={"fraction": 1.0}, train={"max_steps": 2})


def _run(cfg_path, *sets):
    cfg = load_config(cfg_path, list(sets))
    run_dir = make_run_dir(cfg)
    summary = Simulation(cfg, run_dir, log=lambda m: None).run()
    return run_dir, summary


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _delta(run_dir: Path, rnd: int) -> list[np.ndarray]:
    before = load_adapter_arrays(run_dir / f"rounds/{rnd - 1:04d}/adapter")
    after = load_adapter_arrays(run_dir / f"rounds/{rnd:04d}/adapter")
    return [a.astype(np.float64) - b for a, b in zip(after, before, strict=True)]


# -- robust aggregation ------------------------------------------------------------------------
def test_median_ignores_a_poisoned_client(cfg_path, monkeypatch):
    # Prepare: client 2 sends its adapter scaled by 1e4 (a poisoned update)
    real = fs.run_client_round

    def poisoned(*args, **kwargs):
        reply = real(*args, **kwargs)
        if kwargs["client"] == 2:
            reply = Reply(reply.client, [a * 1e4 for a in reply.arrays], reply.num_examples,
                          reply.metrics, reply.extra)
        return reply

    monkeypatch.setattr(fs, "run_client_round", poisoned)
    # Execute: the same round under the mean and under the coordinate-wise median
    mean_dir, _ = _run(cfg_path, "name=mean", "rounds=1")
    median_dir, summary = _run(cfg_path, "name=median", "rounds=1", "strategy.aggregator=median")
    # Assert: the mean is blown up, the median stays on the honest clients' scale
    mean_norm = np.sqrt(sum(float((d ** 2).sum()) for d in _delta(mean_dir, 1)))
    median_norm = np.sqrt(sum(float((d ** 2).sum()) for d in _delta(median_dir, 1)))
    honest = max(v for k, v in _lines(median_dir)[1]["update_norms"].items() if k != "2")
    assert median_norm <= honest < 1e-3 * mean_norm
    assert summary["strategy"]["aggregator"] == "median"


def test_krum_names_the_clients_it_kept(cfg_path):
    run_dir, _ = _run(cfg_path, "name=krum", "rounds=1", "strategy.aggregator=krum",
                      "partition.clients=5", "strategy.krum_f=1")
    line = _lines(run_dir)[1]
    assert len(line["selected"]) == 1 and line["selected"][0] in line["clients"]


def test_krum_with_too_few_replies_keeps_the_global_adapter(cfg_path):
    run_dir, _ = _run(cfg_path, "name=krum2", "rounds=1", "strategy.aggregator=krum",
                      "strategy.krum_f=1")  # 4 clients: Krum needs more than 2f + 2 = 4
    assert _lines(run_dir)[1]["aggregated"] is False
    assert all(not d.any() for d in _delta(run_dir, 1))


# -- differential privacy ---------------------------------------------------------------------
def test_central_dp_reports_a_growing_epsilon_and_clips(cfg_path):
    run_dir, summary = _run(cfg_path, "name=dp", "privacy.mode=central", "privacy.clip=0.01",
                            "privacy.noise_multiplier=0.0001")
    lines = _lines(run_dir)
    eps = [m["epsilon"] for m in lines]
    # Assert: nothing spent before round 1, then more each round; the summary says it
    assert eps[0] == 0 and 0 < eps[1] < eps[2] == summary["epsilon"]
    assert summary["delta"] == 1e-5
    # Assert: with almost no noise the mean update is within C of the start (4 clipped
    # updates of norm <= C, their sum divided by the 4 clients expected)
    norm = np.sqrt(sum(float((d ** 2).sum()) for d in _delta(run_dir, 1)))
    assert norm <= 0.01 * (1 + 1e-3)
    assert min(lines[1]["update_norms"].values()) > 0.01  # so clipping did something


def test_local_dp_noise_is_added_by_each_client(cfg_path):
    run_dir, _ = _run(cfg_path, "name=ldp", "rounds=1", "privacy.mode=local",
                      "privacy.clip=0.01", "privacy.noise_multiplier=1.0")
    # each upload is start + clipped delta + N(0, (sigma C)^2) per coordinate: its norm is
    # about sigma * C * sqrt(size), far beyond C
    line = _lines(run_dir)[1]
    size = sum(a.size for a in load_adapter_arrays(run_dir / "rounds/0000/adapter"))
    for norm in line["update_norms"].values():
        assert norm == pytest.approx(0.01 * np.sqrt(size), rel=0.1)
    assert line["epsilon"] > 0


# -- compressed uploads ----------------------------------------------------------------------------
@pytest.mark.parametrize("method, ratio", [("fp16", 0.5), ("int8", 0.25), ("topk", 0.02)])
def test_compression_cuts_the_measured_upload(cfg_path, method, ratio):
    plain, _ = _run(cfg_path, "name=plain", "rounds=1")
    packed, _ = _run(cfg_path, f"name={method}", "rounds=1", f"compress.method={method}")
    up, up0 = _lines(packed)[1]["bytes_up"], _lines(plain)[1]["bytes_up"]
    assert up / up0 == pytest.approx(ratio, rel=0.35)
    assert _lines(packed)[1]["bytes_down"] == _lines(plain)[1]["bytes_down"]


def test_topk_keeps_its_residual_in_client_state(cfg_path):
    from fedit.algorithms.strategies import ClientState
    from fedit.federation import checkpoint as ckpt

    run_dir, _ = _run(cfg_path, "name=topk", "compress.method=topk")
    manifest = ckpt.latest_manifest(run_dir)
    states = {c: ckpt.read_state(run_dir, ref, ClientState)
              for c, ref in manifest.client_states.items()}
    assert sorted(states) == [0, 1, 2, 3]
    assert all(np.abs(np.concatenate([a.ravel() for a in s.arrays["codec.residual"]])).max() > 0
               for s in states.values())


# -- LoRA ranks -------------------------------------------------------------------------------
def test_mixed_ranks_train_each_client_at_its_rank(cfg_path, monkeypatch):
    shapes: dict[int, list[tuple[int, ...]]] = {}
    real = fs.run_client_round

    def spy(*args, **kwargs):
        reply = real(*args, **kwargs)
        shapes[kwargs["client"]] = [a.shape for a in reply.arrays]
        return reply

    monkeypatch.setattr(fs, "run_client_round", spy)
    run_dir, summary = _run(cfg_path, "name=ranks", "lora.client_ranks=[2, 4, 8, 8]")
    # clients 0 and 1 uploaded rank-2 and rank-4 factors; the global adapter stays rank 8
    assert shapes[0][0][0] == 2 and shapes[1][0][0] == 4 and shapes[2][0][0] == 8
    final = load_adapter_arrays(run_dir / "final/adapter")
    assert final[0].shape[0] == 8
    assert summary["final_eval_loss"] < summary["base_eval_loss"]


def test_ffa_lora_sends_only_b_and_keeps_a(cfg_path):
    plain, _ = _run(cfg_path, "name=plain", "rounds=1")
    # FedProx's hook and FFA's freezing hook train together (CombinedHook)
    ffa, _ = _run(cfg_path, "name=ffa", "lora.freeze_a=true", "strategy.name=fedprox",
                  "strategy.mu=1.0")
    a0 = load_adapter_arrays(ffa / "rounds/0000/adapter")
    a2 = load_adapter_arrays(ffa / "final/adapter")
    from fedit.client.load import load_model
    from fedit.model.adapter import adapter_names

    names = adapter_names(load_model(load_config(ffa / "config.toml"))[1])
    for name, x, y in zip(names, a0, a2, strict=True):
        assert np.array_equal(x, y) == ("lora_A" in name), name
    sent = sum(a.nbytes for n, a in zip(names, a0, strict=True) if "lora_B" in n)
    assert _lines(ffa)[1]["bytes_up"] == 4 * sent < _lines(plain)[1]["bytes_up"]


# -- refused before the run -----------------------------------------------------------------
@pytest.mark.parametrize("sets, message", [
    (["flower.secure_aggregation=true", "compress.method=topk"],
     "compress.method = topk under SecAgg+"),
    (["flower.secure_aggregation=true", "strategy.aggregator=median"],
     "strategy.aggregator = median ranks single updates"),
    (["privacy.mode=central", "strategy.aggregator=krum"], "calibrates its noise"),
    (["lora.client_ranks=[2, 4, 8, 8]", "strategy.name=scaffold"], "scaffold's control"),
    (["privacy.mode=local", "privacy.adaptive=true"], "in local mode it does not"),
    (["privacy.mode=central", "strategy.name=scaffold"], "would leak what privacy hides"),
    (["lora.client_ranks=[2, 4]"], "give one rank per client: 2 ranks"),
    (["lora.client_ranks=[2, 4, 16, 8]"], "each rank must be in 1..lora.r = 8"),
])
def test_what_cannot_work_together_is_refused_before_anything_is_written(
        cfg_path, sets, message):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(cfg_path, sets)
        Simulation(cfg, Path(cfg.output_dir) / "refused", log=lambda m: None)
    assert not (Path(load_config(cfg_path).output_dir) / "refused").exists()


def test_central_dp_under_secagg_clips_at_the_clients_and_noises_the_mean(cfg_path):
    # Execute: the same DP run, the server seeing each update vs only their masked mean
    # (the in-process SecAgg+ emulation: clients clip and weigh 1, the server adds noise)
    sets = ["rounds=1", "privacy.mode=central", "privacy.clip=0.01",
            "privacy.noise_multiplier=0.5"]
    clear, _ = _run(cfg_path, "name=clear", *sets)
    masked, _ = _run(cfg_path, "name=masked", *sets, "flower.secure_aggregation=true")
    # Assert: the same clipped sum and the same noise: the same global adapter
    for a, b in zip(_delta(clear, 1), _delta(masked, 1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert _lines(masked)[1]["epsilon"] == _lines(clear)[1]["epsilon"] > 0
    assert _lines(masked)[1]["num_examples"] == _lines(clear)[1]["num_examples"]
