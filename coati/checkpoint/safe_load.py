"""Reading a resume checkpoint without trusting it as code.

Its ``torch.distributed.checkpoint`` folder is read with an allow-list unpickler for the pickled ``.metadata`` (only
the metadata classes DCP itself writes) and ``torch.load(weights_only=True)`` for non-tensor items; its
``trainer_state.json`` as plain JSON. :class:`CheckpointError` is what every refusal of a checkpoint raises.
"""

from __future__ import annotations

import io
import json
import os
import pickle

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta


class CheckpointError(RuntimeError):
    """A resume checkpoint is missing, incomplete, corrupt, unsafe or of another run; the message says why."""


def dcp_failures(e: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside a DCP ``CheckpointException`` (nested ones unpacked), or ``[e]``; read by the
    writer (:mod:`coati.checkpoint.resume`) and the reader alike."""
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict):
        return [e]
    return [inner for f in failures.values() for inner in dcp_failures(f[0] if isinstance(f, tuple) else f)]


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
        if inner := [f for f in dcp_failures(e) if isinstance(f, CheckpointError)]:
            raise inner[0] from None
        raise
