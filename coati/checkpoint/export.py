"""The HF export: a standard ``*ForSequenceClassification`` folder (LoRA merged, tokenizer, ``train_config.json``)
that anyone can load, written atomically.

It is never trusted as code when read back: weights are safetensors, everything else JSON or text.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from coati.io import describe_os_error, make_readable, write_json
from coati.models.lora import merged_copy
from coati.strategies.base import parameters_finite


class ExportError(RuntimeError):
    """The export could not be written (no space, no permission); the previous export is left whole."""


class NonFiniteWeightsError(RuntimeError):
    """Model parameters hold NaN or infinity, so they are never written as a usable model or checkpoint."""


def non_finite_names(model: nn.Module) -> list[str]:
    """Names of the parameters of ``model`` that hold NaN or infinity (for error messages)."""
    return [n for n, p in model.named_parameters()
            if not bool(torch.isfinite((p.to_local() if hasattr(p, "to_local") else p).detach()).all())]


def _is_weight_file(name: str) -> bool:
    return name in ("model.safetensors", "model.safetensors.index.json") or (
        name.startswith("model-") and name.endswith(".safetensors"))


#: Weight files an export may carry beside the model's own (``export_hf``'s ``extra_tensors``): an export without one
#: removes an earlier export's copy, so a folder never mixes two runs' files.
LENGTH_HEAD_FILE = "length_head.safetensors"
EXTRA_WEIGHT_FILES = (LENGTH_HEAD_FILE,)


def export_hf(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: str, train_config: dict | None = None,
              extra_config: dict | None = None, extra_json: dict[str, dict] | None = None,
              adapter: bool = False, extra_text: dict[str, str] | None = None,
              extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> str:
    """Write ``model`` to ``path`` as a Hugging Face folder, atomically.

    The folder holds ``config.json`` (``num_labels == 1``, ``pad_token_id`` distinct from EOS), ``model.safetensors``,
    the tokenizer (right padding) and ``train_config.json``. ``AutoModelForSequenceClassification.from_pretrained``
    then reads the reward at the last non-pad token, which is the EOS the trainer scored.

    Everything is written into a temporary folder inside ``path`` and moved into place when complete (``config.json``
    last), so a full disk or an interrupt leaves the previous export whole and no temporary folder. Files are readable
    by others (0644 under umask 022); other files in ``path`` (checkpoints, metrics) are kept.

    Args:
        model: the HF sequence-classification model or its peft wrapper (merged on a copy; ``model`` is unchanged).
        train_config: written as ``train_config.json``.
        extra_config: keys added to ``config.json`` (e.g. reward statistics).
        extra_json: more JSON files written with the export, ``{file name: content}`` (e.g. ``summary.json``).
        extra_text: text files written with the export (UTF-8), ``{file name: text}`` (e.g. the ``README.md``
            model card of :func:`coati.model_card.render_model_card`); plain file names only.
        adapter: also write the peft adapter (LoRA weights and the trained value head, peft's own layout) to
            ``path/adapter``, for users who load it over their own (e.g. 4-bit) copy of the base model.
        extra_tensors: safetensors files written with the export, ``{file name: {tensor name: tensor}}``; names
            from :data:`EXTRA_WEIGHT_FILES` only (e.g. the length head of ``--length_head``).
    Returns:
        ``path``.
    Raises:
        ValueError: a name in ``extra_json`` or ``extra_text`` is not a plain file name, or one in ``extra_tensors``
            is not in :data:`EXTRA_WEIGHT_FILES` (nothing is written).
        NonFiniteWeightsError: a weight is NaN or infinite (nothing is written).
        ExportError: writing failed; the message names the cause (e.g. ``No space left on device``).
    """
    for name in [*(extra_json or {}), *(extra_text or {})]:
        if not name or name in (".", "..") or os.path.basename(name) != name or "\\" in name:
            raise ValueError(f"export file name {name!r} is not a plain file name")
    for name in extra_tensors or {}:
        if name not in EXTRA_WEIGHT_FILES:
            raise ValueError(f"export weight file {name!r} is not one of {', '.join(EXTRA_WEIGHT_FILES)}")
    plain = merged_copy(model)
    extra_params = [t for tensors in (extra_tensors or {}).values() for t in tensors.values()]
    if not parameters_finite(list(plain.parameters()) + extra_params):
        bad = non_finite_names(plain)
        raise NonFiniteWeightsError(f"{len(bad)} weight tensors are NaN or infinite (e.g. {bad[0]}); nothing was "
                                    f"exported to {path}. Lower --lr or check the data")
    plain.config.update({"num_labels": 1, "id2label": {0: "reward"}, "label2id": {"reward": 0},
                         "pad_token_id": tokenizer.pad_token_id, **(extra_config or {})})
    files = {**(extra_json or {}), **({} if train_config is None else {"train_config.json": train_config})}
    tmp = None
    try:
        os.makedirs(path, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export.tmp", dir=path)
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(tmp)
        for name, content in files.items():
            write_json(os.path.join(tmp, name), content)
        for name, text in (extra_text or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        for name, tensors in (extra_tensors or {}).items():
            save_file(tensors, os.path.join(tmp, name))
        if adapter and hasattr(model, "peft_config"):
            model.save_pretrained(os.path.join(tmp, "adapter"))
            shutil.rmtree(os.path.join(path, "adapter"), ignore_errors=True)
        make_readable(tmp)
        new = set(os.listdir(tmp))
        if not any(_is_weight_file(n) for n in new):
            raise ExportError(f"export to {path} failed: save_pretrained wrote no weights")
        for name in os.listdir(path):  # weight files of an earlier export that this one does not replace
            if (_is_weight_file(name) or name in EXTRA_WEIGHT_FILES) and name not in new:
                os.remove(os.path.join(path, name))
        for name in sorted(new, key=lambda n: n == "config.json"):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error type
        raise ExportError(f"export to {path} failed: {describe_os_error(e)}; the previous export there (if any) is "
                          "unchanged") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
