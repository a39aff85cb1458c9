"""OpenAI's request and response shapes, and its error format.

Requests are checked here (pydantic) so that every client mistake becomes a 400 in
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape that names the field;
unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ApiError(Exception):
    """An error answered in OpenAI's format with an HTTP status."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens whatever the model says

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None  # required; null is refused below, as OpenAI does

    @field_validator("content")
    @classmethod
    def _not_null(cls, v: str | list[TextPart] | None, info: ValidationInfo) -> Any:
        if v is None:  # OpenAI accepts null only beside tool calls, which fedit has not
            raise ValueError(f"'content' is required for {info.data.get('role', 'these')} "
                             "messages (got null)")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


MAX_LOGPROBS = 20  # the most likely tokens a completion reports per position (vLLM's limit)


class CompletionRequest(_Request):
    """A legacy completion: one prompt or a batch (strings or token-id lists), each answered
    by its own choice; ``echo`` with ``logprobs`` scores the prompt too (what
    lm-evaluation-harness sends for log-likelihoods, ``max_tokens`` 0 or 1)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 only with echo (the prompt scored, nothing "
                             "generated)")
        if self.stream and (self.echo or self.logprobs is not None or len(self.prompts()) > 1):
            raise ValueError("stream: not supported with echo, logprobs or several prompts; "
                             "leave stream out")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch: one string or token-id list per prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def budget(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default


def parse(model: type[_Request], body: Any) -> Any:
    """Check a request body; a bad field is a 400 naming it."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        msg = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {msg}" if param else msg, param=param,
                       code="invalid_value" if first["type"] != "missing" else "missing") \
            from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_body(rid: str, model: str, text: str, reason: str | None, use: dict[str, int]) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": reason, "logprobs": None}],
            "usage": use, "system_fingerprint": "fedit"}


def completion_body(rid: str, model: str, text: str, reason: str | None,
                    use: dict[str, int]) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
            "usage": use, "system_fingerprint": "fedit"}


def completion_choice(index: int, text: str, reason: str | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}


def completion_batch_body(rid: str, model: str, choices: list[dict[str, Any]],
                          use: dict[str, int]) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use, "system_fingerprint": "fedit"}


def logprobs_body(scores: Sequence[tuple[int, float | None, Sequence[tuple[int, float]]]],
                  decode: Callable[[int], str], start: int = 0) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` object: ``tokens``, ``token_logprobs`` (None for a
    prompt's first token), ``top_logprobs`` ({token: log-prob}, None there too) and
    ``text_offset`` (each token's first character in the choice's text, from ``start``).
    Two token ids that decode to one text share a key: the higher log-prob is kept, so the
    largest value is always the most likely token's (what the harness's is_greedy reads)."""
    tokens = [decode(token) for token, _, _ in scores]
    offsets, at = [], start
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops: list[dict[str, float] | None] = []
    for _, value, top in scores:
        tops.append(None if value is None else {})
        for token, v in top:  # most likely first: two ids of one text keep the higher
            tops[-1].setdefault(decode(token), v)  # type: ignore[union-attr]
    return {"tokens": tokens, "token_logprobs": [value for _, value, _ in scores],
            "top_logprobs": tops, "text_offset": offsets}


def chat_chunk(rid: str, model: str, delta: dict[str, Any], reason: str | None = None,
               use: dict[str, int] | None = None, final_usage: bool = False) -> dict:
    choices = [] if final_usage else [{"index": 0, "delta": delta, "finish_reason": reason,
                                       "logprobs": None}]
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": choices, "usage": use, "system_fingerprint": "fedit"}


def completion_chunk(rid: str, model: str, text: str, reason: str | None = None,
                     use: dict[str, int] | None = None, final_usage: bool = False) -> dict:
    choices = [] if final_usage else [{"index": 0, "text": text, "finish_reason": reason,
                                       "logprobs": None}]
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": use, "system_fingerprint": "fedit"}
