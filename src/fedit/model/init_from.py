"""Starting from a trained adapter: ``lora.init_from = RUN_OR_ADAPTER``.

``RUN_OR_ADAPTER`` is a run folder (it has ``config.toml``: its ``final/adapter``, as
``fedit eval`` resolves a run) or a PEFT adapter folder (``adapter_config.json`` and
``adapter_model.safetensors``, e.g. a round's ``rounds/NNNN/adapter`` or one saved by
PEFT). Its arrays become the global adapter of round 0.

Its ``r``, ``lora_alpha`` and target modules must be the run's: they are checked, not
taken from the adapter, so that the run's ``config.toml`` says what the run trained (and
``lora.client_ranks``, FFA-LoRA and the wire format keep meaning what they say); a
mismatch stops with one line naming the ``lora.*`` key to set.

For DPO the starting adapter is also the reference: it is held, frozen, as a second PEFT
adapter named :data:`REFERENCE_ADAPTER` in the same model (no second copy of the base
model), and :func:`reference_weights` makes it the active one for the reference pass.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedit.errors import ConfigError, ModelError
from fedit.model.adapter import adapter_params, load_adapter_arrays, set_adapter_arrays

REFERENCE_ADAPTER = "reference"  # the PEFT adapter name of DPO's frozen reference
ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.toml"
FINAL_ADAPTER = Path("final") / "adapter"


def init_adapter_dir(init_from: str) -> Path:
    """The adapter folder ``lora.init_from`` names: itself, or a run folder's final adapter.

    Raises
    ------
    ConfigError
        No such path, a run without a final adapter, or neither kind of folder (one line).
    """
    where = f"lora.init_from = {init_from!r}"
    path = Path(init_from).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{where}: no such run folder or adapter folder; give a run folder "
                          "(its final/adapter is used) or a PEFT adapter folder")
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if (path / RUN_CONFIG).is_file():
        if (path / FINAL_ADAPTER / ADAPTER_CONFIG).is_file():
            return path / FINAL_ADAPTER
        raise ConfigError(f"{where}: the run has no {FINAL_ADAPTER} (not finished?); give a "
                          f"round's adapter, e.g. {path / 'rounds' / '0001' / 'adapter'}")
    raise ConfigError(f"{where}: not a run folder (no {RUN_CONFIG}) nor a PEFT adapter "
                      f"folder (no {ADAPTER_CONFIG})")


def _adapter_config(folder: Path, where: str) -> dict[str, Any]:
    file = folder / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read {file} ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: {file} is not a JSON object")
    return config


def check_init_adapter(model: Any, folder: Path, where: str) -> None:
    """The adapter in ``folder`` has the run's r, alpha and target modules (those of the
    model's ``default`` adapter) and plain LoRA's math; else one line naming the key."""
    found, ours = _adapter_config(folder, where), model.peft_config["default"]
    if str(found.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"{where}: a {found.get('peft_type')} adapter; fedit trains LoRA")
    targets = found.get("target_modules")
    targets = sorted([targets] if isinstance(targets, str) else targets or [])
    wrong = [(key, have, want) for key, have, want in [
        ("lora.r", found.get("r"), ours.r),
        ("lora.alpha", found.get("lora_alpha"), ours.lora_alpha),
        ("lora.target_modules", targets, sorted(ours.target_modules))] if have != want]
    if wrong:
        raise ConfigError(f"{where}: the adapter differs from the run: " + "; ".join(
            f"{key} = {want!r} but the adapter has {have!r} (set {key} = {have!r})"
            for key, have, want in wrong))
    for key, plain in [("use_dora", False), ("use_rslora", False), ("bias", "none"),
                       ("rank_pattern", {}), ("alpha_pattern", {})]:
        if found.get(key, plain) not in (plain, None):
            raise ConfigError(f"{where}: the adapter has {key} = {found[key]!r}; fedit's "
                              f"LoRA needs {key} = {plain!r} (plain LoRA)")


def init_adapter_arrays(model: Any, init_from: str) -> list[np.ndarray]:
    """The arrays of the adapter ``lora.init_from`` names, checked against the model's
    adapter (config, tensor names and shapes), in ``adapter_names`` order."""
    where = f"lora.init_from = {init_from!r}"
    folder = init_adapter_dir(init_from)
    check_init_adapter(model, folder, where)
    params = adapter_params(model, "default")
    try:
        arrays = load_adapter_arrays(folder, list(params))
    except ModelError as e:
        raise ConfigError(f"{where}: {e} (an adapter of another base model?)") from None
    for (name, param), array in zip(params.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(param.shape):
            raise ConfigError(f"{where}: tensor {name} has shape {tuple(array.shape)}, the "
                              f"model's is {tuple(param.shape)} (an adapter of another base "
                              "model?)")
    return arrays


def start_from(model: Any, init_from: str, reference: bool) -> list[np.ndarray]:
    """The round-0 adapter: ``lora.init_from``'s arrays (also loaded into the model's
    ``default`` adapter), or the model's fresh adapter when ``init_from`` is empty. With
    ``reference`` (DPO) and ``init_from`` they are also held as the frozen reference
    adapter; otherwise any reference adapter is removed (the base is the reference)."""
    if not init_from:
        set_reference_adapter(model, None)
        return [p.detach().float().cpu().numpy().copy()
                for p in adapter_params(model, "default").values()]
    arrays = init_adapter_arrays(model, init_from)
    set_adapter_arrays(model, arrays, "default")
    set_reference_adapter(model, arrays if reference else None)
    return arrays


def set_reference_adapter(model: Any, arrays: list[np.ndarray] | None) -> None:
    """Hold ``arrays`` as the frozen adapter :data:`REFERENCE_ADAPTER` (a copy of the
    ``default`` adapter's config, fp32, never trainable); ``None``: drop it. The active
    adapter, the train/eval mode and the global RNG are left as they were."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)
    if arrays is None:
        return
    config = copy.deepcopy(model.peft_config["default"])
    config.inference_mode = True
    was_training = model.training
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        model.add_adapter(REFERENCE_ADAPTER, config)
    model.train(was_training)
    for param in adapter_params(model, REFERENCE_ADAPTER).values():
        param.data = param.data.float()
        param.requires_grad_(False)
    set_adapter_arrays(model, arrays, REFERENCE_ADAPTER)


def has_reference_adapter(model: Any) -> bool:
    return REFERENCE_ADAPTER in getattr(model, "peft_config", {})


@contextmanager
def reference_weights(model: Any) -> Iterator[None]:
    """Inside the block the model computes with DPO's reference: the frozen reference
    adapter when it has one, else the base model (its adapters disabled). After it the
    active adapter and every parameter's ``requires_grad`` are as before."""
    if not has_reference_adapter(model):
        with model.disable_adapter():
            yield
        return
    active = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(REFERENCE_ADAPTER)
    try:
        yield
    finally:
        model.set_adapter(active)
        for p, flag in flags:
            p.requires_grad_(flag)

