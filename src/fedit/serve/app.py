"""``fedit serve``: an OpenAI-compatible HTTP API and a chat page over one base model.

``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent
events when ``stream`` is true; a batch of prompts, ``echo`` and ``logprobs`` answered as
vLLM does, so lm-evaluation-harness's ``local-completions`` scores a served adapter),
``/health``, and the chat page at ``/`` with its two small helpers (``/fedit/info``,
``/fedit/metrics``). With an API key, ``/fedit/info`` tells a caller without it only that
a key is needed, and ``/fedit/metrics`` needs it. Requests go to the batching engine
(``fedit.model.engine``); this module only checks, formats and streams.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from fedit.data.prompts import TEMPLATE_STOPS, build_prompt
from fedit.errors import ConfigError
from fedit.model.engine import Engine, Event, Job, QueueFull, Sampling
from fedit.serve import protocol as P
from fedit.serve.models import Catalog

_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


@dataclass
class Server:
    """What the app needs: the catalog, the engine and its tokenizer, the limits, a key."""

    catalog: Catalog
    engine: Engine
    tokenizer: Any
    max_model_len: int
    default_max_tokens: int = 256
    api_key: str | None = None


def create_app(server: Server) -> Any:
    """The FastAPI app of a loaded server."""
    app = FastAPI(title="fedit serve", docs_url=None, redoc_url=None)

    def error(e: P.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(P.ApiError)
    async def _api_error(_: Request, e: P.ApiError) -> JSONResponse:
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        return error(P.ApiError(e.status_code, str(e.detail), code=str(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error(P.ApiError(400, str(e.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        return error(P.ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                type_="server_error"))

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        return server.api_key is None or (header.startswith("Bearer ") and
                                          header.removeprefix("Bearer ").strip()
                                          == server.api_key)

    def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise P.ApiError(401, "You didn't provide an API key: send it as 'Authorization: "
                             "Bearer KEY'.", code="invalid_api_key")
        if header.removeprefix("Bearer ").strip() != server.api_key:
            raise P.ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise P.ApiError(400, f"the request body is not valid JSON ({e})") from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = server.engine
        return {"status": "ok", "models": len(server.catalog.models), "running": engine.running,
                "waiting": engine.queue.qsize() + len(engine.deferred),
                "max_batch": engine.max_batch, "adapters_loaded": len(engine.adapters.slots),
                "steps": engine.steps}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [m.card() for m in server.catalog.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        return _model(server, name).card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        authorize(request)
        req = P.parse(P.ChatRequest, await body_of(request))
        served = _model(server, req.model)
        template = served.template or server.catalog.template
        prompt = chat_prompt_ids([m.model_dump() | {"content": m.text()} for m in req.messages],
                                 template, server.tokenizer)
        return await _answer(server, request, req, prompt, req.budget(), template, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorize(request)
        req = P.parse(P.CompletionRequest, await body_of(request))
        _model(server, req.model)
        prompts = req.prompts()
        if not prompts:
            raise P.ApiError(400, "prompt: an empty list; give at least one prompt",
                             param="prompt")
        room = server.engine.queue.maxsize  # a bigger batch could never be queued whole
        if len(prompts) > room:
            raise P.ApiError(400, f"prompt: {len(prompts)} prompts, more than this server "
                             f"queues (--max-queue {room}); send at most {room} a request",
                             param="prompt")
        batch = [_prompt_ids(server, p, i, len(prompts)) for i, p in enumerate(prompts)]
        if len(batch) == 1 and not req.echo and req.logprobs is None:
            return await _answer(server, request, req, batch[0], req.budget(), None, chat=False)
        return await _answer_batch(server, request, req, batch, prompts)

    async def _answer(server: Server, request: Request, req: Any, prompt: list[int],
                      budget: int | None, template: str | None, chat: bool) -> Any:
        sampling = _sampling(server, req, len(prompt), budget, template, chat)
        events, job = _submit(server, prompt, req.model, sampling)
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            stream = _sse(events, job, rid, req.model, chat, req.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, end = await _collect(events, job, request)
        if end is None:  # the client went away: nobody reads this
            return JSONResponse({}, status_code=499)
        use = P.usage(end.prompt_tokens, end.completion_tokens)
        make = P.chat_body if chat else P.completion_body
        return make(rid, req.model, text, end.finish_reason, use)

    async def _answer_batch(server: Server, request: Request, req: P.CompletionRequest,
                            batch: list[list[int]], prompts: list[str | list[int]]) -> Any:
        """One choice a prompt, in order; with ``echo`` the prompt's text and log-probs
        lead its choice's (vLLM's answer to lm-evaluation-harness)."""
        sampling = [_sampling(server, req, len(ids), req.budget(), None, False) for ids in batch]
        submitted: list[tuple[asyncio.Queue[Event], Job]] = []
        try:
            for ids, how in zip(batch, sampling, strict=True):
                submitted.append(_submit(server, ids, req.model, how, req.logprobs, req.echo))
        except P.ApiError:
            for _, job in submitted:
                job.cancelled.set()
            raise
        answers = await asyncio.gather(*(_collect(events, job, request)
                                         for events, job in submitted))
        if any(end is None for _, end in answers):  # the client went away
            return JSONResponse({}, status_code=499)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, ((text, end), ids, prompt) in enumerate(zip(answers, batch, prompts,
                                                          strict=True)):
            assert end is not None
            head = (prompt if isinstance(prompt, str) else server.tokenizer.decode(ids)) \
                if req.echo else ""
            scores = None
            if req.logprobs is not None:
                scores = P.logprobs_body(end.scores, lambda t: server.tokenizer.decode([t]))
            choices.append(P.completion_choice(i, head + text, end.finish_reason, scores))
            prompt_tokens += end.prompt_tokens
            completion_tokens += end.completion_tokens
        use = P.usage(prompt_tokens, completion_tokens)
        return P.completion_batch_body(P.new_id("cmpl"), req.model, choices, use)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("fedit.serve").joinpath("static/index.html").read_text("utf-8")

    @app.get("/fedit/info")
    async def info(request: Request) -> dict[str, Any]:
        if not authorized(request):  # only whether a key is needed (the page asks for it)
            return {"auth": True}
        left, right = server.catalog.default_pair()
        return {"base_model": server.catalog.base_model, "template": server.catalog.template,
                "default_pair": [left, right], "max_model_len": server.max_model_len,
                "auth": server.api_key is not None}

    @app.get("/fedit/metrics")
    async def metrics(model: str, request: Request) -> dict[str, Any]:
        authorize(request)
        served = _model(server, model)
        if served.metrics_file() is None:
            raise P.ApiError(404, f"model {model!r} belongs to no run with a metrics.jsonl",
                             param="model", code="no_metrics")
        return server.catalog.loss_curve(model)

    return app


def _model(server: Server, name: str) -> Any:
    served = server.catalog.models.get(name)
    if served is None:
        names = list(server.catalog.models)
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise P.ApiError(404, f"The model `{name}` does not exist (served: {shown}).",
                         param="model", code="model_not_found")
    return served


def _prompt_ids(server: Server, prompt: str | list[int], index: int, count: int) -> list[int]:
    """A prompt's token ids (a string is tokenized); an empty or out-of-vocabulary prompt
    is a 400 that names it."""
    where = f"prompt[{index}]" if count > 1 else "prompt"
    ids = list(server.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt)
    if not ids:
        raise P.ApiError(400, f"{where}: empty; give at least one token", param="prompt")
    vocab = len(server.tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise P.ApiError(400, f"{where}: token id {bad} is outside the vocabulary "
                         f"(0..{vocab - 1})", param="prompt")
    return ids


def _sampling(server: Server, req: Any, prompt: int, budget: int | None,
              template: str | None, chat: bool) -> Sampling:
    max_tokens = _check_length(server, prompt, budget, chat)
    stops = req.stops() + (TEMPLATE_STOPS.get(template, ()) if template else ())
    return Sampling(max_tokens, req.temperature, req.top_p, stops, req.seed, req.ignore_eos)


def _check_length(server: Server, prompt: int, budget: int | None, chat: bool) -> int:
    """The token budget of a request, or a 400 naming the context limit."""
    limit = server.max_model_len
    what = "messages" if chat else "prompt"
    if budget is None:
        budget = min(server.default_max_tokens, max(1, limit - prompt))
    if prompt + budget > limit:
        raise P.ApiError(
            400, f"This model's maximum context length is {limit} tokens. However, you "
            f"requested {prompt + budget} tokens ({prompt} in the {what}, {budget} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            param="max_tokens" if prompt < limit else what, code="context_length_exceeded")
    return budget


def chat_prompt_ids(messages: list[dict[str, Any]], template: str, tokenizer: Any) -> list[int]:
    """The prompt tokens of a conversation in the model's prompt template.

    ``chat``: the tokenizer's chat template. ``alpaca`` (what fedit adapters are trained
    on by default): the last user message is the instruction; a system message and earlier
    turns go in the input section, one ``Role: text`` line each.
    """
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise P.ApiError(400, "this model has no chat template: use /v1/completions")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if messages[-1]["role"] != "user":
        raise P.ApiError(400, "messages: the last message must be the user's (the alpaca "
                         "template answers one instruction)", param="messages")
    history = [f"{m['role'].capitalize()}: {m['content']}" for m in messages[:-1]]
    row = {"instruction": messages[-1]["content"], "context": "\n".join(history)}
    return list(tokenizer(build_prompt(row, "alpaca"))["input_ids"])


def _submit(server: Server, prompt: list[int], model: str, sampling: Sampling,
            logprobs: int | None = None, echo: bool = False
            ) -> tuple[asyncio.Queue[Event], Job]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:  # called on the engine's thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(prompt, model, sampling, emit, logprobs=logprobs, echo=echo)
    try:
        server.engine.submit(job)
    except QueueFull as e:
        raise P.ApiError(429, f"The server is busy ({e}); retry later.", type_="requests",
                         code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    return events, job


async def _collect(events: asyncio.Queue[Event], job: Job,
                   request: Any) -> tuple[str, Event | None]:
    """The whole answer; (text, None) when the client disconnected first (job cancelled)."""
    parts: list[str] = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), _POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return "".join(parts), None
                continue
            if event.kind == "error":
                raise P.ApiError(500, f"generation failed: {event.text}", type_="server_error")
            if event.kind == "finish":
                return "".join(parts), event
            parts.append(event.text)
    finally:
        job.cancelled.set()  # a no-op when the job is done; frees its row when not


async def _sse(events: asyncio.Queue[Event], job: Job, rid: str, model: str, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: ``data: {chunk}`` events, then ``data: [DONE]``."""
    chunk: Callable[..., dict] = P.chat_chunk if chat else P.completion_chunk

    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield data(chunk(rid, model, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if event.kind == "error":
                yield data(P.ApiError(500, f"generation failed: {event.text}",
                                      type_="server_error").body())
                break
            if event.kind == "delta":
                yield data(chunk(rid, model, {"content": event.text} if chat else event.text))
                continue
            yield data(chunk(rid, model, {} if chat else "", event.finish_reason))
            if include_usage:
                use = P.usage(event.prompt_tokens, event.completion_tokens)
                yield data(chunk(rid, model, {} if chat else "", None, use, final_usage=True))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client went away mid-stream: its row leaves the batch


def api_key_from_env(var: str | None) -> str | None:
    """The key in ``var`` (``--api-key-env``); an unset or empty variable is an error."""
    if var is None:
        return None
    key = os.environ.get(var, "").strip()
    if not key:
        raise ConfigError(f"--api-key-env {var}: the environment variable is unset or empty; "
                          f"export {var}=... or leave --api-key-env out")
    return key
