"""`fedit report`: a self-contained HTML page from files the test writes itself."""

from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedit.cli import app
from fedit.errors import DataError
from fedit.report import build_report, load_source, sample_rows

CATS = ["brainstorming", "closed_qa", "open_qa"]
EVIL = '<script>alert("x")</script> & <b>bold</b>'


def _m(loss: float, rouge: float | None) -> dict:
    return {"rows": 2, "loss": loss, "perplexity": 2.718281828**loss, "rouge_l": rouge,
            "similarity": None if rouge is None else rouge + 0.1, "exact_match": None}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _answers(arm: str) -> list[dict]:
    return [{"id": i, "category": CATS[i % 3], "instruction": f"question {i} {EVIL}",
             "context": "ctx & more" if i == 1 else "", "reference": f"reference {i}",
             "answer": f"{arm} answer {i} {EVIL}", "rouge_l": 0.25, "similarity": 0.5,
             "exact_match": None, "loss": 1.0} for i in range(6)]


def _eval(loss: float, rouge: float | None) -> dict:
    return {"overall": _m(loss, rouge),
            "by_category": {c: _m(loss + 0.1 * k, rouge) for k, c in enumerate(CATS)},
            "settings": {"rows": 6}}


ARMS = {"base": 2.6, "local-only": 2.2, "fedit": 2.1, "centralized": 2.05}


@pytest.fixture
def exp_dir(tmp_path: Path) -> Path:
    """An experiment folder as `fedit experiment` writes it (numbers made up)."""
    out = tmp_path / "exp"
    for arm, loss in ARMS.items():
        _write(out / arm / "eval.json", _eval(loss, 0.1 + (2.7 - loss) / 10))
        _write_lines(out / arm / "answers.jsonl", _answers(arm))
    _write_lines(out / "fedit" / "metrics.jsonl", [
        {"round": 0, "clients": [], "eval_loss": 2.6},
        {"round": 1, "clients": [0, 2], "train_loss": 2.4, "eval_loss": 2.3, "seconds": 5.0,
         "eval_loss_by_category": {c: 2.3 + 0.1 * k for k, c in enumerate(CATS)}},
        {"round": 2, "clients": [1, 3], "train_loss": 2.2, "eval_loss": 2.1, "seconds": 5.0,
         "eval_loss_by_category": {c: 2.1 + 0.1 * k for k, c in enumerate(CATS)}},
    ])
    _write(out / "partitions" / "stats.json", {
        "label_field": "category", "num_clients": 2, "num_rows": 30, "labels": CATS,
        "clients": [{"client": 0, "rows": 20, "labels": {"open_qa": 15, "closed_qa": 5}},
                    {"client": 1, "rows": 10, "labels": {"brainstorming": 10}}]})
    arms = {arm: {"arm": arm, "steps": 0 if arm == "base" else 8, "train_seconds": 12.0,
                  "eval_seconds": 3.0, **_eval(loss, 0.1)} for arm, loss in ARMS.items()}
    _write(out / "experiment.json", {
        "experiment": "fedit-paper", "scale": "test", "model": "tiny", "clients": 2,
        "test_rows": 6, "budget": {"rounds": 2, "clients_per_round": 2, "local_steps": 2,
                                   "client_steps": 4, "total_steps": 8},
        "local_clients": [0, 1], "arms": arms, "seconds": 61.0})
    return out


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in
            re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"  # the PNG signature
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def test_experiment_report_embeds_every_plot(exp_dir):
    out = build_report(exp_dir)
    assert out == exp_dir / "report.html"
    text = out.read_text(encoding="utf-8")
    images = _images(text)
    # loss curve, per-category bars, per-category curves, client heatmap
    assert len(images) == 4
    for png in images:
        w, h = _png_size(png)
        assert w >= 300 and h >= 200
    # the same PNGs beside the HTML; the heatmap drawn from stats.json (no clients.png)
    for key in ("loss", "categories", "category_curves", "clients"):
        assert (exp_dir / f"report-{key}.png").read_bytes() in images
    # nothing outside the page
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and "<script" not in text


def test_experiment_report_tables(exp_dir):
    text = build_report(exp_dir).read_text(encoding="utf-8")
    for arm, loss in ARMS.items():
        assert f"<th>{arm}</th>" in text and f"{loss:.4f}" in text
    # the lowest loss (centralized) is the column's best
    assert '<td class="num best">2.0500</td>' in text
    assert "2 rounds x 2 clients x 2 steps" in text


def test_answer_length_column_is_shown_and_never_the_best(exp_dir):
    tokens = {"base": 40.0, "local-only": 31.5, "fedit": 22.25, "centralized": 18.0}
    for arm, n in tokens.items():  # each arm's mean answer length, as fedit eval writes it
        path = exp_dir / arm / "eval.json"
        ev = json.loads(path.read_text(encoding="utf-8"))
        ev["overall"]["answer_tokens"] = n
        _write(path, ev)
    text = build_report(exp_dir).read_text(encoding="utf-8")
    assert "<th>answer tokens</th>" in text
    for n in tokens.values():  # a length has no better side: none of them in bold
        assert f'<td class="num">{n:.4f}</td>' in text
    assert "answer tokens: mean length of the generated answers" in text


def test_answers_are_escaped(exp_dir):
    text = build_report(exp_dir).read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>bold</b>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in text
    assert "context: ctx &amp; more" in text
    for arm in ARMS:
        assert f"{arm} answer 0 &lt;script&gt;" in text


def test_sample_rows_take_one_per_category_first():
    answers = {"a": [{"id": i, "category": "x" if i < 5 else "y"} for i in range(8)]}
    assert sample_rows(answers, 3) == [0, 1, 5]
    assert sample_rows(answers, 20) == list(range(8))
    assert sample_rows({"a": []}, 3) == []


def test_run_folder_report(tmp_path):
    run = tmp_path / "run"
    _write_lines(run / "metrics.jsonl", [{"round": 0, "clients": [], "eval_loss": 3.0},
                                         {"round": 1, "clients": [0], "train_loss": 2.9,
                                          "eval_loss": 2.8, "seconds": 1.0, "lr": 3e-4},
                                         {"round": 2, "clients": [1], "train_loss": 2.7,
                                          "eval_loss": 2.6, "seconds": 1.0, "lr": 1e-6}])
    _write(run / "summary.json", {"clients": 4, "test_rows": 6, "seconds": 10.0,
                                  "bytes_down": 3 * 2**20, "bytes_up": 2**19,
                                  "weights_mb_down": 3.0, "weights_mb_up": 1.0,
                                  "weights_mb_total": 4.0})
    text = build_report(run, tmp_path / "out" / "r.html").read_text(encoding="utf-8")
    # the facts: lr across rounds, fedit's bytes beside FlowerTune's count
    assert "<td>learning rate</td><td>0.0003 (round 1) to 1e-06 (round 2)</td>" in text
    assert ("<td>communication</td><td>3.00 MiB down, 0.50 MiB up (the payloads sent); "
            "weights 4.00 MB as FlowerTune counts them (3.00 down + 1.00 up)</td>") in text
    assert len(_images(text)) == 1  # the loss curve only: no eval, no partitions
    assert (tmp_path / "out" / "r-loss.png").is_file()
    assert "Overall metrics" not in text and "LLM judge" not in text
    # fedit eval and fedit judge add their tables
    _write(run / "eval.json", _eval(2.8, 0.3))
    _write_lines(run / "answers.jsonl", _answers("run"))
    _write(run / "judge.json", {"mode": "single", "judge_model": "judge-x",
                                "overall": {"rows": 6, "mean_score": 6.5}, "by_category": {},
                                "items": []})
    _write(run / "judge-vs-base.json", {"mode": "pairwise", "judge_model": "judge-x",
                                        "overall": {"rows": 6, "win_rate": 0.625},
                                        "by_category": {}, "items": []})
    text = build_report(run).read_text(encoding="utf-8")
    assert "Overall metrics" in text and "2.8000" in text
    assert "<tr><th>run</th><td>single</td><td>judge-x</td>" in text and "6.500" in text
    assert "<tr><th>run vs-base</th><td>pairwise</td>" in text and "0.625" in text
    assert "run answer 0 &lt;script&gt;" in text
    assert len(_images(text)) == 2  # + per-category bars


def test_not_a_run_folder(tmp_path):
    with pytest.raises(DataError, match="neither an experiment folder"):
        load_source(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        load_source(tmp_path / "missing")


def test_broken_files_are_named(tmp_path, exp_dir):
    (exp_dir / "fedit" / "eval.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"fedit/eval.json: not valid JSON"):
        build_report(exp_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not valid JSON"):
        build_report(run)
    (run / "metrics.jsonl").write_text('{"round": 0}\n', encoding="utf-8")
    (run / "judge.json").write_text('{"mode": "single"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"judge.json: no 'overall' table"):
        build_report(run)


def test_cli_report(exp_dir, tmp_path):
    result = CliRunner().invoke(app, ["report", str(exp_dir), "--out", str(tmp_path / "x.html")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'x.html'}" in result.output
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "error:" in result.output and "no such folder" in result.output
