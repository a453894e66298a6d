"""TrainConfig: the single source of truth for every training option.

The argparse parser is generated from the dataclass fields, so a new option is one field here. The resolved config
is saved as ``train_config.json`` next to every export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: finite, within ``[lo, hi]`` (open ends with ``lo_open`` / ``hi_open``).

    ``text`` is the rule as the error message says it, e.g. ``a finite number > 0``.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    note: str = ""

    def ok(self, value: float) -> bool:
        """Whether ``value`` obeys the rule (NaN and infinities never do)."""
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    @property
    def text(self) -> str:
        """E.g. ``an integer >= 1`` or ``a finite number in [0, 1)``."""
        kind = "an integer" if self.integer else "a finite number"
        num = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"  # noqa: E731
        if self.lo is not None and self.hi is not None:
            bounds = f" in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            bounds = f" {'>' if self.lo_open else '>='} {num(self.lo)}"
        elif self.hi is not None:
            bounds = f" {'<' if self.hi_open else '<='} {num(self.hi)}"
        else:
            bounds = ""
        return kind + bounds + (f" ({self.note})" if self.note else "")


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1, integer=True)  # a count of at least one
NON_NEGATIVE_INT = Range(0, integer=True)
FRACTION = Range(0, 1)


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, nargs: str | None = None,
         valid: Range | None = None) -> Any:
    """A dataclass field carrying its CLI help text, choices and numeric rule (``valid``) in metadata."""
    meta = {"help": help, "choices": choices, "nargs": nargs, "valid": valid}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All options of ``train_reward_model.py``; field names are the CLI flags (``--max_len`` etc.).

    Registry-backed choices (``model``, ``loss_fn``, ``strategy``) are validated against their registries in
    :func:`parse_args`, so the CLI choices cannot drift from the code.
    """

    # backbone
    model: str = _opt("llama", "backbone family (registry coati.models.backbones.BACKBONES)")
    pretrain: str | None = _opt(None, "pretrained weights: local HF folder, Hub id (online), a .gguf file, or the alias "
                                      "'smollm2-135m'; omitted = random init from --model_config")
    model_config: str = _opt("tiny", "random-init config when --pretrain is omitted: a preset name of the backbone "
                                     "(e.g. tiny, small) or a config.json path")
    tokenizer: str | None = _opt(None, "tokenizer folder or Hub id; default: the backbone's own, or SmolLM2's for a "
                                       "random-init model")
    trust_remote_code: bool = _opt(False, "allow Hub remote code when loading (off by default)")
    # LoRA
    lora_rank: int = _opt(0, "LoRA rank; 0 = full fine-tuning", valid=NON_NEGATIVE_INT)
    lora_alpha: float = _opt(16.0, "LoRA alpha (scaling = alpha / rank)", valid=POSITIVE)
    lora_dropout: float = _opt(0.0, "LoRA dropout", valid=Range(0, 1, hi_open=True))
    lora_train_bias: str = _opt("none", "which biases to train with LoRA", choices=("none", "all", "lora_only"))
    # loss
    loss_fn: str = _opt("log_sig", "pairwise loss (registry coati.losses.LOSSES)")
    focal_gamma: float = _opt(2.0, "focal loss gamma (0 = log_sig)", valid=NON_NEGATIVE)
    penalty: str = _opt("none", "penalty on the scores (registry coati.losses.PENALTIES)")
    penalty_weight: float = _opt(0.02, "weight of the penalty (averaged over chosen and rejected scores)",
                                 valid=NON_NEGATIVE)
    reward_bound: float = _opt(5.0, "log_barrier bound B: scores are kept inside (-B, B)", valid=POSITIVE)
    center_rewards_coefficient: float = _opt(0.0, "adds c * mean((r_c + r_r)^2) to keep rewards centred at 0",
                                             valid=NON_NEGATIVE)
    reward_token: str = _opt("auto", "token appended to every answer where the reward is read: auto / eos (the "
                                     "EOS) or a token id (e.g. an unused vocabulary id)")
    # data
    dataset: list[str] = _opt(["hh-rlhf"], "named datasets, local files (.jsonl/.jsonl.gz/.json/.parquet) or Hub ids",
                              nargs="+")
    data_dir: str | None = _opt(None, "where named datasets are looked up first (default: env COATI_DATA_DIR)")
    eval_dataset: list[str] | None = _opt(None, "evaluation datasets (same forms as --dataset)", nargs="+")
    eval_split: float = _opt(0.0, "fraction of --dataset held out for evaluation (deterministic, by content hash) "
                                  "when --eval_dataset is not given", valid=Range(0, 1, hi_open=True))
    max_samples: int | None = _opt(None, "at most N pairs per dataset (first N usable rows, in file order)",
                                   valid=COUNT)
    max_eval_samples: int | None = _opt(None, "at most N evaluation pairs per eval dataset", valid=COUNT)
    strict_data: bool = _opt(False, "stop at the first bad row (file:line) instead of skipping and counting it")
    max_len: int = _opt(512, "max tokens per sequence (prompt truncated from the left; the EOS is always kept)",
                         valid=Range(8, integer=True))
    packing: bool = _opt(True, "pack the chosen and rejected sequences of each batch into rows without padding "
                               "between them (no attention across sequences); off = padded batches")
    share_prefix: bool = _opt(True, "packing: compute the tokens that chosen and rejected share at their start (the "
                                    "prompt) once per pair; rewards and gradients are unchanged")
    max_tokens_per_batch: int = _opt(0, "packed row capacity in tokens (0 = auto: LLaMA and InternLM2 put the whole "
                                        "batch in one row, which their per-sequence attention makes free of "
                                        "padding; BLOOM, whose packed attention is a dense mask, uses rows of "
                                        "2 x --max_len, or --max_len without --share_prefix)",
                                   valid=NON_NEGATIVE_INT)
    group_by_length: bool = _opt(False, "padded path: batch pairs of similar length together (less padding)")
    padding_side: str = _opt("right", "padding side of batches (rewards do not depend on it)",
                             choices=("right", "left"))
    chat_template: str = _opt("auto", "render conversations with the tokenizer's chat template: auto (when it has "
                                      "one), always, never", choices=("auto", "always", "never"))
    # strategy
    strategy: str = _opt("ddp", "distributed strategy (registry coati.strategies.STRATEGIES)")
    zero_stage: int = _opt(3, "fsdp: 2 keeps gathered parameters after forward, 3 reshards them (less memory)",
                            valid=Range(2, 3, integer=True))
    cpu_offload: bool = _opt(False, "fsdp: keep sharded parameters and optimizer state in CPU memory")
    zero_cpu_offload: bool = _opt(False, "colossalai_zero2: offload optimizer state to CPU")
    placement_policy: str = _opt("static", "colossalai_gemini: where Gemini places parameters",
                                 choices=("static", "auto"))
    mixed_precision: str = _opt("bf16", "colossalai_*: training precision of the ColossalAI plugin",
                                choices=("bf16", "fp16"))
    dist_timeout: float = _opt(1800.0, "seconds a collective may wait before every rank stops with an error",
                               valid=POSITIVE)
    # optimisation
    batch_size: int = _opt(4, "pairs per micro-batch per process", valid=COUNT)
    accumulation_steps: int = _opt(1, "micro-batches per optimizer step", valid=COUNT)
    max_epochs: int = _opt(1, "passes over the training pairs", valid=COUNT)
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (overrides max_epochs when reached); "
                                      "omit it to train --max_epochs epochs", valid=COUNT)
    lr: float = _opt(5e-6, "peak learning rate (AdamW)", valid=POSITIVE)
    weight_decay: float = _opt(0.0, "AdamW weight decay", valid=NON_NEGATIVE)
    adam_eps: float = _opt(1e-8, "AdamW epsilon", valid=POSITIVE)
    warmup_ratio: float = _opt(0.03, "share of optimizer steps spent in linear warmup before the cosine decay",
                               valid=FRACTION)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 disables", valid=NON_NEGATIVE)
    max_bad_steps: int = _opt(5, "stop after this many consecutive steps skipped for a non-finite loss or gradient",
                              valid=COUNT)
    gradient_checkpointing: bool = _opt(False, "recompute block activations in backward (less memory, ~30% "
                                               "more compute)")
    gradient_checkpointing_ratio: float = _opt(1.0, "with --gradient_checkpointing: share of the blocks recomputed "
                                                    "(the first ones); below 1 trades memory for speed",
                                              valid=Range(0, 1, lo_open=True))
    bf16: bool = _opt(False, "bf16 autocast for the backbone (weights, optimizer and loss stay fp32)")
    seed: int = _opt(42, "seed for init, shuffling and dropout", valid=Range(0, 2**32, hi_open=True, integer=True))
    # logging / output
    log_every: int = _opt(10, "log train metrics every N optimizer steps", valid=COUNT)
    eval_every: int = _opt(0, "evaluate every N optimizer steps (0 = only at the end)", valid=NON_NEGATIVE_INT)
    eval_batch_size: int | None = _opt(None, "pairs per evaluation batch per process (default: --batch_size)",
                                       valid=COUNT)
    save_every: int = _opt(0, "write a resume checkpoint every N optimizer steps (0 = never)", valid=NON_NEGATIVE_INT)
    keep_last: int = _opt(2, "resume checkpoints to keep, oldest deleted first (0 = keep all)", valid=NON_NEGATIVE_INT)
    resume: str | None = _opt(None, "resume from 'auto' (newest valid checkpoint in --save_path) or a checkpoint "
                                    "folder; the run's settings and data must be the checkpoint's")
    init_from: str | None = _opt(None, "start a new run from the weights of a resume checkpoint folder or of an "
                                       "export folder (value head included; for an export also its tokenizer): a "
                                       "fresh optimizer, schedule and step, other settings allowed")
    save_path: str = _opt("out/rm", "export folder: HF model, tokenizer, train_config.json, metrics.jsonl")
    disable_tqdm: bool = _opt(False, "no progress bar")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of all fields."""
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        """Write the config as JSON to ``path`` (creates parent folders)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)


def _str2bool(value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def _registry_choices() -> dict[str, tuple[str, ...]]:
    from coati.losses import LOSSES, PENALTIES
    from coati.models.backbones import BACKBONES
    from coati.strategies import STRATEGIES

    return {"model": tuple(BACKBONES), "loss_fn": tuple(LOSSES), "penalty": tuple(PENALTIES),
            "strategy": tuple(STRATEGIES)}


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


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one ``--<field>`` flag per :class:`TrainConfig` field, defaults shown in ``--help``.

    Numeric flags carry their :class:`Range` as the argparse ``type``, so ``--lr inf`` or ``--max_steps 0`` stop at
    parse time with ``argument --lr: must be a finite number > 0, got 'inf'`` (exit code 2).
    """
    parser = argparse.ArgumentParser(
        prog="train_reward_model.py",
        description="Train a reward model (backbone + value head) on preference pairs.",
        formatter_class=DefaultsOnceHelpFormatter,
    )
    registry = _registry_choices()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"default": default, "help": meta["help"].replace("%", "%%")}  # argparse formats help
        choices = registry.get(f.name) or meta.get("choices")
        if choices:
            kwargs["choices"] = choices
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        base = next((t for t in (bool, int, float) if t in typing.get_args(hints[f.name]) or hints[f.name] is t), None)
        if base is bool:
            kwargs.update(type=_str2bool, nargs="?", const=True)
        elif base is not None:
            kwargs["type"] = checked(base, meta.get("valid"))
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def validate(cfg: TrainConfig) -> list[str]:
    """Every rule a config breaks, as ``--flag: must be ..., got ...`` lines (empty when valid).

    Covers the numeric :class:`Range` of each field (also for configs built in code) and the rules between fields.
    """
    errors = []
    for f in dataclasses.fields(TrainConfig):
        rule, value = f.metadata.get("valid"), getattr(cfg, f.name)
        if rule is None or value is None or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)) or (rule.integer and not isinstance(value, int)) \
                or not rule.ok(value):
            errors.append(f"--{f.name}: must be {rule.text}, got {value!r}")
    if cfg.reward_token not in ("auto", "eos") and not cfg.reward_token.isdigit():
        errors.append(f"--reward_token: must be auto, eos or a token id, got {cfg.reward_token!r}")
    if cfg.resume and cfg.init_from:
        errors.append("--resume continues a run and --init_from starts a new one from a checkpoint's weights: "
                      "give one of them")
    return errors


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse CLI arguments into a validated :class:`TrainConfig`.

    Raises:
        SystemExit: (from argparse, exit code 2) on an unknown flag, a bad value or an invalid combination, with a
            one-line message naming the flag.
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    errors = validate(cfg)
    if errors:
        parser.error("; ".join(errors))
    return cfg
