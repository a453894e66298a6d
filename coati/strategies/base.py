"""The strategy interface: a strategy owns the device, the process group, precision and the model wrapping.

A strategy is built from the :class:`~coati.config.StrategyArgs` group (``Strategy(args)``) and reads only the options
it names in ``takes``. What it cannot do (LoRA, resume checkpoints, a precision, running without CUDA or without a
package) is a class-level capability that :func:`coati.preflight.validate` checks once, before any model is loaded.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from coati.config import StrategyArgs


class StrategyUnavailable(RuntimeError):
    """The strategy cannot run here (missing package or hardware); the message names the alternatives."""


class Strategy(ABC):
    """Distributed-training glue.

    Lifecycle: ``setup()`` -> ``prepare(model, make_optimizer)`` -> per micro-batch ``autocast`` / ``no_sync`` /
    ``backward``, per optimizer step ``step(optimizer, max_norm)`` -> ``export_model`` -> ``teardown()``.

    Class-level capabilities (checked by :meth:`refusals` when the config is validated):

    * ``takes``: the :class:`~coati.config.StrategyArgs` options it reads besides ``strategy``;
    * ``precisions``: the ``--mixed_precision`` values it trains in;
    * ``refuses``: ``{"lora" | "resume" | "quantized": reason}`` for what it cannot do (``quantized``: a 4- or
      8-bit bitsandbytes backbone), the reason ending the error message;
    * :meth:`unavailable`: why it cannot run in this environment (no GPU, package missing), or None.
    """

    name: str = ""
    takes: tuple[str, ...] = ("mixed_precision",)
    precisions: tuple[str, ...] = ("fp32", "bf16")
    refuses: dict[str, str] = {}
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    #: this rank's sequence-parallel group (:mod:`coati.strategies.sequence_parallel`), None without one
    sequence_parallel = None

    def __init__(self, args: StrategyArgs | None = None):
        self.args = args or StrategyArgs()

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes files."""
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel index: the ranks of one sequence-parallel group share it (and their batches)."""
        return self.rank // self.sp_size

    @property
    def data_world_size(self) -> int:
        """Number of data-parallel groups (distinct batches per step): ``world_size / S``."""
        return self.world_size // self.sp_size

    @property
    def sp_size(self) -> int:
        """Ranks per sequence-parallel group (1 without sequence parallelism)."""
        return self.sequence_parallel.size if self.sequence_parallel else 1

    def reduce_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the data-parallel groups (in place and returned): metrics and counts, of which every
        rank of a sequence-parallel group holds the same copy, count once (only its first rank contributes)."""
        if self.sequence_parallel is not None and self.sequence_parallel.rank:
            tensor.zero_()
        return self.all_reduce(tensor)

    @classmethod
    def unavailable(cls) -> str | None:
        """Why the strategy cannot run in this environment (cheap: imports nothing heavy), or None."""
        return None

    @classmethod
    def refusals(cls, cfg) -> list[str]:
        """What ``cfg`` (a :class:`~coati.config.TrainConfig`) asks that this strategy cannot do, one line each."""
        wants = {"lora": cfg.lora.uses_lora, "resume": cfg.optim.save_every > 0 or bool(cfg.optim.resume),
                 "quantized": cfg.backbone.quantized}
        errors = [f"--strategy {cls.name} {why}" for need, why in cls.refuses.items() if wants[need]]
        if cfg.strategy.mixed_precision not in cls.precisions:
            errors.append(f"--strategy {cls.name} trains in {' or '.join(cls.precisions)}, not --mixed_precision "
                          f"{cfg.strategy.mixed_precision}")
        reason = cls.unavailable()
        return errors + ([reason] if reason else [])

    @abstractmethod
    def setup(self) -> None:
        """Initialise the process group (if any) and pick ``self.device``."""

    @abstractmethod
    def prepare(self, model: nn.Module,
                make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer], accumulates: bool = False,
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move/wrap the model for this strategy and build its optimizer over the trainable parameters.

        ``accumulates``: the loop accumulates gradients over micro-batches (only Gemini must know before boosting).
        """

    @abstractmethod
    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain module inside whatever ``prepare`` returned."""

    def autocast(self) -> ContextManager:
        """The precision context of forward passes: bf16 autocast under ``--mixed_precision bf16``, else none."""
        if self.args.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, model: nn.Module) -> ContextManager:
        """Context for gradient-accumulation micro-steps that need no gradient synchronisation."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (a 0-dim tensor)."""
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor | None:
        """Clip the global gradient norm to ``max_norm`` (0 = no clipping), then update and clear the gradients,
        unless the norm is not finite: then the gradients are cleared and nothing is updated.

        Returns:
            the global norm before clipping (0-dim float32; NaN/inf when the update was skipped), or None when the
            strategy's own optimizer finds overflow and the norm is not known here.
        """
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor over the shards
        if bool(torch.isfinite(norm)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (in place and returned); identity on one process."""
        return tensor

    def gather_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[n, ...]`` on each data-parallel rank -> ``[sum n, ...]``, every rank's rows in rank order, with
        gradients: a loss of the gathered rows that every rank computes the same (a batch statistic over all ranks,
        such as a correlation) gets, after the strategy averages gradients over the ranks, the gradient of that one
        loss. Identity on one process."""
        return tensor

    def barrier(self) -> None:
        """Wait for every rank."""

    def export_model(self, model: nn.Module) -> nn.Module | None:
        """The plain trained model to export, on the main rank (None elsewhere); every rank must call it."""
        return self.unwrap(model) if self.is_main else None

    def teardown(self, keep_process_group: bool = False) -> None:
        """Release the process group; with ``keep_process_group`` (the caller ends the process right after) a group
        of several ranks is left for the operating system to reclaim."""

    def abandon(self) -> None:
        """After a run failed in this process: release what :meth:`setup` made without waiting for other ranks
        (they may never reach a barrier); the default has nothing to release."""


def all_finite(strategy: Strategy, params: Iterable[torch.Tensor]) -> bool:
    """True when every rank's ``params`` are all finite (see :func:`parameters_finite`; one all-reduce)."""
    flag = torch.tensor([0.0 if parameters_finite(params) else 1.0], dtype=torch.float64)
    return strategy.all_reduce(flag).item() == 0


def parameters_finite(params: Iterable[torch.Tensor]) -> bool:
    """True when every value of ``params`` (tensors; DTensor shards are read locally) is finite, on this rank.

    One float64 sum per tensor (NaN and infinity propagate through it; finite values cannot overflow it) and one
    device sync at the end: about one read of the parameters, no copies.
    """
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        t = p.to_local() if hasattr(p, "to_local") else p
        if t.numel():
            total = total.to(t.device) + t.detach().sum(dtype=torch.float64)
    return bool(torch.isfinite(total))


def dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Model and optimizer state in torch.distributed.checkpoint's strategy-neutral form (``{"model"}`` only when
    ``optimizer`` is None).

    ``get_state_dict`` strips DDP's ``module.`` prefix and keeps FSDP2's DTensor shards, so the same checkpoint
    loads under naive, ddp and fsdp (DCP reshards on load).
    A model with a bitsandbytes 4-/8-bit backbone keeps only its trainable parameters (LoRA adapters, value head):
    the frozen quantised weights are rebuilt from ``--pretrain`` exactly (quantisation is deterministic), and their
    packed data and quantisation constants are not tensors DCP can reshard.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    from coati.models.lora import is_quantized

    if optimizer is None:
        model_sd = get_model_state_dict(model)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    if is_quantized(model):
        trainable = {n.removeprefix("module.") for n, p in model.named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    return {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}


def load_dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Inverse of :func:`dcp_state`: put loaded model (and optimizer) state back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    from coati.models.lora import is_quantized

    options = StateDictOptions(strict=not is_quantized(model))  # quantised: the trainable parameters only
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
        return
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
