"""`fedit serve` as a real process on 127.0.0.1, driven by the official `openai` client."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from fedit.errors import ConfigError, ModelError
from fedit.serve.launch import ServerProcess as Served
from fedit.serve.models import build_catalog
from tests.conftest import KEY


@pytest.fixture(scope="module")
def server(run, loud):
    served = Served([str(run), str(loud), "--api-key-env", "FEDIT_TEST_KEY", "--max-batch", "4"],
                    env={"FEDIT_TEST_KEY": KEY})
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_models_lists_base_the_run_and_its_rounds(client, run):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "tiny", "tiny/round-0000", "tiny/round-0001", "tiny/round-0002",
                   "loud"]
    assert client.models.retrieve("tiny/round-0002").id == "tiny/round-0002"


def test_chat_and_completion_greedy_with_usage(client):
    messages = [{"role": "user", "content": "Name a colour."}]
    a = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                       temperature=0)
    b = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                       temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content  # greedy repeats
    assert a.choices[0].message.role == "assistant"
    assert a.usage.completion_tokens <= 12 and a.usage.prompt_tokens > 10
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    if a.choices[0].finish_reason == "length":
        assert a.usage.completion_tokens == 12
    c = client.completions.create(model="base", prompt="Once upon a time", max_tokens=5,
                                  temperature=0)
    assert c.usage.completion_tokens <= 5 and c.usage.prompt_tokens > 0
    assert c.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_the_whole_answer(client):
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    whole = client.chat.completions.create(model="tiny/round-0001", messages=messages,
                                           max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="tiny/round-0001", messages=messages,
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}
    done = list(client.completions.create(model="base", prompt="abc", max_tokens=4,
                                          temperature=0, stream=True))
    assert done[-1].choices[0].finish_reason in ("stop", "length")


def test_adapters_answer_differently_and_seeded_sampling_repeats(client):
    prompt = "Below is a list"
    greedy = {m: client.completions.create(model=m, prompt=prompt, max_tokens=10,
                                           temperature=0).choices[0].text
              for m in ("base", "loud", "tiny/round-0000")}
    assert greedy["loud"] != greedy["base"]  # the adapter is applied
    assert greedy["tiny/round-0000"] == greedy["base"]  # round 0: B = 0, the base model
    kw = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 1.0, "seed": 7}
    assert client.completions.create(**kw).choices[0].text == \
        client.completions.create(**kw).choices[0].text


def test_stop_strings_cut_the_answer(client):
    free = client.completions.create(model="base", prompt="Once", max_tokens=20,
                                     temperature=0).choices[0].text
    assert len(free) > 3
    stop = free[2:4]
    cut = client.completions.create(model="base", prompt="Once", max_tokens=20, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def _error(server, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        r = httpx.post(server.url + path, content=raw, headers=headers, timeout=30)
    else:
        r = httpx.post(server.url + path, json=body, headers=headers, timeout=30)
    return r.status_code, r.json()["error"]


def test_client_mistakes_are_openai_errors(server, client):
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        wrong.models.list()
    status, err = _error(server, "/v1/completions", {"model": "base", "prompt": "x"}, key=None)
    assert status == 401 and "didn't provide an API key" in err["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024 tokens"):
        client.completions.create(model="base", prompt="hello", max_tokens=5000)
    status, err = _error(server, "/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in err["message"]
    status, err = _error(server, "/v1/chat/completions",
                         {"model": "base", "messages": [{"role": "user", "content": "x"}],
                          "temperature": 3})
    assert status == 400 and err["param"] == "temperature" and "less than or equal to 2" \
        in err["message"]
    status, err = _error(server, "/v1/chat/completions", {"model": "base", "messages": []})
    assert status == 400 and err["param"] == "messages"
    status, err = _error(server, "/v1/completions", {"model": "base", "prompt": "x", "n": 2})
    assert status == 400 and "only n=1" in err["message"]
    status, err = _error(server, "/v1/nothing-here", {})
    assert status == 404 and err["message"] == "Not Found"


def test_null_content_is_a_bad_request(client):
    for role in ("user", "system", "assistant"):
        messages = [{"role": role, "content": None}, {"role": "user", "content": "hi"}]
        with pytest.raises(openai.BadRequestError,
                           match=f"'content' is required for {role} messages") as e:
            client.chat.completions.create(model="base", messages=messages, max_tokens=2)
        assert e.value.body["param"] == "messages.0.content"


def test_loss_chart_data_and_info_need_the_key(server, run):
    auth = {"Authorization": f"Bearer {KEY}"}
    info = httpx.get(server.url + "/fedit/info", headers=auth).json()
    assert info["default_pair"] == ["base", "tiny"] and info["auth"] is True
    assert info["max_model_len"] == 1024
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):  # only: a key is needed
        assert httpx.get(server.url + "/fedit/info", headers=headers).json() == {"auth": True}
    curve = httpx.get(server.url + "/fedit/metrics", params={"model": "tiny"},
                      headers=auth).json()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert curve["rounds"] == [0, 1, 2]
    assert curve["eval_loss"] == [x["eval_loss"] for x in lines]
    assert httpx.get(server.url + "/fedit/metrics", params={"model": "base"},
                     headers=auth).status_code == 404
    refused = httpx.get(server.url + "/fedit/metrics", params={"model": "tiny"})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert "didn't provide an API key" in refused.json()["error"]["message"]


@pytest.fixture(scope="module")
def one_slot(run):
    """A server decoding one request at a time with one place in its queue."""
    served = Served([str(run), "--max-batch", "1", "--max-queue", "1"])
    yield served
    served.stop()


def _health(served):
    return httpx.get(served.url + "/health").json()


def _wait_for(served, key, value):
    deadline = time.monotonic() + 60
    while _health(served)[key] != value:
        assert time.monotonic() < deadline, _health(served)
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_slot_and_full_queue_is_429(one_slot):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1000,
            "temperature": 0, "stream": True, "ignore_eos": True}
    short = {**body, "stream": False, "max_tokens": 2}
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(1) as pool:
        with http.stream("POST", one_slot.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(4)]  # data lines and their blank separators
            assert first[0].startswith("data: ")
            _wait_for(one_slot, "running", 1)
            # one request running, one waiting fills the queue: the next is refused
            pending = pool.submit(httpx.post, one_slot.url + "/v1/completions", json=short,
                                  timeout=60)
            _wait_for(one_slot, "waiting", 1)
            busy = httpx.post(one_slot.url + "/v1/completions", json=short)
            assert busy.status_code == 429
            assert busy.json()["error"]["code"] == "rate_limit_exceeded"
            too_many = httpx.post(one_slot.url + "/v1/completions",
                                  json={**short, "prompt": ["a", "b"]})  # never fits
            assert too_many.status_code == 400 and too_many.json()["error"]["message"] == (
                "prompt: 2 prompts, more than this server queues (--max-queue 1); send at "
                "most 1 a request")
            assert not pending.done()  # still waiting behind the stream
        # the stream is closed mid-answer: its row leaves and the waiting request runs
        done = pending.result()
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 2
    # the stream's row left long before its 1,000 tokens (the engine counts its steps)
    assert _health(one_slot)["steps"] < 500
    _wait_for(one_slot, "running", 0)
    ok = httpx.post(one_slot.url + "/v1/completions",
                    json={"model": "base", "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


def test_without_a_key_info_and_metrics_answer_everyone(one_slot):
    info = httpx.get(one_slot.url + "/fedit/info").json()
    assert info["auth"] is False and info["default_pair"] == ["base", "tiny"]
    curve = httpx.get(one_slot.url + "/fedit/metrics", params={"model": "tiny"})
    assert curve.status_code == 200 and curve.json()["rounds"] == [0, 1, 2]


def test_catalog_names_an_experiments_arms_and_refuses_mixed_bases(run, loud, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(run, exp / "fedit")
    shutil.copytree(loud, exp / "centralized" / "adapter")
    shutil.copytree(loud, exp / "local-only" / "client_0001" / "adapter")
    (exp / "experiment.json").write_text("{}")
    catalog = build_catalog([str(exp)])
    assert list(catalog.models) == [
        "base", "exp/centralized", "exp/fedit", "exp/fedit/round-0000", "exp/fedit/round-0001",
        "exp/fedit/round-0002", "exp/local-only/client_0001"]
    assert catalog.default_pair() == ("base", "exp/fedit")
    assert catalog.models["exp/fedit/round-0001"].round == 1
    assert catalog.template == "alpaca"  # the run's data.template, used for every model
    # an adapter inside a run is named as the run names it
    only = build_catalog([str(run / "rounds" / "0001" / "adapter")])
    assert list(only.models) == ["base", "tiny/round-0001"]
    arm = build_catalog([str(exp / "centralized" / "adapter")])  # arm/adapter: the arm's name
    assert list(arm.models) == ["base", "centralized"]
    other = tmp_path / "other"
    shutil.copytree(loud, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "some/other-model"}))
    with pytest.raises(ModelError, match="different base models"):
        build_catalog([str(run), str(other)])
    with pytest.raises(ConfigError, match="two models named 'loud'"):
        build_catalog([str(loud), str(exp / "centralized" / "adapter"), str(loud)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no run folder"):
        build_catalog([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="--template jinja"):
        build_catalog([str(run)], template="jinja")


@pytest.mark.parametrize(("args", "message"), [
    (["/no/such/run"], "/no/such/run: no such run or adapter folder"),
    (["{run}", "--api-key-env", "FEDIT_UNSET_KEY"],
     "--api-key-env FEDIT_UNSET_KEY: the environment variable is unset or empty; "
     "export FEDIT_UNSET_KEY=... or leave --api-key-env out"),
    (["{run}", "--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["{run}", "--max-queue", "0"], "--max-queue must be >= 1, got 0"),
])
def test_serve_refuses_bad_arguments_in_one_line(run, args, message, monkeypatch):
    from typer.testing import CliRunner

    from fedit.cli import app

    monkeypatch.delenv("FEDIT_UNSET_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", *(a.format(run=run) for a in args)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {message}"]
