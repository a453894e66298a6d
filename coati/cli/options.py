"""What the command lines share: help that states each default once, parse-time range checks, the model-loading
options of ``coati.score`` / ``coati.evaluate`` / ``coati.serve``, output paths checked before any work, and user
errors turned into one ``error: ...`` line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from coati.config import COUNT, Range
from coati.data.template import LAYOUTS


class DefaultsOnceHelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help unless the help already mentions its default, or X is None,
    False or SUPPRESS (so ``--help`` shows each default once)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = any(action.default is v for v in (None, False, argparse.SUPPRESS))  # `is`: 0 == False
        if "default" in text.lower() or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def checked(base: type, rule: Range | None):
    """An argparse ``type`` that converts with ``base`` and enforces ``rule``, so a bad value fails at parse time."""
    def convert(text: str):
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule.text if rule else base.__name__}, got {text!r}") from None
        if rule is not None and not rule.ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule.text}, got {text!r}")
        return value
    convert.__name__ = base.__name__
    return convert


def check_output_target(flag: str, path: str, folder: bool = False) -> None:
    """Fail before any work when an output path cannot be written; creates nothing.

    Args:
        flag: the option named in the message (``--output``); path: the file (or with ``folder`` the folder,
            created later if missing) to be written.
    Raises:
        ValueError: a file path that is a folder, or a folder path that is a file. FileNotFoundError: a file's
            folder does not exist. PermissionError: the file, folder or (for a missing folder) its nearest existing
            parent is not writable.
    """
    path = os.path.abspath(path)
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag} {path}: exists and is not a folder")
        probe = path
        while not os.path.exists(probe):  # the folder is created with its parents: the first existing one counts
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise ValueError(f"{flag} {path}: {probe} is a file, so the folder cannot be created")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError(f"{flag} {path}: {probe} is not writable")
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder; give a file path")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"{flag} {path}: not writable")


def add_model_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of loading and running the model, shared by ``coati.score``, ``coati.evaluate`` and ``coati.serve``;
    returns ``p``."""
    p.add_argument("--batch_size", type=checked(int, COUNT), default=16, help="sequences per forward pass")
    p.add_argument("--max_len", type=checked(int, Range(8, integer=True)), default=None,
                   help="max tokens per sequence (default: train_config.json)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="backbone weights dtype")
    p.add_argument("--load_in_4bit", action="store_true",
                   help="load the backbone's linear layers in 4 bits (bitsandbytes NF4, computing in --dtype): less "
                        "memory, scores within the quantisation error (see docs/qlora.md)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="how prompt and response become tokens: coati (this trainer's, read from train_config.json), "
                        "chat (the whole conversation through the tokenizer's chat template, as TRL trains on "
                        "conversations; plus the config's reward_token_id when set, as InternLM2 reward models), "
                        "text (hh-rlhf text + EOS, TRL on plain text); auto: coati with a train_config.json, else "
                        "chat when the tokenizer has a template, else text")
    p.add_argument("--disable_tqdm", action="store_true", help="no progress bar (it goes to stderr)")
    return p


def user_errors_exit(run: Callable, args, errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> int:
    """``run(args)``, with a user error (one of ``errors``) printed as one ``error: ...`` line on stderr.

    Returns:
        0 when ``run`` returned, 2 after a user error (anything else propagates: a crash shows its traceback).
    """
    try:
        run(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
