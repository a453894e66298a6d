"""The defaults a user gets without flags: ``--lr auto`` per fine-tuning mode, ``--mixed_precision auto`` from what
the device computes natively, a warm-up bounded for short and time-limited runs, and the docs (the flags tables of
docs/training.md, docs/defaults.md) and ``--help`` saying the same values as the code."""

import json
import re

import pytest
import torch

import coati.config as config
import coati.preflight as preflight
from coati.cli.train import build_parser, parse_args
from coati.config import LR_FULL, LR_LORA, WARMUP_MAX_STEPS, OptimArgs, TrainConfig
from coati.preflight import auto_precision, native_bf16, resolve_auto, validate
from coati.trainer import plan_warmup

from helpers import REPO

TRAINING = (REPO / "docs" / "training.md").read_text(encoding="utf-8")  # the flags tables (scripts/flags_table.py)
DEFAULTS = (REPO / "docs" / "defaults.md").read_text(encoding="utf-8")  # "Defaults and why"


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(flags)``: no CUDA, and a processor whose ``/proc/cpuinfo`` flags are ``flags`` (None: unreadable)."""
    def set_(flags):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(preflight, "_cpu_flags", lambda: None if flags is None else frozenset(flags))
    return set_


@pytest.fixture
def cuda(monkeypatch):
    """``cuda(bf16)``: a visible CUDA GPU that has (or lacks) native bf16; the CPU has none."""
    def set_(bf16: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(preflight, "_cpu_flags", lambda: frozenset({"avx2"}))
    return set_


# ------------------------------------------------------------------------------------------------- --lr auto

def test_lr_auto_is_one_rate_per_fine_tuning_mode(cpu):
    cpu({"avx2"})
    assert (LR_LORA, LR_FULL) == (2e-4, 1e-4)
    assert parse_args([]).optim.lr == LR_FULL
    assert parse_args(["--lora_rank", "16"]).optim.lr == LR_LORA
    assert parse_args(["--lr", "auto", "--lora_rank", "4"]).optim.lr == LR_LORA
    assert parse_args(["--lora_rank", "16", "--lr", "3e-5"]).optim.lr == 3e-5  # an explicit rate is kept


def test_the_resolved_values_are_what_train_config_json_records(cpu, tmp_path):
    cpu({"avx512_bf16"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: auto\nmixed_precision: auto\nwarmup_steps: auto\nlora_rank: 8\n")
    cfg = parse_args(["--config", str(recipe)])
    assert (cfg.optim.lr, cfg.strategy.mixed_precision, cfg.optim.warmup_steps) == (LR_LORA, "bf16", None)
    written = tmp_path / "train_config.json"  # what coati.run.export writes: cfg.to_dict()
    written.write_text(json.dumps(cfg.to_dict()))
    assert json.loads(written.read_text())["lr"] == LR_LORA
    cpu({"avx2"})  # rerun elsewhere: the recorded values, not this machine's auto
    assert parse_args(["--config", str(written)]) == cfg


def test_a_config_built_in_code_resolves_and_validates(cpu):
    cpu(set())
    raw = TrainConfig()
    assert (raw.optim.lr, raw.strategy.mixed_precision, raw.optim.warmup_steps) == (None, "auto", None)
    assert validate(raw) == []
    resolved = resolve_auto(TrainConfig.from_dict({"lr": "auto", "warmup_steps": "auto", "lora_rank": 2}))
    assert (resolved.optim.lr, resolved.strategy.mixed_precision, resolved.optim.warmup_steps) == (LR_LORA, "fp32",
                                                                                                   None)
    explicit = TrainConfig.from_dict({"lr": 1e-3, "mixed_precision": "fp16", "strategy": "colossalai_zero2"})
    assert resolve_auto(explicit) is explicit  # nothing auto: unchanged
    assert validate(TrainConfig.from_dict({"lr": "fast"})) == ["--lr: must be a finite number > 0, got 'fast'"]


# ------------------------------------------------------------------------------------- --mixed_precision auto

@pytest.mark.parametrize("flags, native", [
    ({"avx2", "avx512f"}, False),
    ({"avx2", "avx512f", "avx512_bf16"}, True),  # AMD Zen 4, Intel Cooper Lake and later
    ({"avx2", "amx_tile", "amx_bf16"}, True),  # Intel Sapphire Rapids and later
    (set(), False),
])
def test_cpu_bf16_is_native_with_avx512_bf16_or_amx(flags, native, cpu):
    cpu(flags)
    assert native_bf16("cpu") is native
    assert parse_args([]).strategy.mixed_precision == ("bf16" if native else "fp32")
    assert native_bf16("mps") is False


def test_without_proc_cpuinfo_torchs_own_check_decides(cpu, monkeypatch):
    cpu(None)
    for answer in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: answer)
        assert native_bf16("cpu") is answer


@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_bf16_follows_the_gpu(bf16, cuda):
    cuda(bf16)
    assert native_bf16("cuda") is bf16 and native_bf16("cpu") is False
    assert auto_precision("ddp") == ("bf16" if bf16 else "fp32")
    assert auto_precision("colossalai_zero2") == ("bf16" if bf16 else "fp32")
    assert auto_precision("colossalai_gemini") == ("bf16" if bf16 else "fp16")  # Gemini has no fp32


def test_cuda_check_that_fails_means_no_native_bf16(monkeypatch):
    def broken(including_emulation=True):
        raise AssertionError("Torch not compiled with CUDA enabled")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", broken)
    assert native_bf16("cuda") is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_one_every_strategy_accepts(native, monkeypatch):
    from coati.strategies import STRATEGIES

    monkeypatch.setattr(preflight, "native_bf16", lambda device_type: native)
    for name, cls in STRATEGIES.items():
        chosen = auto_precision(name)
        assert chosen in cls.precisions, (name, chosen)
        cfg = resolve_auto(TrainConfig.from_dict({"strategy": name}))
        assert cfg.strategy.mixed_precision == chosen
        assert not [e for e in cls.refusals(cfg) if "--mixed_precision" in e]


def test_explicit_precisions_and_the_old_flag_are_kept(cpu):
    cpu({"avx512_bf16"})
    assert [parse_args(a).strategy.mixed_precision for a in (["--mixed_precision", "fp32"], ["--bf16", "false"],
                                                             ["--bf16"], [])] == ["fp32", "fp32", "bf16", "bf16"]
    cpu({"avx2"})
    assert parse_args(["--mixed_precision", "bf16"]).strategy.mixed_precision == "bf16"  # emulated, but asked for


# ----------------------------------------------------------------------------------------------------- warm-up

@pytest.mark.parametrize("total, expected", [
    (0, 0), (4, 0), (33, 0), (34, 1), (100, 3), (333, 9), (334, 10), (918, 10), (100_000, 10),
])
def test_auto_warmup_is_the_ratios_share_rounded_down_and_capped(total, expected):
    assert WARMUP_MAX_STEPS == 10
    assert plan_warmup(total, OptimArgs()) == expected == min(int(0.03 * total), 10)


def test_a_time_limited_run_is_bounded_by_the_cap_not_by_its_plan():
    # benchmarks/README.md: a 15-minute run planned 918 steps, made 60, and 3% of the plan (27) went to warm-up
    timed = OptimArgs(max_train_minutes=15)
    assert plan_warmup(918, timed) == 10 < int(0.03 * 918) == 27
    assert plan_warmup(918, timed) == plan_warmup(918, OptimArgs())  # the same schedule when resumed without it
    assert plan_warmup(20, timed) == 0


def test_explicit_warmup_steps_and_ratio():
    assert plan_warmup(918, OptimArgs(warmup_steps=50)) == 50  # as given, past the cap
    assert plan_warmup(10, OptimArgs(warmup_steps=30)) == 30  # even past the plan
    assert plan_warmup(918, OptimArgs(warmup_steps=0)) == 0
    assert plan_warmup(100, OptimArgs(warmup_ratio=0.29, warmup_steps=None)) == 10  # 28.999... in floats: 29, capped
    assert plan_warmup(100, OptimArgs(warmup_ratio=0.07)) == 7
    assert plan_warmup(50, OptimArgs(warmup_ratio=0.0)) == 0
    with pytest.raises(ValueError, match="total_steps must be >= 0"):
        plan_warmup(-1, OptimArgs())


def test_warmup_steps_parses_auto_and_numbers():
    assert parse_args([]).optim.warmup_steps is None
    assert parse_args(["--warmup_steps", "7"]).optim.warmup_steps == 7
    assert parse_args(["--warmup_steps", "0", "--warmup_steps", "auto"]).optim.warmup_steps is None


# ----------------------------------------------------------------------------- docs and --help say the same

def _table_row(flag: str) -> tuple[str, str]:
    """``(default, meaning)`` of ``flag``'s row in the flag tables of docs/training.md."""
    rows = re.findall(rf"^\| `{flag}` \| `([^`]*)` \| (.*) \|$", TRAINING, flags=re.M)
    assert len(rows) == 1, (flag, rows)
    return rows[0]


def _help(flag: str) -> str:
    action = next(a for a in build_parser()._actions if flag in a.option_strings)
    return " ".join(action.help.replace("%%", "%").split())


def _numbers(text: str) -> set[float]:
    return {float(x) for x in re.findall(r"\d+(?:\.\d+)?e-\d+", text)}


def test_flags_table_and_help_state_the_codes_defaults():
    for flag in ("--lr", "--mixed_precision", "--warmup_steps", "--warmup_ratio"):
        default, meaning = _table_row(flag)
        assert meaning.startswith(_help(flag)), flag  # the table is the help text (scripts/flags_table.py)
        action = next(a for a in build_parser()._actions if flag in a.option_strings)
        assert default == str(action.default), flag
    assert _table_row("--lr")[0] == _table_row("--mixed_precision")[0] == _table_row("--warmup_steps")[0] == "auto"
    assert _table_row("--warmup_ratio")[0] == str(OptimArgs().warmup_ratio)
    lr_help = _help("--lr")
    assert f"default auto = {config._sci(LR_LORA)} with LoRA" in lr_help and \
        f"{config._sci(LR_FULL)} for full fine-tuning" in lr_help
    assert {LR_LORA, LR_FULL} <= _numbers(lr_help)
    assert f"at most {WARMUP_MAX_STEPS}" in _help("--warmup_steps")
    assert "AVX512-BF16 or AMX-BF16" in _help("--mixed_precision") and "else fp32" in _help("--mixed_precision")


def test_defaults_and_why_names_the_same_values():
    start = DEFAULTS.index("# Defaults and why\n")
    end = DEFAULTS.find("\n## ", start + 1)
    section = DEFAULTS[start:end if end != -1 else len(DEFAULTS)]
    rows = dict(re.findall(r"^\| `(--\w+)` \| (.*) \|$", section, flags=re.M))
    assert set(rows) == {"--lr", "--mixed_precision", "--warmup_steps"}
    assert {LR_LORA, LR_FULL} <= _numbers(rows["--lr"])
    assert "LoRA" in rows["--lr"] and "full" in rows["--lr"]
    assert "bf16" in rows["--mixed_precision"] and "AVX512-BF16" in rows["--mixed_precision"]
    assert f"at most {WARMUP_MAX_STEPS}" in rows["--warmup_steps"]
    assert f"{OptimArgs().warmup_ratio:g}" in rows["--warmup_steps"] or \
        f"{OptimArgs().warmup_ratio * 100:g}%" in rows["--warmup_steps"]
