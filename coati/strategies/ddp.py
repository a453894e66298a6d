"""torch DistributedDataParallel: nccl on GPU, gloo on CPU."""

from __future__ import annotations

from typing import Callable, ContextManager, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from coati.strategies.base import Strategy
from coati.strategies.distributed import ProcessGroupMixin


class DDPStrategy(ProcessGroupMixin, Strategy):
    """Data parallel with full replicas; gradients are averaged over ranks at each backward (``--dist_timeout``:
    seconds a collective may wait before the process group errors out)."""

    name = "ddp"
    takes = ("mixed_precision", "dist_timeout", "sequence_parallel_size")

    def prepare(self, model: nn.Module, make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                accumulates: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap in DDP (parameters broadcast from rank 0) and build the optimizer."""
        model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
        return wrapped, make_optimizer([p for p in wrapped.parameters() if p.requires_grad])

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module inside DDP."""
        return model.module if isinstance(model, DistributedDataParallel) else model

    def no_sync(self, model: nn.Module) -> ContextManager:
        """Skip the gradient all-reduce on accumulation micro-steps."""
        return model.no_sync()
