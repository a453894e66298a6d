"""Backbone registry: each CLI ``--model`` choice maps to a Hugging Face sequence-classification class.

A reward model here *is* a transformers ``*ForSequenceClassification`` with ``num_labels=1``: its ``score`` layer is
the value head, so the export is a standard folder that ``AutoModelForSequenceClassification`` loads. To add a
backbone, add one :class:`Backbone` entry to ``BACKBONES`` (its classes, accepted ``model_type`` values, LoRA targets,
presets). A RoPE model using transformers' attention interface needs nothing else: its packed batches run the
per-group attention of :mod:`coati.models.packed_attention`. A model whose attention cannot gives a ``dense_packed_forward``
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
    Gemma3TextConfig,
    Gemma3TextForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForSequenceClassification,
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
        dense_packed_forward: for a backbone without per-group attention (BLOOM's ALiBi), how a packed batch runs
            over one dense mask per row: ``(body, input_ids, position_ids, groups) -> [R, L, hidden]`` last hidden
            states (:func:`coati.models.bloom.packed_forward`); None = transformers' own forward with the per-group
            attention ``coati_packed`` (:mod:`coati.models.packed_attention`; RoPE backbones).
        packs: False for a scoring-only entry (a model type coati does not train): padded batches only, and a
            packed batch is refused with one line.
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
    dense_packed_forward: Callable[..., Any] | None = None
    packs: bool = True
    takes: tuple[str, ...] = ()

    @property
    def group_attention(self) -> bool:
        """Whether packed batches run through the per-group attention (``coati_packed``): what sequence parallelism
        and a whole-batch packed row need."""
        return self.packs and self.dense_packed_forward is None

    def row_capacity(self, max_len: int, share_prefix: bool, requested: int = 0) -> int:
        """Packed row capacity in tokens, the one owner of that rule: ``requested`` (``--max_tokens_per_batch``) when
        given, else 0 (the whole batch in one row, no padding) with per-group attention; with a dense mask (quadratic
        in the row length) the longest group, ``2 * max_len`` with prefix sharing (a pair), else ``max_len``."""
        if requested:
            return requested
        return 0 if self.group_attention else (2 if share_prefix else 1) * max_len


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

#: the linear layers LoRA adapts in every LLaMA-style block (attention and gated MLP), the same names in Qwen2, Qwen3,
#: Gemma 3 and Mistral
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              max_position_embeddings=4096)
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048)
_QWEN2_PRESETS = {"tiny": _TINY, "small": _SMALL,
                  # Qwen2.5-0.5B shape (random weights)
                  "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                               tie_word_embeddings=True)}
# Qwen3 sets head_dim apart from hidden_size / heads (128 in every released size)
_QWEN3_PRESETS = {"tiny": dict(_TINY, head_dim=16), "small": dict(_SMALL, head_dim=32),
                  # Qwen3-0.6B shape (random weights)
                  "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                               num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                               tie_word_embeddings=True)}
# Gemma 3: local (sliding-window) and global layers alternate, five local to one global in the released models;
# the small presets keep one of each, with a window shorter than their rows so that packing meets it
_GEMMA3_PRESETS = {
    "tiny": dict(_TINY, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                 layer_types=["sliding_attention", "full_attention"]),
    "small": dict(_SMALL, head_dim=32, query_pre_attn_scalar=32, sliding_window=128,
                  layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    # Gemma 3 270M shape (random weights)
    "270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                 max_position_embeddings=32768, rope_theta=1000000.0,
                 layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)}
# Mistral 7B v0.1 attends 4096 tokens back on every layer; later releases set no window (null)
_MISTRAL_PRESETS = {"tiny": dict(_TINY, sliding_window=32), "small": dict(_SMALL, sliding_window=None)}

BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone(name="bloom", config_class=BloomConfig, model_class=BloomForSequenceClassification,
             model_types=("bloom",), lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
             presets=bloom.BLOOM_PRESETS, dense_packed_forward=bloom.packed_forward),
    Backbone(name="llama", config_class=LlamaConfig, model_class=LlamaForSequenceClassification,
             model_types=("llama",), lora_targets=_PROJECTIONS, presets=_LLAMA_PRESETS),
    # InternLM2 checkpoints are converted at load time into native LLaMA modules (no remote code)
    Backbone(name="internlm2", config_class=LlamaConfig, model_class=LlamaForSequenceClassification,
             model_types=("internlm2",), lora_targets=INTERNLM2_LORA_TARGETS, presets=INTERNLM2_PRESETS,
             load_pretrained=load_internlm2, config_from_dict=internlm2_to_llama_config),
    # Qwen2 and Qwen2.5 (bias on q, k, v); Qwen3 (RMS norm of q and k per head); Gemma 3's text model (local layers
    # with a sliding window, scaling from query_pre_attn_scalar); Mistral (a sliding window on every layer when its
    # config sets one). Packed batches run the same per-group attention, which applies each layer's window.
    Backbone(name="qwen2", config_class=Qwen2Config, model_class=Qwen2ForSequenceClassification,
             model_types=("qwen2",), lora_targets=_PROJECTIONS, presets=_QWEN2_PRESETS),
    Backbone(name="qwen3", config_class=Qwen3Config, model_class=Qwen3ForSequenceClassification,
             model_types=("qwen3",), lora_targets=_PROJECTIONS, presets=_QWEN3_PRESETS),
    Backbone(name="gemma3", config_class=Gemma3TextConfig, model_class=Gemma3TextForSequenceClassification,
             model_types=("gemma3_text",), lora_targets=_PROJECTIONS, presets=_GEMMA3_PRESETS),
    Backbone(name="mistral", config_class=MistralConfig, model_class=MistralForSequenceClassification,
             model_types=("mistral",), lora_targets=_PROJECTIONS, presets=_MISTRAL_PRESETS),
)}

#: ``--model auto``: the entry is read from the checkpoint's ``config.json`` (``model_type``), see :func:`detect`
AUTO = "auto"


def get_backbone(name: str) -> Backbone:
    """Look up a backbone by CLI name.

    Raises:
        ValueError: unknown name; the message lists the choices.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def detect(folder: str) -> Backbone:
    """The entry for ``--model auto``: the one accepting the ``model_type`` of ``folder/config.json``.

    Raises:
        ValueError: no config.json in ``folder`` (one line naming it), or a model_type no entry accepts.
    """
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"--model auto reads the model_type of {path}: {e}") from None
    return backbone_for_type(model_type, where=path)


def backbone_for_type(model_type: str | None, where: str = "") -> Backbone:
    """The entry whose ``model_types`` contain ``model_type``.

    Raises:
        ValueError: no entry accepts it; the message names ``where`` (a file) and lists those accepted.
    """
    for backbone in BACKBONES.values():
        if model_type in backbone.model_types:
            return backbone
    accepted = ", ".join(t for b in BACKBONES.values() for t in b.model_types)
    raise ValueError(f"{where + ': ' if where else ''}model_type {model_type!r} is not a supported backbone "
                     f"(accepted: {accepted})")


def backbone_for(config: PretrainedConfig) -> Backbone:
    """The entry whose ``model_types`` contain ``config.model_type`` (an InternLM2 export is a ``llama`` model).

    Raises:
        ValueError: no entry accepts that model_type; the message lists those accepted.
    """
    return backbone_for_type(config.model_type)


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
