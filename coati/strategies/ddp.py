"""torch DistributedDataParallel: nccl on GPU, gloo on CPU."""

from __future__ import annotations

import datetime
import os
import socket
from typing import Callable, ContextManager, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from coati.strategies.base import Strategy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_s: float) -> tuple[int, int, torch.device]:
    """Join (or, outside torchrun, create a one-process) default process group.

    Returns:
        ``(rank, world_size, device)``: ``cuda:LOCAL_RANK`` with nccl when CUDA is available, else CPU with gloo.
    """
    if "RANK" not in os.environ:  # plain `python train_reward_model.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


class DDPStrategy(Strategy):
    """Data parallel with full replicas; gradients are averaged over ranks at each backward.

    Args:
        dist_timeout: seconds a collective may wait before the process group errors out.
    """

    name = "ddp"

    def __init__(self, dist_timeout: float = 1800.0):
        self.dist_timeout = dist_timeout

    def setup(self) -> None:
        """Initialise the process group and device."""
        self.rank, self.world_size, self.device = init_process_group(self.dist_timeout)

    def prepare(self, model: nn.Module,
                make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
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

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks."""
        t = tensor.to(self.device)
        dist.all_reduce(t)
        tensor.copy_(t.to(tensor.device))
        return tensor

    def barrier(self) -> None:
        """Wait for all ranks."""
        dist.barrier()

    def teardown(self) -> None:
        """Destroy the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()
