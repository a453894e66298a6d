"""Every numeric flag is checked at parse time: a bad value stops with one line naming the flag (exit code 2)."""

import dataclasses
import typing

import pytest

from coati.config import TrainConfig, parse_args, validate

# (flag, a value that must be refused): every numeric flag, with the values the hostile-input report tried
BAD = [
    ("--lr", "inf"), ("--lr", "1e999"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1e-5"),
    ("--max_steps", "0"), ("--max_steps", "-1"), ("--max_epochs", "0"),
    ("--log_every", "0"), ("--eval_every", "-1"), ("--save_every", "-2"), ("--keep_last", "-1"),
    ("--max_grad_norm", "nan"), ("--max_grad_norm", "-1"), ("--max_grad_norm", "inf"),
    ("--warmup_ratio", "-1"), ("--warmup_ratio", "1.5"), ("--warmup_ratio", "nan"),
    ("--weight_decay", "-0.1"), ("--weight_decay", "inf"), ("--adam_eps", "0"), ("--adam_eps", "nan"),
    ("--batch_size", "0"), ("--batch_size", "2.5"), ("--accumulation_steps", "0"), ("--eval_batch_size", "0"),
    ("--max_bad_steps", "0"), ("--max_len", "4"), ("--max_tokens_per_batch", "-1"),
    ("--max_samples", "0"), ("--max_eval_samples", "0"), ("--eval_split", "1"), ("--eval_split", "-0.1"),
    ("--lora_rank", "-1"), ("--lora_alpha", "0"), ("--lora_dropout", "1"), ("--focal_gamma", "-1"),
    ("--penalty_weight", "nan"), ("--reward_bound", "0"), ("--center_rewards_coefficient", "-1"),
    ("--dist_timeout", "0"), ("--dist_timeout", "inf"), ("--zero_stage", "1"), ("--seed", "-1"),
    ("--seed", str(2 ** 32)), ("--gradient_checkpointing_ratio", "0"), ("--gradient_checkpointing_ratio", "1.1"),
]


@pytest.mark.parametrize("flag, value", BAD)
def test_a_bad_number_stops_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args([f"{flag}={value}"])  # the = form: argparse would read "-1" as a flag
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: must be " in last and repr(value) in last, last


def test_every_numeric_field_has_a_rule():
    hints = typing.get_type_hints(TrainConfig)
    fields = [f for f in dataclasses.fields(TrainConfig)
              if any(t in (int, float) for t in (hints[f.name], *typing.get_args(hints[f.name])))]
    assert len(fields) > 25
    assert [f.name for f in fields if f.metadata.get("valid") is None] == []


def test_valid_edges_are_accepted():
    cfg = parse_args(["--max_grad_norm", "0", "--warmup_ratio", "0", "--warmup_ratio", "1", "--eval_split", "0",
                      "--save_every", "0", "--keep_last", "0", "--max_steps", "1", "--seed", "0",
                      "--gradient_checkpointing_ratio", "1", "--lora_dropout", "0.5", "--zero_stage", "2"])
    assert (cfg.max_grad_norm, cfg.warmup_ratio, cfg.keep_last, cfg.max_steps, cfg.zero_stage) == (0.0, 1.0, 0, 1, 2)


def test_a_config_built_in_code_is_checked_too():
    assert validate(TrainConfig()) == []
    assert validate(TrainConfig(lr=float("nan"), max_steps=0, log_every=0)) == [
        "--max_steps: must be an integer >= 1, got 0", "--lr: must be a finite number > 0, got nan",
        "--log_every: must be an integer >= 1, got 0"]


def test_resume_and_init_from_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--resume", "auto", "--init_from", "x"])
    assert "give one of them" in capsys.readouterr().err
