"""Every numeric flag is checked at parse time: a bad value stops with one line naming the flag (exit code 2)."""

import json
import typing

import pytest

from coati.cli.train import parse_args
from coati.config import GROUPS, TrainConfig, option_fields
from coati.preflight import validate

# (flag, a value that must be refused): every numeric flag, with the values the hostile-input report tried
BAD = [
    ("--lr", "inf"), ("--lr", "1e999"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1e-5"),
    ("--max_steps", "0"), ("--max_steps", "-1"), ("--max_epochs", "0"),
    ("--log_every", "0"), ("--eval_every", "-1"), ("--save_every", "-2"), ("--keep_last", "-1"),
    ("--max_grad_norm", "nan"), ("--max_grad_norm", "-1"), ("--max_grad_norm", "inf"),
    ("--warmup_ratio", "-1"), ("--warmup_ratio", "1.5"), ("--warmup_ratio", "nan"),
    ("--warmup_steps", "-1"), ("--warmup_steps", "2.5"), ("--warmup_steps", "inf"), ("--lr", "automatic"),
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
    hints = {name: typing.get_type_hints(GROUPS[group])[name] for name, (group, _) in option_fields().items()}
    fields = [(name, f) for name, (group, f) in option_fields().items()
              if any(t in (int, float) for t in (hints[name], *typing.get_args(hints[name])))]
    assert len(fields) > 25
    assert [name for name, f in fields if f.metadata.get("valid") is None] == []


def test_valid_edges_are_accepted():
    cfg = parse_args(["--max_grad_norm", "0", "--warmup_ratio", "0", "--warmup_ratio", "1", "--eval_split", "0",
                      "--save_every", "0", "--keep_last", "0", "--max_steps", "1", "--seed", "0",
                      "--gradient_checkpointing_ratio", "1", "--lora_dropout", "0.5", "--strategy", "fsdp",
                      "--zero_stage", "2"])
    assert (cfg.optim.max_grad_norm, cfg.optim.warmup_ratio, cfg.optim.keep_last, cfg.optim.max_steps,
            cfg.strategy.zero_stage) == (0.0, 1.0, 0, 1, 2)


def test_a_config_built_in_code_is_checked_too():
    assert validate(TrainConfig()) == []
    assert validate(TrainConfig.from_dict(dict(lr=float("nan"), max_steps=0, log_every=0))) == [
        "--max_steps: must be an integer >= 1, got 0", "--lr: must be a finite number > 0, got nan",
        "--log_every: must be an integer >= 1, got 0"]


def test_resume_and_init_from_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--resume", "auto", "--init_from", "x"])
    assert "give one of them" in capsys.readouterr().err


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--focal_gamma", "3"], "--focal_gamma is not used by --loss_fn log_sig (only by focal)"),
    (["--reward_bound", "2", "--penalty", "l2"], "--reward_bound is not used by --penalty l2 (only by log_barrier)"),
    (["--penalty_weight", "0.1"], "--penalty_weight is not used by --penalty none (only by log_barrier, l2)"),
    (["--zero_stage", "2"], "--zero_stage is not used by --strategy ddp (only by fsdp)"),
    (["--placement_policy", "auto", "--strategy", "fsdp"], "--placement_policy is not used by --strategy fsdp"),
    (["--strategy", "colossalai_ddp", "--save_every", "5"], "--strategy colossalai_ddp cannot write or read resume"),
    (["--strategy", "colossalai_gemini", "--lora_rank", "4"], "--strategy colossalai_gemini does not support LoRA"),
    (["--mixed_precision", "fp16"], "--strategy ddp trains in fp32 or bf16, not --mixed_precision fp16"),
])
def test_an_option_the_chosen_component_does_not_take_is_refused(argv, message, capsys):
    assert message in _refused(argv, capsys)


def test_the_chosen_components_take_their_options():
    cfg = parse_args(["--loss_fn", "focal", "--focal_gamma", "3", "--penalty", "log_barrier", "--reward_bound", "2",
                      "--penalty_weight", "0.1", "--strategy", "fsdp", "--zero_stage", "2", "--cpu_offload"])
    assert (cfg.loss.focal_gamma, cfg.loss.reward_bound, cfg.strategy.zero_stage, cfg.strategy.cpu_offload) == \
        (3.0, 2.0, 2, True)


@pytest.mark.parametrize("native", [False, True])
def test_merged_flags_keep_their_old_spelling(native, monkeypatch):
    monkeypatch.setattr("coati.preflight.native_bf16", lambda device_type: native)  # the old spelling wins either way
    assert parse_args(["--bf16"]).strategy.mixed_precision == "bf16"
    assert parse_args(["--bf16", "false"]).strategy.mixed_precision == "fp32"
    assert parse_args(["--mixed_precision", "bf16", "--bf16", "false"]).strategy.mixed_precision == "fp32"
    assert parse_args(["--strategy", "fsdp", "--zero_cpu_offload"]).strategy.cpu_offload is True
    assert parse_args([]).strategy.mixed_precision == ("bf16" if native else "fp32")  # auto (tests/test_preflight.py)


def test_a_recipe_sets_options_and_the_command_line_overrides_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: bloom\nlr: 2.0e-4\ndataset: oaast-rm-zh\nbf16: true\npacking: false\n"
                      "max_len: '128'\n")
    cfg = parse_args(["--config", str(recipe), "--lr", "1e-3"])
    assert (cfg.backbone.model, cfg.optim.lr, cfg.data.dataset, cfg.strategy.mixed_precision, cfg.data.packing,
            cfg.data.max_len) == ("bloom", 1e-3, ["oaast-rm-zh"], "bf16", False, 128)
    as_json = tmp_path / "r.json"
    as_json.write_text(json.dumps(cfg.to_dict()))
    assert parse_args(["--config", str(as_json)]) == cfg


@pytest.mark.parametrize("text, message", [
    ("lrr: 0.1\n", "bad.yaml: unknown option 'lrr' (did you mean 'lr'?)"),
    ("- lr\n", "bad.yaml: expected a mapping of option names to values"),
    ("lr: [1\n", "bad.yaml: cannot read it"),
    ("lr: -1\n", "--lr: must be a finite number > 0, got -1"),
    ("lr: '-1'\n", "argument --lr: must be a finite number > 0, got '-1'"),
    ("packing: 3\n", "--packing: must be true or false, got 3"),
    ("packing: maybe\n", "argument --packing: Truthy value expected: got maybe"),
    ("padding_side: middle\n", "--padding_side: must be one of right, left, got 'middle'"),
    ("model: gpt9\n", "--model: must be one of bloom, llama, internlm2, qwen2, qwen3, gemma3, mistral, auto, got 'gpt9'"),
    # a value of the wrong type is one line, not a traceback from deep inside the run
    ("dataset: 5\n", "bad.yaml: --dataset: must be a list of strings, got 5"),
    ("dataset: [hh-rlhf, {a: 1}]\n", "bad.yaml: --dataset: must be a list of strings, got ['hh-rlhf', {'a': 1}]"),
    ("model: 7\n", "bad.yaml: --model: must be a string, got 7"),
    ("pretrain: [a, b]\n", "bad.yaml: --pretrain: must be a string or null, got ['a', 'b']"),
    ("max_len: 512.5\n", "bad.yaml: --max_len: must be an integer, got 512.5"),
    # bounded: an alias bomb under a valid key, an alias cycle, deep nesting, binary
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\ndataset: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     "bad.yaml: expands to more than 100,000 values (YAML aliases reused over and over); refused"),
    ("dataset: &x [hh-rlhf, *x]\n", "bad.yaml: a YAML alias refers to a value that contains it (a cycle)"),
    ("dataset: " + "[" * 3000 + "]" * 3000 + "\n", "bad.yaml: nested too deeply"),
    ("lr: \udcff\n", "bad.yaml: not UTF-8 text"),
])
def test_a_bad_recipe_is_one_line(text, message, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(text.encode("utf-8", "surrogateescape"))
    last = _refused(["--config", str(recipe)], capsys)
    assert message in last, last


def test_a_recipe_larger_than_the_bound_is_refused_unread(tmp_path, capsys):
    from coati.cli.recipe import MAX_RECIPE_BYTES

    recipe = tmp_path / "big.yaml"
    recipe.write_text("lr: 0.1\n" + "#" * MAX_RECIPE_BYTES + "\n")
    assert "big.yaml: larger than 1 MiB" in _refused(["--config", str(recipe)], capsys)
