"""The LLM judge against a real OpenAI-compatible HTTP server (FastAPI + uvicorn on 127.0.0.1).

The server decides from the prompt it receives: a single grade is the N of "score=N" in the
answer; a pairwise verdict favours the answer that says GOOD, or always position A. A script
of faults (a reply without a verdict, HTTP 500, HTTP 429) is played before the normal
replies. It counts every request it gets.

No test waits: the clients' back-off goes to a ``Waits`` that records it, and a request the
server never answers is played by a transport that raises httpx's timeout at once.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from fedit.cli import app as cli_app
from fedit.errors import DataError
from fedit.evaluate.judge import Judge, default_cache_path, judge_pairwise, judge_single, run_judge
from fedit.evaluate.judge_answers import load_answers, match_rows
from fedit.evaluate.judge_cache import JudgeCache
from fedit.evaluate.judge_client import JudgeClient, JudgeError, chat_endpoint
from fedit.evaluate.judge_prompts import (
    pairwise_messages,
    parse_rating,
    parse_verdict,
    single_messages,
)


@dataclass
class ServerState:
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    script: list[str] = field(default_factory=list)  # faults played first: malformed|500|429
    pairwise: str = "better"  # better: the answer saying GOOD wins; favour_a: always [[A]]
    url: str = ""


STATE = ServerState()
_BLOCK = r"\[The Start of {who} Answer\]\n(.*?)\n\[The End of {who} Answer\]"


def _judge_reply(body: dict[str, Any]) -> str:
    user = body["messages"][-1]["content"]
    single = re.search(_BLOCK.format(who="Assistant's"), user, re.S)
    if single:
        n = re.search(r"score=(\d+)", single.group(1))
        return f"The answer is fine. Rating: [[{n.group(1) if n else 5}]]"
    if STATE.pairwise == "favour_a":
        return "Assistant A is more detailed. [[A]]"
    a = re.search(_BLOCK.format(who="Assistant A's"), user, re.S).group(1)
    b = re.search(_BLOCK.format(who="Assistant B's"), user, re.S).group(1)
    return "[[A]]" if "GOOD" in a else "[[B]]" if "GOOD" in b else "Both alike. [[C]]"


server_app = FastAPI()


@server_app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    body = await request.json()
    STATE.requests.append(body)
    STATE.headers.append(dict(request.headers))
    fault = STATE.script.pop(0) if STATE.script else None
    if fault == "500":
        return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
    if fault == "429":
        return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                            headers={"Retry-After": "0.3"})
    content = _judge_reply(body) if fault is None else (
        "I cannot decide." if fault == "malformed" else f"No verdict ({fault}).")
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}]}


@pytest.fixture(scope="module")
def server_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(server_app, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def server(server_url):
    STATE.__init__()  # a fresh script and request count for each test
    STATE.url = server_url
    return STATE


def answers(scores_or_texts: list[Any], categories=("open_qa", "closed_qa")) -> list[dict]:
    rows = []
    for i, v in enumerate(scores_or_texts):
        text = f"score={v} answer {i}" if isinstance(v, int) else v
        rows.append({"id": i, "category": categories[i % len(categories)],
                     "instruction": f"Question number {i}?",
                     "context": "Some context." if i % 2 else "", "reference": f"ref {i}",
                     "answer": text, "rouge_l": 0.0, "similarity": 0.0, "exact_match": None,
                     "loss": None})
    return rows


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Waits:
    """Stands in for ``time.sleep`` in a client: records each back-off instead of waiting."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


class SilentServer(httpx.BaseTransport):
    """The test server, except that its first ``silent`` requests get no reply: each is
    recorded and raises what httpx raises when the timeout runs out, at once."""

    def __init__(self, silent: int) -> None:
        self.silent = silent
        self.timeouts: list[dict[str, float]] = []  # the timeout each request carried
        self._network = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.timeouts.append(request.extensions["timeout"])
        if len(self.timeouts) <= self.silent:
            raise httpx.ReadTimeout("timed out", request=request)
        return self._network.handle_request(request)

    def close(self) -> None:
        self._network.close()


def make_judge(server, tmp_path, **client_kw) -> Judge:
    """A judge of the test server whose back-off is recorded in ``judge.client.sleep``."""
    client_kw = {"timeout": 2.0, "retries": 2, "backoff": 0.01, "sleep": Waits()} | client_kw
    return Judge(JudgeClient(server.url, "judge-1", **client_kw),
                 JudgeCache(tmp_path / "cache.sqlite"))


def test_parsers_and_endpoint():
    assert parse_rating("Rating: [[5]] ... on reflection Rating: [[7]]") == 7
    assert parse_rating("Rating: [[8.5]]") == 8.5
    assert parse_rating("Rating: [[11]]") is None and parse_rating("Rating: 7") is None
    assert parse_verdict('format "[[A]]" ... my final verdict: [[B]]') == "B"
    assert parse_verdict("[[C]]") == "C" and parse_verdict("A is better") is None
    assert chat_endpoint("http://h:8080/v1/") == "http://h:8080/v1/chat/completions"
    assert chat_endpoint("http://h:8080") == "http://h:8080/v1/chat/completions"
    assert chat_endpoint("https://x/openai/v1") == "https://x/openai/v1/chat/completions"
    assert chat_endpoint("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_single_grades_parsed_per_category(server, tmp_path):
    rows = answers([7, 3, 9, 4])  # open_qa: 7, 9; closed_qa: 3, 4
    result = judge_single(rows, make_judge(server, tmp_path), log=lambda m: None)
    assert [it["score"] for it in result["items"]] == [7, 3, 9, 4]
    assert result["overall"] == {"rows": 4, "judged": 4, "unparsable": 0, "mean_score": 5.75}
    assert result["by_category"]["open_qa"]["mean_score"] == 8.0
    assert result["by_category"]["closed_qa"]["mean_score"] == 3.5
    # what the judge was sent: MT-Bench single-math-v1, the reference, temperature 0
    body = next(b for b in server.requests if "Question number 1?" in b["messages"][1]["content"])
    assert body["model"] == "judge-1" and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    user = body["messages"][1]["content"]
    assert user.startswith("[Instruction]\nPlease act as an impartial judge")
    assert "[Question]\nQuestion number 1?\n\n[Context]\nSome context.\n\n" in user
    assert "[The Start of Reference Answer]\nref 1\n[The End of Reference Answer]" in user
    assert "authorization" not in server.headers[0]  # no key, no header


def test_pairwise_position_bias_is_a_tie(server, tmp_path):
    server.pairwise = "favour_a"
    mine = answers(["GOOD a", "GOOD b", "GOOD c"])
    other = answers(["x", "y", "z"])
    result = judge_pairwise(match_rows(mine, other, tmp_path, tmp_path),
                            make_judge(server, tmp_path), log=lambda m: None)
    assert len(server.requests) == 6  # each pair in both orders
    assert [(it["verdict_ab"], it["verdict_ba"], it["outcome"], it["consistent"])
            for it in result["items"]] == [("A", "A", "tie", False)] * 3
    overall = result["overall"]
    counts = (overall["win"], overall["tie"], overall["loss"], overall["inconsistent"])
    assert counts == (0, 3, 0, 3)
    assert overall["tie_rate"] == 1.0 and overall["win_rate"] == 0.0


def test_pairwise_better_answer_wins_in_both_orders(server, tmp_path):
    # open_qa (even ids): mine is better; closed_qa (odd ids): the other one; id 4: neither
    mine = answers(["GOOD 0", "plain 1", "GOOD 2", "plain 3", "plain 4"])
    other = answers(["plain 0", "GOOD 1", "plain 2", "GOOD 3", "plain 4"])
    result = judge_pairwise(match_rows(mine, other, tmp_path, tmp_path),
                            make_judge(server, tmp_path), concurrency=3, log=lambda m: None)
    assert [it["outcome"] for it in result["items"]] == ["win", "loss", "win", "loss", "tie"]
    assert [(it["verdict_ab"], it["verdict_ba"]) for it in result["items"]][:2] == [
        ("A", "B"), ("B", "A")]
    assert all(it["consistent"] for it in result["items"])
    assert result["by_category"]["open_qa"] == {
        "rows": 3, "judged": 3, "unparsable": 0, "win": 2, "tie": 1, "loss": 0,
        "inconsistent": 0, "win_rate": 2 / 3, "tie_rate": 1 / 3, "loss_rate": 0.0}
    assert result["by_category"]["closed_qa"]["loss_rate"] == 1.0
    # the swap really swapped: id 0's second prompt shows the other answer first
    users = [b["messages"][1]["content"] for b in server.requests if "number 0?" in
             b["messages"][1]["content"]]
    firsts = sorted(u.split("[The Start of Assistant A's Answer]\n")[1][:7] for u in users)
    assert firsts == ["GOOD 0\n", "plain 0"]


def test_malformed_reply_is_retried_then_counted(server, tmp_path):
    server.script = ["malformed"]
    judge = make_judge(server, tmp_path)
    result = judge_single(answers([6]), judge, concurrency=1, log=lambda m: None)
    assert result["items"][0]["score"] == 6 and len(server.requests) == 2
    server.script = ["malformed", "m2", "m3"]  # parse_retries=2: three replies, no verdict
    result = judge_single(answers([8], categories=("other",)), judge, log=lambda m: None)
    assert result["items"][0]["score"] is None
    assert result["items"][0]["judgment"] == "No verdict (m3)."
    assert result["overall"]["unparsable"] == 1 and result["overall"]["mean_score"] is None
    assert len(server.requests) == 5
    result = judge_single(answers([8], categories=("other",)), judge, log=lambda m: None)
    assert result["items"][0]["score"] == 8 and len(server.requests) == 6  # not cached
    server.script = ["malformed", "malformed", "m3"]  # the judge repeats itself: no 3rd try
    result = judge_single(answers([2], categories=("other",)), judge, log=lambda m: None)
    assert result["items"][0]["score"] is None and len(server.requests) == 8


def test_server_error_then_success(server, tmp_path):
    server.script = ["500", "500"]
    judge = make_judge(server, tmp_path)
    result = judge_single(answers([9]), judge, log=lambda m: None)
    assert result["items"][0]["score"] == 9
    assert len(server.requests) == 3 and judge.client.requests == 3
    assert len(judge.client.sleep.seconds) == 2  # one back-off before each retry


def test_backoff_doubles_with_jitter_up_to_the_cap(server, tmp_path):
    # jitter 0 halves each back-off, the most jitter keeps it whole; the cap comes first
    for jitter, expected in [(0.0, [0.25, 0.5, 0.5]), (1.0, [0.5, 1.0, 1.0])]:
        server.script = ["500"] * 3
        judge = make_judge(server, tmp_path / str(jitter), retries=3, backoff=0.5,
                           max_backoff=1.0, jitter=lambda j=jitter: j)
        assert judge_single(answers([3]), judge, log=lambda m: None)["items"][0]["score"] == 3
        assert judge.client.sleep.seconds == expected


def test_rate_limit_waits_retry_after(server, tmp_path):
    server.script = ["429"]
    judge = make_judge(server, tmp_path)  # back-off 0.01 s: the wait is the server's 0.3 s
    assert judge_single(answers([4]), judge, log=lambda m: None)["items"][0]["score"] == 4
    assert judge.client.sleep.seconds == [0.3] and len(server.requests) == 2
    server.script = ["429"]  # a Retry-After over the cap waits the cap
    judge = make_judge(server, tmp_path, max_backoff=0.2)
    judge_single(answers([5]), judge, log=lambda m: None)
    assert judge.client.sleep.seconds == [0.2] and len(server.requests) == 4


def test_error_after_retries_names_the_status(server, tmp_path):
    server.script = ["500"] * 3
    with pytest.raises(JudgeError, match=r"answered HTTP 500 3 times: .*overloaded"):
        judge_single(answers([9]), make_judge(server, tmp_path), log=lambda m: None)


def test_a_silent_server_is_tried_once_per_retry_then_a_clear_error(server, tmp_path):
    # Prepare: a server that does not answer the first three requests at all
    silent = SilentServer(3)
    judge = make_judge(server, tmp_path, timeout=0.2, retries=2, jitter=lambda: 1.0,
                       transport=silent)
    # Execute
    with pytest.raises(JudgeError) as err:
        judge_single(answers([5]), judge, log=lambda m: None)
    # Assert: every request had the client's timeout; 1 + retries tries, not one more, with
    # the back-off (0.01 s doubled) between them
    assert silent.timeouts == [{"connect": 0.2, "read": 0.2, "write": 0.2, "pool": 0.2}] * 3
    assert str(err.value) == (f"judge endpoint {server.url}/chat/completions gave no answer "
                              "within 0.2 s (3 tries): raise --timeout or check the server")
    assert judge.client.requests == 3 and not server.requests
    assert judge.client.sleep.seconds == [0.01, 0.02]
    # one silent request, then an answered retry
    silent = SilentServer(1)
    judge = make_judge(server, tmp_path, jitter=lambda: 1.0, transport=silent)
    result = judge_single(answers([5]), judge, log=lambda m: None)
    assert result["items"][0]["score"] == 5 and len(server.requests) == 1
    assert judge.client.requests == 2 and len(silent.timeouts) == 2
    assert judge.client.sleep.seconds == [0.01]


def test_default_cache_path_is_in_fedit_cache_dir(tmp_path, monkeypatch):
    # the same file as before convert.cache_dir was used: $FEDIT_CACHE (~ expanded; unset
    # or empty means ~/.cache/fedit), then judge/replies.sqlite
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEDIT_CACHE", str(tmp_path / "cache"))
    assert default_cache_path() == tmp_path / "cache" / "judge" / "replies.sqlite"
    monkeypatch.setenv("FEDIT_CACHE", "~/elsewhere")
    assert default_cache_path() == tmp_path / "home" / "elsewhere" / "judge" / "replies.sqlite"
    home_cache = tmp_path / "home" / ".cache" / "fedit" / "judge" / "replies.sqlite"
    monkeypatch.setenv("FEDIT_CACHE", "")
    assert default_cache_path() == home_cache
    monkeypatch.delenv("FEDIT_CACHE")
    assert default_cache_path() == home_cache


def test_cli_cache_second_run_makes_no_request(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    run = write(tmp_path / "run" / "answers.jsonl", answers([7, 3, 9, 4]))
    args = ["judge", str(run.parent), "--judge-url", server.url, "--judge-model", "judge-1",
            "--judge-key-env", "JUDGE_KEY"]
    first = CliRunner().invoke(cli_app, args)
    assert first.exit_code == 0, first.output
    assert "overall                  mean score  5.75 / 10  (4 judged, 0 unparsable)" in (
        first.output)
    assert len(server.requests) == 4
    assert server.headers[0]["authorization"] == "Bearer sk-test"
    written = json.loads((run.parent / "judge.json").read_text())
    assert written["mode"] == "single" and written["judge_model"] == "judge-1"
    assert written["overall"]["mean_score"] == 5.75
    assert written["settings"]["requests"] == 4 and written["settings"]["cache_hits"] == 0
    assert "judgment" not in written["items"][0]
    records = [json.loads(x) for x in (run.parent / "judge.jsonl").read_text().splitlines()]
    assert [r["judgment"] for r in records][0] == "The answer is fine. Rating: [[7]]"
    # the same prompts through another spelling of the URL: all from the cache
    bare = server.url.removesuffix("/v1")
    again = CliRunner().invoke(cli_app, [*args[:3], bare, *args[4:]])
    assert again.exit_code == 0, again.output
    assert len(server.requests) == 4  # the server saw nothing new
    assert "0 requests, 4 replies from the cache" in again.output
    rewritten = json.loads((run.parent / "judge.json").read_text())
    assert rewritten["items"] == [{**it, "cached": True} for it in written["items"]]
    assert (tmp_path / "cache" / "judge" / "replies.sqlite").is_file()


def test_cli_pairwise_default_out(server, tmp_path):
    mine = write(tmp_path / "fedit" / "answers.jsonl", answers(["GOOD 0", "plain 1"]))
    other = write(tmp_path / "local" / "answers.jsonl", answers(["plain 0", "plain 1"]))
    result = CliRunner().invoke(cli_app, [
        "judge", str(mine), "--against", str(other.parent), "--judge-url", server.url,
        "--judge-model", "judge-1", "--cache", str(tmp_path / "c.sqlite"), "--no-reference"])
    assert result.exit_code == 0, result.output
    assert "overall                  win 50%  tie 50%  loss 0%  (2 judged, 0 ties" in (
        result.output)
    written = json.loads((tmp_path / "fedit" / "judge-vs-local.json").read_text())
    assert written["mode"] == "pairwise" and written["settings"]["prompt"] == "pair-v2"
    assert "Reference Answer" not in server.requests[0]["messages"][1]["content"]
    assert (tmp_path / "fedit" / "judge-vs-local.jsonl").is_file()


def test_unreachable_endpoint_is_one_clear_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = write(tmp_path / "answers.jsonl", answers([5]))
    result = CliRunner().invoke(cli_app, [
        "judge", str(run), "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model",
        "m", "--retries", "1", "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line
    assert line.startswith(f"error: judge endpoint http://127.0.0.1:{port}/v1/chat/completions "
                           "unreachable (ConnectError: ")
    assert line.endswith("; 2 tries): start the server or fix --judge-url")


def test_mismatched_rows_and_bad_files(tmp_path, monkeypatch):
    a = write(tmp_path / "a.jsonl", answers([1, 2, 3]))
    b = write(tmp_path / "b.jsonl", answers([1, 2]))
    with pytest.raises(DataError, match=r"hold different rows: ids only in the first \[2\], "
                                        r"only in the second \[\]"):
        run_judge(a, b, url="http://127.0.0.1:9/v1", model="m")
    changed = answers([1, 2, 3])
    changed[1]["instruction"] = "Another question?"
    with pytest.raises(DataError, match="id 1 has a different instruction"):
        match_rows(load_answers(a), changed, a, b)
    (tmp_path / "bad.jsonl").write_text('{"id": 0, "answer": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field\(s\) \['instruction'\]"):
        load_answers(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="no such answers file"):
        load_answers(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'instruction' and 'answer' must be"):
        write(tmp_path / "bad.jsonl", [{"id": 0, "instruction": "q", "answer": None}])
        load_answers(tmp_path / "bad.jsonl")
    with pytest.raises(JudgeError, match=r"--judge-url '127.0.0.1:8080/v1': give an http://"):
        run_judge(a, None, url="127.0.0.1:8080/v1", model="m")
    with pytest.raises(JudgeError, match=r"a.jsonl/c.sqlite: cannot open the judge cache "
                                         r"\(FileExistsError: .*\): point --cache or FEDIT_"):
        run_judge(a, None, url="http://127.0.0.1:9/v1", model="m", cache_path=a / "c.sqlite")
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(JudgeError, match="environment variable NO_SUCH_KEY"):
        run_judge(a, None, url="http://127.0.0.1:9/v1", model="m", key_env="NO_SUCH_KEY")


# FastChat llm_judge/data/judge_prompts.jsonl, verbatim (system prompt, prompt template)
_FASTCHAT_CRITERIA_PAIR_V2 = (
    "You should choose the assistant that follows the user's instructions and answers the "
    "user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin "
    "your evaluation by comparing the two responses and provide a short explanation. ")
_FASTCHAT = {
    "pair-math-v1": (
        "Please act as an impartial judge and evaluate the quality of the responses provided "
        "by two AI assistants to the user question displayed below. Your evaluation should "
        "consider correctness and helpfulness. You will be given a reference answer, assistant "
        "A's answer, and assistant B's answer. Your job is to evaluate which assistant's answer "
        "is better. Begin your evaluation by comparing both assistants' answers with the "
        "reference answer. Identify and correct any mistakes. Avoid any positional biases and "
        "ensure that the order in which the responses were presented does not influence your "
        "decision. Do not allow the length of the responses to influence your evaluation. Do "
        "not favor certain names of the assistants. Be as objective as possible. After "
        "providing your explanation, output your final verdict by strictly following this "
        "format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and "
        "\"[[C]]\" for a tie.",
        "[User Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The "
        "End of Reference Answer]\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End "
        "of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End "
        "of Assistant B's Answer]"),
    "single-math-v1": (
        "You are a helpful assistant.",
        "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the "
        "response provided by an AI assistant to the user question displayed below. Your "
        "evaluation should consider correctness and helpfulness. You will be given a reference "
        "answer and the assistant's answer. Begin your evaluation by comparing the assistant's "
        "answer with the reference answer. Identify and correct any mistakes. Be as objective "
        "as possible. After providing your explanation, you must rate the response on a scale "
        "of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: "
        "[[5]]\".\n\n[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}"
        "\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n[The "
        "End of Assistant's Answer]"),
    "single-v1": (
        "You are a helpful assistant.",
        "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the "
        "response provided by an AI assistant to the user question displayed below. Your "
        "evaluation should consider factors such as the helpfulness, relevance, accuracy, "
        "depth, creativity, and level of detail of the response. Begin your evaluation by "
        "providing a short explanation. Be as objective as possible. After providing your "
        "explanation, you must rate the response on a scale of 1 to 10 by strictly following "
        "this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n{question}"
        "\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"),
}


def test_prompts_are_mt_bench_verbatim():
    row = answers(["the answer"])[0] | {"instruction": "Why {x}?", "reference": "ref {y}"}
    fill = {"question": "Why {x}?", "ref_answer_1": "ref {y}", "answer": "the answer",
            "answer_a": "first", "answer_b": "second"}
    for name, messages in [("single-math-v1", single_messages(row)),
                           ("single-v1", single_messages(row, reference=False)),
                           ("pair-math-v1", pairwise_messages(row, "first", "second"))]:
        system, template = _FASTCHAT[name]
        expected = template.replace("{question}", fill["question"])
        for key in ("ref_answer_1", "answer", "answer_a", "answer_b"):
            expected = expected.replace("{" + key + "}", fill[key])
        assert messages == [{"role": "system", "content": system},
                            {"role": "user", "content": expected}], name
    system, template = _FASTCHAT["pair-math-v1"]
    pair_v2 = pairwise_messages(row, "first", "second", reference=False)
    assert pair_v2[0]["content"] == system.replace(
        system[system.index("Your evaluation"):system.index("Avoid any")],
        _FASTCHAT_CRITERIA_PAIR_V2)
    assert "Reference" not in pair_v2[1]["content"]
