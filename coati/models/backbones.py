"""Backbone registry: each CLI ``--model`` choice maps to a Hugging Face sequence-classification class.

A reward model here *is* a transformers ``*ForSequenceClassification`` with ``num_labels=1``: its ``score`` layer is
the value head, so the export is a standard folder that ``AutoModelForSequenceClassification`` loads. To add a
backbone, add one :class:`Backbone` entry to ``BACKBONES`` (its classes, accepted ``model_type`` values, LoRA targets,
presets). A RoPE model using transformers' attention interface needs nothing else: its packed batches run the
per-group attention of :mod:`coati.models.packed_attention`. A model whose attention cannot gives a ``packed_forward``
(:mod:`coati.models.bloom`), one with checkpoints in a foreign layout a ``load_pretrained`` converter
(:mod:`coati.models.internlm2`), each from a module of its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from transformers import (
    BloomConfig,
    BloomForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from coati.models import bloom
from coati.models.internlm2 import (INTERNLM2_LORA_TARGETS, INTERNLM2_PRESETS, internlm2_to_llama_config,
                                   load_internlm2)


@dataclass(frozen=True)
class Backbone:
    """One backbone family.

    Attributes:
        name: CLI name.
        config_class: transformers config class used for random init.
        model_class: ``*ForSequenceClassification`` class (its ``score`` is the value head).
        model_types: ``config.json`` ``model_type`` values this family accepts from ``--pretrain``.
        lora_targets: module names LoRA adapts.
        presets: ``--model_config`` preset name -> config kwargs for random init (vocab size comes from the tokenizer).
        load_pretrained: optional ``(path, **kwargs) -> model`` for checkpoints that need conversion.
        config_from_dict: optional converter of a foreign ``config.json`` dict into ``config_class`` (random init
            from an InternLM2 config, for example); None = pass the keys to ``config_class``.
        packed_forward: how a packed batch is run: None = transformers' own forward with the per-group attention
            ``coati_packed`` (:mod:`coati.models.packed_attention`; RoPE backbones); else ``(body, input_ids,
            position_ids, groups) -> [R, L, hidden]`` last hidden states (:func:`coati.models.bloom.packed_forward`).
        takes: options of its config group it reads (for the config validator).
    """

    name: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    model_types: tuple[str, ...]
    lora_targets: tuple[str, ...]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    load_pretrained: Callable[..., PreTrainedModel] | None = None
    config_from_dict: Callable[[dict[str, Any]], PretrainedConfig] | None = None
    packed_forward: Callable[..., Any] | None = None
    takes: tuple[str, ...] = ()

    def row_capacity(self, max_len: int, share_prefix: bool) -> int:
        """Default packed row capacity in tokens (when ``--max_tokens_per_batch`` is 0): 0 (the whole batch in one row,
        no padding) with per-group attention; with a dense mask (quadratic in the row length) the longest group,
        ``2 * max_len`` with prefix sharing (a pair), else ``max_len``."""
        return 0 if self.packed_forward is None else (2 if share_prefix else 1) * max_len


_LLAMA_PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=4096),
    # SmolLM2-135M shape (random weights)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    # ~1B LLaMA (TinyLlama-1.1B shape)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, max_position_embeddings=4096),
}

BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone(name="bloom", config_class=BloomConfig, model_class=BloomForSequenceClassification,
             model_types=("bloom",), lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
             presets=bloom.BLOOM_PRESETS, packed_forward=bloom.packed_forward),
    Backbone(name="llama", config_class=LlamaConfig, model_class=LlamaForSequenceClassification,
             model_types=("llama", "mistral"),
             lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
             presets=_LLAMA_PRESETS),
    # InternLM2 checkpoints are converted at load time into native LLaMA modules (no remote code)
    Backbone(name="internlm2", config_class=LlamaConfig, model_class=LlamaForSequenceClassification,
             model_types=("internlm2",), lora_targets=INTERNLM2_LORA_TARGETS, presets=INTERNLM2_PRESETS,
             load_pretrained=load_internlm2, config_from_dict=internlm2_to_llama_config),
)}


def get_backbone(name: str) -> Backbone:
    """Look up a backbone by CLI name.

    Raises:
        ValueError: unknown name; the message lists the choices.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def backbone_for(config: PretrainedConfig) -> Backbone:
    """The entry whose ``model_types`` contain ``config.model_type`` (an InternLM2 export is a ``llama`` model).

    Raises:
        ValueError: no entry accepts that model_type; the message lists those accepted.
    """
    for backbone in BACKBONES.values():
        if config.model_type in backbone.model_types:
            return backbone
    accepted = ", ".join(t for b in BACKBONES.values() for t in b.model_types)
    raise ValueError(f"model_type {config.model_type!r} is not a supported backbone (accepted: {accepted})")


def build_config(backbone: Backbone, model_config: str, vocab_size: int, pad_token_id: int,
                 eos_token_id: int, bos_token_id: int | None) -> PretrainedConfig:
    """Config for a randomly initialised backbone.

    Args:
        model_config: a preset name of ``backbone`` or a path to a ``config.json``.
        vocab_size: taken from the tokenizer, so ids always fit the embedding.
    Raises:
        ValueError: unknown preset (lists the presets) or a config.json of another model_type.
    """
    ids = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
               bos_token_id=bos_token_id, num_labels=1)
    if os.path.isfile(model_config):
        with open(model_config, encoding="utf-8") as f:
            kwargs = json.load(f)
        model_type = kwargs.get("model_type", backbone.model_types[0])
        if model_type not in backbone.model_types:
            raise ValueError(f"{model_config}: model_type {model_type!r} does not match --model {backbone.name}")
        if backbone.config_from_dict is not None:
            config = backbone.config_from_dict(dict(kwargs, **ids))
            config.update(ids)
            return config
        kwargs.pop("model_type", None)
    elif model_config in backbone.presets:
        kwargs = dict(backbone.presets[model_config])
    else:
        raise ValueError(f"unknown --model_config {model_config!r} for {backbone.name}; presets: "
                         f"{', '.join(backbone.presets)} (or a config.json path)")
    return backbone.config_class(**kwargs, **ids)
