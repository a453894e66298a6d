"""Process-group plumbing shared by the multi-process strategies (a mixin, not a strategy)."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys

import torch
import torch.distributed as dist


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


class _GatherData(torch.autograd.Function):
    """All-gather of ``[n_r, ...]`` rows of different sizes over the default group, keeping the ranks ``r`` with
    ``r % S == rank % S``; backward sums every rank's gradient of the gathered rows (one all-reduce, which gloo has,
    unlike reduce-scatter) and returns this rank's rows of it.

    Every rank computing the same loss ``L`` of the gathered rows gets ``D dL/dx`` for its own rows x (D ranks keep
    them), so the strategy's average over the D data-parallel ranks gives ``dL/dtheta``."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sp_size: int) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.int64, device=tensor.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device))
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        keep = [r for r in range(world) if r % sp_size == rank % sp_size]
        ctx.sizes, ctx.keep, ctx.rank, ctx.longest = sizes, keep, rank, longest
        return torch.cat([parts[r][:sizes[r]] for r in keep])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = torch.zeros((len(ctx.sizes), ctx.longest, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        start = 0
        for r in ctx.keep:
            full[r, :ctx.sizes[r]] = grad[start:start + ctx.sizes[r]]
            start += ctx.sizes[r]
        dist.all_reduce(full)
        return full[ctx.rank, :ctx.sizes[ctx.rank]], None


class ProcessGroupMixin:
    """``setup``/``all_reduce``/``barrier``/``teardown`` over torch.distributed's default group.

    Reads ``self.args.dist_timeout`` (seconds) and ``sequence_parallel_size``; sets ``rank``, ``world_size``,
    ``device`` and ``sequence_parallel``.
    """

    def setup(self) -> None:
        """Initialise the process group and device, and the sequence-parallel groups when S > 1.

        Raises:
            ValueError: S does not divide the world size.
        """
        from coati.strategies.sequence_parallel import make_groups

        self.rank, self.world_size, self.device = init_process_group(self.args.dist_timeout)
        self.sequence_parallel = make_groups(self.args.sequence_parallel_size)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (the tensor may live on CPU; it travels via the group's device)."""
        t = tensor.to(self.device)
        dist.all_reduce(t)
        tensor.copy_(t.to(tensor.device))
        return tensor

    def gather_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """:meth:`coati.strategies.base.Strategy.gather_data` over the default group: the rows of the ranks that
        hold the same sequence-parallel index as this one (one copy of each data-parallel group's batch)."""
        if self.world_size == 1:
            return tensor
        return _GatherData.apply(tensor, self.sequence_parallel.size if self.sequence_parallel else 1)

    def barrier(self) -> None:
        """Wait for all ranks."""
        dist.barrier()

    def teardown(self, keep_process_group: bool = False) -> None:
        """Wait for every rank, then destroy the process group, or with ``keep_process_group`` and several ranks
        leave it alive for the operating system to reclaim when the caller ends the process (the CLI does, with
        ``os._exit``).

        Why keep it: seen with torch 2.13 on gloo, a DDP reducer freed after ``destroy_process_group`` runs
        ``~ProcessGroupGloo`` holding the GIL while a gloo worker thread waits for the GIL to drop an ``all_gather``'s
        Python-owned outputs, and both hang. The barrier narrows that window but did not close it (a ddp test run
        hung once after its export). With the group kept, freeing the reducer never runs that destructor.
        """
        if dist.is_initialized():
            dist.barrier()
            if not (keep_process_group and dist.get_world_size() > 1):
                dist.destroy_process_group()

    def abandon(self) -> None:
        """After a failed run: destroy the process group when this process is its whole world (a library caller may
        run again in the same process); with other ranks nothing is done, as they may be inside a collective and
        the launcher stops them all once this one exits."""
        if dist.is_initialized() and dist.get_world_size() == 1:
            dist.destroy_process_group()


def end_process(code: int) -> int:
    """Return ``code``, or, while a process group is still initialized (a rank of a multi-process run whose group was
    kept: :meth:`ProcessGroupMixin.teardown` with ``keep_process_group``), flush logging, stdout and stderr and end
    the process with ``os._exit(code)``.

    The caller must have closed every file it wrote. What is skipped is the interpreter's teardown (atexit handlers,
    destructors), where freeing a DDP reducer can run ``~ProcessGroupGloo`` and deadlock (torch 2.13; see
    :meth:`ProcessGroupMixin.teardown`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
