"""Small file-writing rules every output of coati follows: strict JSON, readable permissions, atomic folders."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def finite_json(obj: Any) -> Any:
    """A copy of ``obj`` with every non-finite float (NaN, +-inf) replaced by None, so it is valid JSON.

    Python's ``json`` writes ``NaN`` / ``Infinity`` literals that strict JSON readers (JavaScript, Go, jq) refuse.
    Dicts, lists and tuples are walked; other values are returned unchanged.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`finite_json` (obj), UTF-8 kept (``ensure_ascii=False``), ``allow_nan=False``."""
    kwargs.setdefault("ensure_ascii", False)
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON (see :func:`dumps`) to ``path``, readable by others (see :func:`make_readable`)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(obj, indent=indent))
    make_readable(path)


def make_readable(path: str) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the permissions a normal write would.

    Files become ``0o666 & ~umask`` (0644 under the usual umask 022) and folders ``0o777 & ~umask``. safetensors
    writes its files 0600 and ``tempfile.mkdtemp`` makes 0700 folders, which a separate serving account could not
    read.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o666 if os.path.isfile(path) else 0o777) & ~mask)
    for folder, dirs, files in os.walk(path):  # yields nothing for a file
        for names, mode in ((dirs, 0o777), (files, 0o666)):
            for name in names:
                os.chmod(os.path.join(folder, name), mode & ~mask)


def describe_os_error(e: Exception) -> str:
    """A short cause for a failed write, e.g. ``No space left on device`` (an OSError's errno text; for other
    errors such as safetensors' ``SafetensorError``, their text, which names the OS error)."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
