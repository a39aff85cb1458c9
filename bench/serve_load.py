"""Load on ``fedit serve``: requests batched across adapters vs one request at a time.

    .venv/bin/python bench/serve_load.py                 # SmolLM2, 64 requests, 8 concurrent
    .venv/bin/python bench/serve_load.py --fast          # the tiny random model (~1 min)
    .venv/bin/python bench/serve_load.py --requests 32 --concurrency 4 --no-write

One process runs both arms in turn against a real server on 127.0.0.1, started twice on
the same base model and three adapters (random LoRA weights of the default shape, so every
row pays for its adapter): ``--max-batch 8`` (ours) and ``--max-batch 1`` (one request at
a time, as a server without batching decodes). Each arm sends the same requests: fixed
prompts from databricks-dolly-15k, spread over the three adapters in turn, greedy,
``max_tokens`` fixed and ``ignore_eos`` so every answer has that many tokens (SmolLM2's
chat template; the tiny model's alpaca template may stop earlier at its markers),
``--concurrency`` in flight at once, streamed through the official ``openai`` client.
Reported per arm: completion tokens/s over the wall time, p50/p95 latency and time to first
token, errors (must be 0); and the ratio of the two throughputs. Writes
bench/results/serve_load.json unless --no-write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from round_overhead import build_tiny_model  # noqa: E402

from fedit.data.load import load_rows  # noqa: E402
from fedit.model.adapter import get_adapter_arrays, save_adapter, set_adapter_arrays  # noqa: E402
from fedit.model.base import LoraSpec, attach_lora, load_base_model  # noqa: E402
from fedit.serve.launch import ServerProcess  # noqa: E402

ADAPTERS = ("a", "b", "c")
DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULT = Path(__file__).parent / "results" / "serve_load.json"


def make_adapters(base: str, out: Path) -> None:
    """Three adapters of the default LoRA shape with random (non-zero) B."""
    lm = attach_lora(load_base_model(base, dtype="fp32"), LoraSpec(), seed=0)
    for i, name in enumerate(ADAPTERS):
        rng = np.random.default_rng(i)
        arrays = [rng.normal(0, 0.01, a.shape) if "lora_B" in k else a
                  for k, a in zip(_names(lm), get_adapter_arrays(lm), strict=True)]
        set_adapter_arrays(lm, arrays)
        save_adapter(lm, out / name, base_model=base)


def _names(lm: Any) -> list[str]:
    from fedit.model.adapter import adapter_names

    return adapter_names(lm)


def prompts(n: int) -> list[str]:
    files = sorted(DOLLY.glob("*dolly*.jsonl*"))
    if not files:
        return [f"Write a short note about topic number {i}." for i in range(n)]
    rows = load_rows(str(files[0]))
    short = [r["instruction"] for r in rows if len(r["instruction"]) < 200 and not r["context"]]
    return short[:n]


async def one(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # counted, never hidden
        return {"error": f"{type(e).__name__}: {e}"}
    return {"latency": time.perf_counter() - start, "ttft": first or 0.0, "tokens": tokens}


async def load(url: str, n: int, concurrency: int, max_tokens: int,
               texts: list[str]) -> dict[str, Any]:
    import openai

    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                  timeout=600) as client:

        async def limited(i: int) -> dict[str, Any]:
            async with gate:
                return await one(client, f"adapters/{ADAPTERS[i % 3]}", texts[i % len(texts)],
                                 max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(n)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok) or [0.0]
    ttft = sorted(r["ttft"] for r in ok) or [0.0]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": n, "errors": n - len(ok),
            "error_examples": [r["error"] for r in results if "error" in r][:3],
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_latency_s": statistics.median(lat), "p95_latency_s": _p95(lat),
            "p50_ttft_s": statistics.median(ttft), "p95_ttft_s": _p95(ttft)}


def _p95(xs: list[float]) -> float:
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="the tiny random model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = str(build_tiny_model(Path(tmp) / "tiny")) if args.fast else "smollm2-135m"
        folder = Path(tmp) / "adapters"
        make_adapters(base, folder)
        texts = prompts(16)
        # SmolLM2's chat template has no stop markers, so every answer is max_tokens long;
        # the tiny tokenizer has no chat template (alpaca's markers may stop an answer early)
        template = "alpaca" if args.fast else "chat"
        arms = {}
        for arm, batch in (("batched", args.concurrency), ("one_at_a_time", 1)):
            with ServerProcess([str(folder), "--max-batch", str(batch), "--template", template]
                               ) as server:
                asyncio.run(load(server.url, 4, min(4, args.concurrency), 4, texts))  # warm-up
                arms[arm] = asyncio.run(load(server.url, args.requests, args.concurrency,
                                             args.max_tokens, texts))
            print(f"{arm:>14}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float)
                                             else f"{k} {v}" for k, v in arms[arm].items()))
    ratio = arms["batched"]["tokens_per_s"] / arms["one_at_a_time"]["tokens_per_s"]
    print(f"batched / one at a time: {ratio:.2f}x tokens/s")
    result = {"model": base if not args.fast else "tiny", "requests": args.requests,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "adapters": len(ADAPTERS), "arms": arms, "throughput_ratio": ratio,
              "cpu": _cpu()}
    if not args.no_write:
        RESULT.parent.mkdir(exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULT}")
    if any(a["errors"] for a in arms.values()):
        sys.exit("errors: " + json.dumps({k: a["error_examples"] for k, a in arms.items()}))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
