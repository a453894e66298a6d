"""Two kinds of output, kept apart: the HF export (a standard ``*ForSequenceClassification`` folder, LoRA merged, that
anyone can load) and resume checkpoints (model + optimizer + scheduler + RNG + data position, written atomically).

Neither is trusted as code when read back: exports are safetensors + JSON; resume checkpoints are
``torch.distributed.checkpoint`` folders whose pickled ``.metadata`` is read with an allow-list unpickler (only the
metadata classes DCP itself writes) and whose non-tensor items load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from transformers import PreTrainedTokenizerBase

from coati.config import TrainConfig
from coati.io import describe_os_error, make_readable, write_json
from coati.models.lora import merged_copy
from coati.signals import Interrupted
from coati.strategies.base import all_finite, dcp_state, load_dcp_state, parameters_finite

logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------- resume state
#
# <save_path>/checkpoints/step-000120/
#     model_optim/        torch.distributed.checkpoint of model + optimizer (sharded or not; strategy-neutral)
#     rng/rank{r}.pt      each rank's torch / python RNG states (tensors and ints: loads with weights_only=True)
#     trainer_state.json  step, scheduler state, run fingerprint, ...
#     manifest.json       every file above with its size and sha256, written last
# A checkpoint is written into ".step-000120.tmp" and renamed when complete, so a crash never leaves a folder
# that looks finished; one whose manifest is missing or does not match its files is never loaded. A write that
# fails (full disk, interrupt) removes its temporary folder.

CHECKPOINT_DIR = "checkpoints"
_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A resume checkpoint is missing, incomplete, corrupt, unsafe or of another run; the message says why."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(folder, n), root) for folder, _, names in os.walk(root)
                  for n in names if n != "manifest.json")


def verify_checkpoint(path: str) -> None:
    """Check a resume checkpoint against its manifest (presence, sizes, sha256).

    Raises:
        CheckpointError: no manifest, a listed file missing or of another size or hash, or an unlisted file.
    """
    manifest_path = os.path.join(path, "manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no readable manifest.json ({e}); the checkpoint is incomplete") from None
    present = _files(path)
    if not isinstance(manifest, dict) or sorted(manifest) != present:
        listed = set(manifest) if isinstance(manifest, dict) else set()
        raise CheckpointError(f"{path}: files differ from manifest.json (missing: "
                              f"{sorted(listed - set(present))}, unlisted: {sorted(set(present) - listed)})")
    for name, meta in manifest.items():
        full = os.path.join(path, name)
        if not isinstance(meta, dict) or os.path.getsize(full) != meta.get("size") \
                or _sha256(full) != meta.get("sha256"):
            raise CheckpointError(f"{full}: size or checksum does not match manifest.json (corrupt)")


def list_checkpoints(save_path: str) -> list[str]:
    """Finished checkpoint folders under ``<save_path>/checkpoints``, oldest first (temporary ones excluded)."""
    root = os.path.join(save_path, CHECKPOINT_DIR)
    names = os.listdir(root) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in sorted(names) if n.startswith(_PREFIX) and n[len(_PREFIX):].isdigit()]


def find_resume_checkpoint(save_path: str, resume: str) -> str | None:
    """Resolve ``--resume``: ``auto`` (the newest valid checkpoint under save_path, invalid ones skipped with a
    warning; None when there is none) or a checkpoint folder.

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


#: the lock file a run holds in its ``--save_path`` (kept afterwards: it also marks the folder as a coati run's)
LOCK_NAME = ".coati-run.lock"
#: entries that mark a folder as written by coati (an export, a run's metrics, its checkpoints, its lock)
COATI_ENTRIES = ("train_config.json", "metrics.jsonl", CHECKPOINT_DIR, LOCK_NAME)


class SavePathError(ValueError):
    """``--save_path`` cannot be used by this run: not writable, someone else's folder, or in use by another run."""


class SavePathLock:
    """An exclusive ``flock`` on ``<save_path>/.coati-run.lock`` for the life of a run, holding the owner's pid and
    host; the operating system releases it when the process ends, however it ends. ``release()`` releases it
    earlier (idempotent). A lock that is not held (another rank's) does nothing."""

    def __init__(self, fd: int | None = None):
        self.fd = fd

    def release(self) -> None:
        """Give the lock up (the file stays)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _lock_save_path(save_path: str) -> SavePathLock:
    import fcntl
    import socket

    path = os.path.join(save_path, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            owner = os.read(fd, 256).decode("utf-8", "replace").split()
        finally:
            os.close(fd)
        who = f"pid {owner[0]} on host {owner[1]}" if len(owner) >= 2 else "another process"
        raise SavePathError(f"--save_path {save_path} is in use by another run ({who}); wait for it to finish or "
                            "choose another --save_path") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return SavePathLock(fd)


def prepare_save_path(save_path: str, resuming: bool, overwrite: bool = False,
                      lock: bool | None = None) -> SavePathLock:
    """Check the export folder before anything is trained, and lock it for this run.

    Refused: the filesystem root; an existing file; a non-empty folder that coati did not write (none of
    :data:`COATI_ENTRIES`: someone's model folder would have its ``config.json`` replaced) unless ``overwrite``
    (``--overwrite_output_dir``); a folder that cannot be written; a folder another run holds (the lock names its
    pid and host); for a new run, a folder that already holds resume checkpoints (a new run's checkpoints would be
    mixed with the old ones: ``--keep_last`` would delete the new, lower-numbered ones first, and a later
    ``--resume auto`` would pick up the old run).

    Args:
        lock: take the run's lock (default: on the process of global rank 0, the one that exports; ``RANK`` as set
            by torchrun).
    Returns:
        the lock (release it at the end of the run; the process's end releases it too).
    Raises:
        SavePathError: one of the refusals above, one line saying what to do.
        CheckpointError: a new run, and ``<save_path>/checkpoints`` holds a finished checkpoint.
    """
    real = os.path.realpath(save_path)
    if real == os.path.realpath(os.sep):
        raise SavePathError(f"--save_path {save_path} is the filesystem root; name a folder for this run's export")
    if os.path.exists(save_path) and not os.path.isdir(save_path):
        raise SavePathError(f"--save_path {save_path} is a file, not a folder")
    if os.path.isdir(save_path) and not overwrite:
        try:
            entries = os.listdir(save_path)
        except OSError as e:
            raise SavePathError(f"--save_path {save_path} cannot be read: {describe_os_error(e)}") from None
        if entries and not any(name in entries for name in COATI_ENTRIES):
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise SavePathError(f"--save_path {save_path} holds files that are not a coati run's ({shown}); the "
                                "export would replace them: choose an empty or new folder, or add "
                                "--overwrite_output_dir")
    try:
        os.makedirs(save_path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=save_path, prefix=".write_test"):
            pass
    except OSError as e:
        raise SavePathError(f"--save_path {save_path} is not writable: {describe_os_error(e)}") from None
    if lock is None:
        lock = os.environ.get("RANK", "0") == "0"
    held = _lock_save_path(save_path) if lock else SavePathLock()
    if not resuming and (found := list_checkpoints(save_path)):
        held.release()
        raise CheckpointError(f"--save_path {save_path} already holds resume checkpoints (newest "
                              f"{os.path.basename(found[-1])}); continue that run with --resume auto, or start this "
                              f"one in another --save_path (or delete {os.path.join(save_path, CHECKPOINT_DIR)}); "
                              "--init_from CHECKPOINT starts a new run from a checkpoint's weights")
    return held


def init_from_kind(path: str) -> str:
    """What ``--init_from`` names: ``"checkpoint"`` (a verified resume checkpoint: its model weights start the run)
    or ``"export"`` (an export folder: its backbone, value head and tokenizer are the run's ``--pretrain``).

    Raises:
        CheckpointError: neither, or a checkpoint that fails verification.
    """
    if os.path.isfile(os.path.join(path, "manifest.json")):
        verify_checkpoint(path)
        return "checkpoint"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "export"
    raise CheckpointError(f"--init_from {path}: neither a resume checkpoint (no manifest.json) nor an export folder "
                          "(no config.json)")


# ---------------------------------------------------------------------------------------------- run fingerprint

#: options that change what a run computes: a resume checkpoint carries them and refuses a run that differs.
#: (Strategy, logging, checkpoint and packing layout settings are left out: they do not change the math, and a
#: checkpoint resumes under another strategy.)
FINGERPRINT_FIELDS = ("model", "pretrain", "model_config", "tokenizer", "lora_rank", "lora_alpha", "lora_dropout",
                      "lora_train_bias", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                      "bnb_4bit_double_quant", "loss_fn", "focal_gamma", "penalty", "penalty_weight", "reward_bound",
                      "center_rewards_coefficient", "reward_token", "max_len", "chat_template", "group_by_length",
                      "max_epochs", "max_steps", "lr", "weight_decay", "adam_eps", "warmup_ratio", "warmup_steps",
                      "max_grad_norm", "mixed_precision", "seed", "init_from", "ties", "tie_param", "length_head",
                      "length_loss_weight", "orthogonal_loss_weight")


def run_fingerprint(options: dict, train_tok: list, global_batch: int, total_steps: int) -> dict:
    """What identifies a run: its math-changing options (``options``: the flat config) and the SHA-256 of its
    training pairs (token ids and margins, in order), so a checkpoint never resumes another run's data or settings.

    Returns:
        ``{"settings": {field: value, "global_batch": int, "total_steps": int}, "data_sha256": hex str}``.
    """
    settings = dict({k: options[k] for k in FINGERPRINT_FIELDS}, global_batch=global_batch, total_steps=total_steps)
    h = hashlib.sha256()
    for p in train_tok:
        h.update(array.array("q", [len(p.chosen_ids), *p.chosen_ids, len(p.rejected_ids), *p.rejected_ids]).tobytes())
        h.update(repr(p.margin).encode())
    return {"settings": settings, "data_sha256": h.hexdigest()}


def check_same_run(path: str, fingerprint: dict) -> None:
    """Refuse to resume the checkpoint ``path`` of another run: one line naming every setting (``name: old -> new``)
    in which its fingerprint (see :func:`run_fingerprint`) differs; a checkpoint without one (an older coati)
    differs in everything.

    Raises:
        CheckpointError: the fingerprints differ, or the checkpoint's trainer state is unreadable.
    """
    saved = read_trainer_state(path).get("fingerprint")
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        diffs = ["run fingerprint (the checkpoint has none: written by an older coati)"]
    else:
        defaults = TrainConfig().to_dict()  # a setting added since the checkpoint was written had its default then
        new = fingerprint["settings"]
        old = {k: saved["settings"].get(k, defaults.get(k)) for k in set(saved["settings"]) | set(new)}
        diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        if saved.get("data_sha256") != fingerprint.get("data_sha256"):
            diffs.append("training data (the pairs' content or order differs)")
    if diffs:
        raise CheckpointError(f"--resume: {path} belongs to another run ({'; '.join(diffs)}); resume with that run's "
                              "settings and data, or start a new run from its weights with --init_from " + path +
                              " and another --save_path")


# ---------------------------------------------------------------------------------------------- safe DCP reading

# The only globals a DCP ``.metadata`` pickle refers to (torch 2.4 - 2.13): its own dataclasses and enums, torch's
# Size, dtypes, layouts and memory formats, and the path type. Anything else (os.system, builtins.eval, ...) is
# refused before it is called.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata",
                                              "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (
                torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which checkpoint metadata never holds")


class _SafeReader(FileSystemReader):
    """A DCP ``FileSystemReader`` whose metadata is read by the allow-list unpickler (never runs code)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        meta_path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(meta_path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: not a checkpoint's metadata ({e}); refused without running "
                                  "it") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{meta_path}: holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor items load with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn}: refused, it is not plain data "
                                  f"({str(e).splitlines()[-1][:200]})") from None
        clean = io.BytesIO()
        torch.save(obj, clean)  # only plain containers, numbers and tensors survive weights_only loading
        clean.seek(0)
        super().load_bytes(read_item, clean)


def dcp_load(state: dict, path: str) -> None:
    """``torch.distributed.checkpoint.load`` of ``state`` (in place) from ``path``, without unpickling code.

    Raises:
        CheckpointError: the metadata or an item refers to anything but checkpoint data.
    """
    reader = _SafeReader(path)
    reader.read_metadata()  # refuse a crafted metadata file here, with its own message (DCP would wrap it)
    try:
        dcp.load(state, storage_reader=reader, planner=_SafePlanner())
    except CheckpointException as e:  # a BaseException holding each rank's error
        if inner := [f for f in _failures(e) if isinstance(f, CheckpointError)]:
            raise inner[0] from None
        raise


# ---------------------------------------------------------------------------------------------- write / read

def save_resume_checkpoint(save_path: str, step: int, strategy, model, optimizer, scheduler, trainer_state: dict,
                           keep_last: int) -> str:
    """Write a resume checkpoint atomically (every rank calls this) and return its folder
    ``<save_path>/checkpoints/step-<step>``; keep the newest ``keep_last`` (0 = all).

    Raises:
        NonFiniteWeightsError: a parameter is NaN or infinite (nothing is written).
        CheckpointError: writing failed (full disk, interrupt); the temporary folder is removed.
    """
    if not all_finite(strategy, model.parameters()):
        raise NonFiniteWeightsError(f"parameters are NaN or infinite at step {step}; no checkpoint written")
    root = os.path.join(save_path, CHECKPOINT_DIR)
    final = os.path.join(root, f"{_PREFIX}{step:06d}")
    tmp = os.path.join(root, f".{_PREFIX}{step:06d}.tmp")
    try:
        if strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"))
        strategy.barrier()
        dcp.save(dcp_state(model, optimizer), checkpoint_id=os.path.join(tmp, "model_optim"))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, os.path.join(tmp, "rng", f"rank{strategy.rank}.pt"))
        strategy.barrier()
        if strategy.is_main:
            state = dict(trainer_state, step=step, scheduler=scheduler.state_dict(), world_size=strategy.world_size,
                         strategy=strategy.name)
            write_json(os.path.join(tmp, "trainer_state.json"), state)
            manifest = {name: {"size": os.path.getsize(os.path.join(tmp, name)),
                               "sha256": _sha256(os.path.join(tmp, name))} for name in _files(tmp)}
            write_json(os.path.join(tmp, "manifest.json"), {"files": manifest})
            make_readable(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(save_path)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, final) from None
    strategy.barrier()
    return final


def _failures(e: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside a DCP ``CheckpointException`` (nested ones unpacked), or ``[e]``."""
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict):
        return [e]
    return [inner for f in failures.values() for inner in _failures(f[0] if isinstance(f, tuple) else f)]


def _write_error(e: BaseException, final: str) -> BaseException:
    """What a failed checkpoint write raises: an interrupt goes on as itself; a disk error (also one rank's, inside
    DCP's ``CheckpointException``) becomes one CheckpointError line; any other error of DCP a CheckpointError with its
    first cause; anything else is raised unchanged."""
    inner = _failures(e)
    stop = next((f for f in inner if not isinstance(f, Exception) or isinstance(f, Interrupted)), None)
    cause = next((f for f in inner if isinstance(f, OSError)), None)
    if stop is not None:
        return stop
    torn = next((f for f in inner if _torn_write(f)), None)
    if torn is not None:  # torch's zip writer reports a full disk as "unexpected pos 704 vs 598"
        return CheckpointError(f"writing checkpoint {final} failed: No space left on device (torch's file writer "
                               f"stopped mid-file); no partial checkpoint was left, the previous ones are kept")
    if cause is None and inner == [e]:  # an error not from DCP
        return e
    reason = describe_os_error(cause) if cause is not None else f"{type(inner[0]).__name__}: {inner[0]}"[:300]
    return CheckpointError(f"writing checkpoint {final} failed: {reason}; no partial checkpoint was left")


def _torn_write(e: BaseException) -> bool:
    """Whether ``e`` is torch's file writer failing mid-file (``unexpected pos``, ``PytorchStreamWriter failed``,
    ``file write failed``): what a full disk looks like from ``torch.save``."""
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("unexpected pos", "PytorchStreamWriter failed",
                                                                   "file write failed"))


def read_trainer_state(path: str) -> dict:
    """The ``trainer_state.json`` of a verified checkpoint; raises CheckpointError when unreadable or not an object."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/trainer_state.json: unreadable ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}/trainer_state.json: not a JSON object")
    return state


def load_resume_checkpoint(path: str, strategy, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path`` (every rank calls this).

    Returns:
        the trainer state saved with it (``step``, ``fingerprint``, ...).
    Raises:
        CheckpointError: this rank's RNG file is missing (the checkpoint was written by fewer ranks), or the
            checkpoint holds anything but data (see :func:`dcp_load`).
    """
    state = read_trainer_state(path)
    named = re.fullmatch(r"step-(\d+)", os.path.basename(os.path.normpath(path)))
    if named and state.get("step") != int(named.group(1)):
        raise CheckpointError(f"{path}: trainer_state.json records step {state.get('step')!r} but the folder is "
                              f"step {int(named.group(1))}: the checkpoint was edited or renamed; resume from another")
    target = dcp_state(model, optimizer)
    dcp_load(target, os.path.join(path, "model_optim"))
    load_dcp_state(model, optimizer, target)
    if not all_finite(strategy, model.parameters()):
        raise CheckpointError(f"{path}: its weights are NaN or infinite; resume from an earlier checkpoint "
                              "(--resume PATH)")
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


def resume_run(save_path: str, resume: str, fingerprint: dict, strategy, model, optimizer, scheduler) -> int:
    """``--resume``: find the checkpoint (:func:`find_resume_checkpoint`), refuse another run's
    (:func:`check_same_run`), restore it (:func:`load_resume_checkpoint`) and return the step to continue from (0
    when ``resume`` is ``auto`` and there is no valid checkpoint yet)."""
    path = find_resume_checkpoint(save_path, resume)
    if path is None:
        return 0
    check_same_run(path, fingerprint)
    state = load_resume_checkpoint(path, strategy, model, optimizer, scheduler)
    if strategy.is_main:
        logger.info("resumed from %s at step %d (written under %s)", path, state["step"], state["strategy"])
    return state["step"]


def load_checkpoint_weights(path: str, strategy, model) -> None:
    """Load only the model weights of a resume checkpoint into ``model`` (``--init_from``): no optimizer, step or RNG.

    Raises:
        CheckpointError: the checkpoint is invalid, or its weights do not fit this model (other backbone, shape
            or LoRA settings).
    """
    verify_checkpoint(path)
    target = dcp_state(model, None)
    try:
        dcp_load({"model": target["model"]}, os.path.join(path, "model_optim"))
    except CheckpointError:
        raise
    except Exception as e:  # DCP reports missing keys and shape mismatches as assorted errors
        raise CheckpointError(f"--init_from {path}: its weights do not fit this model ({str(e).splitlines()[0][:300]})"
                              ) from None
    load_dcp_state(model, None, target)
    if not all_finite(strategy, model.parameters()):
        raise CheckpointError(f"--init_from {path}: its weights are NaN or infinite")
