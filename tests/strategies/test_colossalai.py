"""ColossalAI strategies: what config validation refuses, lazy import, the ZeRO step against ColossalAI's own clipping
code, the plugins built from the options, the export helpers, and colossalai_ddp training exactly like ddp (CLI, two
CPU processes). The ZeRO plugins need CUDA GPUs; on CPU only what happens around them is tested.
"""

import contextlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from coati.config import StrategyArgs, TrainConfig
from coati.preflight import validate
from coati.strategies.colossalai import (ColossalAIDDPStrategy, ColossalAIGeminiStrategy, ColossalAIZero2Strategy,
                                         _export_skeleton, _fill_skeleton)
from helpers import REPO, run_env

ZERO = [ColossalAIZero2Strategy, ColossalAIGeminiStrategy]
_INSTALL_HINT = "colossalai is not importable: pip install -e .[colossalai] && bash scripts/install_colossalai.sh"
_real_find_spec = importlib.util.find_spec


def _colossalai():
    return pytest.importorskip("colossalai.booster", reason=_INSTALL_HINT, exc_type=ImportError)


@pytest.fixture
def environment(monkeypatch):
    """``environment(cuda=..., installed=...)``: what the strategies' ``unavailable()`` sees."""
    def set_(cuda: bool, installed: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)

        def find_spec(name, *args, **kwargs):
            if name == "colossalai":
                return importlib.machinery.ModuleSpec("colossalai", None) if installed else None
            return _real_find_spec(name, *args, **kwargs)
        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return set_


@pytest.mark.parametrize("options, cuda, expected", [
    ({"strategy": "colossalai_ddp"}, False, []),
    ({"strategy": "colossalai_ddp", "mixed_precision": "bf16", "lora_rank": 4, "accumulation_steps": 2}, False, []),
    ({"strategy": "colossalai_ddp", "save_every": 2}, False,
     ["--strategy colossalai_ddp cannot write or read resume checkpoints"]),
    ({"strategy": "colossalai_ddp", "mixed_precision": "fp16"}, False,
     ["--strategy colossalai_ddp trains in fp32 or bf16, not --mixed_precision fp16"]),
    ({"strategy": "colossalai_ddp", "cpu_offload": True}, False,
     ["--cpu_offload is not used by --strategy colossalai_ddp"]),
    ({"strategy": "colossalai_zero2", "mixed_precision": "fp16", "cpu_offload": True, "lora_rank": 4}, True, []),
    ({"strategy": "colossalai_zero2"}, True, []),  # fp32 weights and master weights
    ({"strategy": "colossalai_zero2", "zero_stage": 2}, True,
     ["--zero_stage is not used by --strategy colossalai_zero2"]),
    ({"strategy": "colossalai_zero2", "resume": "auto"}, True,
     ["--strategy colossalai_zero2 cannot write or read resume checkpoints"]),
    ({"strategy": "gemini", "mixed_precision": "bf16", "placement_policy": "auto", "accumulation_steps": 4}, True, []),
    ({"strategy": "colossalai_gemini", "mixed_precision": "fp32"}, True,
     ["--strategy colossalai_gemini trains in bf16 or fp16, not --mixed_precision fp32"]),
    ({"strategy": "colossalai_gemini"}, True, []),  # auto: bf16, or fp16 on a GPU without bf16 (tests/test_preflight.py)
    ({"strategy": "colossalai_gemini", "mixed_precision": "fp16", "lora_rank": 4}, True,
     ["--strategy colossalai_gemini does not support LoRA", "use --strategy colossalai_zero2, fsdp or ddp"]),
    ({"strategy": "colossalai_gemini", "mixed_precision": "bf16", "cpu_offload": True}, True,
     ["--cpu_offload is not used by --strategy colossalai_gemini"]),
])
def test_validation_refuses_what_each_strategy_cannot_do(options, cuda, expected, environment):
    environment(cuda=cuda, installed=True)
    errors = validate(TrainConfig.from_dict(options))
    assert len(errors) == (1 if expected else 0), errors
    assert all(part in errors[0] for part in expected), errors


@pytest.mark.parametrize("cls", ZERO)
@pytest.mark.parametrize("installed", [True, False])
def test_zero_without_cuda_names_the_cpu_alternatives(cls, installed, environment):
    environment(cuda=False, installed=installed)
    msg = cls.unavailable()
    assert msg.startswith(f"--strategy {cls.name} needs CUDA GPUs; none is visible")
    assert all(f"--strategy {s}" in msg for s in ("ddp", "fsdp", "colossalai_ddp"))
    assert "pip install" not in msg  # installing colossalai would not help


@pytest.mark.parametrize("cls", ZERO + [ColossalAIDDPStrategy])
def test_missing_package_names_the_install_script(cls, environment):
    environment(cuda=True, installed=False)
    msg = cls.unavailable()
    assert msg.startswith(f"--strategy {cls.name} needs the colossalai package, which is not installed")
    assert "pip install -e .[colossalai] then bash scripts/install_colossalai.sh" in msg
    assert "--strategy ddp" in msg and "CUDA" not in msg


def test_registry_and_validation_do_not_import_colossalai():
    code = ("import sys\n"
            "from coati.config import TrainConfig\nfrom coati.preflight import validate\n"
            "from coati.strategies import STRATEGIES\n"
            "for name in ('colossalai_ddp', 'colossalai_zero2', 'gemini'):\n"
            "    STRATEGIES[name].unavailable()\n"
            "    validate(TrainConfig.from_dict({'strategy': name, 'mixed_precision': 'bf16'}))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'colossalai'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=run_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


class _ZeroWrapper:
    """Stands for ColossalAI's ZeRO optimizer wrapper: ``step`` runs ColossalAI's own unscale-and-clip code (the
    installed version's) on ``grads`` whose global norm is ``norm``, reading the norm from the wrapper's attributes."""

    def __init__(self, cls, grads):
        self.grads, self.calls = grads, []
        norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
        if cls is ColossalAIZero2Strategy:
            from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

            self.mixed_precision_mixin, self._clip_grad_norm = None, 0.0  # bf16/fp32: no loss scale
            self._clip = lambda: LowLevelZeroOptimizer._unscale_and_clip_grads(self, self.grads, norm)
        else:
            from colossalai.amp.naive_amp.mixed_precision_mixin import BF16MixedPrecisionMixin
            from colossalai.zero.gemini.gemini_optimizer import GeminiOptimizer

            self.mix_precision_mixin = BF16MixedPrecisionMixin()
            self.clipping_flag, self.max_norm = True, math.inf  # as GeminiOptimizer sets them from max_norm=inf
            self._calc_global_norm = lambda: norm

            def clip():
                scale = GeminiOptimizer._get_combined_scale(self)  # -1: none; else gradients are divided by it
                for g in self.grads:
                    g.div_(1.0 if scale == -1 else scale)
            self._clip = clip

    def step(self):
        self._clip()
        self.calls.append("step")

    def zero_grad(self):
        self.calls.append("zero_grad")


@pytest.mark.parametrize("cls", ZERO)
@pytest.mark.parametrize("max_norm", [0.5, 0.0, 100.0])
def test_zero_step_clips_at_the_norm_it_is_given(cls, max_norm):
    _colossalai()
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0], [4.0]])]  # global norm 5
    before = [g.clone() for g in grads]
    strategy = cls(StrategyArgs(strategy=cls.name, mixed_precision="bf16"))
    strategy._optimizer = wrapper = _ZeroWrapper(cls, grads)
    assert strategy.step(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), max_norm) is None
    assert wrapper.calls == ["step", "zero_grad"]
    factor = 0.5 / 5.0 if max_norm == 0.5 else 1.0  # 0 = no clipping; 100 is above the norm
    assert all(torch.allclose(g, b * factor, rtol=1e-5, atol=0) for g, b in zip(grads, before))


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group (the plugins read the world size when built)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_plugins_follow_the_options(process_group):
    _colossalai()
    zero2 = ColossalAIZero2Strategy(StrategyArgs(strategy="colossalai_zero2", mixed_precision="fp16", cpu_offload=True))
    plugin = zero2._plugin(accumulates=True)
    assert (plugin.stage, plugin.precision, plugin.zero_optim_kwargs["cpu_offload"]) == (2, "fp16", True)
    assert zero2.hybrid_adam and not ColossalAIZero2Strategy(StrategyArgs()).hybrid_adam

    gemini = ColossalAIGeminiStrategy(StrategyArgs(strategy="gemini", mixed_precision="bf16", placement_policy="auto"))
    with pytest.raises(RuntimeError, match="prepared with accumulates=False"):
        gemini._plugin(accumulates=False)
        gemini.no_sync(nn.Linear(1, 1))
    plugin = gemini._plugin(accumulates=True)
    assert plugin.gemini_config["placement_policy"] == "auto" and plugin.gemini_config["enable_gradient_accumulation"]
    assert plugin.gemini_config["mixed_precision"] is torch.bfloat16
    assert plugin.optim_kwargs["max_norm"] > 0  # so that Gemini's chunks measure gradient norms for step() to clip
    with gemini.no_sync(nn.Linear(1, 1)):
        pass

    from colossalai.booster.plugin import TorchDDPPlugin

    assert isinstance(ColossalAIDDPStrategy(StrategyArgs())._plugin(accumulates=True), TorchDDPPlugin)


def test_precision_belongs_to_the_zero_plugins():
    for cls in ZERO:
        assert isinstance(cls(StrategyArgs(mixed_precision="bf16")).autocast(), contextlib.nullcontext)
    autocast = ColossalAIDDPStrategy(StrategyArgs(mixed_precision="bf16")).autocast()
    assert isinstance(autocast, torch.autocast) and autocast.fast_dtype is torch.bfloat16


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
    from helpers import tiny_model

    from coati.models.backbones import get_backbone
    from coati.models.reward_model import RewardModel
    from coati.strategies.colossalai import _cast_value_head

    ref = RewardModel(tiny_model("llama", tokenizer), get_backbone("llama"))
    model = RewardModel(tiny_model("llama", tokenizer), get_backbone("llama"))
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


# ------------------------------------------------------------------------------------- colossalai_ddp == ddp (CLI)

COMMON = ["--model", "llama", "--dataset", "hh-rlhf", "--max_samples", "64", "--max_len", "96", "--lr", "1e-3",
          "--adam_eps", "1e-6", "--log_every", "1", "--disable_tqdm", "--seed", "7", "--max_steps", "5",
          "--batch_size", "2", "--accumulation_steps", "2", "--max_grad_norm", "0.5", "--mixed_precision", "fp32"]


def _train(args, nproc=1, save_path=None):
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                                   if nproc > 1 else [])
    proc = subprocess.run(launcher + [str(REPO / "train_reward_model.py")] + args + ["--save_path", str(save_path)],
                          capture_output=True, text=True, env=run_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save_path


def _losses(path):
    rows = map(json.loads, (Path(path) / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_colossalai_ddp_trains_like_ddp(tmp_path):
    """Same per-step losses and exported weights as ``--strategy ddp``: 2 CPU processes, full fine-tuning in fp32,
    gradient accumulation (``no_sync`` on the first micro-batch of each step) and clipping at 0.5 (the gradient norms
    here are larger). (bf16 and LoRA take the same code as under ddp: the base ``autocast`` and peft; measured equal
    too when this test was written, and left out to keep the suite's time.)"""
    _colossalai()
    args = COMMON
    ref = _train(args + ["--strategy", "ddp"], nproc=2, save_path=tmp_path / "ddp")
    out = _train(args + ["--strategy", "colossalai_ddp"], nproc=2, save_path=tmp_path / "colossalai_ddp")
    ref_losses, losses = _losses(ref), _losses(out)
    assert len(losses) == len(ref_losses) == 5 and len(set(ref_losses)) > 1
    assert max(abs(x - y) for x, y in zip(losses, ref_losses)) < 1e-5, (losses, ref_losses)
    ref_w, out_w = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert ref_w.keys() == out_w.keys()
    assert max((ref_w[k] - out_w[k]).abs().max().item() for k in ref_w) < 1e-5
