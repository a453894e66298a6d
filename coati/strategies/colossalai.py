"""ColossalAI strategies through a ``Booster``: ``colossalai_ddp`` (``TorchDDPPlugin``; CPU or GPU),
``colossalai_zero2`` (``LowLevelZeroPlugin`` stage 2) and ``colossalai_gemini`` (``GeminiPlugin``), both CUDA only.

They need the ``colossalai`` package (0.5.0, installed with ``scripts/install_colossalai.sh``), imported only inside
methods, so importing this module, ``--help`` and the registry work without it.

* ``prepare`` returns the plain torch optimizer inside ColossalAI's optimizer wrapper (LR schedulers need a
  ``torch.optim.Optimizer``); backward goes through the booster. ``colossalai_ddp`` trains in fp32 or under bf16
  autocast and clips and steps that torch optimizer, all exactly as ``ddp``.
* The ZeRO plugins own mixed precision: they cast the weights to bf16/fp16 and keep fp32 master weights in the
  optimizer, so there is no autocast. The value head of :class:`~coati.models.reward_model.RewardModel` is called on
  an fp32 hidden state: a forward pre-hook casts its input to the training dtype, a forward hook its output to fp32.
  Their optimizers clip inside their own step, at the norm :meth:`step` sets just before it, and find fp16 overflow
  themselves. The export loads the gathered weights, upcast, into a CPU copy taken in ``prepare``.
* Resume checkpoints (torch.distributed.checkpoint of plain torch modules and optimizers) are refused.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import warnings
from abc import abstractmethod
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from coati.strategies.base import Strategy, StrategyUnavailable
from coati.strategies.distributed import ProcessGroupMixin

_INSTALL = "pip install -e .[colossalai] then bash scripts/install_colossalai.sh"
_NO_RESUME = ("cannot write or read resume checkpoints (ColossalAI wraps the model and optimizer its own way): train "
              "without --save_every/--resume, or use --strategy fsdp or ddp")
_NO_QUANTIZED = ("cannot train a 4-/8-bit backbone (its plugins cast and shard every parameter, and bitsandbytes' "
                 "packed weights keep their quantisation state outside the tensor): use --strategy ddp or naive")


@contextlib.contextmanager
def _quiet():
    """Silence the warnings ColossalAI's own code raises (optional kernels not installed, DDP arguments that torch
    deprecates): they are not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"colossalai(\.|$)")
        yield


def _export_skeleton(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` for the export, costing no parameter memory.

    Parameters and persistent buffers become meta tensors of the same shape and dtype (filled by
    :func:`_fill_skeleton`); non-persistent buffers (e.g. rotary ``inv_freq``, absent from state dicts) are copied
    to CPU as they are. Must run before ColossalAI casts or moves the model.
    """
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in memo:
                keep = key in module._non_persistent_buffers_set
                memo[id(buf)] = buf.detach().to("cpu", copy=True) if keep else torch.empty_like(buf, device="meta")
    return copy.deepcopy(model, memo)


def _fill_skeleton(skeleton: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a full state dict into the skeleton (on CPU, each floating tensor cast back to the skeleton's dtype).

    Raises:
        RuntimeError: keys do not match.
    """
    target = skeleton.state_dict()
    skeleton.load_state_dict({k: v.detach().to("cpu", target[k].dtype if k in target and v.is_floating_point()
                                                else v.dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    return skeleton


def _cast_value_head(model: nn.Module, dtype: torch.dtype) -> list:
    """Make ``model.hf_model.score`` take fp32 inputs although ColossalAI casts its weights to ``dtype``.

    Returns:
        the hook handles (empty when the model has no such head).
    """
    head = getattr(getattr(model, "hf_model", None), "score", None)
    if not isinstance(head, nn.Module):
        return []

    def cast_input(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def fp32_output(module, args, output):
        return output.float() if torch.is_tensor(output) and output.is_floating_point() else output

    return [head.register_forward_pre_hook(cast_input), head.register_forward_hook(fp32_output)]


def _as_hybrid_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Rebuild the run's torch Adam/AdamW as ColossalAI's ``HybridAdam`` (same parameter groups and settings).

    Gemini accepts only ColossalAI's Adam implementations; with CPU offload HybridAdam updates CPU master weights
    with a vectorised kernel. Both of its kernels are ColossalAI CUDA extensions, compiled on first use: that
    needs ninja, a C++ compiler and the CUDA toolkit (nvcc, ``CUDA_HOME``) matching torch's CUDA.
    """
    from colossalai.nn.optimizer import HybridAdam

    groups = [{k: g[k] for k in ("params", "lr", "betas", "eps", "weight_decay")} for g in optimizer.param_groups]
    return HybridAdam(groups, adamw_mode=bool(optimizer.defaults.get("decoupled_weight_decay")))


class _BoosterStrategy(ProcessGroupMixin, Strategy):
    """A ColossalAI ``Booster`` over the plugin of :meth:`_plugin` (a base, not a strategy): process group, boosting,
    backward through the optimizer wrapper, teardown."""

    takes = ("mixed_precision", "dist_timeout")
    refuses = {"resume": _NO_RESUME, "quantized": _NO_QUANTIZED}
    #: rebuild the optimizer as ColossalAI's HybridAdam before boosting
    hybrid_adam = False
    _booster = None
    _optimizer = None  # ColossalAI's optimizer wrapper

    @classmethod
    def unavailable(cls) -> str | None:
        """Why it cannot run here: the colossalai package is not installed (found without importing it)."""
        if importlib.util.find_spec("colossalai") is None:
            return (f"--strategy {cls.name} needs the colossalai package, which is not installed: install it with "
                    f"`{_INSTALL}`, or use --strategy ddp or --strategy fsdp")
        return None

    @abstractmethod
    def _plugin(self, accumulates: bool):
        """The ColossalAI plugin to boost with (``accumulates``: the loop accumulates gradients)."""

    def setup(self) -> None:
        """Join the process group and import colossalai.

        Raises:
            StrategyUnavailable: colossalai fails to import (a broken install).
        """
        super().setup()
        try:
            with _quiet():
                import colossalai.booster  # noqa: F401
        except Exception as e:  # a broken install fails in many ways (ImportError, AttributeError, ...)
            raise StrategyUnavailable(f"--strategy {self.name}: importing colossalai failed ({type(e).__name__}: "
                                      f"{e}); reinstall it with `{_INSTALL}`") from e

    def prepare(self, model: nn.Module, make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                accumulates: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Boost the model and the optimizer built over its trainable parameters.

        Returns:
            ``(ColossalAI's model wrapper, the torch optimizer inside its optimizer wrapper)``.
        """
        from colossalai.booster import Booster

        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        self._booster = Booster(plugin=self._plugin(accumulates))
        with _quiet():
            boosted, self._optimizer, *_ = self._booster.boost(model, _as_hybrid_adam(optimizer) if self.hybrid_adam
                                                               else optimizer)
        return boosted, self._optimizer.unwrap()

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module inside ColossalAI's model wrapper."""
        return model.unwrap() if hasattr(model, "unwrap") else model

    def backward(self, loss: torch.Tensor) -> None:
        """``booster.backward``: loss scaling (fp16), backward, gradient reduction."""
        self._booster.backward(loss, self._optimizer)

    def teardown(self, keep_process_group: bool = False) -> None:
        """Drop the booster, then :meth:`ProcessGroupMixin.teardown`."""
        self._booster = self._optimizer = None
        super().teardown(keep_process_group)


class ColossalAIDDPStrategy(_BoosterStrategy):
    """ColossalAI's ``TorchDDPPlugin``: torch DDP behind a Booster, on CPU (gloo) or GPU (nccl); same losses and
    weights as ``ddp`` (the base autocast and :meth:`~coati.strategies.base.Strategy.step`); LoRA works."""

    name = "colossalai_ddp"

    def _plugin(self, accumulates: bool):
        from colossalai.booster.plugin import TorchDDPPlugin

        return TorchDDPPlugin()

    def no_sync(self, model: nn.Module) -> ContextManager:
        """Skip the gradient all-reduce on accumulation micro-steps."""
        return self._booster.no_sync(model, self._optimizer)


class _ZeroStrategy(_BoosterStrategy):
    """The ZeRO plugins (a base, not a strategy): they cast the weights and clip inside their optimizer's step."""

    precisions = ("fp32", "bf16", "fp16")
    #: the attribute of ColossalAI's optimizer wrapper holding the clipping norm
    _norm_attr = ""
    _skeleton: nn.Module | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        """Why it cannot run here: no CUDA GPU (checked first: installing colossalai would not help), or no package."""
        if not torch.cuda.is_available():
            return (f"--strategy {cls.name} needs CUDA GPUs; none is visible: use --strategy ddp, --strategy fsdp or "
                    f"--strategy colossalai_ddp instead (they run on CPU and GPU)")
        return super().unavailable()

    def prepare(self, model: nn.Module, make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                accumulates: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Keep a memory-free copy for the export (rank 0), hook the value head, then boost."""
        self._skeleton = _export_skeleton(model) if self.is_main else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.mixed_precision)
        if dtype is not None:
            _cast_value_head(model, dtype)
        return super().prepare(model, make_optimizer, accumulates)

    def autocast(self) -> ContextManager:
        """None: the plugin has cast the weights to the training dtype."""
        return contextlib.nullcontext()

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        """Step ColossalAI's optimizer wrapper, clipping at ``max_norm`` (0 = none): unscale, clip, update the master
        weights (skipped on fp16 overflow), refresh the training-dtype weights, clear the gradients.

        Returns:
            None: the wrapper finds overflow itself and measures the norm over its shards, in loss-scaled units.
        """
        setattr(self._optimizer, self._norm_attr, max_norm if max_norm > 0 else math.inf)
        self._optimizer.step()
        self._optimizer.zero_grad()

    @abstractmethod
    def _full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full state dict (keys of the unwrapped module) on rank 0; every rank calls it."""

    def export_model(self, model: nn.Module) -> nn.Module | None:
        """Rank 0: the CPU copy holding the trained weights in their original dtype; None elsewhere."""
        state = self._full_state(model)
        return _fill_skeleton(self._skeleton, state) if self.is_main else None


class ColossalAIZero2Strategy(_ZeroStrategy):
    """ColossalAI ZeRO stage 2 (``LowLevelZeroPlugin(stage=2)``), one process per GPU.

    Every rank keeps the full model in the training dtype; fp32 master weights, optimizer state and gradients are
    partitioned over ranks. Gradients are reduce-scattered at every backward and accumulate in the partitions (ZeRO-2
    has no ``no_sync``). LoRA works (frozen weights stay replicated). ``--cpu_offload`` keeps master weights and
    optimizer state in CPU memory (the optimizer is rebuilt as HybridAdam).
    """

    name = "colossalai_zero2"
    takes = ("mixed_precision", "dist_timeout", "cpu_offload")
    _norm_attr = "_clip_grad_norm"  # LowLevelZeroOptimizer

    @property
    def hybrid_adam(self) -> bool:
        """With CPU offload."""
        return self.args.cpu_offload

    def _plugin(self, accumulates: bool):
        from colossalai.booster.plugin import LowLevelZeroPlugin

        return LowLevelZeroPlugin(stage=2, precision=self.args.mixed_precision, cpu_offload=self.args.cpu_offload)

    def _full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.unwrap(model).state_dict()  # every rank holds every (training-dtype) weight


class ColossalAIGeminiStrategy(_ZeroStrategy):
    """ColossalAI Gemini (``GeminiPlugin``): chunk-based ZeRO-3 with CPU/GPU placement of chunks (``--placement_policy``
    static: chunks stay where placed; auto: they move from memory statistics of the first step).

    Parameters, gradients and optimizer state live in chunks sharded over ranks; every forward gathers them, so every
    rank runs every forward. The optimizer is rebuilt as HybridAdam (Gemini takes only ColossalAI's Adam). The plugin
    is built with clipping on (at an infinite norm) so that its chunks measure gradient norms; :meth:`step` sets the
    real norm.
    """

    name = "colossalai_gemini"
    takes = ("mixed_precision", "dist_timeout", "placement_policy")
    precisions = ("bf16", "fp16")
    refuses = {"lora": "does not support LoRA (ColossalAI 0.5.0's GeminiPlugin has no LoRA support and leaves frozen "
                       "weights unsharded): use --strategy colossalai_zero2, fsdp or ddp with --lora_rank, or drop "
                       "--lora_rank for full fine-tuning with Gemini",
               "resume": _NO_RESUME, "quantized": _NO_QUANTIZED}
    hybrid_adam = True
    _norm_attr = "max_norm"  # GeminiOptimizer
    _accumulates = False

    def _plugin(self, accumulates: bool):
        from colossalai.booster.plugin import GeminiPlugin

        self._accumulates = accumulates  # pin_memory: what the default enable_async_reduce sets, with a warning
        return GeminiPlugin(placement_policy=self.args.placement_policy, precision=self.args.mixed_precision,
                            max_norm=math.inf, enable_gradient_accumulation=accumulates, pin_memory=True)

    def no_sync(self, model: nn.Module) -> ContextManager:
        """Nothing: Gemini reduces at every backward and accumulates when prepared with ``accumulates=True``.

        Raises:
            RuntimeError: prepared with ``accumulates=False`` (Gemini would overwrite the accumulated gradients).
        """
        if not self._accumulates:
            raise RuntimeError(f"--strategy {self.name} was prepared with accumulates=False but the loop accumulates")
        return contextlib.nullcontext()

    def _full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict(only_rank_0=True)  # a collective gathering the chunks
