"""End to end through the CLI: real hh-rlhf rows, tiny models, and a real 2-process torchrun on gloo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from helpers import REPO, TOKENIZER_DIR, free_port, run_env

COMMON = ["--dataset", "hh-rlhf", "--max_samples", "48", "--max_len", "96", "--lr", "1e-3", "--log_every", "1",
          "--disable_tqdm", "--seed", "7", "--mixed_precision", "fp32"]


def _run(args, launcher=None, expect_ok=True):
    cmd = (launcher or [sys.executable]) + [str(REPO / "train_reward_model.py")] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), timeout=600, cwd=REPO)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(path, split="train"):
    return [r for r in map(json.loads, (Path(path) / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.mark.slow
def test_cli_trains_evaluates_and_exports(tmp_path):
    out = tmp_path / "rm"
    _run(["--model", "llama", "--strategy", "naive", "--batch_size", "4", "--max_steps", "4", "--eval_split", "0.25",
          "--save_path", str(out)] + COMMON)
    train, evals = _rows(out), _rows(out, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train + evals:
        for key in ("step", "split", "loss", "acc", "dist", "chosen_reward", "rejected_reward"):
            assert key in r
        assert r["dist"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"], abs=1e-6)
    assert evals and evals[-1]["pairs"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval"]["pairs"] == evals[-1]["pairs"]

    # the export's train_config.json is a recipe: given back, it trains the same run again (weights equal), and
    # --report_to tensorboard feeds the same rows to TensorBoard event files
    again = tmp_path / "again"
    _run(["--config", str(out / "train_config.json"), "--save_path", str(again), "--report_to", "tensorboard"])
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert [r["loss"] for r in _rows(again)] == [r["loss"] for r in train]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(again / "runs"))
    events.Reload()
    for tag, key in (("train/loss", "loss"), ("train/acc", "acc"), ("eval/acc", "acc")):
        rows = train if tag.startswith("train") else evals
        assert [(e.step, round(e.value, 5)) for e in events.Scalars(tag)] == \
            [(r["step"], round(r[key], 5)) for r in rows]


def test_help_groups_the_flags_and_shows_each_default_once():
    from coati.cli.train import build_parser

    text = " ".join(build_parser().format_help().split())  # argparse wraps lines anywhere
    for group in ("backbone:", "lora:", "data:", "loss:", "strategy:", "optim:", "log:"):
        assert group in text
    assert "(default: log_sig)" in text and "(default: 512)" in text
    assert text.count("(default: 512)") == 1 and "(default: None)" not in text and "--max-len" not in text


@pytest.mark.parametrize("args, message", [
    (["--strategy", "nope"], "invalid choice: 'nope'"),
    (["--dataset", "/no/such/file.jsonl"], "error: unknown data spec '/no/such/file.jsonl'"),
])
def test_user_errors_are_one_clear_line(args, message, tmp_path, capsys):
    """In-process (tests/cli/test_errors.py runs the CLI as a subprocess for each kind of mistake)."""
    from coati.cli.train import main

    try:
        code = main(args + ["--save_path", str(tmp_path / "x"), "--max_steps", "1"])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [next(
        line for line in err.splitlines() if message in line)]
    assert "Traceback" not in err
    import torch.distributed as dist

    assert not dist.is_initialized()  # a failed run leaves no process group behind (a second run can start)


@pytest.mark.slow
def test_cli_internlm2_focal_log_barrier_on_chinese_pairs(tmp_path, data_dir):
    """InternLM2 recipe end to end: real InternLM2 tokenizer, focal loss + log barrier, XTuner's reward token."""
    tok_dir = TOKENIZER_DIR
    out = tmp_path / "rm"
    _run(["--model", "internlm2", "--tokenizer", str(tok_dir), "--strategy", "naive", "--loss_fn", "focal",
          "--penalty", "log_barrier", "--reward_token", "92527", "--dataset", str(data_dir / "zh/medicalgpt_dpo_zh_500.jsonl"),
          "oaast-rm-zh", "--max_samples", "24", "--max_len", "128", "--batch_size", "4", "--max_steps", "3",
          "--lr", "1e-3", "--mixed_precision", "fp32", "--log_every", "1", "--disable_tqdm", "--save_path", str(out)])
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(set(r["languages"]) == {"zh"} for r in rows)
    # step 1 starts from near-zero rewards: focal (= log 2 at d = 0) plus 0.02 x log barrier (about -2 log 5)
    assert rows[0]["loss"] == pytest.approx(0.6287, abs=0.05)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["reward_token_id"] == 92527
    assert config["pad_token_id"] != 92527
    train_config = json.loads((out / "train_config.json").read_text())
    assert train_config["loss_fn"] == "focal" and train_config["penalty"] == "log_barrier"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_model_auto_picks_the_family_of_the_checkpoint_and_records_it(family, tmp_path, tokenizer):
    """A checkpoint folder of a family (random weights of its tiny preset, SmolLM2's tokenizer): ``--model auto``
    trains it as that family, says so in the log, records it in train_config.json, and the export loads as the
    family's own ``*ForSequenceClassification``."""
    from coati.models.backbones import get_backbone
    from coati.models.loading import build_model

    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    build_model(get_backbone(family), tokenizer, None, "tiny").save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    out = tmp_path / "rm"
    proc = _run(["--model", "auto", "--pretrain", str(ckpt), "--strategy", "naive", "--batch_size", "4",
                 "--max_steps", "2", "--save_path", str(out)] + COMMON)
    assert f"--model auto: {family} (model_type" in proc.stderr + proc.stdout
    assert json.loads((out / "train_config.json").read_text())["model"] == family
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model) is get_backbone(family).model_class
    # no checkpoint to read: refused at parse time, one line
    bad = _run(["--model", "auto", "--save_path", str(tmp_path / "x")] + COMMON, expect_ok=False)
    assert bad.returncode == 2 and "--model auto reads the backbone family from a checkpoint" in bad.stderr


END_PROCESS = """
import atexit, os, sys
import torch.distributed as dist
from coati.strategies.distributed import ProcessGroupMixin, end_process

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
print(end_process(5))  # no process group: the code comes back
dist.init_process_group("gloo")
ProcessGroupMixin().teardown(keep_process_group=True)  # one rank: destroyed all the same
print(dist.is_initialized())
dist.init_process_group("gloo")
atexit.register(lambda: print("interpreter teardown ran"))
print("written before the end", end="")  # buffered, not flushed, when stdout is a pipe
end_process(3)
print("not reached")
"""


def test_a_rank_that_keeps_its_process_group_ends_without_interpreter_teardown(tmp_path):
    """What the CLI does after a multi-process run (the gloo destructor deadlock is a race, so the test checks the
    mechanism): the code is the exit status, buffered output is flushed, no interpreter teardown (atexit, and so no
    destructors) runs, and with one rank ``keep_process_group`` destroys the group as usual."""
    proc = subprocess.run([sys.executable, "-c", END_PROCESS, str(free_port())], capture_output=True, text=True,
                          env=run_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == "5\nFalse\nwritten before the end"
