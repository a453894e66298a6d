"""``train_reward_model.py``'s command line: flags (one per option of :mod:`coati.config`), recipe files, the
checks of :func:`coati.preflight.validate`, then :func:`coati.run.run`, with user mistakes turned into one line and
exit code 2.

Exit codes: 0 done; 2 a user error (bad flag, data, checkpoint, non-finite weights, failed export); 130 / 143
stopped by SIGINT / SIGTERM (after a resume checkpoint when ``--save_every`` is on).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from types import MappingProxyType

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from coati.checkpoint.export import ExportError, NonFiniteWeightsError
from coati.checkpoint.safe_load import CheckpointError
from coati.cli.options import DefaultsOnceHelpFormatter, checked
from coati.cli.recipe import read_recipe
from coati.config import ALIASES, GROUPS, TrainConfig
from coati.data.formats import DataFormatError
from coati.models.cache import CacheError
from coati.preflight import registries, resolve_auto, validate
from coati.run import run
from coati.signals import Interrupted, signals_raise
from coati.strategies import StrategyUnavailable
from coati.strategies.distributed import end_process
from coati.trainer import NonFiniteError

#: what a user's mistake raises: one ``error: ...`` line and exit code 2, never a traceback
USER_ERRORS = (ValueError, FileNotFoundError, StrategyUnavailable, DataFormatError, PermissionError,
               CheckpointError, NonFiniteError, NonFiniteWeightsError, ExportError, CacheError)


def or_auto(convert):
    """An argparse ``type`` that reads ``auto`` as None (the field's "resolve it for this run") and anything else
    with ``convert``."""
    def read(text: str):
        return None if text == "auto" else convert(text)
    read.__name__ = convert.__name__
    return read


class _SetAlias(argparse.Action):
    """An old flag merged into another one (``--bf16 [true|false]`` sets ``--mixed_precision``)."""

    def __call__(self, parser, namespace, value, option_string=None):
        target, convert = ALIASES[self.dest]
        setattr(namespace, target, convert(value))


class _Parser(HfArgumentParser):
    """``HfArgumentParser`` whose numeric flags also carry their :class:`Range` (the field's ``valid``), whose
    ``auto`` fields (metadata ``auto=True``: None in the dataclass) show and take ``auto``, and whose errors are one
    ``error: ...`` line (no usage block of 60 flags)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")

    @staticmethod
    def _parse_dataclass_field(parser, f: dataclasses.Field):
        shadow = copy.copy(f)
        meta = {k: v for k, v in f.metadata.items() if k not in ("valid", "auto")}
        shadow.metadata = MappingProxyType(dict(meta, help=meta["help"].replace("%", "%%")))  # argparse formats help
        HfArgumentParser._parse_dataclass_field(parser, shadow)
        for option in [o for o in parser._option_string_actions if "-" in o[2:]]:  # Coati's flags: underscores only
            parser._option_string_actions.pop(option).option_strings.remove(option)
        action = parser._option_string_actions[f"--{f.name}"]
        if f.metadata.get("valid") is not None:
            action.type = checked(action.type, f.metadata["valid"])
        if f.metadata.get("auto"):  # a string default goes through `type` too: "auto" -> None
            action.type, action.default = or_auto(action.type), "auto"


def build_parser() -> argparse.ArgumentParser:
    """The parser: one ``--<field>`` flag per option of every group (``--help`` lists them by group), the merged
    old spellings (``--bf16``, ``--zero_cpu_offload``) and ``--config``.

    Numeric flags carry their :class:`Range` as the argparse ``type``, so ``--lr inf`` or ``--max_steps 0`` stop at
    parse time with ``argument --lr: must be a finite number > 0, got 'inf'`` (exit code 2).
    """
    for name, cls in GROUPS.items():
        cls._argument_group_name = name
    parser = _Parser(list(GROUPS.values()), prog="train_reward_model.py", formatter_class=DefaultsOnceHelpFormatter,
                     description="Train a reward model (backbone + value head) on preference pairs.")
    for name, registry in registries().items():
        parser._option_string_actions[f"--{name}"].choices = tuple(registry)
    parser.add_argument("--bf16", dest="bf16", action=_SetAlias, nargs="?", const=True, type=string_to_bool,
                        default=argparse.SUPPRESS, help="same as --mixed_precision bf16 (--bf16 false: fp32)")
    parser.add_argument("--config", metavar="RECIPE", default=None,
                        help="a YAML or JSON file of options (flag name: value), e.g. examples/*.yaml or the "
                             "train_config.json of an export; flags on the command line override it")
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse CLI arguments (and the ``--config`` recipe they name) into a validated :class:`TrainConfig`, with
    ``--lr auto`` and ``--mixed_precision auto`` resolved for this run (:func:`resolve_auto`).

    Raises:
        SystemExit: (from argparse, exit code 2) on an unknown flag, a bad value, a bad recipe or an invalid
            combination, with a one-line message naming the flag.
    """
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    recipe = pre.parse_known_args(argv)[0].config
    if recipe:
        try:
            parser.set_defaults(**read_recipe(recipe))
        except ValueError as e:
            parser.error(str(e))
    values = vars(parser.parse_args(argv))
    values.pop("config")
    cfg = resolve_auto(TrainConfig.from_dict(values))
    errors = validate(cfg)
    if errors:
        parser.error("; ".join(errors))
    return cfg


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse flags, run, and turn user mistakes into one clear line on stderr (exit codes: see the module
    docstring). A rank of a multi-process run (torchrun) ends its process here with ``os._exit`` once its output is
    flushed, rather than returning: see :func:`coati.strategies.distributed.end_process`."""
    cfg = parse_args(argv)
    # the same mistake is found by every rank: say it once (rank 0); anything else is a crash of the rank
    # that raised it, shown by that rank, and torchrun then stops the others
    say = os.environ.get("RANK", "0") == "0"
    with signals_raise("training"):
        try:
            run(cfg, exit_after=True)
        except Interrupted as e:
            if say:
                print(f"error: {e}", file=sys.stderr)
            return end_process(e.exit_code)
        except KeyboardInterrupt:  # SIGINT before the handlers were installed
            if say:
                print("error: training was interrupted by SIGINT", file=sys.stderr)
            return end_process(130)
        except USER_ERRORS as e:
            if say:
                print(f"error: {e}", file=sys.stderr)
            return end_process(2)
    return end_process(0)


if __name__ == "__main__":
    sys.exit(main())
