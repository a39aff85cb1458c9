"""OpenAI's request and response shapes, and its error format.

Requests are checked here (pydantic) so that every client mistake becomes a 400 in
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape that names the field;
unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


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
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    def budget(self) -> int:
        return self.max_tokens or 16  # OpenAI's default for completions


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
