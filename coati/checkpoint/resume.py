"""Resume checkpoints (model + optimizer + scheduler + RNG + data position, written atomically): their layout and
manifest, the save path a run locks, and writing and reading them back (``--resume``, ``--init_from``).

A checkpoint is read without trusting it as code (:mod:`coati.checkpoint.safe_load`) and only by the run it belongs
to (:mod:`coati.checkpoint.fingerprint`); the HF export is :mod:`coati.checkpoint.export`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile

import torch
import torch.distributed.checkpoint as dcp

from coati.checkpoint.export import NonFiniteWeightsError
from coati.checkpoint.fingerprint import check_same_run
from coati.checkpoint.safe_load import CheckpointError, dcp_failures, dcp_load, read_trainer_state
from coati.io import describe_os_error, make_readable, write_json
from coati.signals import Interrupted
from coati.strategies.base import all_finite, dcp_state, load_dcp_state

logger = logging.getLogger(__name__)


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


def _write_error(e: BaseException, final: str) -> BaseException:
    """What a failed checkpoint write raises: an interrupt goes on as itself; a disk error (also one rank's, inside
    DCP's ``CheckpointException``) becomes one CheckpointError line; any other error of DCP a CheckpointError with its
    first cause; anything else is raised unchanged."""
    inner = dcp_failures(e)
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
