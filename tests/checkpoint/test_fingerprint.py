"""A checkpoint belongs to one run; updates that make weights non-finite stop the run; signals stop it cleanly."""

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from coati.checkpoint.export import NonFiniteWeightsError
from coati.checkpoint.resume import list_checkpoints, save_resume_checkpoint
from coati.losses import log_sig_loss
from coati.models.backbones import get_backbone
from coati.models.reward_model import RewardModel
from coati.signals import Interrupted
from coati.strategies.naive import NaiveStrategy
from coati.cli.train import main
from helpers import tiny_model, tiny_trainer

RUN = ["--strategy", "naive", "--dataset", "hh-rlhf", "--max_samples", "24", "--max_len", "64", "--batch_size", "4",
       "--max_steps", "4", "--save_every", "2", "--log_every", "1", "--disable_tqdm", "--lr", "1e-3",
       "--mixed_precision", "fp32"]


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines[-5:]
    return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "rm"
    assert main(RUN + ["--save_path", str(out)]) == 0
    return out


@pytest.mark.parametrize("change, named", [
    (["--lr", "2e-3"], "lr 0.001 -> 0.002"),
    (["--loss_fn", "log_exp"], "loss_fn 'log_sig' -> 'log_exp'"),
    (["--dataset", "dpo-en-demo"], "training data"),
    (["--max_samples", "28"], "training data"),
    (["--seed", "7"], "seed 42 -> 7"),
])
def test_resume_refuses_another_runs_checkpoint(finished, tmp_path, change, named, capsys):
    import shutil

    other = tmp_path / "rm"
    shutil.copytree(finished, other)
    before = (other / "model.safetensors").read_bytes()
    assert main(RUN + change + ["--save_path", str(other), "--resume", "auto"]) == 2
    err = _error(capsys)
    assert "belongs to another run" in err and named in err, err
    assert (other / "model.safetensors").read_bytes() == before  # nothing exported


def test_the_fingerprint_names_options_of_the_config_once(monkeypatch):
    """FINGERPRINT_FIELDS is checked against coati.config when imported: a misspelt name or a renamed option fails
    there, not at the first run; the settings keep its order (what checkpoints have always stored)."""
    import coati.checkpoint.fingerprint as fingerprint
    from coati.config import TrainConfig, option_fields

    fields = fingerprint.FINGERPRINT_FIELDS
    assert set(fields) <= set(option_fields()) and len(set(fields)) == len(fields)
    settings = fingerprint.run_fingerprint(TrainConfig().to_dict(), [], 8, 10)["settings"]
    assert list(settings) == [*fields, "global_batch", "total_steps"]
    with pytest.raises(ValueError, match=r"max_length is not an option \(did you mean max_len\?\)"):
        fingerprint._check_fields((*fields, "max_length"))
    with pytest.raises(ValueError, match="seed is named more than once"):
        fingerprint._check_fields((*fields, "seed"))
    renamed = {("learning_rate" if k == "lr" else k): v for k, v in option_fields().items()}  # --lr renamed
    monkeypatch.setattr(fingerprint, "option_fields", lambda: renamed)
    with pytest.raises(ValueError, match="once: lr is not an option$"):
        fingerprint._check_fields(fields)


def test_resume_of_the_same_run_is_accepted(finished, tmp_path, capsys):
    import shutil

    again = tmp_path / "rm"
    shutil.copytree(finished, again)
    assert main(RUN + ["--save_path", str(again), "--resume", "auto"]) == 0
    wa, wb = load_file(finished / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_new_run_into_a_folder_with_checkpoints_stops(finished, tmp_path, capsys):
    import shutil

    used = tmp_path / "rm"
    shutil.copytree(finished, used)
    names = sorted(os.listdir(used / "checkpoints"))
    assert main(RUN + ["--lr", "5e-4", "--save_path", str(used)]) == 2
    err = _error(capsys)
    assert "already holds resume checkpoints (newest step-000004)" in err and "--resume auto" in err
    assert sorted(os.listdir(used / "checkpoints")) == names  # the old run's checkpoints are untouched


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(finished, tmp_path, capsys):
    from coati.checkpoint.resume import load_checkpoint_weights

    ckpt = str(finished / "checkpoints" / "step-000004")
    # the weights it loads are exactly the checkpoint's: the finished run exported them at step 4
    strategy = NaiveStrategy()
    strategy.setup()
    from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain
    from coati.models.loading import load_tokenizer

    tok = load_tokenizer(resolve_pretrain(SMOLLM2_ALIAS, with_model=False))
    model = RewardModel(tiny_model("llama", tok, seed=5), get_backbone("llama"))
    load_checkpoint_weights(ckpt, strategy, model)
    exported = load_file(finished / "model.safetensors")
    state = model.model.state_dict()
    assert all(torch.equal(exported[k], state[k]) for k in exported)
    # other settings are allowed; the new run starts at step 0 with its own schedule
    out = tmp_path / "new"
    assert main(RUN + ["--lr", "1e-4", "--max_steps", "2", "--save_path", str(out), "--init_from", ckpt]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    capsys.readouterr()


# ------------------------------------------------------------------------------------------ in-process trainer

def _trainer(tokenizer, tmp_path, loss_fn=log_sig_loss, **opts):
    trainer = tiny_trainer(tokenizer, tmp_path, loss_fn, **dict(dict(save_every=2), **opts))
    trainer.on_save = lambda step: save_resume_checkpoint(str(tmp_path), step, trainer.strategy, trainer.model,
                                                          trainer.optimizer, trainer.scheduler, {}, 0)
    return trainer


def test_an_update_that_makes_weights_nan_stops_before_any_checkpoint_of_them(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path)
    original = trainer.strategy.step

    def poisoned_step(opt, max_norm):  # finite gradients, but the update overflows (as --lr 1e30 does)
        norm = original(opt, max_norm)
        if trainer.step == 2:  # the third update
            with torch.no_grad():
                next(trainer.model.parameters()).mul_(float("inf"))
        return norm
    trainer.strategy.step = poisoned_step
    with pytest.raises(NonFiniteWeightsError, match="the update of step 3 made parameters NaN or infinite.*"
                                                    "step-000002"):
        trainer.fit()
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step-000002"]
    reloaded = _trainer(tokenizer, tmp_path / "x")
    from coati.checkpoint.resume import load_resume_checkpoint

    load_resume_checkpoint(str(tmp_path / "checkpoints" / "step-000002"), reloaded.strategy, reloaded.model,
                           reloaded.optimizer, reloaded.scheduler)
    assert all(torch.isfinite(p).all() for p in reloaded.model.parameters())


def test_the_cli_exports_nothing_when_weights_go_non_finite(tmp_path, capsys):
    # --lr at the largest value the parser accepts that still blows up fp32 weights
    out = tmp_path / "rm"
    code = main(["--strategy", "naive", "--dataset", "hh-rlhf", "--max_samples", "16", "--max_len", "48",
                 "--batch_size", "4", "--max_steps", "4", "--disable_tqdm", "--lr", "1e38", "--warmup_ratio", "0",
                 "--mixed_precision", "fp32", "--max_bad_steps", "2", "--save_every", "1", "--save_path", str(out)])
    assert code == 2
    err = _error(capsys)
    assert "the update of step 1 made parameters NaN or infinite" in err and "nothing was exported" in err, err
    assert not (out / "model.safetensors").exists()
    for ckpt in list_checkpoints(str(out)):  # whatever was checkpointed is finite
        assert _checkpoint_weights_finite(ckpt), ckpt


def test_a_run_whose_every_update_was_skipped_exports_nothing(tmp_path, capsys):
    # margins finite in float32 but so large that every step's mean loss overflows: each update is skipped, fewer in
    # a row than --max_bad_steps; the untrained model must not be exported as if it were trained
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "chosen": f"a good answer {i}",
                                        "rejected": f"bad {i}", "margin": 3e38}) + "\n" for i in range(16)))
    out = tmp_path / "rm"
    code = main(["--strategy", "naive", "--dataset", str(data), "--max_len", "48", "--batch_size", "4",
                 "--max_steps", "2", "--max_bad_steps", "5", "--disable_tqdm", "--mixed_precision", "fp32",
                 "--save_path", str(out)])
    assert code == 2
    err = _error(capsys)
    assert "none of the 2 optimizer steps of this run updated the weights: 2 had a non-finite loss" in err, err
    assert "largest |margin| is 3e+38" in err and "nothing was exported" in err, err
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()


def _checkpoint_weights_finite(path):
    """True when every tensor stored in a DCP checkpoint is finite (read with the safe reader)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from coati.checkpoint.safe_load import _SafeReader, dcp_load

    meta = _SafeReader(os.path.join(path, "model_optim")).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata) and k.startswith("model.")}
    dcp_load(state, os.path.join(path, "model_optim"))
    return bool(state) and all(bool(torch.isfinite(t).all()) for t in state.values())


def test_a_stop_signal_finishes_the_step_checkpoints_and_resumes_exactly(tokenizer, tmp_path):
    straight = _trainer(tokenizer, tmp_path / "straight")
    straight.fit()

    calls = {"n": 0}

    def loss_with_signal(c, r, m):  # SIGTERM arrives in the middle of the 5th step (before its backward)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return log_sig_loss(c, r, m)

    stopped = _trainer(tokenizer, tmp_path / "stopped", loss_fn=loss_with_signal)
    with pytest.raises(Interrupted) as info:
        stopped.fit()
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step 5 of 8" in str(info.value) and "step-000005" in str(info.value)
    assert stopped.step == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed after fit

    from coati.checkpoint.resume import find_resume_checkpoint, load_resume_checkpoint

    resumed = _trainer(tokenizer, tmp_path / "stopped")
    state = load_resume_checkpoint(find_resume_checkpoint(str(tmp_path / "stopped"), "auto"), resumed.strategy,
                                   resumed.model, resumed.optimizer, resumed.scheduler)
    resumed.step = state["step"]
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert math.isfinite(resumed.history[-1]["loss"])


def test_init_from_an_export_starts_from_its_weights_and_value_head(finished, tmp_path, capsys):
    out = tmp_path / "from_export"
    # one step at a learning rate too small to move fp32 weights: the export comes back unchanged
    assert main(RUN + ["--lr", "1e-12", "--max_steps", "1", "--save_every", "0", "--save_path", str(out),
                       "--init_from", str(finished)]) == 0
    wa, wb = load_file(finished / "model.safetensors"), load_file(out / "model.safetensors")
    assert "score.weight" in wa and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6  # head included
    capsys.readouterr()


def test_init_from_something_else_is_refused(tmp_path, capsys):
    assert main(RUN + ["--save_path", str(tmp_path / "o"), "--init_from", str(tmp_path)]) == 2
    assert "neither a resume checkpoint" in _error(capsys)


def test_settings_that_cannot_be_meant_for_the_backbone(tmp_path, capsys, caplog, tokenizer):
    """A LoRA rank above the hidden size is refused in one line; a --max_len past the backbone's positions and an
    ordinary word as the reward token are one warning each."""
    import logging

    from coati.models.loading import resolve_reward_token

    out = tmp_path / "rm"
    assert main(["--strategy", "naive", "--dataset", "hh-rlhf", "--max_samples", "8", "--max_steps", "1",
                 "--disable_tqdm", "--lora_rank", "65", "--save_path", str(out)]) == 2
    assert _error(capsys) == ("error: --lora_rank 65 is above the backbone's hidden size 64: a LoRA adapter's rank "
                              "cannot exceed its matrix's (use at most 64; 8-64 is usual)")
    with caplog.at_level(logging.WARNING, logger="coati"):
        assert main(["--strategy", "naive", "--dataset", "hh-rlhf", "--max_samples", "8", "--max_steps", "1",
                     "--disable_tqdm", "--max_len", "2304", "--model_config", "tiny", "--mixed_precision", "fp32",
                     "--save_path", str(out)]) == 0
        assert any("--max_len 2304 is past the 2048 positions" in r.getMessage() for r in caplog.records)
        caplog.clear()
        word = tokenizer.convert_tokens_to_ids("the")
        assert resolve_reward_token(tokenizer, str(word)) == word
        assert [r.getMessage() for r in caplog.records] == [
            f"warning: --reward_token {word} ('the') is an ordinary vocabulary token, not a special, added or unused "
            "one: the same token inside a text is read like the one appended"]
        caplog.clear()
        resolve_reward_token(tokenizer, str(tokenizer.eos_token_id))
        assert not caplog.records
