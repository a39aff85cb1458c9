"""The generation engine: continuous batching for serving and for evaluation alike.

Served, one thread owns the model and decodes every running request together: requests wait
in a bounded queue (``submit``). Evaluating, ``run`` decodes a list of prompts to the end on
the calling thread, in the order given, with no queue and no thread. Either way the engine
admits new prompts between decoding steps (continuous batching), so a short answer leaves
the batch when it ends instead of waiting for the longest one: the new prompts are
pre-filled together, their KV cache rows are joined to the running batch's (left-padded to
a common length), and from then on one forward pass a step serves every running row, each
with its own LoRA adapter when served (PEFT's mixed-adapter batches, ``adapter_names=``).
A finished, stopped or abandoned row leaves the batch at once, and the left padding no
row needs any more is cut off.

Each row keeps its own sampling (temperature, top-p, its own seeded generator), stop
strings and token budget, so a row decodes the same tokens whether it runs alone or in a
batch (up to the floating-point differences of padded batched matmuls, which greedy
decoding of an fp32 model does not see; tested).
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

from fedit.errors import ModelError

Emit = Callable[["Event"], None]


@dataclass(frozen=True)
class Sampling:
    """How one request decodes: temperature 0 is greedy; ``seed`` makes sampling repeatable."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


class TokenScore(NamedTuple):
    """One token's log-probability under the model, and the most likely tokens there.

    ``logprob`` is None for a prompt's first token (nothing predicts it); ``top`` holds the
    ``logprobs`` most likely tokens as (id, log-prob) and the token itself (as vLLM does).
    """

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Event:
    """What the engine tells a request: a piece of text, the end, or a failure.

    A finish event of a job that asked for log-probs carries them (``scores``): the prompt's
    tokens first when it asked for ``echo``, then every token sampled (an EOS included).
    """

    kind: str  # "delta" | "finish" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    scores: tuple[TokenScore, ...] = ()


@dataclass
class Job:
    """One request: its prompt tokens, the model (adapter) it asks for, how to decode.

    ``emit`` is called from the engine's thread; ``cancelled`` is set by the request's side
    when its client goes away (the row leaves the batch at the next step). ``logprobs``
    (None: none) asks for each sampled token's log-prob and the ``logprobs`` most likely
    tokens; ``echo`` for the prompt's tokens' too (one forward pass over the prompt).
    ``sampling.max_tokens`` may be 0 with ``echo``: the prompt is scored, nothing sampled.
    """

    prompt_ids: list[int]
    model: str
    sampling: Sampling
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None
    echo: bool = False


class Adapters(Protocol):
    """Which adapter a row runs with (``fedit.serve.adapters.AdapterCache`` for serving)."""

    @property
    def slots(self) -> Mapping[str, str]: ...  # name -> loaded adapter (``/health``)
    @property
    def enabled(self) -> bool: ...  # rows name their adapter (``adapter_names=``)
    def slot(self, name: str) -> str: ...
    def acquire(self, name: str) -> bool: ...
    def release(self, name: str) -> None: ...
    def release_all(self) -> None: ...


class AsItIs:
    """No adapter switching: every row runs the model as it is (its active adapter, if any)."""

    slots: Mapping[str, str] = {}
    enabled = False  # no adapter_names=: the active adapter serves every row

    def slot(self, name: str) -> str:
        return name

    def acquire(self, name: str) -> bool:
        return True

    def release(self, name: str) -> None:
        pass

    def release_all(self) -> None:
        pass


class QueueFull(Exception):
    """The engine's queue holds as many waiting requests as it may (answer 429)."""


@dataclass
class _Row:
    job: Job
    slot: str  # the adapter's PEFT name, or BASE_SLOT
    generator: torch.Generator
    pending: int = -1  # the token to feed at the next step
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already emitted
    scores: list[TokenScore] = field(default_factory=list)  # when the job asks for logprobs

    @property
    def length(self) -> int:
        """Real (unpadded) positions in the cache after the pending token is fed."""
        return len(self.job.prompt_ids) + len(self.generated)


@dataclass
class _Batch:
    rows: list[_Row]
    cache: Any  # transformers DynamicCache, batch = len(rows)
    mask: torch.Tensor  # (rows, cached positions): 0 on the left padding


class Engine:
    """Owns the model on one thread; ``submit`` jobs from any thread.

    Parameters
    ----------
    model : peft.PeftModel or transformers model
        The base model, wrapped by PEFT when adapters are served.
    tokenizer : transformers tokenizer
    adapters : Adapters or None
        Names -> PEFT adapters (serving's ``AdapterCache``, loaded lazily, at most
        ``max_loaded`` at a time); None: the model as it is, whatever name a job gives.
    max_batch : int
        Rows decoded together (1: one request at a time).
    max_queue : int
        Requests that may wait for a place; one more is refused (``QueueFull``).
    """

    def __init__(self, model: Any, tokenizer: Any, adapters: Adapters | None = None, *,
                 max_batch: int = 16, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.adapters: Adapters = adapters if adapters is not None else AsItIs()
        self.max_batch = max_batch
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.deferred: list[Job] = []  # taken from the queue, waiting for an adapter slot
        self.eos = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedit-engine", daemon=True)
        self.running = 0  # rows in the batch now (``/health``)
        self.steps = 0  # decoding steps run (tests and stats)
        self.max_rows_seen = 0  # the largest batch decoded
        # logits (rows x positions x vocab) one prefill may hold to score prompts (echo):
        # 2**28 is 1 GiB in fp32; more rows are pre-filled a group at a time, then joined
        self.echo_logits = 2**28
        self.vocab = int(getattr(getattr(model, "config", None), "vocab_size", None)
                         or len(tokenizer))

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        """Queue a job; raises ``QueueFull`` when ``max_queue`` jobs already wait."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting") from None

    def run(self, jobs: Sequence[Job], max_batch_tokens: int | None = None) -> None:
        """Decode ``jobs`` to the end on the calling thread, admitted in the order given.

        Continuous batching as served, with no queue and no thread: whenever rows finish,
        the next jobs join, so the batch is never held up by its longest answer. A job joins
        only while the batch would hold at most ``max_batch_tokens`` prompt + answer
        positions (left padding included; a job always runs when the batch is empty), so
        one very long prompt does not pad every row to its length. The same jobs in the
        same order give the same batches, so greedy answers repeat exactly. Errors raise."""
        waiting = deque(jobs)
        batch: _Batch | None = None
        while waiting or batch is not None:
            new: list[Job] = []
            while waiting and self._fits(batch, new, waiting[0], max_batch_tokens):
                job = waiting.popleft()
                if not self.adapters.acquire(job.model):
                    raise ModelError(f"no adapter slot for {job.model!r}")
                new.append(job)
            if new:
                batch = self._join(batch, self._prefill(new))
            if batch is not None:
                batch = self._step(batch)

    def _fits(self, batch: _Batch | None, new: Sequence[Job], job: Job,
              max_tokens: int | None) -> bool:
        rows = (len(batch.rows) if batch else 0) + len(new)
        if rows >= self.max_batch:
            return False
        if max_tokens is None or rows == 0:
            return True
        width = max([batch.mask.shape[1] if batch else 0]
                    + [len(j.prompt_ids) for j in (*new, job)])
        budget = max(j.sampling.max_tokens for j in (*new, job))
        if batch:
            budget = max(budget, *(r.job.sampling.max_tokens - len(r.generated)
                                   for r in batch.rows))
        return (rows + 1) * (width + budget) <= max_tokens

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        batch: _Batch | None = None
        while not self._stop.is_set():
            jobs: list[Job] = []
            try:
                rows = len(batch.rows) if batch else 0
                jobs = self._take(self.max_batch - rows, block=rows == 0)
                if jobs:
                    batch = self._join(batch, self._prefill(jobs))
                if batch is not None:
                    batch = self._step(batch)
                self.running = len(batch.rows) if batch else 0
            except Exception as exc:  # a bug must not hang every client: fail the batch
                traceback.print_exc()
                failed = [r.job for r in batch.rows] if batch else []
                for job in failed + [j for j in jobs if j not in failed]:
                    job.emit(Event("error", text=f"{type(exc).__name__}: {exc}"))
                batch = None
                self.adapters.release_all()

    def _take(self, room: int, block: bool) -> list[Job]:
        """Up to ``room`` jobs whose adapter can be held now, oldest first.

        A job whose adapter cannot be loaded yet (every slot in use by running rows) waits
        in ``deferred``, ahead of the queue; at most ``max_batch`` wait there."""
        taken: list[Job] = []
        waiting, self.deferred = self.deferred, []
        for job in waiting:
            self._consider(job, taken, room)
        while len(taken) < room and len(self.deferred) < self.max_batch:
            try:
                wait = block and not taken and not self.deferred
                job = self.queue.get(timeout=0.1) if wait else self.queue.get_nowait()
            except queue.Empty:
                break
            self._consider(job, taken, room)
        return taken

    def _consider(self, job: Job, taken: list[Job], room: int) -> None:
        if job.cancelled.is_set():
            return
        try:
            if len(taken) < room and self.adapters.acquire(job.model):
                taken.append(job)
            else:
                self.deferred.append(job)
        except ModelError as exc:  # a broken adapter folder fails its own requests only
            job.emit(Event("error", text=str(exc)))

    def _prefill(self, jobs: Sequence[Job]) -> _Batch | None:
        """Run the new prompts (left-padded) and sample each one's first token; prompts
        to score (echo) go in groups whose every-position logits fit ``echo_logits``."""
        if not any(j.echo for j in jobs):
            return self._prefill_group(jobs)
        batch: _Batch | None = None
        group: list[Job] = []
        for job in sorted(jobs, key=lambda j: -len(j.prompt_ids)):  # longest sets the width
            width = len(group[0].prompt_ids) if group else len(job.prompt_ids)
            if group and (len(group) + 1) * width * self.vocab > self.echo_logits:
                batch = self._join(batch, self._prefill_group(group))
                group = []
            group.append(job)
        return self._join(batch, self._prefill_group(group))

    def _prefill_group(self, jobs: Sequence[Job]) -> _Batch | None:
        from transformers import DynamicCache

        width = max(len(j.prompt_ids) for j in jobs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids)
                             for j in jobs])
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        rows = [_Row(j, self.adapters.slot(j.model), _generator(j.sampling.seed)) for j in jobs]
        cache = DynamicCache()
        echo = any(j.echo for j in jobs)  # then every position's logits, else the last's
        logits = self._forward(ids, mask, positions, cache, rows, keep=0 if echo else 1)
        for i, row in enumerate(rows):
            if row.job.echo:
                prompt = row.job.prompt_ids
                row.scores = _prompt_scores(logits[i, width - len(prompt):], prompt,
                                            row.job.logprobs or 0)
        batch = _Batch(rows, cache, mask)
        return self._advance(batch, logits[:, -1].float().cpu())

    def _step(self, batch: _Batch) -> _Batch | None:
        """Feed every row's pending token, sample the next."""
        ids = torch.tensor([[r.pending] for r in batch.rows])
        batch.mask = torch.cat([batch.mask, torch.ones(len(batch.rows), 1, dtype=torch.long)], 1)
        positions = torch.tensor([[r.length - 1] for r in batch.rows])
        logits = self._forward(ids, batch.mask, positions, batch.cache, batch.rows)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(batch.rows))
        return self._advance(batch, logits[:, -1].float().cpu())

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any, rows: Sequence[_Row], keep: int = 1) -> torch.Tensor:
        """The logits (rows, positions, vocab) of the last ``keep`` positions (0: all)."""
        kwargs: dict[str, Any] = {}
        if self.adapters.enabled:
            kwargs["adapter_names"] = [r.slot for r in rows]
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), cache=cache, use_cache=True,
                         logits_to_keep=keep, **kwargs)
        return out.logits

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Sample a token a row, emit the new text, drop the rows that are done."""
        keep: list[int] = []
        for i, row in enumerate(batch.rows):
            if row.job.cancelled.is_set() or row.job.sampling.max_tokens == 0:
                if not row.job.cancelled.is_set():  # echo with max_tokens 0: scored only
                    self._finish(row, "length", 0)
                self.adapters.release(row.job.model)
                continue
            token = _sample(logits[i], row.job.sampling, row.generator)
            if row.job.logprobs is not None:
                row.scores.append(_token_score(logits[i], token, row.job.logprobs))
            if self._emit(row, token):
                keep.append(i)
            else:
                self.adapters.release(row.job.model)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            index = torch.tensor(keep)
            batch.cache.batch_select_indices(index.to(self.device))
            batch.rows = [batch.rows[i] for i in keep]
            batch.mask = batch.mask[index]
            _trim_left(batch)
        return batch

    def _emit(self, row: _Row, token: int) -> bool:
        """Record ``token`` for ``row`` and send the text it adds; False when the row is done."""
        sampling = row.job.sampling
        eos = token in self.eos and not sampling.ignore_eos
        if not eos:
            row.generated.append(token)
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        cut = _first_stop(text, sampling.stop)
        done_length = len(row.generated) + eos >= sampling.max_tokens
        if cut is not None or eos or done_length:
            end = cut if cut is not None else len(text)
            if end > row.sent:
                row.job.emit(Event("delta", text=text[row.sent:end]))
            reason = "length" if done_length and cut is None and not eos else "stop"
            self._finish(row, reason, len(row.generated) + eos)
            return False
        safe = _safe_end(text, sampling.stop)
        if safe > row.sent:
            row.job.emit(Event("delta", text=text[row.sent:safe]))
            row.sent = safe
        row.pending = token
        return True

    def _finish(self, row: _Row, reason: str, completion_tokens: int) -> None:
        row.job.emit(Event("finish", finish_reason=reason,
                           prompt_tokens=len(row.job.prompt_ids),
                           completion_tokens=completion_tokens, scores=tuple(row.scores)))

    def _join(self, running: _Batch | None, new: _Batch | None) -> _Batch | None:
        """One batch of both: caches and masks left-padded to the same length, stacked."""
        if running is None or new is None:
            return running or new
        width = max(running.mask.shape[1], new.mask.shape[1])
        for a, b in zip(_layers(running.cache), _layers(new.cache), strict=True):
            a.keys = torch.cat([_pad_left(a.keys, width, 2), _pad_left(b.keys, width, 2)])
            a.values = torch.cat([_pad_left(a.values, width, 2), _pad_left(b.values, width, 2)])
        running.mask = torch.cat([_pad_left(running.mask, width, 1),
                                  _pad_left(new.mask, width, 1)])
        running.rows += new.rows
        return running


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(x, "keys") and hasattr(x, "values") for x in layers):
        raise RuntimeError("this model's KV cache has no per-layer keys/values to join batches")
    return list(layers)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim)


def _trim_left(batch: _Batch) -> None:
    """Cut the leading columns that are padding in every row (rows with long prompts left)."""
    real = batch.mask.any(0).nonzero()
    start = int(real[0]) if len(real) else 0
    if start == 0:
        return
    for layer in _layers(batch.cache):
        layer.keys = layer.keys[:, :, start:].contiguous()
        layer.values = layer.values[:, :, start:].contiguous()
    batch.mask = batch.mask[:, start:]


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids = {tokenizer.eos_token_id}
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list | tuple) else {extra}
    return frozenset(int(i) for i in ids if i is not None)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _sample(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> int:
    """Greedy at temperature 0; else softmax(logits / T) restricted to the top-p nucleus."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, -1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p >= sampling.top_p  # keep the first above top_p
        sorted_p[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _prompt_scores(logits: torch.Tensor, ids: Sequence[int], k: int) -> list[TokenScore]:
    """Each prompt token's log-prob given the tokens before it (the first: None), from the
    prompt's own logits (positions, vocab): log_softmax in fp32, as the model's own."""
    logp = torch.log_softmax(logits[:-1].float(), -1)
    target = torch.tensor(ids[1:], device=logp.device)
    chosen = logp.gather(1, target[:, None])[:, 0].cpu().tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k and chosen:
        values, index = logp.topk(k, -1)
        tops = [list(zip(i, v, strict=True))
                for i, v in zip(index.cpu().tolist(), values.cpu().tolist(), strict=True)]
    scores = [TokenScore(ids[0], None, ())]
    for token, value, top in zip(ids[1:], chosen, tops, strict=True):
        scores.append(TokenScore(token, value, _with_token(top, token, value)))
    return scores


def _token_score(logits: torch.Tensor, token: int, k: int) -> TokenScore:
    """A sampled token's log-prob under the model's own distribution (before temperature
    and top-p, as vLLM reports it) and the ``k`` most likely tokens."""
    logp = torch.log_softmax(logits.float(), -1)
    value = float(logp[token])
    top: list[tuple[int, float]] = []
    if k:
        values, index = logp.topk(k)
        top = list(zip(index.tolist(), values.tolist(), strict=True))
    return TokenScore(token, value, _with_token(top, token, value))


def _with_token(top: list[tuple[int, float]], token: int, value: float
                ) -> tuple[tuple[int, float], ...]:
    return tuple(top) if any(t == token for t, _ in top) else (*top, (token, value))


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be sent: not a half-decoded character, nor the start of a
    stop string that the next tokens may complete."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                end -= k
                break
    return end
