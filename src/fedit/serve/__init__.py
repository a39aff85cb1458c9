"""``fedit serve``: the base model and every adapter of the runs given, behind an
OpenAI-compatible API that batches requests across adapters, with a chat page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedit.errors import ConfigError
from fedit.model.base import load_base_model, load_tokenizer
from fedit.model.device import pick_device
from fedit.model.engine import Engine
from fedit.serve.adapters import AdapterCache, wrap_with_adapter
from fedit.serve.app import Server, api_key_from_env, create_app
from fedit.serve.models import build_catalog

__all__ = ["load_server", "serve"]


def load_server(paths: list[str], *, model: str | None = None, template: str | None = None,
                dtype: str = "auto", device: str = "auto", max_batch: int = 16,
                max_queue: int = 64, max_adapters: int = 8, max_model_len: int = 2048,
                default_max_tokens: int = 256, api_key_env: str | None = None,
                log: Callable[[str], None] = print) -> Server:
    """Find the adapters, load the base model once, start the engine."""
    limits = {"--max-batch": max_batch, "--max-queue": max_queue,
              "--max-adapters": max_adapters, "--max-model-len": max_model_len,
              "default max_tokens": default_max_tokens}
    for flag, value in limits.items():
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    api_key = api_key_from_env(api_key_env)
    catalog = build_catalog(paths, model, template)
    if not catalog.base_model:
        raise ConfigError("no base model: pass --model")
    tokenizer = load_tokenizer(catalog.base_model)
    lm = load_base_model(catalog.base_model, dtype=dtype, device=pick_device(device))
    lm.config.use_cache = True
    folders = {name: m.adapter for name, m in catalog.models.items()}
    first = next((n for n in catalog.default_pair() if folders[n] is not None), None)
    loaded: dict[str, str] = {}
    if first is not None:
        lm = wrap_with_adapter(lm, folders[first])  # type: ignore[arg-type]
        loaded = {first: "a0"}
    adapters = AdapterCache(lm, folders, max_adapters, loaded)
    limit = min(max_model_len, int(getattr(lm.config, "max_position_embeddings", max_model_len)))
    engine = Engine(lm, tokenizer, adapters, max_batch=max_batch, max_queue=max_queue).start()
    log(f"serving {len(catalog.models)} models on {catalog.base_model} ({lm.dtype}): "
        + ", ".join(list(catalog.models)[:6]) + (", ..." if len(catalog.models) > 6 else ""))
    return Server(catalog, engine, tokenizer, limit, default_max_tokens, api_key)


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    app: Any = create_app(server)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=2)
    finally:
        server.engine.stop()
