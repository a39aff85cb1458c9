"""The HTTP client of the LLM judge: any OpenAI-compatible chat-completions endpoint, with
retries and back-off.

The endpoint URL is the OpenAI "base URL": the client POSTs to ``{url}/chat/completions``,
so ``http://127.0.0.1:8080/v1`` and ``https://api.openai.com/v1`` work as given. A bare
``http://host:port`` (no path) gets ``/v1`` added; a URL that already ends in
``/chat/completions`` is used as it is.

A judge with a small context (``fedit serve`` of a small model, a local server) answers HTTP
400 "maximum context length" when the prompt and ``max_tokens`` do not fit: that request and
every later one go without ``max_tokens`` (the server gives what fits); a prompt that does
not fit at all raises :class:`PromptTooLong`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from fedit.errors import FeditError


class JudgeError(FeditError):
    """The judge endpoint cannot be reached or keeps failing; the message says what to do."""


class PromptTooLong(JudgeError):
    """The judge's context cannot hold the prompt: HTTP 400, context length exceeded."""


def chat_endpoint(url: str) -> str:
    """Return the chat-completions URL of an OpenAI base URL.

    Parameters
    ----------
    url : str
        ``{base}`` (``/chat/completions`` is added), a bare ``http://host:port`` (``/v1``
        is added first) or a URL already ending in ``/chat/completions``.

    Returns
    -------
    str
        The URL the client POSTs to.

    Raises
    ------
    JudgeError
        ``url`` is not an http:// or https:// URL with a host.
    """
    url = url.rstrip("/")
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise JudgeError(f"--judge-url {url!r}: give an http:// or https:// URL, e.g. "
                         "http://127.0.0.1:8080/v1")
    if url.endswith("/chat/completions"):
        return url
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url + "/chat/completions"


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception, its message on one line."""
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text}"


@dataclass
class JudgeClient:
    """A chat-completions client that retries what is worth retrying.

    Parameters
    ----------
    url : str
        OpenAI base URL (see :func:`chat_endpoint`).
    model : str
        The judge model name sent in each request.
    api_key : str or None
        Sent as ``Authorization: Bearer``; None sends no header (local servers).
    timeout : float
        Seconds for one request.
    retries : int
        Extra tries after a timeout, connection error, HTTP 429 or 5xx.
    backoff, max_backoff : float
        First back-off in seconds, doubled each retry (with jitter), capped by
        ``max_backoff``; a 429's ``Retry-After`` is honoured up to that cap.
    max_tokens : int or None
        The reply's budget; None once a server said prompt + budget exceed its context
        (HTTP 400): later requests leave it to the server.
    sleep : callable
        Waits the back-off, given seconds (``time.sleep``; a test records instead).
    jitter : callable
        A number in [0, 1) that sets each back-off between half and all of its value, so
        concurrent callers do not retry in step (``random.random``).
    transport : httpx.BaseTransport or None
        What carries the requests (None: httpx's own, over the network).

    Attributes
    ----------
    endpoint : str
        The URL requests go to.
    requests : int
        Requests sent so far, retries included.
    """

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 20.0
    max_tokens: int | None = 1024
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    jitter: Callable[[], float] = field(default=random.random, repr=False)
    transport: httpx.BaseTransport | None = field(default=None, repr=False)
    requests: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.endpoint = chat_endpoint(self.url)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(timeout=self.timeout, headers=headers,
                                  transport=self.transport)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    def chat(self, messages: list[dict[str, str]]) -> str:
        """Return the reply text for ``messages`` at temperature 0.

        Parameters
        ----------
        messages : list of dict
            Chat messages (``role``, ``content``).

        Returns
        -------
        str
            The reply's text, "" when the reply has none.

        Raises
        ------
        PromptTooLong
            The prompt alone is over the judge's context.
        JudgeError
            The endpoint is unreachable, silent or failing after the retries, or refused
            the request.
        """
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0}
        if self.max_tokens is not None:
            try:
                return self._post({**body, "max_tokens": self.max_tokens})
            except PromptTooLong:  # prompt + max_tokens over a small context: from now on
                self.max_tokens = None  # the server gives each reply what fits
        return self._post(body)

    def _post(self, body: dict[str, Any]) -> str:
        """POST ``body``, retrying timeouts, connection errors, 429 and 5xx."""
        for attempt in range(self.retries + 1):
            with self._lock:
                self.requests += 1
            try:
                resp = self._http.post(self.endpoint, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if attempt == self.retries:
                    raise self._transport_error(exc) from exc
                self.sleep(self.delay(attempt))
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                if attempt == self.retries:
                    raise JudgeError(f"judge endpoint {self.endpoint} answered HTTP "
                                     f"{resp.status_code} {attempt + 1} times: "
                                     f"{_snippet(resp.text)}")
                self.sleep(self.delay(attempt, resp.headers.get("retry-after")))
                continue
            self._raise_refusal(resp)
            return _reply_text(resp)
        raise AssertionError("unreachable")  # the loop returns or raises

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Return the seconds to wait after failed try number ``attempt`` (0 first).

        Parameters
        ----------
        attempt : int
            How many tries failed before this one.
        retry_after : str or None
            A 429's ``Retry-After`` header: seconds, honoured up to ``max_backoff``.

        Returns
        -------
        float
            ``min(max_backoff, backoff * 2**attempt)`` times ``0.5 + jitter() / 2``, or
            the server's ``Retry-After`` when that is longer.
        """
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        delay *= 0.5 + self.jitter() / 2
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            delay = max(delay, min(self.max_backoff, float(retry_after)))
        return delay

    def _raise_refusal(self, resp: httpx.Response) -> None:
        """Raise for an HTTP 4xx reply: :class:`PromptTooLong` for a full context."""
        if resp.status_code == 400 and _context_full(resp.text):
            raise PromptTooLong(f"judge endpoint {self.endpoint}: {_snippet(resp.text)}")
        if resp.status_code >= 400:
            raise JudgeError(f"judge endpoint {self.endpoint} refused the request: HTTP "
                             f"{resp.status_code} {_snippet(resp.text)} (check "
                             "--judge-model and the API key)")

    def _transport_error(self, exc: Exception) -> JudgeError:
        """The error of a last try that timed out or could not connect."""
        tries = self.retries + 1
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return JudgeError(f"judge endpoint {self.endpoint} gave no answer within "
                              f"{self.timeout:g} s ({tries} tries): raise --timeout or check "
                              "the server")
        return JudgeError(f"judge endpoint {self.endpoint} unreachable ({one_line(exc)}; "
                          f"{tries} tries): start the server or fix --judge-url")


def _context_full(text: str) -> bool:
    """An HTTP 400 body saying the context is too small (OpenAI, vLLM, fedit serve)."""
    return "context_length_exceeded" in text or "maximum context length" in text


def _snippet(text: str) -> str:
    """The start of a reply body, on one line."""
    return " ".join(text.split())[:200] or "(empty body)"


def _reply_text(resp: httpx.Response) -> str:
    """choices[0].message.content, or "" for a reply of any other shape (retried as such)."""
    try:
        content = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""
