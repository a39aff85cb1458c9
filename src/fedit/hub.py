"""Whether the Hugging Face hub can be used, asked once per process and quickly.

Without this, an unreachable hub costs ~30-50 s of retries per file in ``datasets`` and
``transformers`` before their error; one bounded request says the same at once.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from threading import Thread

HUB_PROBE_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set now (huggingface_hub reads them
    only at import)."""
    env = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(k, "").strip().lower() in ("1", "on", "yes", "true") for k in env)


def hub_reachable() -> bool:
    """False when offline mode is set or the hub does not answer within a few seconds."""
    if hub_offline():
        return False
    return _probe(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    answered: list[bool] = []

    def probe() -> None:
        request = urllib.request.Request(endpoint, method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # an error status is still the hub answering
        except (OSError, ValueError):
            pass  # no name, no route, refused, timed out, or not the hub's certificate

    # A thread bounds the DNS lookup too, which the request's own timeout does not cover.
    thread = Thread(target=probe, daemon=True, name="fedit-hub-probe")
    thread.start()
    thread.join(timeout)
    return bool(answered)
