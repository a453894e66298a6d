"""Sequence parallelism (Ulysses) on real gloo processes equals the unsplit run: losses, weights, resume, refusals."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coati.cli.train import parse_args
from helpers import REPO, run_env

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# as tests/strategies/test_strategies.py: Adam's eps keeps round-off in near-zero gradients below the tolerance
COMMON = ["--model", "llama", "--dataset", "hh-rlhf", "--max_samples", "64", "--max_len", "96", "--lr", "1e-3",
          "--adam_eps", "1e-6", "--log_every", "1", "--disable_tqdm", "--seed", "7", "--batch_size", "4",
          "--eval_split", "0.25", "--mixed_precision", "fp32"]


def _worker(nproc: int, sp: int, cases: list[str], strategy: str = "ddp") -> dict:
    cmd = TORCHRUN + ["--nproc_per_node", str(nproc), str(REPO / "tests" / "sp_worker.py"), "--sp", str(sp),
                      "--strategy", strategy, "--cases", *cases]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _assert_parity(results: dict) -> None:
    for case, r in results.items():
        assert r["loss"] < 1e-5 and r["weights"] < 1e-5, (case, r)
        assert r["odd_rows"] >= 1, case  # a row length S does not divide was split at least once


@pytest.mark.slow
def test_two_ranks_train_like_one_for_every_layout_and_backbone():
    """S = 2 on 2 processes == one process on the same global batch, 3 SGD steps: llama and internlm2, packed with and
    without prefix sharing and padded, full and LoRA, with activation recomputation (the all-to-alls run again in
    backward); ``llama3kv`` has 3 key/value heads, which S = 2 replicates."""
    _assert_parity(_worker(2, 2, [f"{m}:{layout}:0" for m in ("llama", "internlm2")
                                  for layout in ("shared", "unshared", "padded")]
                           + ["llama:shared:8", "llama:shared:8:gc", "internlm2:padded:0:gc", "llama3kv:shared:0"]))


@pytest.mark.slow
def test_two_ranks_train_like_one_for_todays_families():
    """Qwen2, Qwen3 (head_dim apart from hidden / heads), Gemma 3 (one key/value head, replicated for S = 2; a local
    layer whose 32-token window the pairs of up to 71 tokens exceed) and Mistral (a window on every layer): S = 2 ==
    one process, packed and padded, full and LoRA."""
    _assert_parity(_worker(2, 2, ["qwen2:shared:0", "qwen2:padded:0", "qwen3:padded:4", "gemma3:shared:0",
                                  "gemma3:padded:4", "mistral:unshared:4"]))


@pytest.mark.slow
def test_three_ranks_split_three_key_value_heads():
    _assert_parity(_worker(3, 3, ["llama3kv:shared:0", "llama3kv:padded:0"]))


@pytest.mark.slow
def test_four_ranks_as_two_data_parallel_groups_of_two():
    _assert_parity(_worker(4, 2, ["llama:shared:0", "llama3kv:unshared:0"]))


@pytest.mark.slow
def test_fsdp_with_sequence_parallelism():
    _assert_parity(_worker(2, 2, ["llama:shared:0", "internlm2:padded:8"], strategy="fsdp"))


def _train(args, save_path, nproc=1):
    launcher = [sys.executable] if nproc == 1 else TORCHRUN + ["--nproc_per_node", str(nproc)]
    proc = subprocess.run(launcher + [str(REPO / "train_reward_model.py")] + args + ["--save_path", str(save_path)],
                          capture_output=True, text=True, env=run_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (Path(save_path) / "metrics.jsonl").read_text().splitlines()]


def _weights_diff(a, b):
    wa, wb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _close(rows, ref_rows):
    assert [(r["split"], r["pairs"]) for r in rows] == [(r["split"], r["pairs"]) for r in ref_rows]
    return max(abs(r["loss"] - s["loss"]) for r, s in zip(rows, ref_rows))


@pytest.mark.slow
def test_cli_run_resume_and_switch_to_one_process(tmp_path):
    """``train_reward_model.py --strategy ddp --sequence_parallel_size 2`` on 2 processes: the same train and eval
    rows (pairs counted once) and export as ``--strategy naive``; its step-3 checkpoint resumes under SP and under
    one process without SP, both ending like the uninterrupted run. It runs with ``--length_head`` (ODIN), whose
    correlation terms over the gathered batch and whose head must resume and export alike; without the head the
    same path carries one loss term fewer (SP training without the head: the tests above)."""
    args = COMMON + ["--max_steps", "6", "--eval_every", "3", "--length_head"]
    sp = ["--strategy", "ddp", "--sequence_parallel_size", "2"]
    ref_rows = _train(args + ["--strategy", "naive"], tmp_path / "naive")
    assert len({r["loss"] for r in ref_rows}) > 2
    rows = _train(args + sp + ["--save_every", "3", "--keep_last", "5"], tmp_path / "sp", nproc=2)
    assert _close(rows, ref_rows) < 1e-5
    assert _weights_diff(tmp_path / "naive", tmp_path / "sp") < 1e-5
    for name, extra, nproc in (("sp_resumed", sp, 2), ("one_process", ["--strategy", "naive"], 1)):
        out = tmp_path / name
        shutil.copytree(tmp_path / "sp", out)
        shutil.rmtree(out / "checkpoints" / "step-000006")  # resume from step 3
        rows = _train(args + extra + ["--resume", "auto", "--save_every", "3", "--keep_last", "5"], out, nproc=nproc)
        assert _close(rows, ref_rows) < 1e-5, name
        assert _weights_diff(tmp_path / "naive", out) < 1e-5, name
        a, b = (load_file(p / "length_head.safetensors")["weight"] for p in (tmp_path / "naive", out))
        assert (a - b).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("argv, world, message", [
    (["--strategy", "naive", "--sequence_parallel_size", "2"], "1", "--sequence_parallel_size is not used by"),
    (["--strategy", "ddp", "--sequence_parallel_size", "2"], "3", "must divide the number of processes (3"),
    (["--strategy", "ddp", "--sequence_parallel_size", "3"], "3", "must divide the 4 attention heads"),
    (["--strategy", "ddp", "--sequence_parallel_size", "2", "--model", "bloom"], "2", "ALiBi"),
    (["--strategy", "colossalai_zero2", "--sequence_parallel_size", "2"], "2", "--sequence_parallel_size is not used"),
], ids=["naive", "world", "heads", "bloom", "colossalai"])
def test_bad_settings_fail_at_parse_time_with_one_line(argv, world, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(SystemExit) as e:
        parse_args(argv + ["--save_path", "/tmp/unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err


def test_heads_of_a_converted_checkpoint_are_checked_before_the_model_loads(monkeypatch):
    """SmolLM2's 9 query heads: S = 2 is refused once the GGUF file is converted (before any weights load)."""
    from coati.models.cache import resolve_pretrain
    from coati.models.loading import attention_heads, prepare_model_files
    from coati.preflight import sequence_parallel_problems

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = parse_args(["--pretrain", "smollm2-135m", "--strategy", "ddp", "--sequence_parallel_size", "2",
                      "--save_path", "/tmp/unused"])
    prepare_model_files(cfg.backbone)
    assert attention_heads(cfg.backbone, resolve_pretrain("smollm2-135m")) == (9, 3)
    assert sequence_parallel_problems(cfg) == []  # at parse time the alias is not converted: heads unknown
    problems = sequence_parallel_problems(cfg, resolve_pretrain("smollm2-135m"))
    assert len(problems) == 1 and "must divide the 9 attention heads" in problems[0], problems
    monkeypatch.setenv("WORLD_SIZE", "3")
    folder = resolve_pretrain("smollm2-135m")
    assert sequence_parallel_problems(cfg.replace(sequence_parallel_size=3), folder) == []  # 3 divides 9: accepted


def test_split_causal_attention_equals_the_written_out_mask():
    """The mask-free form (``[P | C]`` causal, ``R`` against ``[P ; R]`` with the lower-right diagonal) gives the
    written-out path's output and gradients for a plain sequence and a shared-prefix pair."""
    from coati.models.packed_attention import PackPlan, group_attention

    torch.manual_seed(0)
    for shape in ((37, 0, 0), (11, 9, 14), (1, 5, 1)):
        n = sum(shape)
        plan = PackPlan.from_groups(torch.tensor([[0, 0, *shape]]), 1)
        q, k, v = (torch.randn(4, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        outs = []
        for fused in (False, True):
            out = group_attention(plan, shape, q, k, v, 0.0, 8 ** -0.5, fused=fused)
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                        (q, k, v))
            outs.append((out, grads))
        (o1, g1), (o2, g2) = outs
        assert torch.allclose(o1, o2, atol=1e-12), shape
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g1, g2)), shape


def test_split_causal_attention_keeps_no_quadratic_scores_for_backward():
    """What the split form saves for backward grows linearly in the group length: no ``[H, n, n]`` scores. (CPU
    SDPA only runs its flash kernel on 4-D inputs; given 3-D ones it fell back to the math kernel, which saves
    the attention weights: 16 MB here against about 1 MB.)"""
    from coati.models.packed_attention import PackPlan, group_attention

    heads, n, dim = 4, 1024, 16
    for shape in ((n, 0, 0), (n - 256, 0, 256), (512, 256, 256)):
        plan = PackPlan.from_groups(torch.tensor([[0, 0, *shape]]), 1)
        q, k, v = (torch.randn(heads, n, dim, requires_grad=True) for _ in range(3))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            group_attention(plan, shape, q, k, v, 0.0, dim ** -0.5, fused=True)
        scores = heads * n * n * 4  # the fp32 scores the written-out path keeps
        assert 0 < sum(saved) < scores / 4, (shape, sum(saved), scores)
