"""The LoRA adapter as what travels and what is saved: float32 arrays and PEFT folders.

Only the adapter crosses the wire, as float32 numpy arrays in the order of
``peft.get_peft_model_state_dict`` (``adapter_names``); a saved adapter is a plain PEFT
folder that also records that order.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedit.errors import ModelError
from fedit.io import atomic_dir, canonical_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ORDER_KEY = "fedit.tensor_order"  # safetensors metadata: the adapter's key order (JSON list)


def adapter_params(model: Any, adapter: str | None = None) -> dict[str, torch.nn.Parameter]:
    """Return the adapter's parameters themselves, under PEFT's state-dict keys, in its
    order (the tensors, not copies: writing to them changes the model). ``adapter``: the
    PEFT adapter name (default: the active one)."""
    from peft import get_peft_model_state_dict

    # keep_vars: the values are the Parameters, not detached copies; no embedding layers
    # (PEFT's "auto" would look the base model up on the hub).
    state = model.state_dict(keep_vars=True)
    adapter = adapter or model.active_adapter
    return dict(get_peft_model_state_dict(model, state, adapter, save_embedding_layers=False))


def adapter_names(model: Any) -> list[str]:
    """Return the adapter's tensor names, in the order the arrays travel."""
    return list(adapter_params(model))


def get_adapter_arrays(model: Any) -> list[np.ndarray]:
    """Return float32 copies of the adapter's tensors, in ``adapter_names`` order."""
    return [p.detach().float().cpu().numpy().copy() for p in adapter_params(model).values()]


def set_adapter_arrays(model: Any, arrays: Sequence[np.ndarray], adapter: str | None = None
                       ) -> None:
    """Copy arrays into the adapter in place (cast to its dtype, no autograd history);
    ``adapter``: the PEFT adapter name (default: the active one).

    Raises
    ------
    ModelError
        Wrong number of arrays, or an array whose shape differs from its tensor (named);
        nothing is written then.
    """
    params = adapter_params(model, adapter)
    if len(arrays) != len(params):
        raise ModelError(f"expected {len(params)} adapter arrays, got {len(arrays)}")
    for (name, param), array in zip(params.items(), arrays, strict=True):
        if tuple(np.shape(array)) != tuple(param.shape):
            raise ModelError(
                f"adapter tensor {name}: expected shape {tuple(param.shape)}, "
                f"got {tuple(np.shape(array))}"
            )
    with torch.no_grad():
        for param, array in zip(params.values(), arrays, strict=True):
            param.copy_(torch.tensor(np.asarray(array)))


def save_adapter(model: Any, path: str | os.PathLike[str], base_model: str | None = None) -> Path:
    """Write the adapter as a PEFT folder, atomically (an existing one is replaced whole).

    ``adapter_config.json`` + ``adapter_model.safetensors`` (float32, the tensor order in
    its metadata): loads with ``PeftModel.from_pretrained(base, path)``. ``base_model``:
    the ``base_model_name_or_path`` to record; default: the name the base was loaded with.
    """
    from safetensors.torch import save

    config = copy.deepcopy(model.peft_config[model.active_adapter])
    config.target_modules = sorted(config.target_modules)  # a set: fix the JSON's order
    if base_model is not None:
        config.base_model_name_or_path = base_model
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapter_params(model).items()}
    metadata = {"format": "pt", _ORDER_KEY: json.dumps(list(tensors))}
    with atomic_dir(path) as tmp:
        config.save_pretrained(str(tmp))
        # sorted metadata: the same adapter gives the same bytes (safetensors' order varies)
        (tmp / ADAPTER_WEIGHTS).write_bytes(canonical_safetensors(save(tensors, metadata)))
    return Path(path)


def load_adapter_arrays(
    path: str | os.PathLike[str], names: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Read a saved adapter back as float32 arrays.

    Parameters
    ----------
    path : str or os.PathLike
        A folder written by ``save_adapter`` (or by PEFT, when ``names`` is given).
    names : sequence of str, optional
        The order to return (e.g. ``adapter_names(model)``); default: the order
        ``save_adapter`` recorded, which is ``get_adapter_arrays``'s.
    """
    from safetensors import safe_open

    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise ModelError(f"no {ADAPTER_WEIGHTS} in {path}: not a saved adapter")
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if names is None and _ORDER_KEY not in metadata:
            raise ModelError(f"{file} does not record its tensor order: pass names=")
        order = list(names) if names is not None else json.loads(metadata[_ORDER_KEY])
        missing = sorted(set(order) - set(handle.keys()))
        if missing:
            raise ModelError(f"{file} has no tensor {missing[0]}")
        return [handle.get_tensor(k).float().numpy().copy() for k in order]
