"""`fedit experiment ... --seeds 2` at the test scale on the tiny model: one folder a seed,
seeds change the split and the numbers, a seed run again gives the same bytes, and
experiment.json's mean ± sd are those of the per-seed values (computed here again)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedit.cli import app
from fedit.experiment.seeds import mean_sd
from tests.conftest import make_rows, write_jsonl

ARMS = ["base", "local-only", "fedit", "centralized"]


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _cli(args: list[str]):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from two threads
    try:
        result = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def seeded(tiny_model_dir, tmp_path_factory):
    """Seeds 42 and 43 in one folder; seed 43 alone in another."""
    tmp = tmp_path_factory.mktemp("seeds")
    data = write_jsonl(tmp / "rows.jsonl", make_rows(80))
    base = ["experiment", "fedit-paper", "--scale", "test", "--set",
            f"model.name={tiny_model_dir}", "--set", f"data.path={data}"]
    output = _cli([*base, "--out", str(tmp / "two"), "--seeds", "2"])
    _cli([*base, "--out", str(tmp / "again"), "--set", "seed=43"])
    return tmp / "two", tmp / "again", output


def test_one_folder_a_seed_and_the_split_follows_the_seed(seeded):
    two, _, output = seeded
    summary = _read(two / "experiment.json")
    assert summary["seeds"] == [42, 43]
    for s in (42, 43):
        assert all((two / f"seed-{s}" / arm / "eval.json").is_file() for arm in ARMS)
        assert _read(two / f"seed-{s}" / "experiment.json")["arms"].keys() == set(ARMS)
    split = {s: (two / f"seed-{s}" / "test.jsonl").read_bytes() for s in (42, 43)}
    assert split[42] != split[43]  # another held-out split
    fedit = [_read(two / f"seed-{s}" / "fedit" / "eval.json")["overall"]["loss"]
             for s in (42, 43)]
    assert fedit[0] != pytest.approx(fedit[1], rel=1e-6)  # another result
    assert "2 seeds (42, 43): mean ± sd" in output


def test_the_same_seed_reproduces_byte_for_byte(seeded):
    two, again, _ = seeded
    one = two / "seed-43"
    files = ["test.jsonl", "partitions/stats.json", "base/answers.jsonl",
             "fedit/answers.jsonl", "fedit/final/adapter/adapter_model.safetensors",
             "centralized/adapter/adapter_model.safetensors", "centralized/answers.jsonl"]
    files += [str(p.relative_to(one))
              for p in one.glob("local-only/client_*/adapter/*.safetensors")]
    assert len(files) == 9
    for rel in files:
        assert (one / rel).read_bytes() == (again / rel).read_bytes(), rel
    for arm in ARMS:
        assert _read(one / arm / "eval.json")["overall"] == _read(again / arm / "eval.json")[
            "overall"]


def test_mean_and_sd_are_those_of_the_per_seed_values(seeded):
    two, _, _ = seeded
    summary = _read(two / "experiment.json")
    for arm in ARMS:
        for metric in ("loss", "perplexity", "rouge_l"):
            values = [_read(two / f"seed-{s}" / arm / "eval.json")["overall"][metric]
                      for s in (42, 43)]
            got = summary["arms"][arm]["overall"][metric]
            assert got["values"] == values
            assert got["mean"] == pytest.approx((values[0] + values[1]) / 2)
            # two values: the sample sd is |a - b| / sqrt(2)
            assert got["sd"] == pytest.approx(abs(values[0] - values[1]) / np.sqrt(2))


def test_local_only_reports_every_client_it_trained(seeded):
    two, _, _ = seeded
    summary = _read(two / "experiment.json")
    per_client = summary["arms"]["local-only"]["per_client"]
    assert sorted(per_client) == ["42", "43"]
    for s, clients in per_client.items():
        picked = summary["local_clients"][s]
        assert sorted(int(c) for c in clients) == picked and len(picked) == 2
        for c, overall in clients.items():
            own = _read(two / f"seed-{s}" / "local-only" / f"client_{int(c):04d}" / "eval.json")
            assert overall == own["overall"]
        seed_summary = _read(two / f"seed-{s}" / "experiment.json")
        assert seed_summary["arms"]["local-only"]["per_client"] == clients


def test_mean_sd_by_hand():
    assert mean_sd([1.0, 2.0, 3.0, 4.0]) == {"mean": 2.5, "sd": pytest.approx(1.2909944),
                                             "values": [1.0, 2.0, 3.0, 4.0]}
    assert mean_sd([5.0])["sd"] is None


def test_a_second_run_resumes_every_seed(seeded, tiny_model_dir):
    two, _, _ = seeded
    cfg = (two / "seed-42" / "config.toml").read_text()
    data = next(line for line in cfg.splitlines() if line.startswith("path = "))
    data = json.loads(data.removeprefix("path = "))
    output = _cli(["experiment", "fedit-paper", "--scale", "test", "--set",
                   f"model.name={tiny_model_dir}", "--set", f"data.path={data}",
                   "--out", str(two), "--seeds", "2"])
    assert output.count("[fedit] done before (eval.json exists): skipped") == 2


def test_seeds_into_a_one_seed_folder_or_below_two_is_refused(seeded, tmp_path):
    _, again, _ = seeded
    for out, n, message in [(again, "2", f"error: {again} holds a one-seed experiment; "
                                         "choose another --out"),
                            (tmp_path / "x", "0", "error: --seeds 0: give 2 or more")]:
        result = CliRunner().invoke(app, ["experiment", "fedit-paper", "--scale", "test",
                                          "--out", str(out), "--seeds", n])
        assert result.exit_code == 2
        assert result.output.strip() == message


def test_the_paired_differences_are_gathered_across_seeds(seeded):
    two, _, output = seeded
    paired = _read(two / "experiment.json")["paired"]
    assert set(paired) == {"fedit vs base", "fedit vs centralized",
                           "fedit vs local-only clients"}
    # each seed's own paired section, read back: the same numbers, seed by seed
    own = {s: _read(two / f"seed-{s}" / "experiment.json")["paired"]["pairs"] for s in (42, 43)}
    loss = paired["fedit vs base"]["loss"]
    diffs = [own[s]["fedit vs base"]["metrics"]["loss"]["diff"] for s in (42, 43)]
    assert [e["seed"] for e in loss["per_seed"]] == [42, 43]
    assert [e["diff"] for e in loss["per_seed"]] == diffs
    assert loss["diff"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert loss["diff"]["sd"] == pytest.approx(abs(diffs[0] - diffs[1]) / np.sqrt(2))
    verdicts = [own[s]["fedit vs base"]["metrics"]["loss"]["verdict"] for s in (42, 43)]
    assert loss["verdicts"] == {v: verdicts.count(v)
                                for v in ("better", "no difference at 95%", "worse")}
    # the local-only clients are pooled: one entry per (seed, client)
    local = paired["fedit vs local-only clients"]["loss"]["per_seed"]
    assert sorted((e["seed"], e["a"]) for e in local) == sorted(
        (s, f"local-only/client_{c:04d}") for s in (42, 43)
        for c in _read(two / "experiment.json")["local_clients"][str(s)])
    assert "fedit vs base: loss " in output and " over 2: better " in output


def test_the_report_of_a_seeds_folder_puts_the_seeds_side_by_side(seeded):
    import base64
    import io
    import re

    from matplotlib.image import imread

    two, _, output = seeded
    assert (two / "seed-42" / "report.html").is_file()
    assert (two / "seed-43" / "report.html").is_file()
    assert f"{two / 'report.html'}" in output  # the experiment wrote the page across seeds
    result = CliRunner().invoke(app, ["report", str(two), "--out", str(two / "again.html")])
    assert result.exit_code == 0, result.output
    page = (two / "again.html").read_text(encoding="utf-8")
    summary = _read(two / "experiment.json")
    loss = summary["arms"]["fedit"]["overall"]["loss"]
    assert f"{loss['mean']:.4f} ± {loss['sd']:.4f}" in page  # mean ± sd of each arm
    for s in ("42", "43"):  # a link to each seed's own report, and every local-only client
        assert f'<a href="seed-{s}/report.html">seed {s}</a>' in page
        for c, o in summary["arms"]["local-only"]["per_client"][s].items():
            assert f"<td>{s}</td><td>{c}</td><td class=\"num\">{o['loss']:.4f}</td>" in page
    # the forest plot: a row per compared arm and seed, embedded and written beside the page
    title = "Paired differences per seed: fedit - other arm, 95% intervals"
    embedded = re.findall(rf'<img alt="{title}" src="data:image/png;base64,([^"]+)"', page)
    png = (two / "again-paired.png").read_bytes()
    assert [base64.b64decode(embedded[0])] == [png]
    image = imread(io.BytesIO(png), format="png")
    assert image.shape[1] == 1000 and image[..., :3].std() > 0.05
