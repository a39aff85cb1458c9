"""The learning rate across rounds (``train.round_schedule``): each round's peak lr.

The server computes it from the round number and the config alone (so a resumed run goes
on with the same values) and sends it in each client's instruction (``ROUND_LR``); the
client's ``train.lr_scheduler`` (linear | constant) then shapes it within the round.

``cosine`` is FlowerTune LLM's ``cosine_annealing(current_round, total_round, lrate_max,
lrate_min)`` (flwr's FlowerTune template, ``models.py``), called as its ClientApp calls
it, with the server round r = 1..R::

    lr_r = min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * r / R))

so round 1 already gets a little less than ``lr`` ((lr + min_lr) / 2 at R = 2), and round R
gets ``min_lr`` exactly (with ``min_lr = 0`` the last round does not move the adapter;
FlowerTune decays 5e-5 to 1e-6).
"""

from __future__ import annotations

import math

ROUND_LR = "lr"  # instruction key: the peak learning rate of this round's local training


def round_lr(schedule: str, lr: float, min_lr: float, server_round: int, rounds: int) -> float:
    """The peak learning rate of round ``server_round`` (1-based) of ``rounds``.

    ``constant``: ``lr`` every round; ``cosine``: FlowerTune's cosine annealing from
    ``lr`` towards ``min_lr``, reaching it in round ``rounds`` (see the module doc)."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * server_round
                                                             / max(1, rounds)))
    raise ValueError(f"unknown round schedule {schedule!r}: use constant or cosine")
