"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): ZeRO stage 2 or 3 on CPU (gloo) or GPU (nccl)."""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, ContextManager, Iterable, Iterator

import torch
from torch import nn

from coati.strategies.base import Strategy
from coati.strategies.distributed import ProcessGroupMixin


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a HF model, found by the class names in its ``_no_split_modules``."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


class FSDPStrategy(ProcessGroupMixin, Strategy):
    """Fully sharded data parallel: parameters, gradients and optimizer state sharded over ranks.

    Each transformer block is its own FSDP unit, the rest (embeddings, final norm, value head) the root unit.
    Stage 3 frees gathered parameters after forward (``reshard_after_forward=True``); stage 2 keeps them until
    backward (less communication, more memory). bf16 comes from the trainer's autocast, as with every strategy, so
    the numerics match ``ddp``. Rank 0 keeps a CPU copy of the unsharded model for the export.

    Options: ``--zero_stage`` 2 or 3; ``--cpu_offload`` keeps sharded parameters and optimizer state in CPU memory
    (``CPUOffloadPolicy``; GPU runs); ``--dist_timeout``.
    """

    name = "fsdp"
    takes = ("mixed_precision", "dist_timeout", "sequence_parallel_size", "zero_stage", "cpu_offload")
    refuses = {"quantized": "cannot train a 4-/8-bit backbone: FSDP2 shards each parameter as a DTensor, and "
                            "bitsandbytes' packed weights keep their quantisation state (absmax, code) outside the "
                            "tensor, so a shard cannot be de-quantised; use --strategy ddp (or naive)"}
    _export_template: nn.Module | None = None

    def prepare(self, model: nn.Module, make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                accumulates: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Shard every transformer block, then the root, and build the optimizer over the sharded parameters."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        if self.is_main:
            self._export_template = copy.deepcopy(model).cpu()
        model.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        kwargs = dict(mesh=mesh, reshard_after_forward=self.args.zero_stage == 3,
                      offload_policy=CPUOffloadPolicy() if self.args.cpu_offload else OffloadPolicy())
        for block in transformer_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model, make_optimizer([p for p in model.parameters() if p.requires_grad])

    def unwrap(self, model: nn.Module) -> nn.Module:
        """FSDP2 shards in place: the module is its own unwrapped form (parameters are DTensor shards)."""
        return model

    def no_sync(self, model: nn.Module) -> ContextManager:
        """Accumulate unsharded-reduced gradients locally on accumulation micro-steps."""

        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return ctx()

    def export_model(self, model: nn.Module) -> nn.Module | None:
        """Gather the full state dict to rank 0 (a collective: every rank calls it) into the CPU copy."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        self._export_template.load_state_dict(full)
        return self._export_template
