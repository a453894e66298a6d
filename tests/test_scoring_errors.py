"""coati.scoring / coati.score / coati.evaluate on hostile models, inputs and options: every failure is one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, tiny_model
from safetensors.torch import load_file, save_file

from coati.checkpoint.export import export_hf
from coati.data.sources import select_pairs
from coati.cli.evaluate import build_parser as evaluate_parser
from coati.cli.evaluate import main as evaluate_main
from coati.models.reward_model import RewardModel
from coati.cli.score import build_parser as score_parser
from coati.cli.score import main as score_main
from coati.scoring import RewardScorer, resolve_device

MAX_LEN = 48
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "London, I think."},
    {"prompt": "一年有几个月？", "chosen": "十二个月。", "rejected": "十个月。"},
]


def _export(tokenizer, path, train_config=None):
    hf = tiny_model("llama", tokenizer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    export_hf(hf, tokenizer, str(path), train_config, extra_config={"reward_token_id": tokenizer.eos_token_id})
    return path


@pytest.fixture(scope="module")
def export(tokenizer, tmp_path_factory):
    return _export(tokenizer, tmp_path_factory.mktemp("rm_hard"),
                   {"model": "llama", "max_len": MAX_LEN, "chat_template": "auto"})


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hard_data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS), encoding="utf-8")
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading a model a test failure: what is checked must be checked before it."""
    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded before the options/input were checked")

    monkeypatch.setattr(RewardScorer, "from_pretrained", classmethod(refuse))


def _strict_loads(text):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _one_error(capsys) -> str:
    """The single ``error: ...`` line on stderr (it must be the last line; no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- 1. non-finite models and scores

def test_nan_weights_are_refused_by_api_and_both_clis(tokenizer, tmp_path, pairs_file, capsys):
    broken = _export(tokenizer, tmp_path / "broken", {"model": "llama", "max_len": MAX_LEN})
    weights = broken / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    tensors["model.layers.1.self_attn.q_proj.weight"][1, 2] = float("inf")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    expected = (f"{broken}: 2 weight tensors are not finite (NaN/inf), e.g. model.layers.0.mlp.up_proj.weight; "
                "this export is broken, retrain it")

    with pytest.raises(ValueError) as info:
        RewardScorer.from_pretrained(str(broken), device="cpu")
    assert str(info.value) == expected

    src = _write(tmp_path / "in.jsonl", '{"prompt": "hi", "response": "hello"}\n')
    out = tmp_path / "out.jsonl"
    assert score_main(["--model_path", str(broken), "--input", str(src), "--output", str(out),
                       "--disable_tqdm"]) == 2
    assert _one_error(capsys) == f"error: {expected}"
    assert not out.exists()

    report_dir = tmp_path / "eval"
    assert evaluate_main(["--model_path", str(broken), "--dataset", str(pairs_file), "--output_dir",
                          str(report_dir), "--disable_tqdm"]) == 2
    assert _one_error(capsys) == f"error: {expected}"
    assert not (report_dir / "report.json").exists()


def test_a_non_finite_score_is_an_error_not_a_nan(export, tmp_path, pairs_file, monkeypatch, capsys):
    def nan_rewards(self, input_ids, attention_mask=None, *args, **kwargs):
        out = torch.zeros(input_ids.shape[0])
        out[-1] = float("nan")
        return out

    monkeypatch.setattr(RewardModel, "forward", nan_rewards)
    scorer = RewardScorer.from_pretrained(str(export), device="cpu")
    with pytest.raises(ValueError, match=r"1 of 2 scores are not finite \(NaN/inf\)"):
        scorer.score_texts(["a", "b"], ["c", "d"])

    src = _write(tmp_path / "in.jsonl", '{"prompt": "hi", "responses": ["hello", "hey"]}\n')
    out = tmp_path / "out.jsonl"
    assert score_main(["--model_path", str(export), "--input", str(src), "--output", str(out),
                       "--disable_tqdm"]) == 2
    assert "scores are not finite" in _one_error(capsys)
    assert not out.exists()

    report_dir = tmp_path / "eval"
    assert evaluate_main(["--model_path", str(export), "--dataset", str(pairs_file), "--output_dir", str(report_dir),
                          "--disable_tqdm"]) == 2
    assert "scores are not finite" in _one_error(capsys)
    assert not (report_dir / "report.json").exists() and "nan" not in capsys.readouterr().out.lower()


def test_outputs_are_strict_json(export, tmp_path, pairs_file, capsys):
    # an input row may carry a NaN (Python's json reads it); it is written back as null, never as NaN
    src = _write(tmp_path / "in.jsonl", '{"prompt": "hi", "response": "hello", "weight": NaN}\n'
                                        '{"text": "plain", "w": [Infinity, 1.5]}\n')
    out = tmp_path / "out.jsonl"
    assert score_main(["--model_path", str(export), "--input", str(src), "--output", str(out),
                       "--disable_tqdm"]) == 0
    rows = [_strict_loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["weight"] is None and rows[1]["w"] == [None, 1.5]
    assert isinstance(rows[0]["score"], float) and isinstance(rows[1]["score"], float)

    report_dir = tmp_path / "eval"
    assert evaluate_main(["--model_path", str(export), "--dataset", str(pairs_file), "--output_dir", str(report_dir),
                          "--bins", "20", "--disable_tqdm"]) == 0
    report = _strict_loads((report_dir / "report.json").read_text(encoding="utf-8"))
    assert report["pairs"] == 2 and report["heldout"] is False
    assert any(b["acc"] is None for b in report["calibration"])  # empty bins are null
    scores = [_strict_loads(line) for line in (report_dir / "pair_scores.jsonl").read_text("utf-8").splitlines()]
    assert len(scores) == 2 and all(isinstance(s["margin"], float) for s in scores)


# --------------------------------------------------------------------------- 2. input text

def test_lone_surrogates_and_blank_answers_are_row_errors(tmp_path, no_model_load, capsys):
    ok = '{"prompt": "a", "response": "b"}\n'
    cases = [
        ('{"prompt": "a\\ud800", "response": "b"}', ":2: bad 'prompt': prompt message 0 is not valid Unicode "
                                                    "(lone surrogate '\\ud800' at character 1)"),
        ('{"prompt": [{"role": "user", "content": "\\udfff"}], "response": "b"}',
         ":2: bad 'prompt': prompt message 0 is not valid Unicode"),
        ('{"prompt": "a", "response": "x\\ud800"}', ":2: 'response' is not valid Unicode"),
        ('{"prompt": "a", "responses": ["x", "\\ud800"]}', ":2: response 1 is not valid Unicode"),
        ('{"text": "\\ud800"}', ":2: 'text' is not valid Unicode"),
        ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}',
         ":2: bad 'messages': prompt message 0 is not valid Unicode"),
        ('{"text": "b", "id": "\\ud800"}', ":2: the row is not valid Unicode"),
        ('{"prompt": "a", "responses": ["x", "y", ""]}', ":2: response 2 is empty"),
        ('{"prompt": "a", "responses": ["x", "y", "\\u200b\\u200d"]}', ":2: response 2 is empty"),
        ('{"prompt": "a", "response": ""}', ":2: 'response' is empty"),
        ('{"prompt": "a", "response": " \\u200b\\n\\ufeff"}', ":2: 'response' is empty"),
        ('{"text": ""}', ":2: 'text' is empty"),
        ('{"text": "\\u2060"}', ":2: 'text' is empty"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\u200b"}]}',
         ":2: the last message's 'content' is empty"),
    ]
    for i, (line, expected) in enumerate(cases):
        src = _write(tmp_path / f"bad{i}.jsonl", ok + line + "\n")
        out = tmp_path / f"bad{i}_out.jsonl"
        assert score_main(["--model_path", str(tmp_path / "never_loaded"), "--input", str(src), "--output",
                           str(out)]) == 2, line
        err = _one_error(capsys)
        assert err.startswith(f"error: {src}{expected}"), (err, expected)
        assert not out.exists()


def test_api_refuses_blank_answers_and_lone_surrogates(export):
    scorer = RewardScorer.from_pretrained(str(export), device="cpu")
    for blank in ("", "  ", "\u200b\u200d"):
        with pytest.raises(ValueError, match=r"responses\[1\] is empty"):
            scorer.score_texts(["a", "a"], ["ok", blank])
    with pytest.raises(ValueError, match=r"responses\[0\] is not valid Unicode"):
        scorer.score_texts(["a"], ["\ud800"])
    with pytest.raises(ValueError, match="prompt message 1 is not valid Unicode"):
        scorer.score_texts([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "\udc00"}]], ["b"])
    with pytest.raises(ValueError, match="is empty"):
        scorer.best_of_n("a", ["fine", "\u200b"])


# --------------------------------------------------------------------------- 3. outputs checked first

@pytest.fixture
def locked(tmp_path, monkeypatch):
    """A folder that is not writable: root may write anywhere, so os.access says no for this one folder."""
    folder = tmp_path / "locked"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(folder)
                        else real_access(p, mode, **kw))
    return folder


def test_score_output_is_checked_before_the_model_loads(tmp_path, no_model_load, locked, capsys):
    src = _write(tmp_path / "in.jsonl", '{"prompt": "a", "response": "b"}\n')
    cases = [
        (tmp_path, "is a folder"),
        (tmp_path / "missing" / "out.jsonl", f"the folder {tmp_path / 'missing'} does not exist"),
        (locked / "out.jsonl", "not writable"),
    ]
    for output, expected in cases:
        assert score_main(["--model_path", str(tmp_path / "no_such_model"), "--input", str(src), "--output",
                           str(output)]) == 2
        err = _one_error(capsys)
        assert err.startswith(f"error: --output {output}") and expected in err, err
    assert not (tmp_path / "missing").exists() and not list(locked.iterdir())


def test_evaluate_output_dir_is_checked_before_the_model_loads(tmp_path, pairs_file, no_model_load, locked, capsys):
    a_file = _write(tmp_path / "a_file", "x")
    cases = [
        (a_file, "exists and is not a folder"),
        (a_file / "sub", f"{a_file} is a file"),
        (locked / "new" / "eval", f"{locked} is not writable"),
    ]
    for output_dir, expected in cases:
        assert evaluate_main(["--model_path", str(tmp_path / "no_such_model"), "--dataset", str(pairs_file),
                              "--output_dir", str(output_dir)]) == 2
        err = _one_error(capsys)
        assert err.startswith(f"error: --output_dir {output_dir}") and expected in err, err
    assert not list(locked.iterdir())


# --------------------------------------------------------------------------- 4. --device

def test_device_errors_are_one_line(export, tmp_path, pairs_file, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device cuda: CUDA is not available here \(.+\); use --device cpu$"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"^--device gpu0: not a device name"):
        resolve_device("gpu0")
    # the Python API uses the same check, before any weights are read
    monkeypatch.setattr("coati.scoring.AutoModelForSequenceClassification.from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before the device was checked"))
    with pytest.raises(ValueError, match="CUDA is not available here"):
        RewardScorer.from_pretrained(str(export), device="cuda:0")

    src = _write(tmp_path / "in.jsonl", '{"prompt": "a", "response": "b"}\n')
    missing = str(tmp_path / "no_such_model")  # an error naming the model would mean the device came second
    for device, expected in (("cuda", "error: --device cuda: CUDA is not available here ("),
                             ("gpu0", "error: --device gpu0: not a device name")):
        assert score_main(["--model_path", missing, "--input", str(src), "--device", device]) == 2
        assert _one_error(capsys).startswith(expected)
        assert evaluate_main(["--model_path", missing, "--dataset", str(pairs_file), "--device", device,
                              "--output_dir", str(tmp_path / "eval")]) == 2
        assert _one_error(capsys).startswith(expected)
    assert score_main(["--model_path", missing, "--input", str(src), "--device", "cuda"]) == 2
    assert _one_error(capsys).endswith("; use --device cpu")


# --------------------------------------------------------------------------- 5. truncation

def test_truncation_is_reported_per_text(export, tmp_path, capsys):
    huge = "word " * 40000  # 200k characters
    rows = [
        {"prompt": "a", "responses": ["short", huge, "also short"]},
        {"prompt": "hi", "response": "hello"},
        {"text": huge},
        {"prompt": "Tell me a long story. " * 30, "response": "No."},  # the prompt is cut from the left
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    src = _write(tmp_path / "in.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert score_main(["--model_path", str(export), "--input", str(src), "--output", str(out),
                       "--disable_tqdm"]) == 0
    scored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["truncated"] for r in scored] == [[False, True, False], False, True, True, False]
    assert (f"3 of 7 texts were truncated to max_len {MAX_LEN} tokens (prompt cut from the left, or the answer's "
            "end cut)") in capsys.readouterr().err.splitlines()

    scorer = RewardScorer.from_pretrained(str(export), device="cpu")
    encoded = scorer.encode_texts(["a", "Tell me a long story. " * 30, None], [huge, "No.", "fine"])
    assert encoded[0].answer_truncated  # (its chat-template prompt is cut to max_len // 4 tokens too)
    assert (encoded[1].prompt_truncated, encoded[1].answer_truncated) == (True, False)
    assert (encoded[2].prompt_truncated, encoded[2].answer_truncated) == (False, False)
    assert all(len(e.input_ids) <= MAX_LEN for e in encoded)
    got = scorer.score_texts(["a", "Tell me a long story. " * 30, None], [huge, "No.", "fine"])
    assert isinstance(got, list) and all(isinstance(x, float) for x in got)
    assert got == pytest.approx(scorer.score_encoded(encoded), abs=1e-6)
    assert scored[0]["scores"][1] == pytest.approx(got[0], abs=1e-5)

    # nothing cut: no summary line
    small = _write(tmp_path / "small.jsonl", '{"prompt": "hi", "response": "hello"}\n')
    assert score_main(["--model_path", str(export), "--input", str(small), "--output", str(tmp_path / "s.jsonl"),
                       "--disable_tqdm"]) == 0
    assert "truncated" not in capsys.readouterr().err
    assert json.loads((tmp_path / "s.jsonl").read_text(encoding="utf-8"))["truncated"] is False


# --------------------------------------------------------------------------- 6. --help

@pytest.mark.parametrize("build", [score_parser, evaluate_parser], ids=["score", "evaluate"])
def test_help_shows_each_default_once(build):
    import re

    text = build().format_help()
    options = [o for o in re.split(r"\n  (?=-)", text.split("options:", 1)[1]) if o.strip()]
    assert len(options) > 10
    for option in options:
        assert option.lower().count("default") <= 1, option
    by_flag = {o.split()[0].rstrip(","): " ".join(o.split()) for o in options}
    assert "(default: 16)" in by_flag["--batch_size"] and "(default: float32)" in by_flag["--dtype"]
    assert "(default: cuda when available)" in by_flag["--device"]


# --------------------------------------------------------------------------- 7. --heldout

def test_evaluate_heldout_is_the_trainers_held_out_pairs(tokenizer, tmp_path, data_dir, monkeypatch, capsys):
    settings = {"model": "llama", "dataset": "hh-rlhf", "data_dir": str(data_dir), "max_samples": 40,
                "eval_split": 0.3, "seed": 3, "max_len": 64, "chat_template": "auto"}
    model = _export(tokenizer, tmp_path / "rm", settings)
    held = select_pairs(["hh-rlhf"], str(data_dir), max_samples=40, seed=3, eval_split=0.3).eval
    assert 0 < len(held) < 40
    (model / "summary.json").write_text(json.dumps({"eval_pairs": len(held)}), encoding="utf-8")

    monkeypatch.delenv("COATI_DATA_DIR")  # the data folder comes from train_config.json
    out = tmp_path / "eval"
    assert evaluate_main(["--model_path", str(model), "--heldout", "--output_dir", str(out), "--disable_tqdm"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["pairs"] == len(held) and report["heldout"] is True and report["datasets"] == ["hh-rlhf"]
    rows = [json.loads(line) for line in (out / "pair_scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["origin"] for r in rows] == [p.origin for p in held]
    assert f"{len(held)} held-out pairs: acc " in capsys.readouterr().out

    # the data changed since training: summary.json counts another number of held-out pairs
    (model / "summary.json").write_text(json.dumps({"eval_pairs": len(held) + 1}), encoding="utf-8")
    assert evaluate_main(["--model_path", str(model), "--heldout", "--output_dir", str(out), "--disable_tqdm"]) == 2
    err = _one_error(capsys)
    assert "the data changed since training" in err and f"counts {len(held) + 1} held-out pairs" in err


def test_evaluate_heldout_errors(tokenizer, tmp_path, pairs_file, data_dir, no_model_load, capsys):
    bare = _export(tokenizer, tmp_path / "bare", None)  # no train_config.json
    no_split = _export(tokenizer, tmp_path / "no_split", {"dataset": ["hh-rlhf"], "data_dir": str(data_dir),
                                                           "eval_split": 0.0, "max_len": 64})
    cases = [
        (["--model_path", str(no_split)], "give --dataset (the pairs to evaluate) or --heldout"),
        (["--model_path", str(no_split), "--heldout", "--dataset", str(pairs_file)], "not both"),
        (["--model_path", str(no_split), "--heldout", "--max_samples", "5"], "--max_samples applies to --dataset"),
        (["--model_path", str(bare), "--heldout"], "train_config.json is missing"),
        (["--model_path", str(no_split), "--heldout"], "the training run held out no pairs (eval_split 0.0 and no "
                                                       "eval_dataset"),
    ]
    for argv, expected in cases:
        assert evaluate_main(argv + ["--output_dir", str(tmp_path / "eval")]) == 2, argv
        assert expected in _one_error(capsys), argv


# --------------------------------------------------------------------------- 8. python -m: one line, exit 2

def test_module_entry_points_print_one_error_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    src = _write(tmp_path / "in.jsonl", '{"prompt": "a", "response": "\\u200b"}\n')
    for argv, expected in (
            (["coati.score", "--model_path", str(tmp_path / "m"), "--input", str(src)], f"error: {src}:1: 'response' "
                                                                                         "is empty"),
            (["coati.evaluate", "--model_path", str(tmp_path / "m")], "error: give --dataset")):
        proc = subprocess.run([sys.executable, "-m", *argv], check=False, capture_output=True, text=True, env=env,
                              cwd=str(tmp_path), timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(expected), \
            proc.stderr


@pytest.mark.parametrize("layout", ["coati", "chat"])
def test_a_slow_chat_template_in_the_model_folder_is_one_error_line(tokenizer, tmp_path, layout, monkeypatch, capsys):
    """Two nested range(99999) loops (each within jinja's range limit) used to hang coati.score."""
    import copy

    import coati.data.template as template

    tok = copy.copy(tokenizer)
    tok.chat_template = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x"
    model = _export(tok, tmp_path / "rm", {"model": "llama", "max_len": MAX_LEN, "chat_template": "auto"})
    monkeypatch.setattr(template, "TEMPLATE_SECONDS", 0.5)
    src = _write(tmp_path / "in.jsonl", '{"prompt": [{"role": "user", "content": "hi"}], "response": "hello"}\n')
    out = tmp_path / "out.jsonl"
    assert score_main(["--model_path", str(model), "--input", str(src), "--output", str(out), "--layout", layout,
                       "--disable_tqdm"]) == 2
    assert _one_error(capsys) == (f"error: the chat template of {model} took longer than 0.5 s to render a "
                                  f"conversation of {1 if layout == 'coati' else 2} messages; refused")
    assert not out.exists()
