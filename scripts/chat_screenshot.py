"""A screenshot of the chat page of a running ``fedit serve``, after one question (docs).

    .venv/bin/fedit serve runs/quickstart --port 8000 &
    .venv/bin/python scripts/chat_screenshot.py --url http://127.0.0.1:8000 \\
        --out docs/serving-chat.png --prompt "Give me three tips for a short talk."

Drives Debian's ``/usr/bin/chromium`` (``make chromium``) with Playwright at 1280x800: the
page's default pair of models (or ``--left``/``--right``), the prompt sent once, both
answers waited for, then the whole window saved. Not a test: tests/test_chat_page.py is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--left", help="the left model (default: the page's)")
    ap.add_argument("--right", help="the right model (default: the page's)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--api-key", help="when the server has one")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for answers")
    a = ap.parse_args()
    if not CHROMIUM.is_file():
        sys.exit(f"{CHROMIUM} is missing: `make chromium` installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(a.timeout * 1000)
        if a.api_key:  # the page reads it from localStorage
            page.add_init_script(f"localStorage.setItem('fedit.apiKey', {a.api_key!r})")
        page.goto(a.url.rstrip("/") + "/")
        page.wait_for_selector("body[data-ready]")
        for side, model in (("left", a.left), ("right", a.right)):
            if model:
                page.select_option(f"#model-{side}", model)
        page.fill("#max-tokens", str(a.max_tokens))
        page.fill("#prompt", a.prompt)
        page.click("#send")
        page.wait_for_function(
            "() => ['left', 'right'].every(s => ['done', 'error'].includes("
            "document.getElementById('status-' + s).dataset.state))")
        page.click("body", position={"x": 5, "y": 795})  # the focus ring off the button
        a.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(a.out))
        states = [page.get_attribute(f"#status-{s}", "data-state") for s in ("left", "right")]
        browser.close()
    print(f"wrote {a.out} (answers: {', '.join(states)})")
    return 0 if states == ["done", "done"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
