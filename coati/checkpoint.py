"""HF export: a standard ``*ForSequenceClassification`` folder (LoRA merged) that anyone can load."""

from __future__ import annotations

import json
import os

from torch import nn
from transformers import PreTrainedTokenizerBase

from coati.models.lora import merged_copy


def export_hf(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: str, train_config: dict | None = None,
              extra_config: dict | None = None) -> str:
    """Write ``model`` to ``path`` as a Hugging Face folder.

    The folder holds ``config.json`` (``num_labels == 1``, ``pad_token_id`` distinct from EOS), ``model.safetensors``,
    the tokenizer (right padding) and ``train_config.json``. ``AutoModelForSequenceClassification.from_pretrained``
    then reads the reward at the last non-pad token, which is the EOS the trainer scored.

    Args:
        model: the HF sequence-classification model or its peft wrapper (merged on a copy; ``model`` is unchanged).
        extra_config: keys added to ``config.json`` (e.g. reward statistics).
    Returns:
        ``path``.
    """
    os.makedirs(path, exist_ok=True)
    plain = merged_copy(model)
    plain.config.num_labels = 1
    plain.config.id2label = {0: "reward"}
    plain.config.label2id = {"reward": 0}
    plain.config.pad_token_id = tokenizer.pad_token_id
    for key, value in (extra_config or {}).items():
        setattr(plain.config, key, value)
    plain.save_pretrained(path, safe_serialization=True)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(path)
    if train_config is not None:
        with open(os.path.join(path, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump(train_config, f, indent=2, ensure_ascii=False)
    return path
