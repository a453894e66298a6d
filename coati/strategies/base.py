"""The strategy interface: a strategy owns the device, the process group and the model wrapping.

Strategies do not inherit behaviour from each other; each implements this small ABC. The trainer never sees the
CLI namespace through them: they take plain arguments.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn


class StrategyUnavailable(RuntimeError):
    """The strategy cannot run here (missing package or hardware); the message names the alternatives."""


class Strategy(ABC):
    """Distributed-training glue.

    Lifecycle: ``check()`` (cheap, before any model is loaded) -> ``setup()`` -> ``prepare(model, make_optimizer)``
    -> per step ``backward`` / ``clip_grad_norm`` / ``optimizer_step`` -> ``state_dict_for_export`` -> ``teardown()``.
    """

    name: str = ""
    #: True when the forward pass is a collective (sharded parameters): every rank must run every forward.
    lockstep_forward: bool = False
    #: True when :meth:`clip_grad_norm` returns the real global norm, so the trainer can skip non-finite steps.
    checks_grad_norm: bool = True
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes files."""
        return self.rank == 0

    def check(self) -> None:
        """Raise :class:`StrategyUnavailable` when the strategy cannot run in this environment."""

    @abstractmethod
    def setup(self) -> None:
        """Initialise the process group (if any) and pick ``self.device``."""

    @abstractmethod
    def prepare(self, model: nn.Module,
                make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move/wrap the model for this strategy and build its optimizer over the trainable parameters."""

    @abstractmethod
    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain module inside whatever ``prepare`` returned."""

    def no_sync(self, model: nn.Module) -> ContextManager:
        """Context for gradient-accumulation micro-steps that need no gradient synchronisation."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (a 0-dim tensor)."""
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping (0-dim float32)."""
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the update and clear gradients."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (in place and returned); identity on one process."""
        return tensor

    def barrier(self) -> None:
        """Wait for every rank."""

    def all_finite(self, params: Iterable[torch.Tensor]) -> bool:
        """True when every rank's ``params`` are all finite (see :func:`parameters_finite`; one all-reduce)."""
        flag = torch.tensor([0.0 if parameters_finite(params) else 1.0], dtype=torch.float64)
        return self.all_reduce(flag).item() == 0

    def resume_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Model (+ optimizer, unless None) state to save with torch.distributed.checkpoint (every rank calls it)."""
        return dcp_state(model, optimizer)

    def load_resume_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
        """Restore what :meth:`resume_state` gave, after DCP filled it in place."""
        load_dcp_state(model, optimizer, state)

    def state_dict_for_export(self, model: nn.Module) -> nn.Module | None:
        """The plain model to export, on the main rank (None elsewhere)."""
        return self.unwrap(model) if self.is_main else None

    def teardown(self) -> None:
        """Release the process group."""


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
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def load_dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Inverse of :func:`dcp_state`: put loaded model (and optimizer) state back."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None:
        set_model_state_dict(model, state["model"])
        return
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
