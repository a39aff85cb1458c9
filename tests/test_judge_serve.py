"""`fedit judge` against a real `fedit serve` on 127.0.0.1: the tiny random model as judge.

Its replies carry no verdict, so every row must come back counted as unparsable, never
dropped; the requests the judge says it made are the ones in the server's access log.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedit.cli import app as cli_app
from fedit.serve.launch import ServerProcess

# the fixture ``run``: a 2-round tiny run, served as `tiny`, its base as `base`

_POST = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" (\d{3})')


@pytest.fixture(scope="module")
def server(run):  # noqa: F811
    """One request decoded at a time and one waiting: more in flight are answered 429."""
    served = ServerProcess([str(run), "--max-batch", "2", "--max-queue", "1"])
    yield served
    served.stop()


def answers(texts: list[str]) -> list[dict]:
    return [{"id": i, "category": ("open_qa", "closed_qa")[i % 2],
             "instruction": f"Name a river, question {i}.", "context": "",
             "reference": "The Nile.", "answer": text} for i, text in enumerate(texts)]


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def statuses(server: ServerProcess, since: int) -> list[str]:
    """HTTP statuses of the chat requests the server logged after ``since`` of them."""
    return _POST.findall(server.log.read_text())[since:]


def judge(args: list[str], tmp_path: Path) -> str:
    """`fedit judge ARGS` with a cache of its own; what it printed."""
    result = CliRunner().invoke(cli_app, ["judge", *args, "--cache",
                                          str(tmp_path / "cache.sqlite")])
    assert result.exit_code == 0, result.output
    return result.output


def test_single_grades_against_fedit_serve(server, tmp_path):
    # a long answer: its prompt alone is over the tiny model's 1,024 tokens (HTTP 400)
    rows = answers(["The Nile.", "Amazon river", "I do not know.", "river " * 1500])
    file = write(tmp_path / "fedit" / "answers.jsonl", rows)
    before = len(statuses(server, 0))
    out = judge([str(file.parent), "--judge-url", server.url + "/v1", "--judge-model", "tiny",
                 "--concurrency", "2"], tmp_path)
    written = json.loads((file.parent / "judge.json").read_text())
    overall = written["overall"]
    assert overall["rows"] == 4 and overall["judged"] + overall["unparsable"] == 4
    assert f"({overall['judged']} judged, {overall['unparsable']} unparsable)" in out
    assert all(it["score"] is None or 1 <= it["score"] <= 10 for it in written["items"])
    assert written["items"][3]["score"] is None  # too long for the judge: counted, not fatal
    assert written["settings"]["too_long"] == 1
    assert "1 prompts too long for the judge's context (unparsable)" in out
    seen = statuses(server, before)
    assert len(seen) == written["settings"]["requests"]  # every request reached the server
    # HTTP 400 for the first prompts sent with max_tokens (then none is sent) and for the
    # long row, which does not fit even without
    assert 2 <= seen.count("400") <= 3 and set(seen) <= {"200", "400", "429"}
    records = [json.loads(x) for x in (file.parent / "judge.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2, 3]
    assert all(isinstance(r["judgment"], str) for r in records)
    assert records[0]["judgment"]  # the tiny model did answer


def test_pairwise_with_the_base_model_as_judge(server, tmp_path):
    mine = write(tmp_path / "fedit" / "answers.jsonl", answers(["The Nile.", "Amazon"]))
    other = write(tmp_path / "local" / "answers.jsonl", answers(["Danube", "no idea"]))
    before = len(statuses(server, 0))
    # one prompt at a time: 4 in flight overflow the server, and whether the one answered
    # 429 gets in within its retries depends on how fast the others decode (the busy
    # server is test_busy_server_429_is_retried's subject)
    judge([str(mine), "--against", str(other.parent), "--judge-url", server.url + "/v1",
           "--judge-model", "base", "--no-reference", "--concurrency", "1"], tmp_path)
    written = json.loads((tmp_path / "fedit" / "judge-vs-local.json").read_text())
    assert written["mode"] == "pairwise" and written["judge_model"] == "base"
    overall = written["overall"]
    assert overall["rows"] == 2 and overall["judged"] + overall["unparsable"] == 2
    assert all(it["outcome"] in (None, "win", "tie", "loss") for it in written["items"])
    assert len(statuses(server, before)) == written["settings"]["requests"] >= 4


def test_busy_server_429_is_retried(server, tmp_path):
    rows = answers([f"answer {i}" for i in range(4)])
    file = write(tmp_path / "answers.jsonl", rows)
    before = len(statuses(server, 0))
    judge([str(file), "--judge-url", server.url, "--judge-model", "tiny", "--concurrency", "4",
           "--retries", "10"], tmp_path)
    written = json.loads((tmp_path / "judge.json").read_text())
    assert written["overall"]["rows"] == 4
    seen = statuses(server, before)
    assert "429" in seen  # 4 in flight, 3 places: one at least was told to wait
    assert len(seen) == written["settings"]["requests"]
    assert seen.count("200") >= 4 and set(seen) <= {"200", "400", "429"}


def test_unknown_judge_model_is_one_clear_line(server, tmp_path):
    file = write(tmp_path / "answers.jsonl", answers(["The Nile."]))
    result = CliRunner().invoke(cli_app, [
        "judge", str(file), "--judge-url", server.url + "/v1", "--judge-model", "gpt-4o",
        "--cache", str(tmp_path / "cache.sqlite")])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "HTTP 404" in line and "gpt-4o" in line
