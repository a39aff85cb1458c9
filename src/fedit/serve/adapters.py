"""LoRA adapters on the one base model: loaded when first asked for, at most N at a time.

Every adapter a server knows is a PEFT folder on disk; it enters the model (PEFT
``load_adapter``) the first time a request names it and leaves it (``delete_adapter``) when
room is needed for another and no running request uses it, least recently used first.
Only the engine's thread calls these methods.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedit.errors import ModelError

BASE_SLOT = "__base__"  # PEFT's name for "no adapter on this row" in a mixed batch


class AdapterCache:
    """Model names -> PEFT adapters in ``model``, loaded lazily, ``max_loaded`` at most.

    Parameters
    ----------
    model : peft.PeftModel or transformers model
        A PeftModel when any adapter is served (created with the first one loaded).
    folders : mapping of str to Path or None
        Every servable name; ``None`` is the base model (no adapter).
    max_loaded : int
        Adapters held in memory at once (>= 1).
    """

    def __init__(self, model: Any, folders: Mapping[str, Path | None], max_loaded: int = 8,
                 loaded: Mapping[str, str] | None = None) -> None:
        if max_loaded < 1:
            raise ModelError(f"--max-adapters must be >= 1, got {max_loaded}")
        self.model, self.folders, self.max_loaded = model, dict(folders), max_loaded
        self.slots: OrderedDict[str, str] = OrderedDict(loaded or {})  # name -> slot, LRU first
        self.users: dict[str, int] = {}
        self.loads = 0  # adapters loaded from disk (stats, tests)
        self._next = len(self.slots)

    @property
    def enabled(self) -> bool:
        """Whether the model is a PeftModel (rows then name their adapter)."""
        return hasattr(self.model, "peft_config")

    def slot(self, name: str) -> str:
        return BASE_SLOT if self.folders[name] is None else self.slots[name]

    def acquire(self, name: str) -> bool:
        """Make ``name`` usable by one more row; False when every slot is busy now."""
        if self.folders[name] is not None and name not in self.slots:
            if len(self.slots) >= self.max_loaded and not self._evict():
                return False
            self._load(name)
        if name in self.slots:
            self.slots.move_to_end(name)
        self.users[name] = self.users.get(name, 0) + 1
        return True

    def release(self, name: str) -> None:
        self.users[name] = self.users.get(name, 1) - 1
        if self.users[name] <= 0:
            del self.users[name]

    def release_all(self) -> None:
        self.users.clear()

    def _evict(self) -> bool:
        idle = [n for n in self.slots if not self.users.get(n)]
        if not idle:
            return False
        slot = self.slots.pop(idle[0])
        if self.model.active_adapter == slot and self.slots:
            self.model.set_adapter(next(iter(self.slots.values())))
        self.model.delete_adapter(slot)
        return True

    def _load(self, name: str) -> None:
        folder = self.folders[name]
        slot = f"a{self._next}"
        self._next += 1
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                self.model.load_adapter(str(folder), adapter_name=slot, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelError(f"{folder}: cannot load the adapter for {name!r} ({reason})") from e
        self.slots[name] = slot
        self.loads += 1


def wrap_with_adapter(base: Any, folder: Path) -> Any:
    """The base model as a PeftModel holding the adapter in ``folder`` as slot ``a0``."""
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            model = PeftModel.from_pretrained(base, str(folder), adapter_name="a0",
                                              is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"{folder}: cannot load the adapter ({reason}); is it an adapter of "
                         "this base model?") from e
    return model.eval()
