"""coati.reporting: metrics.jsonl rows and trimming, TensorBoard and wandb backends, missing-package messages."""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest

from coati.reporting import MetricsLog, report_to_problem, row_scalars


def train_row(step: int, loss: float, acc: float, **extra) -> dict:
    """A metrics row shaped like the trainer's, with an en and a zh breakdown."""
    return {"step": step, "split": "train", "epoch": 0, "loss": loss, "acc": acc, "dist": 0.01 * step, "lr": 1e-4,
            "pairs": 8, "languages": {"en": {"loss": loss + 0.1, "acc": acc / 2, "pairs": 4},
                                      "zh": {"loss": loss - 0.1, "acc": 1.0, "pairs": 4}}, **extra}


def eval_row(step: int, loss: float, acc: float) -> dict:
    return {"step": step, "split": "eval", "loss": loss, "acc": acc, "pairs": 6,
            "languages": {"en": {"loss": loss, "acc": acc, "pairs": 6}}}


def read_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def tb_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the event files in ``<folder>/runs``, read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(folder) / "runs"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_rows_round_trip_through_metrics_jsonl(tmp_path):
    rows = [train_row(1, 0.69, 0.5), eval_row(1, 0.7, 0.25), train_row(2, float("nan"), 0.75, note="中文")]
    with MetricsLog(str(tmp_path / "run")) as log:
        log.write(rows[0])
        log.write(rows[1])
        assert read_rows(tmp_path / "run") == rows[:2]  # flushed as written, before close
        log.write(rows[2])
    got = read_rows(tmp_path / "run")
    assert got[:2] == rows[:2]
    assert got[2]["loss"] is None and got[2]["note"] == "中文"  # strict JSON: NaN becomes null
    assert got[2]["languages"]["en"] == {"loss": None, "acc": 0.375, "pairs": 4}
    assert {k: v for k, v in got[2].items() if k not in ("loss", "languages")} == \
        {k: v for k, v in rows[2].items() if k not in ("loss", "languages")}


def test_fresh_run_empties_and_resume_keeps_rows_up_to_its_step(tmp_path):
    with MetricsLog(str(tmp_path)) as log:
        for step in range(1, 5):
            log.write(train_row(step, 1.0 / step, 0.5))
        log.write(eval_row(4, 0.3, 0.9))
    with MetricsLog(str(tmp_path), start_step=2) as log:
        assert [r["step"] for r in read_rows(tmp_path)] == [1, 2]
        log.write(train_row(3, 9.0, 0.1))
    assert [(r["step"], r["loss"]) for r in read_rows(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 9.0)]
    MetricsLog(str(tmp_path)).close()  # a fresh run in the same folder
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_trimming_drops_a_cut_short_last_line_and_refuses_a_corrupt_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo', encoding="utf-8")
    MetricsLog(str(tmp_path), start_step=5).close()
    assert [r["step"] for r in read_rows(tmp_path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics row"):
        MetricsLog(str(tmp_path), start_step=5)


def test_write_needs_an_integer_step_and_an_open_log(tmp_path):
    log = MetricsLog(str(tmp_path))
    with pytest.raises(ValueError, match="integer 'step'"):
        log.write({"split": "train", "loss": 0.5})
    log.close()
    log.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        log.write(train_row(1, 0.5, 0.5))


def test_row_scalars_tags_numbers_by_split_and_language():
    row = {"step": 7, "split": "eval", "loss": 0.5, "acc": 1, "ok": True, "name": "x", "none": None,
           "languages": {"en": {"acc": 0.25, "pairs": 2}}, "truncation": {"pairs": 3}}
    assert row_scalars(row) == {"eval/loss": 0.5, "eval/acc": 1, "eval/en/acc": 0.25, "eval/en/pairs": 2,
                                "eval/truncation/pairs": 3}


def test_tensorboard_event_files_hold_the_rows_scalars(tmp_path):
    with MetricsLog(str(tmp_path), report_to="tensorboard") as log:
        log.write(train_row(1, 0.69, 0.5))
        log.write(train_row(2, 0.61, 0.75))
        log.write(eval_row(2, 0.65, 0.625))
    scalars = tb_scalars(tmp_path)
    assert scalars["train/loss"] == [(1, pytest.approx(0.69)), (2, pytest.approx(0.61))]
    assert scalars["train/acc"] == [(1, 0.5), (2, 0.75)]
    assert scalars["eval/loss"] == [(2, pytest.approx(0.65))]
    assert scalars["eval/acc"] == [(2, 0.625)]
    assert scalars["train/en/acc"] == [(1, 0.25), (2, 0.375)]
    assert scalars["train/zh/loss"] == [(1, pytest.approx(0.59)), (2, pytest.approx(0.51))]
    assert scalars["eval/en/pairs"] == [(2, 6)]
    assert "train/step" not in scalars and "train/split" not in scalars
    assert len(read_rows(tmp_path)) == 3  # metrics.jsonl is still written


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    with MetricsLog(str(tmp_path), report_to="tensorboard") as log:
        for step in range(1, 5):
            log.write(train_row(step, float(step), 0.5))
    with MetricsLog(str(tmp_path), report_to="tensorboard", start_step=2) as log:
        for step in (3, 4):
            log.write(train_row(step, 10.0 * step, 0.5))
    assert tb_scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    with MetricsLog(str(tmp_path), report_to="tensorboard") as log:  # a fresh run hides all older events
        log.write(train_row(1, 7.0, 0.5))
    assert tb_scalars(tmp_path)["train/loss"] == [(1, 7.0)]


def wandb_records(run_file: str) -> list:
    """The records of a ``.wandb`` transaction log, decoded with wandb's own protobuf ``Record``.

    The file is a 7-byte header then LevelDB-log framing: 32 KiB blocks of chunks, each ``crc32 (4) | length (2,
    little-endian) | type (1: full, 2: first, 3: middle, 4: last)`` then the bytes; a block's tail shorter than a
    chunk header is padding. (wandb 0.31 ships no Python reader for it.)
    """
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, records = Path(run_file).read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb's own folders inside tmp_path, WANDB_MODE unset, quiet."""
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "run"


def test_wandb_offline_by_default_writes_its_run_folder(wandb_env):
    with MetricsLog(str(wandb_env), report_to="wandb", config={"lr": 1e-4, "model": "llama"}) as log:
        log.write(train_row(1, 0.69, 0.5))
        log.write(train_row(2, 0.61, 0.75))
        log.write(eval_row(2, 0.65, 0.625))
    run_files = glob.glob(str(wandb_env / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    for _ in range(50):  # the file is written by wandb's own service process, which may lag behind finish() under load
        records = wandb_records(run_files[0])
        history: dict[int, dict] = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                history.setdefault(r.history.step.num, {}).update(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        if len(history) == 2:
            break
        time.sleep(0.2)
    assert sorted(history) == [1, 2]
    assert (history[1]["train/loss"], history[1]["train/acc"]) == (0.69, 0.5)
    assert (history[2]["train/loss"], history[2]["eval/loss"], history[2]["eval/en/acc"]) == (0.61, 0.65, 0.625)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["lr"] == 1e-4 and config["model"] == "llama"
    assert len(read_rows(wandb_env)) == 3


def test_wandb_bad_mode_is_one_line(wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match=r"^--report_to wandb: wandb.init failed with WANDB_MODE=sometimes") as e:
        MetricsLog(str(wandb_env), report_to="wandb")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind, command", [("tensorboard", "pip install tensorboard"), ("wandb", "pip install wandb")])
def test_missing_backend_package_names_the_install_command(tmp_path, monkeypatch, kind, command):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    problem = report_to_problem(kind)
    assert problem.startswith(f"--report_to {kind} needs the {kind} package, which is not installed: {command}")
    assert "\n" not in problem
    with pytest.raises(ValueError) as e:
        MetricsLog(str(tmp_path), report_to=kind)
    assert str(e.value) == problem


def test_report_to_problem_is_none_when_usable_and_names_choices_when_unknown():
    assert report_to_problem("none") is None
    assert report_to_problem("tensorboard") is None  # installed by the test extra
    assert report_to_problem("mlflow") == "--report_to: must be one of none, tensorboard, wandb, got 'mlflow'"
