"""The chat page at ``/`` in a real headless Chromium against a real ``fedit serve`` process.

The browser, driven by Playwright, is the system's Chromium where one is on PATH
(``chromium``, ``chromium-browser``, ``google-chrome``: the first found), else Playwright's
own (``.venv/bin/playwright install chromium``, no root needed); ``make test`` looks in the
same order, gets one and says which. With neither the tests fail and say why: never a skip.
The page must stream both answers side by side, give the same text as the API for the
same request, draw the run's loss curve, render an answer's markdown without ever turning
the model's text into HTML, and load nothing from any other origin.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

# the fixtures ``run`` (a 2-round tiny run) and ``loud`` (an adapter that changes every answer)
from fedit.serve.launch import ServerProcess as Served
from tests.conftest import KEY

SYSTEM_CHROMIUMS = ("chromium", "chromium-browser", "google-chrome")  # as the Makefile
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
PROMPT = "Tell me about the river and the mountain."
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def page_server(run, loud):  # noqa: F811
    served = Served([str(run), str(loud)])  # no API key
    yield served
    served.stop()


def system_chromium() -> str | None:
    """The first of ``SYSTEM_CHROMIUMS`` on PATH, or None (then: Playwright's own)."""
    return next(filter(None, map(shutil.which, SYSTEM_CHROMIUMS)), None)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import Error, sync_playwright

    system = system_chromium()
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=system, args=CHROMIUM_ARGS)
            failed = ""
        except Error as e:  # its first line, and the browser's own first complaint if any
            lines = str(e).strip().splitlines()
            said = [x.split("][err] ", 1)[1] for x in lines if "][err] " in x][:1]
            failed = ": ".join(lines[:1] + said)
        if failed:  # out of the except block: one line, not Playwright's error chained
            which = (f"the system's Chromium {system} did not start" if system else
                     f"no Chromium: none on PATH ({', '.join(SYSTEM_CHROMIUMS)}) and "
                     "Playwright's own did not start (`make chromium` or "
                     "`.venv/bin/playwright install chromium` installs it)")
            pytest.fail(f"{which}: {failed}", pytrace=False)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def _api_answer(url: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _send_and_wait(page) -> None:
    page.click("#send")
    page.wait_for_function(  # both finished, either way
        "() => ['left', 'right'].every(s => ['done', 'error'].includes("
        "document.getElementById('status-' + s).dataset.state))")


def _check_answers(page, url: str, models: dict[str, str]) -> dict[str, str]:
    answers = {}
    for side, model in models.items():
        status = page.text_content(f"#status-{side}")
        assert page.get_attribute(f"#status-{side}", "data-state") == "done", (
            status, page.text_content(f"#error-{side}"))
        assert status.startswith("done") and "tok/s" in status and "finish: " in status
        assert page.is_hidden(f"#error-{side}")
        answers[side] = page.get_attribute(f"#answer-{side}", "data-raw")  # before markdown
        assert answers[side], side
        assert answers[side] == _api_answer(url, model), side
    return answers


def test_both_answers_stream_and_equal_the_api(page, page_server, run, tmp_path):  # noqa: F811
    page.goto(page_server.url + "/")
    page.wait_for_selector("body[data-ready]")
    assert page.input_value("#model-left") == "base"
    assert page.input_value("#model-right") == "tiny"
    ids = page.eval_on_selector_all("#model-right option", "os => os.map(o => o.value)")
    assert ids == ["base", "tiny", "tiny/round-0000", "tiny/round-0001", "tiny/round-0002",
                   "loud"]
    assert page.is_hidden("#api-key")  # the server has no key

    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#temperature", "0")
    page.fill("#prompt", PROMPT)
    _send_and_wait(page)
    _check_answers(page, page_server.url, {"left": "base", "right": "tiny"})
    # the tiny model answers blank lines greedily; `loud` writes visible (random) text
    page.select_option("#model-right", "loud")
    _send_and_wait(page)
    answers = _check_answers(page, page_server.url, {"left": "base", "right": "loud"})
    assert answers["right"].strip() and answers["right"] != answers["left"]
    assert page.is_visible("#chart-note")  # neither base nor loud belongs to a run
    page.select_option("#model-left", "tiny/round-0000")  # then the left model's run is drawn
    page.wait_for_selector("#loss-chart circle.selected[data-round='0']")
    page.select_option("#model-right", "tiny/round-0001")  # the right model's run first
    page.wait_for_selector("#loss-chart circle.selected[data-round='1']")
    page.select_option("#model-right", "tiny")  # the final adapter: the last round
    page.wait_for_selector("#loss-chart circle.selected[data-round='2']")

    # one point per metrics.jsonl line
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    points = page.locator("#loss-chart circle.point")
    assert points.count() == len(lines)
    rounds = [int(points.nth(i).get_attribute("data-round")) for i in range(points.count())]
    assert rounds == [x["round"] for x in lines]
    assert page.locator("#loss-chart circle.selected").count() == 1
    chart_text = page.text_content("#loss-chart")
    assert "round" in chart_text and "held-out loss" in chart_text
    assert page.is_hidden("#chart-note")
    page.screenshot(path=str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 10_000


def test_server_errors_show_in_the_column(page, page_server):
    page.goto(page_server.url + "/")
    page.wait_for_selector("body[data-ready]")
    page.fill("#max-tokens", "5000")  # past the context length: a 400 before streaming
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#status-left[data-state=error]")
    page.wait_for_selector("#status-right[data-state=error]")
    message = page.text_content("#error-right")
    assert "maximum context length is 1024 tokens" in message
    assert page.eval_on_selector("#error-right", "e => getComputedStyle(e).color") == \
        "rgb(180, 35, 24)"  # red
    assert page.text_content("#answer-right") == ""


def test_page_loads_nothing_from_another_origin(page, page_server):
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(page_server.url + "/", wait_until="networkidle")
    page.wait_for_selector("#loss-chart circle.point")
    assert page_server.url + "/" in urls and page_server.url + "/v1/models" in urls
    assert [u for u in urls if not u.startswith(page_server.url + "/")] == []


def test_api_key_is_asked_for_kept_and_sent(browser, run):  # noqa: F811
    served = Served([str(run), "--api-key-env", "FEDIT_TEST_KEY"], env={"FEDIT_TEST_KEY": KEY})
    try:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(60_000)
        keys: list[str | None] = []  # the Authorization header of every call the page makes
        page.on("request", lambda r: keys.append(r.headers.get("authorization"))
                if "/v1/" in r.url or "/fedit/" in r.url else None)
        page.goto(served.url + "/")
        page.wait_for_selector("body[data-ready]")
        assert page.is_visible("#api-key")
        assert "didn't provide an API key" in page.text_content("#banner")
        assert page.text_content("#base-info") == "this server needs an API key"
        assert page.eval_on_selector_all("#model-left option", "os => os.length") == 0
        keys.clear()
        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")  # fires change: info is read again, with the key
        page.wait_for_selector("#model-right option[value='tiny']", state="attached")
        assert page.input_value("#model-right") == "tiny" and page.is_hidden("#banner")
        assert page.text_content("#base-info").startswith("base: ")
        page.wait_for_selector("#loss-chart circle.point")  # /fedit/metrics needs the key
        page.fill("#max-tokens", "4")
        page.fill("#prompt", "hi")
        _send_and_wait(page)
        assert [page.get_attribute(f"#status-{s}", "data-state") for s in ("left", "right")] \
            == ["done", "done"]
        assert len(keys) >= 5 and set(keys) == {f"Bearer {KEY}"}  # info, models, metrics, 2 asks
        page.reload()  # the key is kept in localStorage
        page.wait_for_selector("#model-right option[value='tiny']", state="attached")
        assert page.input_value("#api-key") == KEY
        context.close()
    finally:
        served.stop()


MARKDOWN_ANSWER = """**bold** and *italic* and `<b>code</b>`
<img src=x onerror="window.pwned = 1">
<script>window.pwned = 2</script>
[a link](https://example.com/a) and [not a link](javascript:window.pwned=3)

## A heading
- one
- two with __more__

3. third
4. fourth

```python
if a < b and "<i>" > c:
    pass
```"""


def _stub_answer(route) -> None:
    """The chat endpoint answering ``MARKDOWN_ANSWER`` as the server streams it."""
    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def chunk(delta: dict, reason: str | None = None) -> dict:
        return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    half = len(MARKDOWN_ANSWER) // 2  # two pieces: the tags are split mid-stream
    body = (data(chunk({"role": "assistant", "content": ""}))
            + data(chunk({"content": MARKDOWN_ANSWER[:half]}))
            + data(chunk({"content": MARKDOWN_ANSWER[half:]})) + data(chunk({}, "stop"))
            + "data: [DONE]\n\n")
    route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)


def test_markdown_is_rendered_and_html_stays_text(page, page_server):
    page.route("**/v1/chat/completions", _stub_answer)
    page.goto(page_server.url + "/")
    page.wait_for_selector("body[data-ready]")
    page.fill("#prompt", "anything")
    _send_and_wait(page)
    answer = page.locator("#answer-right")
    assert answer.get_attribute("data-raw") == MARKDOWN_ANSWER
    # no tag of the model's became an element, and none of its scripts ran
    assert answer.locator("img, script, b, i").count() == 0
    assert page.evaluate("() => window.pwned") is None
    text = answer.text_content()
    assert '<img src=x onerror="window.pwned = 1">' in text
    assert "<script>window.pwned = 2</script>" in text
    assert answer.locator("strong").all_text_contents() == ["bold", "more"]
    assert answer.locator("em").all_text_contents() == ["italic"]
    assert answer.locator("p code").all_text_contents() == ["<b>code</b>"]
    links = answer.locator("a")
    assert links.count() == 1 and links.text_content() == "a link"
    assert links.get_attribute("href") == "https://example.com/a"
    assert "noopener" in links.get_attribute("rel")
    assert "[not a link](javascript:window.pwned=3)" in text
    assert answer.locator("h2").text_content() == "A heading"
    assert answer.locator("ul > li").all_text_contents() == ["one", "two with more"]
    assert answer.locator("ol > li").all_text_contents() == ["third", "fourth"]
    assert answer.locator("ol").get_attribute("start") == "3"
    assert answer.locator("pre > code").text_content() == \
        'if a < b and "<i>" > c:\n    pass'
    # every element in the answer is one the renderer makes
    tags = set(answer.evaluate("e => [...e.querySelectorAll('*')].map(x => x.tagName)"))
    assert tags <= {"P", "STRONG", "EM", "CODE", "A", "H2", "UL", "OL", "LI", "PRE"}
