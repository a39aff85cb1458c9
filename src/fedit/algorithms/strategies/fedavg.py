"""FedAvg: the example-weighted mean of the client adapters.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (https://arxiv.org/abs/1602.05629); the aggregation of the FedIT
paper (https://arxiv.org/abs/2305.05644), weighted by each client's data size.
"""

from __future__ import annotations

from fedit.algorithms.strategies.base import Strategy


class FedAvg(Strategy):
    """Federated averaging of LoRA adapters: the contract's defaults, nothing more.

    Parameters
    ----------
    params : StrategyParams
        ``fraction`` (0.1) of the clients sampled per round, at least ``min_clients`` (1),
        sampling seeded by ``seed`` (42) and the round number.
    """

    name = "fedavg"
