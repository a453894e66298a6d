"""Model folders a user was handed, broken in every way the hostile probe found: each is one ``error:`` line naming
the file and the cause (exit 2), from the scorer and from training's ``--pretrain``; nothing in them is executed, and
transformers' interactive remote-code prompt is never printed. Also: NaN weights loaded from ``--pretrain`` or a
resume checkpoint, a checkpoint whose recorded step disagrees with its folder, and an export whose recipe or data
changed after training."""

import json
import os
import pickle
import shutil

import pytest
from helpers import tiny_model
from safetensors.torch import load_file, save_file

from coati.checkpoint.export import export_hf
from coati.cli.score import main as score_main
from coati.cli.train import main as train_main


@pytest.fixture(scope="module")
def good(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "rm"
    export_hf(tiny_model("llama", tokenizer), tokenizer, str(path), {"model": "llama", "max_len": 48},
              extra_json={"summary.json": {}})
    return path


def _copy(good, tmp_path, name="rm"):
    dst = tmp_path / name
    shutil.copytree(good, dst)
    return dst


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and "[y/N]" not in err, err
    return errors[0]


def _score(model, tmp_path, capsys) -> str:
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi", "response": "hello"}\n')
    assert score_main(["--model_path", str(model), "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                       "--disable_tqdm"]) == 2
    assert not (tmp_path / "out.jsonl").exists()
    return _one_error(capsys)


def _pretrain(model, tmp_path, capsys) -> str:
    assert train_main(["--model", "llama", "--pretrain", str(model), "--dataset", "hh-rlhf", "--max_samples", "8",
                       "--max_steps", "1", "--disable_tqdm", "--mixed_precision", "fp32",
                       "--save_path", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run" / "model.safetensors").exists()
    return _one_error(capsys)


def _truncate(folder):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])


def _absurd_header(folder):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes((2 ** 60).to_bytes(8, "little") + data[8:])


def _wrong_shapes(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (folder / "config.json").write_text(json.dumps(cfg))


def _vocab_mismatch(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = cfg["vocab_size"] + 1000
    (folder / "config.json").write_text(json.dumps(cfg))


def _no_tokenizer(folder):  # an export interrupted before its tokenizer was written
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(folder / name)


def _no_weights(folder):
    os.remove(folder / "model.safetensors")


def _missing_shard(folder):
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"score.weight": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("damage, message", [
    (_truncate, "model.safetensors: not a readable safetensors file ("),
    (_absurd_header, "model.safetensors: not a readable safetensors file ("),
    (_wrong_shapes, ": cannot load the model ("),
    (_vocab_mismatch, ": cannot load the model ("),
    (_no_weights, ": no model weights (*.safetensors); an incomplete or half-written model folder"),
    (_missing_shard, "model.safetensors.index.json: names shard model-00002-of-00002.safetensors, which is missing"),
])
def test_a_broken_model_folder_is_one_line_naming_it(good, tmp_path, capsys, damage, message):
    model = _copy(good, tmp_path)
    damage(model)
    line = _score(model, tmp_path, capsys)
    assert line.startswith(f"error: {model}") and message in line, line
    line = _pretrain(model, tmp_path, capsys)
    assert line.startswith(f"error: --pretrain {model}") and message in line, line


def test_a_folder_without_tokenizer_files_says_so(good, tmp_path, capsys):
    model = _copy(good, tmp_path)
    _no_tokenizer(model)
    assert _score(model, tmp_path, capsys) == (
        f"error: {model}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); an incomplete or "
        "half-written model folder, or pass --tokenizer")


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_a_pickled_bin_is_refused_unexecuted(good, tmp_path, capsys):
    model = _copy(good, tmp_path)
    state = load_file(str(model / "model.safetensors"))
    os.remove(model / "model.safetensors")
    sentinel = tmp_path / "pwned"
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({**state, "extra": _RunsCode(sentinel)}, f)
    for line in (_score(model, tmp_path, capsys), _pretrain(model, tmp_path, capsys)):
        assert "pytorch_model.bin" in line or "pickled objects other than tensors" in line, line
    assert not sentinel.exists()


def test_remote_code_in_a_folder_is_never_asked_about(good, tmp_path, capsys):
    model = _copy(good, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\n")
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi", "response": "hello"}\n')
    code = score_main(["--model_path", str(model), "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                       "--disable_tqdm"])
    out = capsys.readouterr()
    assert "[y/N]" not in out.err + out.out and not (tmp_path / "pwned").exists()
    assert code == 0  # model_type llama: transformers' own class, the auto_map ignored


def test_non_finite_pretrained_weights_are_refused_at_load(good, tmp_path, capsys):
    model = _copy(good, tmp_path)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    line = _pretrain(model, tmp_path, capsys)
    assert line == (f"error: --pretrain {model}: 1 weight tensors are NaN or infinite (e.g. "
                    "model.layers.0.mlp.up_proj.weight); the checkpoint is broken"), line


RUN = ["--strategy", "naive", "--dataset", "hh-rlhf", "--max_samples", "16", "--max_len", "48", "--batch_size", "4",
       "--max_steps", "2", "--save_every", "1", "--keep_last", "5", "--disable_tqdm", "--mixed_precision", "fp32",
       "--eval_split", "0.3"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "rm"
    assert train_main(RUN + ["--save_path", str(out)]) == 0
    return out


def test_an_edited_recipe_or_changed_data_is_refused_by_heldout_scoring(finished, tmp_path, capsys):
    from coati.cli.evaluate import main as evaluate_main

    out = tmp_path / "rm"
    shutil.copytree(finished, out)
    cfg = json.loads((out / "train_config.json").read_text())
    cfg["max_len"] = 8
    (out / "train_config.json").write_text(json.dumps(cfg))
    assert evaluate_main(["--model_path", str(out), "--heldout", "--disable_tqdm", "--output_dir",
                          str(tmp_path / "eval")]) == 2
    assert "train_config.json was changed after the export" in _one_error(capsys)
    # the text layout does not read the recipe: still scores
    assert score_main(["--model_path", str(out), "--input", str(_rows(tmp_path)), "--output",
                       str(tmp_path / "o.jsonl"), "--layout", "text", "--disable_tqdm"]) == 0

    summary = json.loads((finished / "summary.json").read_text())
    shutil.rmtree(out)
    shutil.copytree(finished, out)
    summary["eval_pairs_sha256"] = "0" * 64  # as if the data had changed since, with the same count
    (out / "summary.json").write_text(json.dumps(summary))
    assert evaluate_main(["--model_path", str(out), "--heldout", "--disable_tqdm", "--output_dir",
                          str(tmp_path / "eval2")]) == 2
    assert "are not those the run held out" in _one_error(capsys)
    assert evaluate_main(["--model_path", str(finished), "--heldout", "--disable_tqdm", "--output_dir",
                          str(tmp_path / "eval3")]) == 0


def _rows(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text('{"prompt": "hi", "response": "hello"}\n')
    return src
