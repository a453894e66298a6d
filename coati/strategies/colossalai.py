"""ColossalAI strategies: ZeRO-2 (``LowLevelZeroPlugin``) and Gemini (``GeminiPlugin``) through a ``Booster``.

Both need CUDA GPUs and the ``colossalai`` package (0.5.0, installed with ``scripts/install_colossalai.sh``).
``colossalai`` is imported only inside methods, so importing this module, ``--help`` and the registry work without
it; :meth:`check` says what is missing before any model is loaded.

How they fit the trainer's loop (``coati/trainer.py``):

* ColossalAI owns mixed precision: the model's weights are cast to bf16/fp16 and fp32 master weights live in the
  optimizer. The value head of :class:`~coati.models.reward_model.RewardModel` is called on an fp32 hidden state, so
  a forward pre-hook casts its input to the training dtype and a forward hook returns its output in fp32.
* ``prepare`` returns the plain torch optimizer inside ColossalAI's optimizer wrapper, so LR schedulers (which need a
  ``torch.optim.Optimizer``) drive its learning rate; stepping always goes through :meth:`optimizer_step`, which steps
  the wrapper (gradient reduction, unscaling, clipping, master-weight update).
* Gradient clipping happens inside ColossalAI's optimizer step, at the norm given when the strategy is built
  (``max_grad_norm``); :meth:`clip_grad_norm` only checks that the trainer asks for the same norm.
* ``state_dict_for_export`` gathers the full (bf16/fp16) weights on rank 0 and loads them, upcast to the original
  dtype, into a CPU copy of the model taken in ``prepare`` (parameters on the meta device until then, so the copy
  costs no memory during training).
* Resume checkpoints (torch.distributed.checkpoint of model + optimizer) are not supported: ColossalAI shards the
  optimizer state its own way.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from coati.strategies.base import Strategy, StrategyUnavailable
from coati.strategies.distributed import ProcessGroupMixin

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
PLACEMENT_POLICIES = ("static", "auto")
_ALTERNATIVES = "use --strategy ddp or --strategy fsdp instead (they run on CPU and GPU)"
_INSTALL = "pip install -e .[colossalai] then bash scripts/install_colossalai.sh"


# ------------------------------------------------------------------------------------------ shared helpers


def _check_environment(name: str) -> None:
    """Raise :class:`StrategyUnavailable` unless CUDA GPUs are visible and the colossalai package is installed."""
    if not torch.cuda.is_available():
        raise StrategyUnavailable(
            f"--strategy {name} needs CUDA GPUs; none is visible (torch {torch.__version__}: "
            f"torch.cuda.is_available() is False). ColossalAI's plugins run on CUDA only: {_ALTERNATIVES}.")
    if importlib.util.find_spec("colossalai") is None:
        raise StrategyUnavailable(
            f"--strategy {name} needs the colossalai package, which is not installed. Install it with "
            f"`{_INSTALL}` (ColossalAI 0.5.0, installed next to the current torch and transformers), or "
            f"{_ALTERNATIVES}.")


def _import_booster(name: str):
    """``(Booster, plugin module)`` from colossalai; a failing import becomes :class:`StrategyUnavailable`."""
    try:
        from colossalai.booster import Booster
        from colossalai.booster import plugin
    except Exception as e:  # a broken install fails in many ways (ImportError, AttributeError, ...)
        raise StrategyUnavailable(
            f"--strategy {name}: importing colossalai failed ({type(e).__name__}: {e}). Reinstall it with "
            f"`{_INSTALL}`, or {_ALTERNATIVES}.") from e
    return Booster, plugin


def _check_precision(mixed_precision: str) -> None:
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {mixed_precision!r}")


def _require_cuda_device(name: str, device: torch.device) -> None:
    if device.type != "cuda":
        raise StrategyUnavailable(f"--strategy {name} needs CUDA GPUs; none is visible: {_ALTERNATIVES}.")


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
            if buf is None or id(buf) in memo:
                continue
            if key in module._non_persistent_buffers_set:
                memo[id(buf)] = buf.detach().to("cpu", copy=True)
            else:
                memo[id(buf)] = torch.empty_like(buf, device="meta")
    return copy.deepcopy(model, memo)


def _fill_skeleton(skeleton: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a full state dict into the skeleton (on CPU, each floating tensor cast back to the skeleton's dtype).

    Raises:
        RuntimeError: keys do not match, or a tensor is still on the meta device afterwards.
    """
    target = skeleton.state_dict()
    converted = {}
    for key, value in state_dict.items():
        value = value.detach()
        dtype = target[key].dtype if key in target and value.is_floating_point() else value.dtype
        converted[key] = value.to(device="cpu", dtype=dtype)
    skeleton.load_state_dict(converted, strict=True, assign=True)
    leftover = [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"export: no weights gathered for {', '.join(leftover[:5])}"
                           + (f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""))
    return skeleton


def _cast_value_head(model: nn.Module, dtype: torch.dtype) -> list:
    """Make ``model.hf_model.score`` take fp32 inputs although ColossalAI casts its weights to ``dtype``.

    Returns:
        the hook handles (empty when the model has no such head).
    """
    hf_model = getattr(model, "hf_model", None)
    head = getattr(hf_model, "score", None)
    if not isinstance(head, nn.Module):
        return []

    def cast_input(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def fp32_output(module, args, output):
        return output.float() if torch.is_tensor(output) and output.is_floating_point() else output

    return [head.register_forward_pre_hook(cast_input), head.register_forward_hook(fp32_output)]


def _as_hybrid_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Rebuild a torch Adam/AdamW as ColossalAI's ``HybridAdam`` with the same parameter groups and settings.

    Gemini accepts only ColossalAI's Adam implementations; with CPU offload HybridAdam updates CPU master weights
    with a vectorised kernel. Both of its kernels are ColossalAI CUDA extensions, compiled on first use: that
    needs ninja, a C++ compiler and the CUDA toolkit (nvcc, ``CUDA_HOME``) matching torch's CUDA.

    Raises:
        ValueError: the optimizer is not Adam/AdamW, or uses amsgrad.
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"ColossalAI strategies rebuild the optimizer as HybridAdam; that needs torch Adam or "
                         f"AdamW, got {type(optimizer).__name__}")
    if any(g.get("amsgrad") for g in optimizer.param_groups):
        raise ValueError("ColossalAI's HybridAdam has no amsgrad")
    from colossalai.nn.optimizer import HybridAdam

    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(optimizer.defaults.get("decoupled_weight_decay"))
    groups = [{"params": list(g["params"]), "lr": float(g["lr"]), "betas": tuple(float(b) for b in g["betas"]),
               "eps": float(g["eps"]), "weight_decay": float(g["weight_decay"])} for g in optimizer.param_groups]
    return HybridAdam(groups, adamw_mode=decoupled)


def _check_clip(name: str, configured: float, requested: float) -> None:
    if not math.isclose(configured, requested, rel_tol=1e-9, abs_tol=0.0):
        raise ValueError(f"--strategy {name} clips gradients inside ColossalAI's optimizer step at the norm fixed "
                         f"when the strategy is built (max_grad_norm={configured}); the trainer asks for "
                         f"{requested}. Build the strategy with max_grad_norm={requested}.")


def _booster_optimizer(wrapper, optimizer: torch.optim.Optimizer):
    """ColossalAI's optimizer wrapper, given it or the torch optimizer inside it (what ``prepare`` returned).

    Raises:
        ValueError: ``prepare`` has not run, or ``optimizer`` is another optimizer.
    """
    if wrapper is None or not (optimizer is wrapper or optimizer is wrapper.unwrap()):
        raise ValueError("optimizer_step needs the optimizer returned by prepare()")
    return wrapper


def _no_resume(name: str):
    """Raises: ValueError naming the alternatives."""
    raise ValueError(f"--strategy {name} cannot write or read resume checkpoints (ColossalAI shards the optimizer "
                     f"state its own way): train without --save_every/--resume, or use --strategy fsdp or ddp.")


class _BoosterMixin:
    """Step plumbing shared by the ColossalAI strategies (a mixin, not a strategy): a Booster owns backward, clipping
    and the update, and ColossalAI shards the optimizer its own way, so resume checkpoints are refused."""

    _booster = None
    _optimizer = None
    _clip_requested = False
    max_grad_norm: float = 0.0

    def check(self) -> None:
        """Cheap checks before any model is loaded (colossalai is not imported here).

        Raises:
            ValueError: resume checkpoints were asked for.
            StrategyUnavailable: no CUDA GPU is visible (checked first), or colossalai is not installed.
        """
        if self.resume_checkpoints:
            _no_resume(self.name)
        _check_environment(self.name)

    def setup(self) -> None:
        """Join the process group (nccl, ``cuda:LOCAL_RANK``) and import colossalai.

        Raises:
            StrategyUnavailable: no CUDA device, or colossalai fails to import.
        """
        super().setup()
        _require_cuda_device(self.name, self.device)
        _import_booster(self.name)

    def backward(self, loss: torch.Tensor) -> None:
        """``booster.backward``: loss scaling (fp16), backward, gradient reduce-scatter into the shards."""
        self._booster.backward(loss, self._optimizer)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clipping happens in :meth:`optimizer_step` (ColossalAI computes the norm over its shards there).

        Returns:
            NaN (the norm is known only after the step; see :attr:`last_grad_norm`).
        Raises:
            ValueError: ``max_norm`` differs from the ``max_grad_norm`` the strategy was built with.
        """
        _check_clip(self.name, self.max_grad_norm, max_norm)
        self._clip_requested = True
        return torch.tensor(float("nan"))

    @property
    def last_grad_norm(self) -> float | None:
        """Global gradient norm (before clipping) measured by the last optimizer step (None before any)."""
        return None if self._optimizer is None else self._optimizer.get_grad_norm()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale, clip, update the master weights, refresh the training-dtype weights, clear gradients.

        Raises:
            ValueError: not the optimizer from ``prepare``; or the strategy clips but the trainer did not ask to.
        """
        wrapper = _booster_optimizer(self._optimizer, optimizer)
        if self.max_grad_norm > 0 and not self._clip_requested:
            _check_clip(self.name, self.max_grad_norm, 0.0)
        self._clip_requested = False
        wrapper.step()
        wrapper.zero_grad()

    def resume_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Raises: ValueError (not supported)."""
        _no_resume(self.name)

    def load_resume_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Raises: ValueError (not supported)."""
        _no_resume(self.name)

    def teardown(self) -> None:
        """Drop the booster and destroy the process group."""
        self._booster = self._optimizer = None
        super().teardown()


# ------------------------------------------------------------------------------------------ ZeRO-2


class ColossalAIZero2Strategy(_BoosterMixin, ProcessGroupMixin, Strategy):
    """ColossalAI ZeRO stage 2: ``Booster`` + ``LowLevelZeroPlugin(stage=2)``, one process per GPU (torchrun).

    Every rank keeps the full model in bf16/fp16; fp32 master weights, optimizer state and gradients are partitioned
    over ranks. Gradients are reduce-scattered at every backward and accumulate in the partitions, so gradient
    accumulation works without ``no_sync`` (ZeRO-2 has none). LoRA models work (only trainable parameters are
    partitioned; frozen weights stay replicated in the training dtype).

    Args:
        mixed_precision: ``bf16`` or ``fp16`` (fp16 uses ColossalAI's dynamic loss scaling).
        zero_cpu_offload: keep master weights and optimizer state in CPU memory (the optimizer is rebuilt as
            ColossalAI's HybridAdam).
        dist_timeout: seconds a collective may wait.
        lora: the model carries LoRA adapters (accepted; nothing changes).
        max_grad_norm: gradient clipping norm applied inside the optimizer step (0 = none); must equal the trainer's.
        resume_checkpoints: the run writes or reads resume checkpoints (refused by :meth:`check`).
    Raises:
        ValueError: unknown ``mixed_precision``.
    """

    name = "colossalai_zero2"
    lockstep_forward = False
    checks_grad_norm = False  # ColossalAI finds overflow itself (fp16 loss scaling) inside its step

    def __init__(self, mixed_precision: str = "bf16", zero_cpu_offload: bool = False, dist_timeout: float = 1800.0,
                 lora: bool = False, max_grad_norm: float = 1.0, resume_checkpoints: bool = False):
        _check_precision(mixed_precision)
        self.mixed_precision, self.zero_cpu_offload = mixed_precision, zero_cpu_offload
        self.dist_timeout, self.lora, self.max_grad_norm = dist_timeout, lora, float(max_grad_norm)
        self.resume_checkpoints = resume_checkpoints
        self._booster = None
        self._optimizer = None  # ColossalAI's LowLevelZeroOptimizer
        self._skeleton: nn.Module | None = None
        self._clip_requested = False

    def prepare(self, model: nn.Module,
                make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Boost the model and the optimizer built over its trainable parameters.

        Returns:
            ``(LowLevelZeroModel, inner torch optimizer)``: give the optimizer to the LR scheduler and to
            :meth:`optimizer_step`.
        """
        Booster, plugins = _import_booster(self.name)
        self._skeleton = _export_skeleton(model) if self.is_main else None
        _cast_value_head(model, PRECISIONS[self.mixed_precision])
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        if self.zero_cpu_offload:
            optimizer = _as_hybrid_adam(optimizer)
        plugin = plugins.LowLevelZeroPlugin(stage=2, precision=self.mixed_precision, cpu_offload=self.zero_cpu_offload,
                                            max_norm=self.max_grad_norm)
        self._booster = Booster(plugin=plugin)
        boosted, self._optimizer, *_ = self._booster.boost(model, optimizer)
        return boosted, self._optimizer.unwrap()

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The RewardModel inside the LowLevelZeroModel (weights in the training dtype, on the GPU)."""
        return model.unwrap() if hasattr(model, "unwrap") else model

    def state_dict_for_export(self, model: nn.Module) -> nn.Module | None:
        """Rank 0: a CPU RewardModel holding the trained weights (every rank holds them all under ZeRO-2)."""
        if not self.is_main:
            return None
        return _fill_skeleton(self._skeleton, self.unwrap(model).state_dict())

# ------------------------------------------------------------------------------------------ Gemini


class ColossalAIGeminiStrategy(_BoosterMixin, ProcessGroupMixin, Strategy):
    """ColossalAI Gemini: ``Booster`` + ``GeminiPlugin``, chunk-based ZeRO-3 with CPU/GPU placement of chunks.

    Parameters, gradients and optimizer state live in chunks sharded over ranks; every forward gathers them, so every
    rank runs every forward (``lockstep_forward``). The optimizer is rebuilt as ColossalAI's ``HybridAdam`` with the
    settings of the one the trainer builds (Gemini accepts only ColossalAI's Adam implementations).

    LoRA is refused: in ColossalAI 0.5.0 ``GeminiPlugin.support_lora()`` is False and ``enable_lora`` raises
    NotImplementedError, and GeminiDDP treats every frozen parameter as "ignored" (neither chunked nor sharded), so
    the frozen base model, the bulk of a LoRA model, would get none of Gemini's memory savings. Use
    ``colossalai_zero2`` (or ddp/fsdp) for LoRA.

    Args:
        mixed_precision: ``bf16`` or ``fp16``.
        placement_policy: ``static`` (chunks stay where placed; all on GPU by default) or ``auto`` (chunks move
            between CPU and GPU from memory statistics gathered during the first step).
        dist_timeout: seconds a collective may wait.
        lora: the model carries LoRA adapters (refused by :meth:`check`).
        max_grad_norm: gradient clipping norm applied inside the optimizer step (0 = none); must equal the trainer's.
        accumulation_steps: micro-batches per optimizer step; > 1 turns on Gemini's gradient accumulation (separate
            gradient chunks, more memory), which must be known before boosting.
        resume_checkpoints: the run writes or reads resume checkpoints (refused by :meth:`check`).
    Raises:
        ValueError: unknown ``mixed_precision``/``placement_policy``, or ``accumulation_steps`` < 1.
    """

    name = "colossalai_gemini"
    lockstep_forward = True
    checks_grad_norm = False  # ColossalAI finds overflow itself (fp16 loss scaling) inside its step

    def __init__(self, mixed_precision: str = "bf16", placement_policy: str = "static", dist_timeout: float = 1800.0,
                 lora: bool = False, max_grad_norm: float = 1.0, accumulation_steps: int = 1,
                 resume_checkpoints: bool = False):
        _check_precision(mixed_precision)
        if placement_policy not in PLACEMENT_POLICIES:
            raise ValueError(f"placement_policy must be one of {', '.join(PLACEMENT_POLICIES)}, "
                             f"got {placement_policy!r}")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.mixed_precision, self.placement_policy = mixed_precision, placement_policy
        self.dist_timeout, self.lora, self.max_grad_norm = dist_timeout, lora, float(max_grad_norm)
        self.accumulation_steps, self.resume_checkpoints = accumulation_steps, resume_checkpoints
        self._booster = None
        self._optimizer = None  # ColossalAI's GeminiOptimizer
        self._skeleton: nn.Module | None = None
        self._clip_requested = False

    def check(self) -> None:
        """Cheap checks before any model is loaded (colossalai is not imported here).

        Raises:
            ValueError: LoRA or resume checkpoints were asked for (configuration errors, reported first).
            StrategyUnavailable: no CUDA GPU is visible (checked first), or colossalai is not installed.
        """
        if self.lora:
            raise ValueError(f"--strategy {self.name} does not support LoRA (ColossalAI 0.5.0's GeminiPlugin has no "
                             f"LoRA support and leaves frozen weights unsharded): use --strategy colossalai_zero2, "
                             f"fsdp or ddp with --lora_rank, or drop --lora_rank for full fine-tuning with Gemini.")
        super().check()

    def prepare(self, model: nn.Module,
                make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Boost the model and a HybridAdam over its parameters.

        Returns:
            ``(GeminiDDP, inner HybridAdam)``: give the optimizer to the LR scheduler and to :meth:`optimizer_step`.
        Raises:
            ValueError: some parameter is frozen (LoRA or partial freezing; see the class docstring).
        """
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(f"--strategy {self.name} trains every parameter, but {len(frozen)} are frozen (e.g. "
                             f"{frozen[0]}): LoRA/frozen weights need --strategy colossalai_zero2, fsdp or ddp.")
        Booster, plugins = _import_booster(self.name)
        self._skeleton = _export_skeleton(model) if self.is_main else None
        _cast_value_head(model, PRECISIONS[self.mixed_precision])
        optimizer = _as_hybrid_adam(make_optimizer(list(model.parameters())))
        plugin = plugins.GeminiPlugin(placement_policy=self.placement_policy, precision=self.mixed_precision,
                                      max_norm=self.max_grad_norm,
                                      enable_gradient_accumulation=self.accumulation_steps > 1)
        self._booster = Booster(plugin=plugin)
        boosted, self._optimizer, *_ = self._booster.boost(model, optimizer)
        return boosted, self._optimizer.unwrap()

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The RewardModel inside GeminiDDP (its parameters are views into chunks: use state_dict_for_export)."""
        return model.unwrap() if hasattr(model, "unwrap") else model

    def no_sync(self, model: nn.Module) -> ContextManager:
        """Gemini reduces at every backward; accumulation works when the strategy was built for it.

        Raises:
            ValueError: built with ``accumulation_steps=1`` but the trainer accumulates.
        """
        if self.accumulation_steps == 1:
            raise ValueError(f"--strategy {self.name} was built with accumulation_steps=1 but the trainer accumulates "
                             f"gradients; build it with the trainer's accumulation_steps.")
        return contextlib.nullcontext()

    def state_dict_for_export(self, model: nn.Module) -> nn.Module | None:
        """Gather the chunks (every rank must call this) and return a CPU RewardModel on rank 0, None elsewhere."""
        state = model.state_dict(only_rank_0=True)  # collective; rank 0 gets the full tensors
        if not self.is_main:
            return None
        return _fill_skeleton(self._skeleton, state)
