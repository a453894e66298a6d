"""User mistakes fail fast through the CLI: exit code 2, one ``error: ...`` line, no traceback, and before the
model is built (no ``model:`` log line). How long a run takes is not asserted: that depends on the machine and its
load (benchmarks, not tests, hold time goals).

The five CLI runs are started by a module fixture, as many at a time as there are cores, so the file stays fast;
each test then checks its own run. The
``error:`` lines are printed at the end of the module (``CLI_ERROR[case]: ...``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import REPO, run_env

DATA_DIR = os.environ["COATI_DATA_DIR"]  # set by conftest.py (default ../shared/data)
COMMON = ["--model", "llama", "--max_steps", "1", "--disable_tqdm"]


def _tokenizer_without_eos(folder: Path) -> Path:
    """A copy of SmolLM2's tokenizer whose EOS token is removed (reloads with ``eos_token_id`` None)."""
    from transformers import AutoTokenizer

    from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain

    tok = AutoTokenizer.from_pretrained(resolve_pretrain(SMOLLM2_ALIAS, with_model=False))
    tok.eos_token = None
    tok.save_pretrained(folder)
    if AutoTokenizer.from_pretrained(folder).eos_token_id is not None:  # older transformers: drop it by hand
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = folder / name
            if path.exists():
                data = json.loads(path.read_text(encoding="utf-8"))
                data.pop("eos_token", None)
                path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    assert AutoTokenizer.from_pretrained(folder).eos_token_id is None
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """Run every case once: ``runs[case]`` is (returncode, stderr, stdout)."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    (tmp / "afile").write_text("a file, not a folder")  # a path under a file cannot be created, even by root
    all_bad = tmp / "all_bad.jsonl"
    all_bad.write_text("\n".join([json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
                                  "{not json", json.dumps({"question": "q", "answer": "a"}), "[1, 2]",
                                  json.dumps({"prompt": "p", "chosen": "a"})]) + "\n", encoding="utf-8")
    no_eos = _tokenizer_without_eos(tmp / "no_eos_tokenizer")
    cases = {
        "unwritable_save_path": ["--save_path", str(tmp / "afile" / "out")],
        "missing_data_file": ["--dataset", "/no/such.jsonl"],
        "tokenizer_without_eos": ["--tokenizer", str(no_eos)],
        "strategy_unavailable": ["--strategy", "colossalai_zero2"],
        "all_rows_bad": ["--dataset", str(all_bad)],
    }
    def launch(args: list[str]) -> tuple[int, str, str]:
        cmd = [sys.executable, str(REPO / "train_reward_model.py")] + COMMON + args
        proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), cwd=tmp, timeout=300)
        return proc.returncode, proc.stderr, proc.stdout

    # as many runs at a time as there are cores
    with ThreadPoolExecutor(max_workers=max(1, min(len(cases), os.cpu_count() or 1))) as pool:
        futures = {case: pool.submit(launch, args if "--save_path" in args
                                     else args + ["--save_path", str(tmp / f"out_{case}")])
                   for case, args in cases.items()}
        results = {case: future.result() for case, future in futures.items()}
    yield results
    lines = [f"CLI_ERROR[{case}]: {line}" for case, result in results.items()
             for line in result[1].splitlines() if line.startswith("error:")]
    capman = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capman is not None and reporter is not None and lines:
        with capman.global_and_fixture_disabled():
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)


def _error_line(runs, case: str) -> str:
    code, err, out = runs[case]
    assert code == 2, f"exit code {code}\n{err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert len(errors[0]) > len("error: ") + 10
    # failed before the model was built: no model log line
    assert "model:" not in err and "model:" not in out, err[-3000:]
    return errors[0]


def test_unwritable_save_path(runs):
    line = _error_line(runs, "unwritable_save_path")
    assert line.startswith("error: --save_path ") and "afile/out is not writable" in line
    assert "data:" not in runs["unwritable_save_path"][1]  # before the data was read


def test_missing_data_file(runs):
    line = _error_line(runs, "missing_data_file")
    assert "'/no/such.jsonl'" in line and "no such file" in line


def test_tokenizer_without_eos(runs):
    line = _error_line(runs, "tokenizer_without_eos")
    assert "no_eos_tokenizer" in line and "has no EOS token" in line and "--reward_token" in line


def test_strategy_that_cannot_run_here(runs):
    line = _error_line(runs, "strategy_unavailable")
    assert "colossalai_zero2" in line and "ddp" in line and "fsdp" in line


def test_data_file_whose_every_row_is_bad(runs):
    line = _error_line(runs, "all_rows_bad")
    assert "all_bad.jsonl" in line and "no usable preference pairs" in line
    err = runs["all_rows_bad"][1]
    assert "5 rows read, 0 pairs kept, 5 skipped" in err  # the report follows the error line
