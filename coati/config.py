"""TrainConfig: every training option, once, in groups (backbone, LoRA, data, loss, strategy, optimisation, logging).

Each group is a dataclass whose field names are the flat command-line flags of Coati (``--max_len``, ``--lr``...);
:mod:`coati.cli.train` builds the parser from them (transformers' ``HfArgumentParser``), and each component is
built from its own group (the strategy from :class:`StrategyArgs`, the loss from :class:`LossArgs`...). A new option
is one field here. This module is a leaf: it imports nothing of coati. Each option checks itself
(:func:`value_problems`) and the rules between options live here too (:func:`rule_problems`); checks that need a
component (a backbone, a strategy, an installed package) are :func:`coati.preflight.validate`'s.
"""

from __future__ import annotations

import dataclasses
import math
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
        return kind + bounds


#: ``--report_to`` choices (:mod:`coati.reporting` writes each)
REPORT_TO = ("none", "tensorboard", "wandb")

POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1, integer=True)  # a count of at least one
NON_NEGATIVE_INT = Range(0, integer=True)
FRACTION = Range(0, 1)

# --------------------------------------------------------------------------------------- defaults that read the run
# `--lr auto`, `--mixed_precision auto` (resolved at parse time: :func:`resolve_auto`) and `--warmup_steps auto`
# (resolved once the planned steps are known: coati.trainer.plan_warmup). The evidence for each value is in
# docs/defaults.md; tests/test_preflight.py keeps those docs, --help and these constants in agreement.

#: peak AdamW learning rate of ``--lr auto`` with LoRA adapters (``--lora_rank`` > 0). Measured by coati: its main job
#: (examples/rm_bilingual.yaml, SmolLM2-135M + LoRA r16, bf16) reached held-out acc 0.614 at this rate. Published
#: LoRA reward-model defaults of the same order: ms-swift 1e-4, LLaMA-Factory's LoRA reward recipe 1e-4 (TRL's docs
#: suggest about 1e-3 with LoRA).
LR_LORA = 2e-4
#: peak AdamW learning rate of ``--lr auto`` for full fine-tuning (``--lora_rank 0``). Measured by coati
#: (benchmarks/README.md, "Equal wall time", 2026-12-07, AMD EPYC without AVX512, fp32): SmolLM2-135M-Instruct, full
#: fine-tuning, 15 minutes on the main job's pairs, held-out acc 0.585 at 1e-4 against 0.520 at 1e-5 (the value
#: before). TRL's RewardConfig default is 1e-4 too; ms-swift publishes 1e-5 and OpenRLHF train_rm 9e-6 for full
#: fine-tuning of larger models and longer runs, Skywork-Reward-V2 3e-6 (pass --lr for those).
LR_FULL = 1e-4
#: the most optimizer steps that ``--warmup_steps auto`` spends in linear warm-up
WARMUP_MAX_STEPS = 10
#: ``--max_text_chars``: the longest prompt message or answer a training row may hold (characters); as the server's
#: ``--max_chars``. Training cuts every sequence at ``--max_len`` tokens, so a longer text is only tokenized, never
#: trained on (two 10 MB answers once took 5.3 GB and 76 s)
MAX_TEXT_CHARS = 100_000
#: ``--max_line_bytes``: the longest line a JSON-lines data file may have; a longer one is skipped while it is read,
#: never held whole (a 13.7 MB .jsonl.gz expanding to one 3 GB line once ended in a MemoryError)
MAX_LINE_BYTES = 16 * 2**20


def _sci(x: float) -> str:
    """``2e-4`` rather than Python's ``0.0002`` (help text)."""
    return f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _opt(default: Any, help: str, valid: Range | None = None, **argparse_kwargs) -> Any:
    """A dataclass field carrying its CLI help, numeric rule (``valid``) and argparse extras (``choices``,
    ``aliases``) in metadata."""
    meta = {"help": help, "valid": valid, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelArgs:
    """The backbone, its weights and tokenizer, 4-/8-bit loading (QLoRA), the reward token, activation checkpointing."""

    model: str = _opt("llama", "backbone family (registry coati.models.backbones.BACKBONES), or auto: the family "
                               "whose model_type the --pretrain checkpoint's config.json names (logged)")
    pretrain: str | None = _opt(None, "pretrained weights: local HF folder, Hub id (online), a .gguf file, or an "
                                      "alias: 'smollm2-135m' (SmolLM2-135M-Instruct, Apache-2.0) or 'gemma3-270m' "
                                      "(Gemma 3 270M, the Gemma Terms of Use); omitted = random init from "
                                      "--model_config")
    model_config: str = _opt("tiny", "random-init config when --pretrain is omitted: a preset name of the backbone "
                                     "(e.g. tiny, small) or a config.json path")
    tokenizer: str | None = _opt(None, "tokenizer folder or Hub id; default: the backbone's own, or SmolLM2's for a "
                                       "random-init model")
    trust_remote_code: bool = _opt(False, "allow Hub remote code when loading (off by default)")
    reward_token: str = _opt("auto", "token appended to every answer where the reward is read: auto / eos (the "
                                     "EOS) or a token id (e.g. an unused vocabulary id)")
    gradient_checkpointing: bool = _opt(False, "recompute block activations in backward (less memory, ~30% "
                                               "more compute)")
    gradient_checkpointing_ratio: float = _opt(1.0, "with --gradient_checkpointing: share of the blocks recomputed "
                                                    "(the first ones); below 1 trades memory for speed",
                                              valid=Range(0, 1, lo_open=True))
    load_in_4bit: bool = _opt(False, "QLoRA: load the frozen backbone in 4 bits (bitsandbytes; needs --lora_rank); "
                                     "the LoRA adapters and the value head train in full precision")
    load_in_8bit: bool = _opt(False, "load the frozen backbone in 8 bits (bitsandbytes LLM.int8; needs --lora_rank)")
    bnb_4bit_quant_type: str = _opt("nf4", "with --load_in_4bit: the 4-bit data type (nf4 = NormalFloat4, QLoRA "
                                           "section 3)", choices=("nf4", "fp4"))
    bnb_4bit_double_quant: bool = _opt(True, "with --load_in_4bit: quantise the quantisation constants too "
                                             "(QLoRA section 3, double quantisation)")

    @property
    def quantized(self) -> bool:
        """True when the backbone loads in 4 or 8 bits."""
        return self.load_in_4bit or self.load_in_8bit


@dataclass
class LoraArgs:
    """LoRA adapters (peft); the value head is always trained in full."""

    lora_rank: int = _opt(0, "LoRA rank; 0 = full fine-tuning", valid=NON_NEGATIVE_INT)
    lora_alpha: float = _opt(16.0, "LoRA alpha (scaling = alpha / rank)", valid=POSITIVE)
    lora_dropout: float = _opt(0.0, "LoRA dropout", valid=Range(0, 1, hi_open=True))
    lora_train_bias: str = _opt("none", "which biases to train with LoRA", choices=("none", "all", "lora_only"))

    @property
    def uses_lora(self) -> bool:
        """Whether the run trains LoRA adapters (``--lora_rank`` > 0) rather than the whole backbone."""
        return isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank > 0


@dataclass
class DataArgs:
    """Which pairs, how they are rendered, tokenized and batched (packing)."""

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
    max_text_chars: int = _opt(MAX_TEXT_CHARS, "rows with a prompt message or answer longer than this many "
                                               "characters are skipped and counted", valid=COUNT)
    max_line_bytes: int = _opt(MAX_LINE_BYTES, "JSON-lines rows longer than this many bytes are skipped and "
                                               "counted without being read whole", valid=COUNT)
    max_responses: int | None = _opt(None, "ranked lists: keep the K best-ranked answers of each prompt (the "
                                           "answers dropped are counted in the data report; default: all)",
                                     valid=Range(2, integer=True))
    ties: str = _opt("drop", "answers judged equally good (equal scores or ranks, \"tie\": true, UltraFeedback's "
                             "score_chosen == score_rejected): drop (counted; a row with nothing but ties is "
                             "skipped), or keep them with a Bradley-Terry model with ties: rao_kupper (Rao and "
                             "Kupper 1967) or davidson (Davidson 1970), whose tie parameter is --tie_param",
                     choices=("drop", "rao_kupper", "davidson"))
    max_len: int = _opt(512, "max tokens per sequence (prompt truncated from the left; the EOS is always kept)",
                         valid=Range(8, integer=True))
    packing: bool = _opt(True, "pack the chosen and rejected sequences of each batch into rows without padding "
                               "between them (no attention across sequences); off = padded batches")
    share_prefix: bool = _opt(True, "compute the tokens that a prompt's answers share at their start (the prompt) "
                                    "once: packed rows hold one group [P, R1 .. RK] per prompt; padded batches run "
                                    "the prompts first and continue each answer through their key/value cache (not "
                                    "under --gradient_checkpointing or sequence parallelism, where padded batches "
                                    "keep one row per answer); rewards and gradients are unchanged")
    max_tokens_per_batch: int = _opt(0, "packed row capacity in tokens (0 = auto: the backbone's own, "
                                        "Backbone.row_capacity: the whole batch in one row with per-group "
                                        "attention, free of padding; rows of one group for BLOOM's dense mask)",
                                   valid=NON_NEGATIVE_INT)
    group_by_length: bool = _opt(False, "padded path: batch pairs of similar length together (less padding)")
    padding_side: str = _opt("right", "padding side of batches (rewards do not depend on it)",
                             choices=("right", "left"))
    chat_template: str = _opt("auto", "render conversations with the tokenizer's chat template: auto (when it has "
                                      "one), always, never", choices=("auto", "always", "never"))


@dataclass
class LossArgs:
    """The pairwise loss and the penalties on the rewards (:mod:`coati.losses`)."""

    loss_fn: str = _opt("log_sig", "pairwise loss (registry coati.losses.LOSSES)")
    focal_gamma: float = _opt(2.0, "focal loss gamma (0 = log_sig)", valid=NON_NEGATIVE)
    penalty: str = _opt("none", "penalty on the scores (registry coati.losses.PENALTIES)")
    penalty_weight: float = _opt(0.02, "weight of the penalty (averaged over chosen and rejected scores)",
                                 valid=NON_NEGATIVE)
    reward_bound: float = _opt(5.0, "log_barrier bound B: scores are kept inside (-B, B)", valid=POSITIVE)
    center_rewards_coefficient: float = _opt(0.0, "adds c * mean((r_c + r_r)^2) to keep rewards centred at 0",
                                             valid=NON_NEGATIVE)
    list_weighting: str = _opt("prompt", "ranked lists: weigh each prompt's C(K, 2) comparisons 1/C(K, 2), so every "
                                         "prompt counts once (prompt, InstructGPT), or every comparison the same "
                                         "(pair); pairs are unaffected", choices=("prompt", "pair"))
    margin_from_scores: bool = _opt(False, "scored lists: each comparison's margin is its score difference")
    length_head: bool = _opt(False, "ODIN (Chen et al. 2024, arXiv 2402.07319): a second linear head on the same "
                                    "hidden state carries answer length; the pairwise loss is taken on the sum of "
                                    "both heads, the quality head (the exported value head, the reward) is pushed "
                                    "to be uncorrelated with length and the length head to carry it; the length "
                                    "head is written beside the export as length_head.safetensors")
    length_loss_weight: float = _opt(1.0, "--length_head: weight of abs(corr(quality, length)) - corr(length "
                                          "head, length), Pearson correlations over each micro-batch on all ranks",
                                     valid=Range(0, 100))
    orthogonal_loss_weight: float = _opt(1.0, "--length_head: weight of abs(w_quality . w_length), keeping the "
                                              "two heads' weights orthogonal", valid=Range(0, 100))
    length_groups: str = _opt("language", "--length_head: language pools the correlations within each language of "
                                          "the micro-batch, so languages whose answers differ in length do not "
                                          "stand for length; batch takes one correlation over the whole micro-batch "
                                          "(ODIN as published)", choices=("language", "batch"))
    tie_param: float | None = _opt(None, "--ties rao_kupper / davidson: the tie parameter nu (log theta of Rao-"
                                         "Kupper, nu of Davidson), fixed during training; default auto = the value "
                                         "at which two answers with equal rewards tie with the probability of a "
                                         "tie in the training comparisons (0, plain Bradley-Terry, without ties); "
                                         "train_config.json records the value used", valid=NON_NEGATIVE, auto=True)


@dataclass
class StrategyArgs:
    """The distributed strategy and its precision (:mod:`coati.strategies`); each strategy takes some of these."""

    strategy: str = _opt("ddp", "distributed strategy (registry coati.strategies.STRATEGIES)")
    zero_stage: int = _opt(3, "fsdp: 2 keeps gathered parameters after forward, 3 reshards them (less memory)",
                           valid=Range(2, 3, integer=True))
    cpu_offload: bool = _opt(False, "keep optimizer state in CPU memory: fsdp also its sharded parameters, "
                                    "colossalai_zero2 also its fp32 master weights", aliases=["--zero_cpu_offload"])
    placement_policy: str = _opt("static", "colossalai_gemini: where Gemini places parameters",
                                 choices=("static", "auto"))
    mixed_precision: str = _opt("auto", "training precision; default auto = bf16 where the device computes bf16 "
                                        "natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX-BF16) and "
                                        "the strategy trains in bf16, else fp32 (colossalai_gemini, which has no "
                                        "fp32: fp16); TRL's, OpenRLHF's and LLaMA-Factory's defaults are bf16; "
                                        "train_config.json records the precision used. fp32; bf16 "
                                        "(autocast for the backbone, weights, optimizer and loss in fp32; "
                                        "ColossalAI's ZeRO plugins keep bf16 weights with fp32 master copies); fp16 "
                                        "(ColossalAI's ZeRO plugins only, with loss scaling). --bf16 is "
                                        "--mixed_precision bf16", choices=("auto", "fp32", "bf16", "fp16"))
    dist_timeout: float = _opt(1800.0, "seconds a collective may wait before every rank stops with an error",
                               valid=POSITIVE)
    sequence_parallel_size: int = _opt(1, "ddp/fsdp: split every batch's tokens over groups of S ranks (DeepSpeed-"
                                          "Ulysses all-to-all attention); the world is W/S data-parallel groups",
                                       valid=COUNT)


@dataclass
class OptimArgs:
    """Optimizer, schedule and the training loop: batch sizes, steps, evaluation and checkpoint intervals."""

    batch_size: int = _opt(4, "pairs per micro-batch per process", valid=COUNT)
    accumulation_steps: int = _opt(1, "micro-batches per optimizer step", valid=COUNT)
    max_epochs: int = _opt(1, "passes over the training pairs", valid=COUNT)
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (overrides max_epochs when reached); "
                                      "omit it to train --max_epochs epochs", valid=COUNT)
    max_train_minutes: float | None = _opt(None, "stop training once this much training time has passed (evaluation "
                                                 "and checkpoints not counted; the step under way finishes, on every "
                                                 "rank), then evaluate and export as at the end; the learning-rate "
                                                 "schedule still spans --max_steps / --max_epochs", valid=POSITIVE)
    lr: float | None = _opt(None, f"peak learning rate (AdamW); default auto = {_sci(LR_LORA)} with LoRA "
                                  "(--lora_rank > 0; coati's main job measured held-out acc 0.614 at it; ms-swift "
                                  f"and LLaMA-Factory publish 1e-4), {_sci(LR_FULL)} for full fine-tuning (coati "
                                  "measured held-out acc 0.585 at it against 0.520 at 1e-5 in 15 minutes on "
                                  "SmolLM2-135M; TRL's default too); train_config.json records the rate used",
                            valid=POSITIVE, auto=True)
    weight_decay: float = _opt(0.0, "AdamW weight decay", valid=NON_NEGATIVE)
    adam_eps: float = _opt(1e-8, "AdamW epsilon", valid=POSITIVE)
    warmup_ratio: float = _opt(0.03, "with --warmup_steps auto: share of the planned optimizer steps spent in "
                                     "linear warm-up before the cosine decay (rounded down, at most "
                                     f"{WARMUP_MAX_STEPS} steps)", valid=FRACTION)
    warmup_steps: int | None = _opt(None, "optimizer steps of linear warm-up before the cosine decay; default auto = "
                                          f"floor(--warmup_ratio x planned steps), at most {WARMUP_MAX_STEPS}, so a "
                                          "short run, or one that --max_train_minutes ends early, is not spent "
                                          "warming up (a 15-minute run planned at 918 steps spent 27 of the 60 it "
                                          "made in a 3% warm-up); a number: that many steps (--warmup_ratio is then "
                                          "unused)",
                                    valid=NON_NEGATIVE_INT, auto=True)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 disables", valid=NON_NEGATIVE)
    max_bad_steps: int = _opt(5, "stop after this many consecutive steps skipped for a non-finite loss or gradient",
                              valid=COUNT)
    seed: int = _opt(42, "seed for init, shuffling and dropout", valid=Range(0, 2**32, hi_open=True, integer=True))
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


@dataclass
class LogArgs:
    """Logging and output."""

    log_every: int = _opt(10, "log train metrics every N optimizer steps", valid=COUNT)
    save_path: str = _opt("out/rm", "export folder: HF model, tokenizer, train_config.json, metrics.jsonl; a "
                                    "run locks it, and a non-empty folder coati did not write is refused")
    overwrite_output_dir: bool = _opt(False, "export into a non-empty --save_path that coati did not write (its "
                                             "config.json, tokenizer and weights files are replaced)")
    export_adapter: bool = _opt(False, "with LoRA: also write the peft adapter and the value head to "
                                       "<save_path>/adapter (for users who keep the 4-bit or original base)")
    disable_tqdm: bool = _opt(False, "no progress bar")

    report_to: str = _opt("none", "where metrics rows also go (besides metrics.jsonl), on rank 0: none, "
                                 "tensorboard (event files in <save_path>/runs) or wandb (offline unless "
                                 "WANDB_MODE says otherwise)", choices=REPORT_TO)


#: group name -> its dataclass; TrainConfig has one attribute per group, in this order
GROUPS: dict[str, type] = {"backbone": ModelArgs, "lora": LoraArgs, "data": DataArgs, "loss": LossArgs,
                           "strategy": StrategyArgs, "optim": OptimArgs, "log": LogArgs}
#: old flag spellings merged into another flag: name -> (flag it sets, value it gives)
ALIASES: dict[str, tuple[str, Any]] = {"bf16": ("mixed_precision", lambda on: "bf16" if on else "fp32"),
                                       "zero_cpu_offload": ("cpu_offload", lambda on: on)}


def option_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every option: flag name -> (group name, dataclass field), in group order."""
    return {f.name: (group, f) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


@dataclass
class TrainConfig:
    """All options of ``train_reward_model.py``, one attribute per group (``cfg.optim.lr``, ``cfg.data.max_len``).

    ``to_dict`` / ``from_dict`` give and take the flat form (flag name -> value) that ``train_config.json`` and
    recipe files use.
    """

    backbone: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    strategy: StrategyArgs = field(default_factory=StrategyArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    log: LogArgs = field(default_factory=LogArgs)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from flat ``flag name -> value`` pairs (missing ones take their defaults).

        Raises:
            ValueError: an unknown name.
        """
        fields, kwargs = option_fields(), {g: {} for g in GROUPS}
        for name, value in values.items():
            if name not in fields:
                raise ValueError(f"unknown option {name!r}")
            kwargs[fields[name][0]][name] = value
        return cls(**{g: GROUPS[g](**kw) for g, kw in kwargs.items()})

    def to_dict(self) -> dict[str, Any]:
        """Flat, plain-JSON ``flag name -> value`` of every option."""
        return {k: v for g in GROUPS for k, v in dataclasses.asdict(getattr(self, g)).items()}

    def replace(self, **values) -> "TrainConfig":
        """A copy with some options (flat names) changed."""
        return TrainConfig.from_dict({**self.to_dict(), **values})


def option_hints() -> dict[str, Any]:
    """Flag name -> its field's type hint (``int``, ``str | None``, ``list[str]``...)."""
    return {name: hint for cls in GROUPS.values() for name, hint in typing.get_type_hints(cls).items()}


def has_type(hint: Any, value: Any) -> bool:
    """Whether ``value`` is of the type ``hint`` names (``bool`` is not an ``int``; an ``int`` is a ``float``)."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(has_type(h, value) for h in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(has_type(args[0], v) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def type_text(hint: Any) -> str:
    """``list[str] | None`` -> ``a list of strings or null``."""
    if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
        return " or ".join(type_text(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {type_text(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(hint, str(hint))


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def value_error(name: str, f: dataclasses.Field, hint: Any, value: Any, choices) -> str | None:
    rule = f.metadata.get("valid")
    if value is None and type(None) in typing.get_args(hint):
        return None
    if rule is not None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (rule.integer and not isinstance(value, int)) or not rule.ok(value):
            return f"--{name}: must be {rule.text}, got {short_repr(value)}"
    elif not has_type(hint, value):
        return f"--{name}: must be {type_text(hint)}, got {short_repr(value)}"
    if choices and value not in choices:
        return f"--{name}: must be one of {', '.join(map(str, choices))}, got {value!r}"
    return None


def value_problems(cfg: TrainConfig, choices: dict[str, tuple] | None = None) -> list[str]:
    """Each option checked on its own: its type, numeric :class:`Range` and choices (also for configs built in code
    or read from a recipe), as ``--flag: must be ..., got ...`` lines (empty when every value is valid).

    Args:
        choices: flag name -> the names its registry accepts (``--model``, ``--loss_fn``...), which this module does
            not know; other flags use their own ``choices``.
    """
    errors, flat, hints = [], cfg.to_dict(), option_hints()
    for name, (group, f) in option_fields().items():
        problem = value_error(name, f, hints[name], flat[name], (choices or {}).get(name) or f.metadata.get("choices"))
        if problem:
            errors.append(problem)
    return errors


def rule_problems(cfg: TrainConfig) -> list[str]:
    """The rules between options that need nothing but the options (``--export_adapter`` needs LoRA, ``--resume``
    and ``--init_from`` exclude each other...), one line each; for a config whose values passed
    :func:`value_problems`. Rules that need a component (a backbone's heads, a strategy's capabilities, an installed
    package) are :func:`coati.preflight.validate`'s."""
    errors = []
    if cfg.backbone.reward_token not in ("auto", "eos") and not cfg.backbone.reward_token.isdigit():
        errors.append(f"--reward_token: must be auto, eos or a token id, got {cfg.backbone.reward_token!r}")
    if cfg.log.export_adapter and not cfg.lora.uses_lora:
        errors.append("--export_adapter writes the LoRA adapter: add --lora_rank, or drop it (full fine-tuning "
                      "exports the whole model)")
    if cfg.backbone.model == "auto" and not (cfg.backbone.pretrain or cfg.optim.init_from):
        errors.append("--model auto reads the backbone family from a checkpoint: give --pretrain (or --init_from an "
                      "export), or name the family for a random init (e.g. --model llama)")
    if cfg.optim.resume and cfg.optim.init_from:
        errors.append("--resume continues a run and --init_from starts a new one from a checkpoint's weights: "
                      "give one of them")
    if cfg.data.ties != "drop" and cfg.loss.loss_fn not in ("log_sig", "log_exp"):
        errors.append(f"--ties {cfg.data.ties} is a Bradley-Terry model with ties, so it replaces log_sig / log_exp: "
                      f"not with --loss_fn {cfg.loss.loss_fn}")
    for name in ("length_loss_weight", "orthogonal_loss_weight", "length_groups"):
        if not cfg.loss.length_head and getattr(cfg.loss, name) != getattr(LossArgs(), name):
            errors.append(f"--{name} is an option of --length_head: add --length_head, or drop it")
    if cfg.loss.tie_param is not None and cfg.data.ties == "drop":
        errors.append("--tie_param is the tie parameter of --ties rao_kupper / davidson: drop it, or keep the ties")
    return errors
