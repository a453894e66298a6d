"""Strategies are interchangeable: same losses and weights, checkpoints that move between them, two nodes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import REPO, free_port, made_once, run_env

# Adam turns round-off in (near-)zero gradients into +-lr steps (BLOOM's final LayerNorm bias has a gradient that is
# exactly 0 in real arithmetic under a pairwise loss); eps=1e-6 keeps such noise below the tolerance compared here.
COMMON = ["--dataset", "hh-rlhf", "--max_samples", "64", "--max_len", "96", "--lr", "1e-3", "--adam_eps", "1e-6",
          "--log_every", "1", "--disable_tqdm", "--seed", "7", "--mixed_precision", "fp32"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
pytestmark = pytest.mark.slow


def _train(args, nproc=1, save_path=None):
    launcher = [sys.executable] if nproc == 1 else TORCHRUN + ["--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(launcher + [str(REPO / "train_reward_model.py")] + args + ["--save_path", str(save_path)],
                          capture_output=True, text=True, env=run_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save_path


def _losses(path):
    return [r["loss"] for r in map(json.loads, (Path(path) / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def _max_weight_diff(a, b):
    wa, wb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _run_args(model):
    """The 5-step run that the strategy-equality and two-node tests compare with its one-process reference."""
    return ["--model", model, "--max_steps", "5"] + COMMON


@pytest.fixture(scope="module")
def naive_run(tmp_path_factory):
    """``naive_run(model)``: the one-process reference run of ``model`` (:func:`_run_args`, batch 4), made once per
    module."""
    return made_once(tmp_path_factory, lambda model, out: _train(
        _run_args(model) + ["--strategy", "naive", "--batch_size", "4"], save_path=out))


# BLOOM runs the FSDP leg only: what is its own there is the wrapping of its blocks (ZeRO-3 shards them); DDP and
# ZeRO-2 do not depend on the family and run on LLaMA
@pytest.mark.parametrize("model, strategies", [("llama", ("ddp", "fsdp2", "fsdp3")), ("bloom", ("fsdp3",))],
                         ids=["llama", "bloom"])
def test_naive_ddp_fsdp2_fsdp3_train_identically(model, strategies, tmp_path, naive_run):
    args = _run_args(model)
    ref = naive_run(model)
    runs = {
        "ddp": ["--strategy", "ddp"],
        "fsdp2": ["--strategy", "fsdp", "--zero_stage", "2"],
        "fsdp3": ["--strategy", "fsdp", "--zero_stage", "3"],
    }
    ref_losses = _losses(ref)
    assert len(ref_losses) == 5 and len(set(ref_losses)) > 1
    for name in strategies:
        out = _train(args + runs[name] + ["--batch_size", "2"], nproc=2, save_path=tmp_path / name)
        losses = _losses(out)
        assert len(losses) == 5
        assert max(abs(x - y) for x, y in zip(losses, ref_losses)) < 1e-5, (name, losses, ref_losses)
        assert _max_weight_diff(ref, out) < 1e-5, name


def test_checkpoint_moves_between_ddp_and_fsdp(tmp_path):
    """A checkpoint written under ddp resumes under fsdp, and one written under fsdp resumes under ddp."""
    args = ["--model", "llama", "--max_steps", "6", "--save_every", "3", "--keep_last", "5", "--batch_size", "2",
            "--strategy"]
    straight = _train(args + ["ddp"] + COMMON, nproc=2, save_path=tmp_path / "straight")
    for first, second in (("ddp", "fsdp"), ("fsdp", "ddp")):
        out = tmp_path / f"{first}_to_{second}"
        if first == "ddp":  # the uninterrupted ddp run wrote the same checkpoints: start from a copy of its folder
            shutil.copytree(straight, out)
        else:
            _train(args + [first] + COMMON, nproc=2, save_path=out)
        # keep only the step-3 checkpoint and drop the export, then finish the run under the other strategy: the
        # resumed run trims metrics.jsonl to step 3 itself, so steps 4-6 and the export compared are its own
        shutil.rmtree(out / "checkpoints" / "step-000006")
        (out / "model.safetensors").unlink()
        _train(args + [second, "--resume", "auto"] + COMMON, nproc=2, save_path=out)
        assert max(abs(x - y) for x, y in zip(_losses(out), _losses(straight))) < 1e-5
        assert len(_losses(out)) == 6
        assert _max_weight_diff(straight, out) < 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_on_loopback(strategy, tmp_path, naive_run):
    """Two torchrun agents as two nodes (one process each, static rendezvous on 127.0.0.1) == one process."""
    args = _run_args("llama") + ["--strategy", strategy, "--batch_size", "2"]
    ref = naive_run("llama")
    port = free_port()
    out = tmp_path / "multi"
    procs = []
    for node_rank in (0, 1):
        cmd = TORCHRUN + ["--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
                          "--master_addr", "127.0.0.1", "--master_port", str(port),
                          str(REPO / "train_reward_model.py")] + args + ["--save_path", str(out)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env(),
                                      cwd=REPO))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert max(abs(x - y) for x, y in zip(_losses(out), _losses(ref))) < 1e-5
    assert _max_weight_diff(ref, out) < 1e-5


@pytest.mark.parametrize("weighting", ["pair", "prompt"])
def test_ranked_lists_weigh_every_comparison_of_the_step_alike_on_any_layout(weighting, tmp_path):
    """Ranked lists with different comparison counts per batch: 2 DDP ranks of 2 prompts and 1 process of 2 prompts
    accumulated twice give the weights of 1 process of 4 prompts (the loss is the weighted mean over the whole
    optimizer step, not a mean of per-rank means)."""
    args = ["--model", "llama", "--max_steps", "4", "--list_weighting", weighting, "--dataset", "oaast-rm-zh",
            "--max_samples", "64", "--max_responses", "5"] + COMMON[4:]
    ref = _train(args + ["--strategy", "naive", "--batch_size", "4"], save_path=tmp_path / "naive")
    ddp = _train(args + ["--strategy", "ddp", "--batch_size", "2"], nproc=2, save_path=tmp_path / "ddp")
    acc = _train(args + ["--strategy", "naive", "--batch_size", "2", "--accumulation_steps", "2"],
                 save_path=tmp_path / "acc")
    assert _max_weight_diff(ref, ddp) < 1e-5 and _max_weight_diff(ref, acc) < 1e-5


@pytest.mark.parametrize("strategy, pairs", [("ddp", 1), ("ddp", 3), ("fsdp", 1)])
def test_a_held_out_set_smaller_than_or_uneven_over_the_ranks_is_evaluated_once(strategy, pairs, tmp_path):
    """1 held-out pair on 2 ranks (rank 1 has none) and 3 with eval batch 1 (rank 1 runs out first): every pair is
    scored once and the run finishes; before, the rank without a pair skipped a forward whose collective (DDP's
    buffer broadcast) the other waited on until --dist_timeout."""
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"Is {i} even?", "chosen": f"{i} is {'even' if i % 2 else 'odd'}",
                                        "rejected": "no idea"}) + "\n" for i in range(pairs)))
    out = _train(["--model", "llama", "--max_steps", "2", "--eval_every", "1", "--eval_dataset", str(held),
                  "--eval_batch_size", "1", "--batch_size", "2", "--dist_timeout", "60", "--strategy", strategy]
                 + COMMON, nproc=2, save_path=tmp_path / "rm")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["pairs"] for r in evals] == [pairs, pairs], evals  # at step 1, and the final evaluation
    assert json.loads((out / "summary.json").read_text())["eval"]["pairs"] == pairs
