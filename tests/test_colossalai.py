"""ColossalAI strategies on a CPU machine: clear refusals, lazy import, and the helpers that need no GPU.

Training through ColossalAI needs CUDA GPUs; here only what happens before (and around) it is tested.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from coati.strategies import STRATEGIES, StrategyUnavailable
from coati.strategies.colossalai import (ColossalAIGeminiStrategy, ColossalAIZero2Strategy, _export_skeleton,
                                         _fill_skeleton)

REPO = Path(__file__).resolve().parents[1]
CLASSES = [ColossalAIZero2Strategy, ColossalAIGeminiStrategy]
_real_find_spec = importlib.util.find_spec


def _find_spec_without_colossalai(name, *args, **kwargs):
    if name == "colossalai" or name.startswith("colossalai."):
        return None
    return _real_find_spec(name, *args, **kwargs)


def _find_spec_with_colossalai(name, *args, **kwargs):
    if name == "colossalai":
        return importlib.machinery.ModuleSpec("colossalai", None)
    return _real_find_spec(name, *args, **kwargs)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("installed", [True, False])
def test_no_cuda_is_refused_with_the_alternatives(cls, installed, no_cuda, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec",
                        _find_spec_with_colossalai if installed else _find_spec_without_colossalai)
    with pytest.raises(StrategyUnavailable) as e:
        cls().check()
    msg = str(e.value)
    assert f"--strategy {cls.name} needs CUDA GPUs; none is visible" in msg
    assert "--strategy ddp" in msg and "--strategy fsdp" in msg and "run on CPU and GPU" in msg
    assert "pip install" not in msg  # installing colossalai would not help


@pytest.mark.parametrize("cls", CLASSES)
def test_missing_package_is_refused_with_install_steps(cls, cuda, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _find_spec_without_colossalai)
    with pytest.raises(StrategyUnavailable) as e:
        cls().check()
    msg = str(e.value)
    assert f"--strategy {cls.name} needs the colossalai package, which is not installed" in msg
    assert "pip install -e .[colossalai]" in msg and "bash scripts/install_colossalai.sh" in msg
    assert "--strategy ddp" in msg and "--strategy fsdp" in msg
    assert "CUDA" not in msg


@pytest.mark.parametrize("cls", CLASSES)
def test_check_passes_with_cuda_and_package_without_importing_it(cls, cuda, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _find_spec_with_colossalai)
    imported = "colossalai" in sys.modules
    cls().check()
    assert ("colossalai" in sys.modules) == imported


def test_gemini_refuses_lora_first_and_zero2_accepts_it(cuda, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _find_spec_with_colossalai)
    with pytest.raises(ValueError, match="does not support LoRA.*colossalai_zero2"):
        ColossalAIGeminiStrategy(lora=True).check()
    ColossalAIZero2Strategy(lora=True).check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="does not support LoRA"):  # a config error, reported on any machine
        ColossalAIGeminiStrategy(lora=True).check()


def test_gemini_prepare_refuses_frozen_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        ColossalAIGeminiStrategy().prepare(model, lambda ps: torch.optim.AdamW(ps))


@pytest.mark.parametrize("cls", CLASSES)
def test_resume_checkpoints_are_refused(cls, cuda, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _find_spec_with_colossalai)
    with pytest.raises(ValueError, match="resume checkpoints"):
        cls(resume_checkpoints=True).check()
    with pytest.raises(ValueError, match="resume checkpoints"):
        cls().resume_state(nn.Linear(1, 1), None)


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="mixed_precision"):
        ColossalAIZero2Strategy(mixed_precision="fp8")
    with pytest.raises(ValueError, match="mixed_precision"):
        ColossalAIGeminiStrategy(mixed_precision="fp32")
    with pytest.raises(ValueError, match="placement_policy"):
        ColossalAIGeminiStrategy(placement_policy="cpu")
    with pytest.raises(ValueError, match="accumulation_steps"):
        ColossalAIGeminiStrategy(accumulation_steps=0)


def test_importing_the_module_does_not_import_colossalai(monkeypatch):
    if "colossalai" in sys.modules:
        pytest.skip("colossalai was already imported in this process")
    monkeypatch.delitem(sys.modules, "coati.strategies.colossalai", raising=False)
    module = importlib.import_module("coati.strategies.colossalai")
    assert "colossalai" not in sys.modules
    assert module.ColossalAIZero2Strategy(zero_cpu_offload=True).name == "colossalai_zero2"
    assert module.ColossalAIGeminiStrategy(placement_policy="auto").name == "colossalai_gemini"
    assert "colossalai" not in sys.modules


class _FakeWrapper:
    """Stands for ColossalAI's optimizer wrapper: records calls."""

    def __init__(self):
        self.inner, self.calls = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), []

    def unwrap(self):
        return self.inner

    def step(self):
        self.calls.append("step")

    def zero_grad(self):
        self.calls.append("zero_grad")


@pytest.mark.parametrize("cls", CLASSES)
def test_clipping_is_configured_up_front(cls):
    strategy = cls(max_grad_norm=1.0)
    strategy._optimizer = wrapper = _FakeWrapper()
    with pytest.raises(ValueError, match="max_grad_norm=0.5"):
        strategy.clip_grad_norm(nn.Linear(1, 1), 0.5)
    with pytest.raises(ValueError, match="max_grad_norm=0.0"):  # the trainer did not ask for clipping
        strategy.optimizer_step(wrapper.inner)
    assert torch.isnan(strategy.clip_grad_norm(nn.Linear(1, 1), 1.0))
    strategy.optimizer_step(wrapper.inner)  # the inner optimizer (what prepare returns) steps the wrapper
    assert wrapper.calls == ["step", "zero_grad"]
    with pytest.raises(ValueError, match="returned by prepare"):
        strategy.optimizer_step(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    unclipped = cls(max_grad_norm=0.0)
    unclipped._optimizer = wrapper
    unclipped.optimizer_step(wrapper)
    assert wrapper.calls == ["step", "zero_grad"] * 2


def test_gemini_accumulation_must_be_configured():
    with pytest.raises(ValueError, match="accumulation_steps=1"):
        ColossalAIGeminiStrategy().no_sync(nn.Linear(1, 1))
    with ColossalAIGeminiStrategy(accumulation_steps=4).no_sync(nn.Linear(1, 1)):
        pass
    with ColossalAIZero2Strategy().no_sync(nn.Linear(1, 1)):
        pass


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.score = nn.Linear(4, 1, bias=False)
        self.register_buffer("scale", torch.arange(4.0))  # persistent
        self.register_buffer("inv_freq", torch.linspace(0, 1, 4), persistent=False)

    def forward(self, x):
        return self.score(self.body(x) * self.scale).squeeze(-1)


def test_export_skeleton_costs_no_memory_and_takes_gathered_weights():
    torch.manual_seed(0)
    model = _Toy()
    skeleton = _export_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters()) and skeleton.scale.is_meta
    assert not skeleton.inv_freq.is_meta and torch.equal(skeleton.inv_freq, model.inv_freq)
    assert not any(p.is_meta for p in model.parameters())  # the original is untouched
    gathered = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}  # as ColossalAI hands them back
    out = _fill_skeleton(skeleton, gathered)
    assert out is skeleton and isinstance(out, _Toy)
    for key, value in out.state_dict().items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        assert torch.equal(value, gathered[key].float())
    x = torch.randn(3, 4)
    assert torch.allclose(out(x), model(x), atol=0.05)
    with pytest.raises(RuntimeError, match="Missing key"):
        _fill_skeleton(_export_skeleton(model), {k: v for k, v in gathered.items() if k != "score.weight"})


def test_value_head_takes_fp32_input_when_weights_are_cast(tokenizer):
    from conftest import tiny_model

    from coati.models.reward_model import RewardModel
    from coati.strategies.colossalai import _cast_value_head

    ref = RewardModel(tiny_model("llama", tokenizer), uses_position_ids=True)
    model = RewardModel(tiny_model("llama", tokenizer), uses_position_ids=True)
    handles = _cast_value_head(model, torch.bfloat16)
    assert len(handles) == 2
    model.to(torch.bfloat16)  # what LowLevelZero/Gemini do to every weight
    ids = torch.randint(0, 100, (4, 12))
    mask = torch.ones_like(ids)
    mask[2:, 9:] = 0
    with torch.no_grad():
        rewards, expected = model(ids, mask), ref(ids, mask)
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)
    assert torch.allclose(rewards, expected, atol=0.1)
    assert _cast_value_head(nn.Linear(1, 1), torch.bfloat16) == []


@pytest.mark.parametrize("name", ["colossalai_zero2", "colossalai_gemini", "gemini"])
def test_cli_fails_before_loading_anything(name, tmp_path):
    if name not in STRATEGIES:
        pytest.skip(f"{name!r} is not registered in coati.strategies.STRATEGIES yet")
    out = tmp_path / "rm"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(REPO / "train_reward_model.py"), "--strategy", name, "--model", "llama",
                           "--max_steps", "1", "--save_path", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "needs CUDA GPUs; none is visible" in proc.stderr
    assert "--strategy ddp" in proc.stderr and "--strategy fsdp" in proc.stderr
    assert not out.exists()  # failed before the save path was even created, so before any model or data
