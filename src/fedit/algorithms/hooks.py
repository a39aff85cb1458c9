"""Trainer hooks the algorithms share, written against :class:`~fedit.algorithms.contract.TrainHook`
(the trainer imports this interface; nothing here imports the trainer).

- :class:`ProximalTerm`: FedProx's (and Ditto's) ``mu / 2 ||w - w_start||^2``;
- :class:`FreezeA`: FFA-LoRA's frozen ``A`` factors;
- :class:`CombinedHook`: several hooks as one (a strategy's hook plus FFA-LoRA's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedit.algorithms.contract import TrainHook, hook_steps


class ProximalTerm(TrainHook):
    """``mu / 2 * sum ||w - w_start||^2`` over the adapter tensors, added to every step.

    ``w_start`` is a detached copy of ``params`` taken on the first call: the trainer calls
    the hook only after the round's start adapter is loaded, so that copy is ``w_t``.
    ``start`` gives it instead (Ditto's personal adapter stays near the global one while
    it trains from its own weights).
    """

    def __init__(self, mu: float, start: list[Any] | None = None) -> None:
        self.mu = mu
        self.start: list[Any] | None = start

    def loss(self, params: Sequence[Any]) -> Any:
        if self.start is None:
            self.start = [p.detach().clone() for p in params]
        total = sum(((p - s) ** 2).sum() for p, s in zip(params, self.start, strict=True))
        return self.mu / 2 * total


class CombinedHook(TrainHook):
    """Several trainer hooks as one: losses added, corrections applied in order."""

    def __init__(self, hooks: Sequence[TrainHook]) -> None:
        steps = [hook_steps(h) for h in hooks]
        self._losses = [loss for loss, _ in steps if loss is not None]
        self._corrects = [fix for _, fix in steps if fix is not None]
        if not self._losses:
            self.loss = None  # type: ignore[assignment,method-assign]
        if not self._corrects:
            self.correct = None  # type: ignore[assignment,method-assign]

    def loss(self, params: Sequence[Any]) -> Any:
        total = self._losses[0](params)
        for extra in self._losses[1:]:
            total = total + extra(params)
        return total

    def correct(self, params: Sequence[Any]) -> None:
        for fix in self._corrects:
            fix(params)


def lora_a_indices(names: Sequence[str]) -> list[int]:
    """Positions of the ``lora_A`` tensors in the wire order ``names``."""
    return [i for i, n in enumerate(names) if n.endswith(".lora_A.weight")]


class FreezeA(TrainHook):
    """FFA-LoRA: ``A`` stays where it started, only ``B`` trains.

    ``correct`` drops every ``lora_A`` gradient (``p.grad = None``), so AdamW leaves those
    tensors bit-identical, weight decay included (it skips parameters without a gradient).

    Parameters
    ----------
    names : sequence of str
        The adapter's tensor names in wire order (``fedit.model.adapter.adapter_names``); the
        trainer's ``params`` come in that order.

    References
    ----------
    FFA-LoRA, https://arxiv.org/abs/2403.12313
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.a_indices = lora_a_indices(self.names)

    def correct(self, params: Sequence[Any]) -> None:
        if len(params) != len(self.names):
            raise ValueError(f"FreezeA: {len(params)} trainable tensors, expected "
                             f"{len(self.names)} (one per adapter tensor)")
        for i in self.a_indices:
            params[i].grad = None
