"""Single process, no wrapping: the reference every other strategy must match."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from coati.strategies.base import Strategy


class NaiveStrategy(Strategy):
    """One process on one device (CUDA when available, else CPU)."""

    name = "naive"

    def setup(self) -> None:
        """Pick the device."""
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, model: nn.Module, make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                accumulates: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move the model to the device and build the optimizer."""
        model.to(self.device)
        return model, make_optimizer([p for p in model.parameters() if p.requires_grad])

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model itself."""
        return model
