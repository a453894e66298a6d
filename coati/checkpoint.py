"""Two kinds of output, kept apart: the HF export (a standard ``*ForSequenceClassification`` folder, LoRA merged, that
anyone can load) and resume checkpoints (model + optimizer + scheduler + RNG + data position, written atomically)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil

from torch import nn
from transformers import PreTrainedTokenizerBase

from coati.models.lora import merged_copy

logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------- resume state
#
# <save_path>/checkpoints/step-000120/
#     model_optim/        torch.distributed.checkpoint of model + optimizer (sharded or not; strategy-neutral)
#     rng/rank{r}.pt      each rank's torch / python RNG states (tensors and ints: loads with weights_only=True)
#     trainer_state.json  step, scheduler state, global batch, seed, ...
#     manifest.json       every file above with its size and sha256, written last
# A checkpoint is written into ".step-000120.tmp" and renamed when complete, so a crash never leaves a folder
# that looks finished; one whose manifest is missing or does not match its files is never loaded.

CHECKPOINT_DIR = "checkpoints"
_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A resume checkpoint is missing, incomplete or corrupt; the message says which file and why."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    out = []
    for folder, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, n), root) for n in names if n != "manifest.json"]
    return sorted(out)


def verify_checkpoint(path: str) -> None:
    """Check a resume checkpoint against its manifest (presence, sizes, sha256).

    Raises:
        CheckpointError: no manifest, a listed file missing or of another size or hash, or an unlisted file.
    """
    manifest_path = os.path.join(path, "manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: no readable manifest.json ({e}); the checkpoint is incomplete") from None
    present = _files(path)
    if sorted(manifest) != present:
        raise CheckpointError(f"{path}: files differ from manifest.json (missing: "
                              f"{sorted(set(manifest) - set(present))}, unlisted: {sorted(set(present) - set(manifest))})")
    for name, meta in manifest.items():
        full = os.path.join(path, name)
        if os.path.getsize(full) != meta["size"] or _sha256(full) != meta["sha256"]:
            raise CheckpointError(f"{full}: size or checksum does not match manifest.json (corrupt)")


def list_checkpoints(save_path: str) -> list[str]:
    """Finished checkpoint folders under ``<save_path>/checkpoints``, oldest first (temporary ones excluded)."""
    root = os.path.join(save_path, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(_PREFIX) and n[len(_PREFIX):].isdigit())
    return [os.path.join(root, n) for n in names]


def find_resume_checkpoint(save_path: str, resume: str) -> str | None:
    """Resolve ``--resume``.

    Args:
        resume: ``auto`` (the newest valid checkpoint under save_path; invalid ones are skipped with a warning;
            None when there is none), or a checkpoint folder (must be valid).
    Raises:
        CheckpointError: an explicit folder that is missing or fails :func:`verify_checkpoint`.
    """
    if resume != "auto":
        if not os.path.isdir(resume):
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        verify_checkpoint(resume)
        return resume
    for path in reversed(list_checkpoints(save_path)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            logger.warning("skipping checkpoint: %s", e)
    return None


def save_resume_checkpoint(save_path: str, step: int, strategy, model, optimizer, scheduler, trainer_state: dict,
                           keep_last: int) -> str:
    """Write a resume checkpoint atomically (every rank calls this); keep the newest ``keep_last``.

    Returns:
        the finished folder ``<save_path>/checkpoints/step-<step>``.
    """
    import torch
    import torch.distributed.checkpoint as dcp

    root = os.path.join(save_path, CHECKPOINT_DIR)
    final = os.path.join(root, f"{_PREFIX}{step:06d}")
    tmp = os.path.join(root, f".{_PREFIX}{step:06d}.tmp")
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    strategy.barrier()
    dcp.save(strategy.resume_state(model, optimizer), checkpoint_id=os.path.join(tmp, "model_optim"))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(tmp, "rng", f"rank{strategy.rank}.pt"))
    strategy.barrier()
    if strategy.is_main:
        state = dict(trainer_state, step=step, scheduler=scheduler.state_dict(), world_size=strategy.world_size,
                     strategy=strategy.name)
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
        manifest = {name: {"size": os.path.getsize(os.path.join(tmp, name)), "sha256": _sha256(os.path.join(tmp, name))}
                    for name in _files(tmp)}
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump({"files": manifest}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(save_path)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    strategy.barrier()
    return final


def load_resume_checkpoint(path: str, strategy, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path`` (every rank calls this).

    Returns:
        the trainer state saved with it (``step``, ``global_batch``, ...).
    Raises:
        CheckpointError: this rank's RNG file is missing (the checkpoint was written by fewer ranks).
    """
    import torch
    import torch.distributed.checkpoint as dcp

    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    target = strategy.resume_state(model, optimizer)
    dcp.load(target, checkpoint_id=os.path.join(path, "model_optim"))
    strategy.load_resume_state(model, optimizer, target)
    scheduler.load_state_dict(state["scheduler"])
    rng_path = os.path.join(path, "rng", f"rank{strategy.rank}.pt")
    if not os.path.exists(rng_path):
        raise CheckpointError(f"{rng_path} is missing: the checkpoint was written by {state['world_size']} ranks")
    rng = torch.load(rng_path, weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
