"""Runs lose nothing: exact resume after SIGKILL / SIGTERM / SIGINT, one failing rank stops them all."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from coati.checkpoint.resume import find_resume_checkpoint
from coati.checkpoint.safe_load import CheckpointError
from helpers import REPO, made_once, run_env

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
COMMON = ["--model", "llama", "--dataset", "hh-rlhf", "--max_samples", "64", "--max_len", "96", "--lr", "1e-3",
          "--adam_eps", "1e-6", "--log_every", "1", "--disable_tqdm", "--seed", "3", "--max_steps", "8",
          "--mixed_precision", "fp32"]


def test_corrupt_or_incomplete_checkpoints_are_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        d = root / f"step-00000{step}"
        (d / "rng").mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        blob = d / "data.bin"
        blob.write_bytes(b"x" * 64)
        import hashlib
        manifest = {n: {"size": (d / n).stat().st_size, "sha256": hashlib.sha256((d / n).read_bytes()).hexdigest()}
                    for n in ("trainer_state.json", "data.bin")}
        (d / "manifest.json").write_text(json.dumps({"files": manifest}))
    (root / ".step-000006.tmp").mkdir()  # a crash mid-write: never a candidate
    assert find_resume_checkpoint(str(tmp_path), "auto").endswith("step-000004")
    (root / "step-000004" / "data.bin").write_bytes(b"y" * 64)  # same size, other bytes
    assert find_resume_checkpoint(str(tmp_path), "auto").endswith("step-000002")
    with pytest.raises(CheckpointError, match="checksum"):
        find_resume_checkpoint(str(tmp_path), str(root / "step-000004"))
    (root / "step-000002" / "manifest.json").unlink()
    assert find_resume_checkpoint(str(tmp_path), "auto") is None


def _rows(path):
    keys = ("step", "split", "loss", "acc", "dist", "chosen_reward", "rejected_reward", "pairs", "skipped_steps")
    return [{k: r.get(k) for k in keys} for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]


def _launch(nproc, stopper=None):
    strategy = ["--strategy", "naive" if nproc == 1 else "ddp", "--batch_size", "4" if nproc == 1 else "2"]
    if nproc == 1:
        launcher = [sys.executable]
    elif stopper is signal.SIGKILL:
        launcher = TORCHRUN + ["--standalone", "--nproc_per_node", "2"]
    else:  # torchrun with a clean exit code on SIGINT / SIGTERM
        launcher = [sys.executable, "-m", "coati.launch", "--standalone", "--nproc_per_node", "2"]
    return launcher + [str(REPO / "train_reward_model.py")] + COMMON + strategy + ["--save_every", "2",
                                                                                 "--keep_last", "2"]


def _kill_tree(pid):
    """SIGKILL ``pid`` and all its descendants (children first read from /proc, then killed together)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted runs (1 process naive, 2 processes ddp), made once for every interruption test."""
    def make(nproc, out):
        proc = subprocess.run(_launch(nproc) + ["--save_path", str(out)], env=run_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out
    return made_once(tmp_path_factory, make)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, stopper", [(1, signal.SIGKILL), (2, signal.SIGKILL), (1, signal.SIGTERM),
                                            (2, signal.SIGINT)])
def test_stopped_mid_training_then_resume_matches_uninterrupted(nproc, stopper, tmp_path, uninterrupted):
    """SIGKILL: the last checkpoint survives. SIGTERM / SIGINT: every rank finishes its step, writes a checkpoint
    there and exits with one line and 128 + the signal number; either way --resume auto ends like no stop."""
    straight, killed = uninterrupted(nproc), tmp_path / "killed"
    victim = subprocess.Popen(_launch(nproc, stopper) + ["--save_path", str(killed)], env=run_env(), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000004" / "manifest.json").exists():
        assert victim.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    if stopper is signal.SIGKILL:
        _kill_tree(victim.pid)  # torchrun starts each worker in a session of its own: kill them all, as a crash does
    else:
        os.kill(victim.pid, stopper)  # the launcher (or the one process) alone, as Slurm or Ctrl-C's handler does
    _, err = victim.communicate(timeout=300)
    assert not (killed / "model.safetensors").exists()
    if stopper is signal.SIGKILL:
        assert victim.returncode != 0
    else:
        assert victim.returncode == 128 + stopper, err[-3000:]
        said = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(said) == 1 and f"stopped by {stopper.name} after step" in said[0], err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert not [n for n in os.listdir(killed / "checkpoints") if n.endswith(".tmp")]

    proc = subprocess.run(_launch(nproc) + ["--save_path", str(killed), "--resume", "auto"], env=run_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _rows(straight), _rows(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "acc", "dist", "chosen_reward", "rejected_reward"):
            assert abs(ra[key] - rb[key]) < 1e-6, (ra["step"], key)
    wa, wb = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


# ------------------------------------------------------------------------------------------ distributed faults

@pytest.mark.slow
def test_one_failing_rank_stops_every_rank_with_its_error_once(tmp_path):
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node", "2", str(REPO / "tests" / "fixtures" / "fail_on_rank.py"),
                      "1", "3", "--"] + COMMON + ["--strategy", "ddp", "--batch_size", "2", "--dist_timeout", "60",
                                                  "--save_path", str(tmp_path / "out")]
    start = time.time()
    proc = subprocess.run(cmd, env=run_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert elapsed < 60 + 30, elapsed
    assert proc.stderr.count("RuntimeError: injected fault on rank 1 at step 3") == 1  # the cause, said once
    # rank 0 did not finish or export
    assert not (tmp_path / "out" / "model.safetensors").exists()
