"""FedAvg: the example-weighted mean of the client adapters.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (https://arxiv.org/abs/1602.05629); the aggregation of the FedIT
paper (https://arxiv.org/abs/2305.05644), weighted by each client's data size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedit.strategies.base import Reply, StrategyParams
from fedit.strategies.utils import aggregate_weighted, sample_clients


class FedAvg:
    """Federated averaging of LoRA adapters.

    Parameters
    ----------
    params : StrategyParams
        ``fraction`` (0.1) of the clients sampled per round, at least ``min_clients`` (1),
        sampling seeded by ``seed`` (42) and the round number.
    """

    def __init__(self, params: StrategyParams | None = None) -> None:
        self.params = params or StrategyParams()

    def sample(self, server_round: int, clients: Sequence[int]) -> list[int]:
        p = self.params
        return sample_clients(clients, server_round, p.fraction, p.min_clients, p.seed)

    def configure_train(self, server_round: int) -> dict[str, Any]:
        return {}

    def aggregate_train(
        self, server_round: int, global_arrays: list[np.ndarray], replies: Sequence[Reply]
    ) -> list[np.ndarray]:
        # Weight each client by the examples it trained on, as FedIT / Shepherd do
        return aggregate_weighted([r.arrays for r in replies], [r.num_examples for r in replies])
