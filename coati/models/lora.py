"""LoRA through peft: apply adapters (value head always trainable and saved) and merge them for export."""

from __future__ import annotations

import copy

from torch import nn


def apply_lora(model: nn.Module, target_modules: tuple[str, ...], rank: int, alpha: float, dropout: float,
               bias: str) -> nn.Module:
    """Wrap a ``*ForSequenceClassification`` in a peft ``PeftModel`` with LoRA adapters.

    LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685), section 4.1
    (``W + (alpha / r) * B A``). The value head (``score``) is listed in ``modules_to_save``: it is trained in full
    and saved with the adapter.

    Args:
        rank: LoRA rank r (> 0).
        bias: ``none``, ``all`` or ``lora_only`` (which biases train).
    Raises:
        ValueError: rank <= 0, or none of ``target_modules`` exists in the model.
    """
    from peft import LoraConfig, get_peft_model

    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in target_modules if t in names]
    if not targets:
        raise ValueError(f"none of the LoRA target modules {target_modules} exists in {type(model).__name__}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias=bias, target_modules=targets,
                        modules_to_save=["score"])
    return get_peft_model(model, config)


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain ``*ForSequenceClassification`` with LoRA merged into the base weights, without touching ``model``.

    For a model without adapters this is a deep copy. Biases (trained or not) are kept as they are.
    """
    clone = copy.deepcopy(model)
    return clone.merge_and_unload() if hasattr(clone, "merge_and_unload") else clone
