"""Checkpoints and exports are data, never code; complete or absent; finite; readable by others."""

import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess

import pytest
import torch

from coati.checkpoint.export import ExportError, NonFiniteWeightsError, export_hf
from coati.checkpoint.resume import list_checkpoints, load_resume_checkpoint, save_resume_checkpoint, verify_checkpoint
from coati.checkpoint.safe_load import CheckpointError, dcp_load
from coati.strategies.naive import NaiveStrategy
from helpers import tiny_model


class _RunsCode:
    """Pickles as a call of ``os.system``: what a crafted checkpoint file would hold."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def _rehash(ckpt):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _checkpoint(tmp_path, steps=1):
    strategy = NaiveStrategy()
    strategy.setup()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for _ in range(steps):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    path = save_resume_checkpoint(str(tmp_path), steps, strategy, model, optimizer, scheduler, {}, 2)
    return strategy, model, optimizer, scheduler, path


def test_a_crafted_metadata_pickle_is_refused_without_running(tmp_path):
    from pathlib import Path

    strategy, model, optimizer, scheduler, path = _checkpoint(tmp_path)
    ckpt = Path(path)
    sentinel = tmp_path / "ran"
    (ckpt / "model_optim" / ".metadata").write_bytes(pickle.dumps(_RunsCode(sentinel)))
    _rehash(ckpt)  # the manifest matches: only the content is hostile
    with pytest.raises(CheckpointError, match=r"\.metadata: not a checkpoint's metadata \(refers to posix\.system"):
        load_resume_checkpoint(path, strategy, model, optimizer, scheduler)
    assert not sentinel.exists()


def test_a_crafted_non_tensor_item_is_refused_without_running(tmp_path):
    import torch.distributed.checkpoint as dcp

    sentinel = tmp_path / "ran"
    dcp.save({"w": torch.ones(2), "extra": _RunsCode(sentinel)}, checkpoint_id=str(tmp_path / "ck"))
    assert not sentinel.exists()
    target = {"w": torch.zeros(2), "extra": {}}
    with pytest.raises(CheckpointError, match="checkpoint item extra: refused, it is not plain data"):
        dcp_load(target, str(tmp_path / "ck"))
    assert not sentinel.exists()
    # the same file with plain data loads
    dcp.save({"w": torch.ones(2), "extra": {"lr": 0.5, "betas": (0.9, 0.99)}}, checkpoint_id=str(tmp_path / "ok"))
    target = {"w": torch.zeros(2), "extra": {"lr": 0.0, "betas": (0.0, 0.0)}}
    dcp_load(target, str(tmp_path / "ok"))
    assert torch.equal(target["w"], torch.ones(2)) and target["extra"] == {"lr": 0.5, "betas": (0.9, 0.99)}


def test_a_real_checkpoint_round_trips_through_the_safe_reader(tmp_path):
    strategy, model, optimizer, scheduler, path = _checkpoint(tmp_path, steps=2)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_resume_checkpoint(path, strategy, model, optimizer, scheduler)
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], state_before)


def test_checkpoints_of_nan_weights_are_refused(tmp_path):
    strategy, model, optimizer, scheduler, _ = _checkpoint(tmp_path)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="no checkpoint written"):
        save_resume_checkpoint(str(tmp_path), 2, strategy, model, optimizer, scheduler, {}, 2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step-000001"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()])
def test_a_failed_checkpoint_write_leaves_nothing_behind(tmp_path, monkeypatch, failure):
    strategy, model, optimizer, scheduler, _ = _checkpoint(tmp_path)

    def broken_save(obj, f, *args, **kwargs):
        if isinstance(f, str):  # the RNG file; DCP's own items go to a buffer
            with open(f, "wb") as fh:
                fh.write(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", broken_save)
    expected = CheckpointError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        save_resume_checkpoint(str(tmp_path), 2, strategy, model, optimizer, scheduler, {}, 2)
    if expected is CheckpointError:
        assert "No space left on device" in str(info.value) and "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000001"]  # no .step-000002.tmp


def _export(tokenizer, path, seed):
    hf = tiny_model("llama", tokenizer, seed=seed)
    export_hf(hf, tokenizer, str(path), {"model": "llama"}, extra_config={"reward_mean": float(seed)},
              extra_json={"summary.json": {"seed": seed}})
    return hf


def test_export_files_are_readable_by_others(tokenizer, tmp_path):
    _export(tokenizer, tmp_path / "rm", 0)
    names = sorted(os.listdir(tmp_path / "rm"))
    assert "model.safetensors" in names and not [n for n in names if n.startswith(".export")]
    for name in names:
        mode = stat.S_IMODE(os.stat(tmp_path / "rm" / name).st_mode)
        assert mode & 0o044 == 0o044, (name, oct(mode))


def test_export_of_nan_weights_writes_nothing(tokenizer, tmp_path):
    hf = tiny_model("llama", tokenizer)
    with torch.no_grad():
        next(hf.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="NaN or infinite"):
        export_hf(hf, tokenizer, str(tmp_path / "rm"))
    assert not (tmp_path / "rm").exists()  # checked before the folder is even created


def test_an_export_that_fails_midway_keeps_the_previous_one(tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "rm"
    _export(tokenizer, out, 0)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    from transformers import PreTrainedModel

    def full_disk(self, folder, **kwargs):
        (open(os.path.join(folder, "config.json"), "w")).write("{}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(ExportError, match="No space left on device; the previous export there"):
        _export(tokenizer, out, 1)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


@contextlib.contextmanager
def _small_tmpfs(tmp_path, size: str):
    """A tmpfs of ``size`` (e.g. ``20m``) mounted under ``tmp_path`` for the block, then unmounted; skips the test
    where mounting is not allowed (not root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def test_an_export_on_a_full_tmpfs_keeps_the_previous_one(tokenizer, tmp_path):
    """The failure as reported: a 20 MB tmpfs holds one export but not a second one beside it."""
    with _small_tmpfs(tmp_path, "20m") as mnt:
        out = mnt / "rm"
        _export(tokenizer, out, 0)
        before = {n: (out / n).read_bytes() for n in os.listdir(out)}
        with pytest.raises(ExportError, match="No space left on device"):
            _export(tokenizer, out, 1)
        assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
        assert json.loads((out / "config.json").read_text())["reward_mean"] == 0.0


# ------------------------------------------------------------------------------ the save path: whose, and in use

def test_the_save_path_refuses_the_root_a_file_and_someone_elses_folder(tmp_path):
    from coati.checkpoint.resume import SavePathError, prepare_save_path

    with pytest.raises(SavePathError, match="is the filesystem root"):
        prepare_save_path("/", resuming=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SavePathError, match="afile is a file, not a folder"):
        prepare_save_path(str(tmp_path / "afile"), resuming=False)
    theirs = tmp_path / "my_model"  # a user's own Hugging Face folder
    theirs.mkdir()
    (theirs / "config.json").write_text('{"mine": true}')
    with pytest.raises(SavePathError, match=r"my_model holds files that are not a coati run's \(config.json\); .*"
                                            "--overwrite_output_dir"):
        prepare_save_path(str(theirs), resuming=False)
    assert os.listdir(theirs) == ["config.json"]  # untouched: no lock, no probe file
    prepare_save_path(str(theirs), resuming=False, overwrite=True).release()
    for marker in ("train_config.json", "metrics.jsonl"):  # a coati export, a run that stopped before exporting
        ours = tmp_path / f"ours_{marker}"
        ours.mkdir()
        (ours / marker).write_text("{}")
        prepare_save_path(str(ours), resuming=False).release()
    prepare_save_path(str(tmp_path / "new" / "folder"), resuming=False).release()


def test_a_second_run_into_a_locked_save_path_is_refused_with_the_owner(tmp_path):
    from coati.checkpoint.resume import LOCK_NAME, SavePathError, prepare_save_path

    first = prepare_save_path(str(tmp_path / "rm"), resuming=False)
    with pytest.raises(SavePathError, match=rf"in use by another run \(pid {os.getpid()} on host "):
        prepare_save_path(str(tmp_path / "rm"), resuming=True)
    first.release()
    prepare_save_path(str(tmp_path / "rm"), resuming=False).release()  # free again
    assert (tmp_path / "rm" / LOCK_NAME).exists()  # kept: it marks the folder as a coati run's
    assert prepare_save_path(str(tmp_path / "rm"), resuming=False, lock=False).fd is None  # other ranks hold none


def test_the_cli_refuses_a_save_path_another_process_is_training_into(tmp_path, capsys):
    import sys

    from coati.cli.train import main

    out = tmp_path / "rm"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from coati.checkpoint.resume "
                               "import prepare_save_path; lock = prepare_save_path(sys.argv[1], False); print('held', "
                               "flush=True); time.sleep(120)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["--model", "llama", "--model_config", "tiny", "--dataset", "hh-rlhf", "--max_samples", "8",
                     "--max_steps", "1", "--disable_tqdm", "--save_path", str(out)])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: --save_path {out} is in use by another run (pid {holder.pid} "), err
    assert sorted(os.listdir(out)) == [".coati-run.lock"]  # the first run's folder is untouched


def test_a_checkpoint_renamed_to_another_step_is_refused(tmp_path):
    strategy, model, optimizer, scheduler, path = _checkpoint(tmp_path)
    moved = os.path.join(os.path.dirname(path), "step-000005")
    os.rename(path, moved)
    with pytest.raises(CheckpointError, match="trainer_state.json records step 1 but the folder is step 5"):
        load_resume_checkpoint(moved, strategy, model, optimizer, scheduler)


def test_a_checkpoint_of_nan_weights_is_refused_when_loaded(tmp_path, monkeypatch):
    import coati.checkpoint.resume as checkpoint

    strategy, model, optimizer, scheduler, _ = _checkpoint(tmp_path)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    monkeypatch.setattr(checkpoint, "all_finite", lambda strategy, params: True)  # as if written by another tool
    path = save_resume_checkpoint(str(tmp_path), 2, strategy, model, optimizer, scheduler, {}, 2)
    monkeypatch.undo()
    with torch.no_grad():
        model[0].weight.zero_()
    with pytest.raises(CheckpointError, match="step-000002: its weights are NaN or infinite"):
        load_resume_checkpoint(path, strategy, model, optimizer, scheduler)
    with pytest.raises(CheckpointError, match="--init_from .*step-000002: its weights are NaN or infinite"):
        checkpoint.load_checkpoint_weights(path, strategy, model)


def test_a_checkpoint_on_a_full_tmpfs_says_no_space_and_keeps_the_last_good_one(tmp_path):
    """torch.save's zip writer on a full disk says 'unexpected pos 704 vs 598'; the user must read 'No space left'."""
    with _small_tmpfs(tmp_path, "1m") as mnt:
        strategy = NaiveStrategy()
        strategy.setup()
        small = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(small.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        save_resume_checkpoint(str(mnt), 1, strategy, small, optimizer, scheduler, {}, 0)
        big = torch.nn.Linear(512, 1024)  # 2 MB of weights: does not fit
        optimizer = torch.optim.AdamW(big.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        with pytest.raises(CheckpointError, match="No space left on device") as info:
            save_resume_checkpoint(str(mnt), 2, strategy, big, optimizer, scheduler, {}, 0)
        assert "unexpected pos" not in str(info.value)
        assert [os.path.basename(p) for p in list_checkpoints(str(mnt))] == ["step-000001"]
        verify_checkpoint(list_checkpoints(str(mnt))[0])
