"""Before a run: what its ``auto`` options stand for on this machine, and whether its components can run it.

The option groups check themselves (:mod:`coati.config`); this module holds the checks that need a component: the
registries (backbones, losses, penalties, strategies) that give ``--model``/``--loss_fn``/``--strategy`` their
choices, 4-/8-bit loading, sequence parallelism, a strategy's refusals, a backbone's sizes. It also resolves
``--lr auto`` and ``--mixed_precision auto`` (:func:`resolve_auto`). Used by the command line
(:mod:`coati.cli.train`) at parse time and by :mod:`coati.run` once the model files are known.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from coati.config import LR_FULL, LR_LORA, ModelArgs, TrainConfig, rule_problems, value_problems
from coati.losses import LOSSES, PENALTIES
from coati.models.backbones import AUTO, BACKBONES, get_backbone
from coati.models.loading import BITSANDBYTES_INSTALL, attention_heads
from coati.registry import Registered
from coati.reporting import report_to_problem
from coati.strategies import STRATEGIES
from coati.strategies.sequence_parallel import head_problem

logger = logging.getLogger("coati")


def registries() -> dict[str, dict]:
    """Option name -> the registry whose keys are its choices."""
    # --model auto takes every option a backbone may take: which ones apply is known once the checkpoint is read
    auto = Registered(build=None, takes=tuple(sorted({o for b in BACKBONES.values() for o in b.takes})))
    return {"model": {**BACKBONES, AUTO: auto}, "loss_fn": LOSSES, "penalty": PENALTIES, "strategy": STRATEGIES}


def _cpu_flags() -> frozenset[str] | None:
    """The processor's feature flags from ``/proc/cpuinfo`` (Linux), or None where that file cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        return None
    return frozenset()


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` (``"cuda"`` or ``"cpu"``, as ``torch.device.type``) computes bf16 matrix products in
    hardware rather than by emulation.

    * ``cuda``: ``torch.cuda.is_available()`` and ``torch.cuda.is_bf16_supported`` without emulation (compute
      capability 8.0 or later, or ROCm);
    * ``cpu``: the processor flags name ``avx512_bf16`` (AVX512-BF16) or ``amx_bf16`` (AMX); where ``/proc/cpuinfo``
      cannot be read, torch's own AVX512-BF16 check;
    * any other device type: False.

    Never raises: a check that fails (a CPU-only torch asked about CUDA) answers False.
    """
    import torch

    try:
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return False
            try:
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # torch before 2.3 has no including_emulation (and did not count emulation)
                return bool(torch.cuda.is_bf16_supported())
        if device_type == "cpu":
            flags = _cpu_flags()
            if flags is None:
                check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
                return bool(check and check())
            return bool({"avx512_bf16", "amx_bf16"} & flags)
    except (RuntimeError, AssertionError, AttributeError):
        return False
    return False


def auto_precision(strategy: str) -> str:
    """What ``--mixed_precision auto`` stands for under ``--strategy strategy`` on this machine: bf16 when the
    strategy's device (the first CUDA GPU when one is visible, else the CPU) computes bf16 natively
    (:func:`native_bf16`), else fp32; a strategy that does not train in that precision gets the first of
    bf16 / fp32 / fp16 (natively bf16) or fp32 / fp16 / bf16 (not) that it does (colossalai_gemini, which has no
    fp32: fp16 without native bf16). An unknown strategy name is treated as one that trains in fp32 or bf16
    (:func:`validate` reports the name)."""
    import torch

    accepted = getattr(STRATEGIES.get(strategy), "precisions", ("fp32", "bf16"))
    order = ("bf16", "fp32", "fp16") if native_bf16("cuda" if torch.cuda.is_available() else "cpu") \
        else ("fp32", "fp16", "bf16")
    return next((p for p in order if p in accepted), "fp32")


def auto_lr(uses_lora: bool) -> float:
    """The peak learning rate of ``--lr auto``: :data:`LR_LORA` with LoRA adapters, else :data:`LR_FULL`."""
    return LR_LORA if uses_lora else LR_FULL


def resolve_auto(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``--lr auto`` (None or ``"auto"``) and ``--mixed_precision auto`` replaced by the values they stand
    for here (:func:`auto_lr`, :func:`auto_precision`), so that the config, and the ``train_config.json`` written
    with every export, records what the run used; ``cfg`` itself is returned when nothing is ``auto``.

    ``--warmup_steps auto`` stays None (``"auto"`` becomes None): it depends on the planned steps, known once the data
    is loaded (:func:`coati.trainer.plan_warmup`). Other values are kept as they are, invalid ones too
    (:func:`validate` reports those); never raises for a bad value.
    """
    values: dict[str, Any] = {}
    if cfg.optim.lr is None or cfg.optim.lr == "auto":
        values["lr"] = auto_lr(cfg.lora.uses_lora)
    if cfg.strategy.mixed_precision == "auto":
        values["mixed_precision"] = auto_precision(cfg.strategy.strategy)
    if cfg.optim.warmup_steps == "auto":
        values["warmup_steps"] = None
    return cfg.replace(**values) if values else cfg


def quantization_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with the 4-/8-bit options of ``cfg`` (one line each): both widths, a quantised backbone without
    LoRA (nothing would train but the value head), 4-bit options without ``--load_in_4bit``, bitsandbytes missing."""
    m, errors = cfg.backbone, []
    flag = "--load_in_4bit" if m.load_in_4bit else "--load_in_8bit"
    if m.load_in_4bit and m.load_in_8bit:
        errors.append("--load_in_4bit and --load_in_8bit: choose one")
    if m.quantized and not cfg.lora.uses_lora:
        errors.append(f"{flag} freezes the quantised backbone, so it needs LoRA adapters to train: add --lora_rank "
                      "(e.g. 16; QLoRA trains the adapters and the value head)")
    defaults = ModelArgs()
    for name in ("bnb_4bit_quant_type", "bnb_4bit_double_quant"):
        if getattr(m, name) != getattr(defaults, name) and not m.load_in_4bit:
            errors.append(f"--{name} is used only with --load_in_4bit: drop it or add --load_in_4bit")
    if m.quantized and importlib.util.find_spec("bitsandbytes") is None:
        errors.append(f"{flag} needs the bitsandbytes package: {BITSANDBYTES_INSTALL}")
    return errors


def sequence_parallel_problems(cfg: TrainConfig, folder: str | None = None) -> list[str]:
    """What stops ``--sequence_parallel_size`` S > 1 (one line each): a backbone without per-group attention (BLOOM),
    S not dividing the number of processes (``WORLD_SIZE``, 1 outside torchrun), S not dividing the query heads.

    The one owner of these rules: called at parse time (:func:`validate`: heads read from the preset or the
    checkpoint's ``config.json`` when ``--pretrain`` is a folder) and again by :func:`coati.run.run` once the model
    files are prepared (``folder``: the converted GGUF checkpoint; ``--model auto`` resolved), before any model loads.
    """
    size = cfg.strategy.sequence_parallel_size
    if size <= 1:
        return []
    errors = []
    if cfg.backbone.model != "auto" and not get_backbone(cfg.backbone.model).group_attention:
        errors.append(f"--sequence_parallel_size needs per-group attention (llama, internlm2): --model "
                      f"{cfg.backbone.model}'s ALiBi attention runs transformers' own attention over one dense mask "
                      f"of the whole row, which cannot be split by heads")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % size:
        errors.append(f"--sequence_parallel_size {size} must divide the number of processes ({world}; start "
                      f"S x data-parallel processes with torchrun --nproc_per_node)")
    heads = None if errors else attention_heads(cfg.backbone, folder)
    problem = heads and head_problem(size, *heads)
    return errors + ([problem] if problem else [])


def validate(cfg: TrainConfig) -> list[str]:
    """Every rule a config breaks, as ``--flag: must be ..., got ...`` lines (empty when valid).

    Each option's own type, range and choices (:func:`coati.config.value_problems`, with the registries' names as
    the choices of ``--model``, ``--loss_fn``, ``--penalty`` and ``--strategy``) and the rules between options
    (:func:`coati.config.rule_problems`), then what needs the components: 4-/8-bit loading
    (:func:`quantization_problems`), sequence parallelism (:func:`sequence_parallel_problems`), the options the chosen
    components do not take (``--focal_gamma`` without ``--loss_fn focal``, ``--zero_stage`` without ``--strategy
    fsdp``), what the chosen strategy cannot do here (LoRA, resume checkpoints, a precision, a missing GPU or
    package: its class-level capabilities) and the metrics backend. ``auto`` values are checked as what they stand
    for here (:func:`resolve_auto`).
    """
    cfg = resolve_auto(cfg)
    found = registries()
    errors = value_problems(cfg, {name: tuple(registry) for name, registry in found.items()})
    if errors:
        return errors
    errors = rule_problems(cfg) + quantization_problems(cfg) + sequence_parallel_problems(cfg)
    flat, defaults = cfg.to_dict(), TrainConfig().to_dict()
    for selector, registry in found.items():
        chosen = registry[flat[selector]]
        governed = {opt for entry in registry.values() for opt in entry.takes}
        for opt in sorted(governed - set(chosen.takes)):
            if flat[opt] != defaults[opt]:
                users = [k for k, e in registry.items() if opt in e.takes]
                errors.append(f"--{opt} is not used by --{selector} {flat[selector]} (only by "
                              f"{', '.join(users)}): drop it or choose one of those")
    backend = report_to_problem(cfg.log.report_to)
    return errors + found["strategy"][flat["strategy"]].refusals(cfg) + ([backend] if backend else [])


def check_model_fits(cfg: TrainConfig, model_config, say: bool = True) -> None:
    """Settings that cannot be what the user meant for this backbone: a LoRA rank above the hidden size is refused
    (an adapter's rank cannot exceed the matrix's), a ``--max_len`` past the positions the backbone was trained on
    is one warning (rotary backbones run past them, with what quality nobody measured here).

    Raises:
        ValueError: ``--lora_rank`` > the hidden size.
    """
    hidden = getattr(model_config, "hidden_size", None)
    if cfg.lora.uses_lora and isinstance(hidden, int) and cfg.lora.lora_rank > hidden:
        raise ValueError(f"--lora_rank {cfg.lora.lora_rank} is above the backbone's hidden size {hidden}: a LoRA "
                         f"adapter's rank cannot exceed its matrix's (use at most {hidden}; 8-64 is usual)")
    positions = getattr(model_config, "max_position_embeddings", None)
    if say and isinstance(positions, int) and cfg.data.max_len > positions:
        logger.warning("warning: --max_len %d is past the %d positions the backbone was trained on "
                       "(max_position_embeddings); sequences longer than that are scored beyond them",
                       cfg.data.max_len, positions)
