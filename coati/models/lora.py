"""LoRA through peft: apply adapters (value head always trainable and saved) and merge them for export."""

from __future__ import annotations

import copy
import warnings

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
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


#: bitsandbytes' packed weight classes (4-bit, 8-bit)
_QUANTIZED_PARAMS = ("Params4bit", "Int8Params")


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` holds bitsandbytes 4- or 8-bit weights."""
    return any(type(p).__name__ in _QUANTIZED_PARAMS for p in model.parameters())


def keep_standard_4bit_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking ``model``'s 4-bit weights for its CPU inference kernel; returns the number of
    4-bit layers.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit`` in eval mode, given an input that needs no gradient,
    rewrites its weight in place into a CPU-only layout, and from then on multiplies through that kernel: in bf16
    whatever the compute dtype, with no backward for the input (a later training step silently gets no gradient
    through the layer), and peft's ``dequantize_module_weight`` (the export) reads the new layout as the old one
    (measured here: weights off by 0.25). The layers keep the standard layout after this; one already repacked is
    converted back.
    """
    layers = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        layers += 1
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
    return layers


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain fp32 ``*ForSequenceClassification`` with LoRA merged into the base weights, without touching ``model``.

    For a model without adapters this is a deep copy. For a peft model every adapted layer's weight becomes
    ``W + (alpha / r) B A`` (peft's ``get_delta_weight``) computed in fp32, where ``W`` is the frozen base weight as the
    forward pass used it: de-quantised from 4 or 8 bits (peft's ``dequantize_module_weight``) or upcast from bf16; the
    value head is the trained copy; biases (trained or not) are kept. The copy has no quantisation config, so it
    saves and loads as an ordinary fp32 model.
    """
    if not hasattr(model, "get_base_model"):
        return copy.deepcopy(model)
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from peft.utils.integrations import dequantize_module_weight
    from transformers.initialization import no_init_weights

    base, state = model.get_base_model(), {}
    keep_standard_4bit_layout(base)  # a layer bitsandbytes repacked goes back first (the one change to model)
    wrapped = set()
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                layer = module.get_base_layer()
                weight = dequantize_module_weight(layer).float()
                for adapter in module.active_adapters:
                    weight = weight + module.get_delta_weight(adapter).float()
                state[f"{name}.weight"] = weight
                if layer.bias is not None:
                    state[f"{name}.bias"] = layer.bias.detach().float()
                wrapped.add(name + ".")
            elif isinstance(module, ModulesToSaveWrapper):
                trained = module.modules_to_save[module.active_adapters[0]]
                state.update({f"{name}.{k}": v.detach().float() for k, v in trained.state_dict().items()})
                wrapped.add(name + ".")
        for name, p in base.named_parameters():
            if any(name.startswith(w) for w in wrapped):
                continue
            if type(p).__name__ in _QUANTIZED_PARAMS:  # a quantised layer without adapters
                p = dequantize_module_weight(base.get_submodule(name.rsplit(".", 1)[0]))
            state[name] = p.detach().float()
    config = copy.deepcopy(base.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    with no_init_weights():
        plain = type(base)(config)
    plain.load_state_dict(state, strict=True)
    return plain.float()
