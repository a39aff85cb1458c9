"""FedProx: FedAvg whose clients add a proximal term to their local loss.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020
(https://arxiv.org/abs/1812.06127), Algorithm 2: client ``k`` minimises
``F_k(w) + mu / 2 * ||w - w_t||^2`` from the round's global weights ``w_t``; the server
averages as FedAvg does. Here ``w`` is the LoRA adapter. As in Flower's FedProx, the
server puts ``mu`` into each client's config (``proximal-mu``) and the client reads it
from there, so a Flower node trains with the server's value.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedit.algorithms.contract import Arrays, ClientState, Instruction, ServerState, TrainHook
from fedit.algorithms.hooks import ProximalTerm
from fedit.algorithms.strategies.base import Strategy, StrategyParams

PROXIMAL_MU = "proximal-mu"  # instruction key: the proximal term's weight this round


@dataclass
class FedProxParams(StrategyParams):
    """FedProx's hyper-parameter (``[strategy]`` key).

    Parameters
    ----------
    mu : float, default 0.01
        The proximal term's weight (``strategy.mu``); 0 is FedAvg.
    """

    mu: float = 0.01

    def __post_init__(self) -> None:
        if not self.mu >= 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")


class FedProx(Strategy):
    """FedAvg on the server, the proximal term ``mu / 2 ||w - w_t||^2`` on each client."""

    name = "fedprox"
    params_class = FedProxParams
    params: FedProxParams

    def __init__(self, params: FedProxParams | None = None) -> None:
        super().__init__(params or FedProxParams())

    def configure(self, server_round: int, client: int, global_arrays: Arrays,
                  state: ServerState) -> Instruction:
        return Instruction(config={PROXIMAL_MU: float(self.params.mu)})

    def train_hook(self, instruction: Instruction, state: ClientState) -> TrainHook | None:
        """The proximal term with the server's ``mu`` (None when it is 0: plain training)."""
        mu = float(instruction.config.get(PROXIMAL_MU, self.params.mu))
        return ProximalTerm(mu) if mu > 0 else None
