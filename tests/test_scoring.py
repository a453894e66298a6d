"""coati.scoring / coati.score: training-layout scores, HF round trip, Best-of-N, normalisation, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_model
from transformers import AutoModelForSequenceClassification

from coati.checkpoint.export import export_hf
from coati.data.formats import PreferencePair
from coati.data.template import SequenceEncoder, render_prompt, tokenize_pairs, use_chat_template
from coati.models.backbones import get_backbone
from coati.models.reward_model import RewardModel
from coati.cli.score import main as score_main
from coati.scoring import RewardScorer

MEAN, STD = 0.25, 2.0
MAX_LEN = 48

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
CANDIDATES = ["4.", "It is four.", "5, probably.", "I do not know.", "二加二等于四。"]
TEXTS = [  # (prompt, response): a string prompt, messages, a Chinese one, none, and one longer than MAX_LEN
    ("What is 2+2?", "It is 4."),
    (PROMPT, "Four."),
    ("你好吗？", "我很好，谢谢。"),
    (None, "A lone answer with no prompt"),
    (("Tell me a long story. " * 20).strip(), ("Once upon a time " * 10).strip()),
]


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _export(tokenizer, path, name="llama", stats=True):
    hf = tiny_model(name, tokenizer)
    _perturb(hf)
    extra = {"reward_token_id": tokenizer.eos_token_id}
    if stats:
        extra.update(reward_mean=MEAN, reward_std=STD)
    export_hf(hf, tokenizer, str(path), {"model": name, "max_len": MAX_LEN, "chat_template": "auto"},
              extra_config=extra)
    return hf


@pytest.fixture(scope="module")
def export(tokenizer, tmp_path_factory):
    """(folder, in-memory HF model) of a perturbed tiny LLaMA with reward statistics in config.json."""
    path = tmp_path_factory.mktemp("rm_score")
    return path, _export(tokenizer, path)


@pytest.fixture(scope="module")
def scorer(export):
    return RewardScorer.from_pretrained(str(export[0]), device="cpu", batch_size=2)


def _messages(prompt):
    if prompt is None:
        return []
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _padded(seqs, pad_id):
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- layout and round trip

def test_loads_training_options(scorer, tokenizer):
    assert scorer.encoder.max_len == MAX_LEN
    assert scorer.encoder.reward_token_id == tokenizer.eos_token_id
    assert scorer.chat_template is use_chat_template(tokenizer, "auto")
    assert scorer.tokenizer.pad_token_id != tokenizer.eos_token_id
    assert scorer.model.backbone is get_backbone("llama")
    assert (scorer.reward_mean, scorer.reward_std) == (MEAN, STD)


def test_score_texts_equal_trainer_layout(export, scorer, tokenizer):
    """score_texts == RewardModel on tokenize_pairs (the trainer's path) for the same (prompt, response)."""
    _, hf = export
    got = scorer.score_texts([p for p, _ in TEXTS], [r for _, r in TEXTS])
    assert isinstance(got, list) and all(isinstance(x, float) for x in got)
    pairs = [PreferencePair(_messages(p), r, "a different answer") for p, r in TEXTS]
    items, stats = tokenize_pairs(pairs, SequenceEncoder(tokenizer, MAX_LEN, tokenizer.eos_token_id),
                                  use_chat_template(tokenizer, "auto"))
    assert stats.prompt_truncated >= 1  # the long row exercises truncation
    ids, mask = _padded([it.chosen_ids for it in items], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = RewardModel(hf, get_backbone("llama")).eval()(ids, mask)
    assert torch.allclose(torch.tensor(got), expected, atol=1e-5), (got, expected)
    # score_pairs on the same pairs gives the same chosen rewards
    scores = scorer.score_pairs(pairs)
    chosen, rejected = scores.chosen, scores.rejected
    assert chosen.dtype == rejected.dtype == torch.float32 and chosen.shape == (len(TEXTS),)
    assert torch.allclose(chosen, expected, atol=1e-5)
    # batch composition and size do not matter
    one = [scorer.score_texts([p], [r])[0] for p, r in TEXTS]
    assert torch.allclose(torch.tensor(one), torch.tensor(got), atol=1e-5)


def test_cli_scores_equal_hf_logits(export, tokenizer, tmp_path):
    """What coati.score writes == AutoModelForSequenceClassification logits on the same ids (right padding)."""
    path, _ = export
    rows = [{"prompt": p, "response": r, "id": i} for i, (p, r) in enumerate(TEXTS) if p is not None]
    rows.append({"text": "A lone answer with no prompt", "id": "t"})
    rows.append({"messages": PROMPT + [{"role": "assistant", "content": "Four."}], "id": "m"})
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert score_main(["--model_path", str(path), "--input", str(src), "--output", str(out), "--batch_size", "3",
                       "--device", "cpu", "--disable_tqdm"]) == 0
    scored = _read_jsonl(out)
    assert [r["id"] for r in scored] == [r["id"] for r in rows]
    for a, b in zip(rows, scored):  # every input key kept, plus "score" and "truncated"
        assert {k: v for k, v in b.items() if k not in ("score", "truncated")} == a

    chat = use_chat_template(tokenizer, "auto")
    enc = SequenceEncoder(tokenizer, MAX_LEN, tokenizer.eos_token_id)
    texts = [(r["prompt"], r["response"]) for r in rows[:-2]] + [(None, rows[-2]["text"]), (PROMPT, "Four.")]
    encoded = [enc.encode(render_prompt(_messages(p), tokenizer, chat), a) for p, a in texts]
    seqs = [e.input_ids for e in encoded]
    ids, mask = _padded(seqs, tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    got = torch.tensor([r["score"] for r in scored])
    assert torch.allclose(got, logits, atol=1e-4), (got, logits)
    # "truncated" per row: the prompt or the answer lost tokens to max_len (the long row at least)
    assert [r["truncated"] for r in scored] == [e.prompt_truncated or e.answer_truncated for e in encoded]
    assert any(r["truncated"] for r in scored) and not all(r["truncated"] for r in scored)


@pytest.mark.parametrize("name", ["llama", "bloom", "qwen2", "qwen3", "gemma3", "mistral"])
def test_scores_do_not_depend_on_batching(name, tokenizer, tmp_path):
    _export(tokenizer, tmp_path, name, stats=False)
    a = RewardScorer.from_pretrained(str(tmp_path), device="cpu", batch_size=1)
    b = RewardScorer.from_pretrained(str(tmp_path), device="cpu", batch_size=8)
    assert a.model.backbone is get_backbone(name)
    prompts, responses = [p for p, _ in TEXTS], [r for _, r in TEXTS]
    assert torch.allclose(torch.tensor(a.score_texts(prompts, responses)),
                          torch.tensor(b.score_texts(prompts, responses)), atol=1e-5)
    # bf16 backbone: value head stays fp32, scores close to fp32
    c = RewardScorer.from_pretrained(str(tmp_path), device="cpu", dtype=torch.bfloat16)
    assert c.model.hf_model.score.weight.dtype == torch.float32
    assert torch.allclose(torch.tensor(c.score_texts(prompts, responses)),
                          torch.tensor(a.score_texts(prompts, responses)), atol=0.1)


# --------------------------------------------------------------------------- Best-of-N

def test_best_of_n_ranking(scorer, tmp_path, export):
    scores, best = scorer.best_of_n(PROMPT, CANDIDATES)
    assert len(scores) == len(CANDIDATES)
    assert best == max(range(len(scores)), key=scores.__getitem__)
    assert scores == pytest.approx(scorer.score_texts([PROMPT] * len(CANDIDATES), CANDIDATES), abs=1e-6)
    ranking = sorted(range(len(scores)), key=lambda i: -scores[i])
    assert ranking[0] == best and len(set(scores)) == len(scores)
    # normalised scores rank the same way
    nscores, nbest = scorer.best_of_n(PROMPT, CANDIDATES, normalize=True)
    assert nbest == best and sorted(range(len(nscores)), key=lambda i: -nscores[i]) == ranking
    # the CLI: scores in the order of `responses`, best = argmax, one batched pass over all rows
    src = _write_jsonl(tmp_path / "bon.jsonl", [{"prompt": PROMPT, "responses": CANDIDATES, "k": 1},
                                                {"prompt": "你好", "responses": CANDIDATES[::-1]}])
    out = tmp_path / "bon_out.jsonl"
    assert score_main(["--model_path", str(export[0]), "--input", str(src), "--output", str(out),
                       "--disable_tqdm"]) == 0
    first, second = _read_jsonl(out)
    assert first["k"] == 1 and first["responses"] == CANDIDATES
    assert first["scores"] == pytest.approx(scores, abs=1e-5) and first["best"] == best
    assert second["best"] == max(range(len(CANDIDATES)), key=second["scores"].__getitem__)


def test_best_index_is_first_on_ties():
    from coati.cli.score import _Row, attach_scores

    out = attach_scores([_Row({"responses": ["a", "b", "c"]}, "responses", 0, 3)], [1.0, 3.0, 3.0])
    assert out[0]["best"] == 1


# --------------------------------------------------------------------------- normalisation

def test_normalize_with_stored_stats(scorer, export, tmp_path, tokenizer, capsys):
    prompts, responses = [p for p, _ in TEXTS], [r for _, r in TEXTS]
    raw = torch.tensor(scorer.score_texts(prompts, responses))
    norm = torch.tensor(scorer.score_texts(prompts, responses, normalize=True))
    assert torch.allclose(norm, (raw - MEAN) / STD, atol=1e-6)

    src = _write_jsonl(tmp_path / "n.jsonl", [{"prompt": "What is 2+2?", "response": "It is 4."}])
    out = tmp_path / "n_out.jsonl"
    assert score_main(["--model_path", str(export[0]), "--input", str(src), "--output", str(out), "--normalize",
                       "--disable_tqdm"]) == 0
    assert _read_jsonl(out)[0]["score"] == pytest.approx((raw[0].item() - MEAN) / STD, abs=1e-5)

    # an export without statistics: a clear error, unless they are passed
    bare = tmp_path / "bare"
    _export(tokenizer, bare, stats=False)
    plain = RewardScorer.from_pretrained(str(bare), device="cpu")
    assert plain.reward_mean is None and plain.reward_std is None
    assert plain.score_texts(["hi"], ["hello"])  # raw scores still work
    with pytest.raises(ValueError, match="reward_mean/reward_std.*retrain"):
        plain.score_texts(["hi"], ["hello"], normalize=True)
    assert score_main(["--model_path", str(bare), "--input", str(src), "--normalize", "--disable_tqdm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "retrain" in err[-1]
    given = RewardScorer.from_pretrained(str(bare), device="cpu", reward_mean=1.0, reward_std=4.0)
    r = given.score_texts(["hi"], ["hello"])[0]
    assert given.score_texts(["hi"], ["hello"], normalize=True)[0] == pytest.approx((r - 1.0) / 4.0, abs=1e-6)
    with pytest.raises(ValueError):
        plain.set_normalization(0.0, 0.0)


# --------------------------------------------------------------------------- errors

def test_not_an_export_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="no such model folder"):
        RewardScorer.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        RewardScorer.from_pretrained(str(tmp_path / "empty"))
    two = tmp_path / "two_labels"
    hf = tiny_model("llama", tokenizer)
    hf.config.num_labels = 2
    hf.config.save_pretrained(str(two))
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardScorer.from_pretrained(str(two))


def test_bad_rows_name_file_and_line(export, tmp_path, capsys):
    path = str(export[0])
    cases = [
        ('{"prompt": "a", "response": "b"}\n\nnot json\n', ":3: invalid JSON"),
        ('{"prompt": "a", "responses": []}\n', ":1: 'responses' must be a non-empty list"),
        ('{"prompt": "a", "response": 3}\n', ":1: 'response' must be a string"),
        ('{"prompt": 5, "response": "b"}\n', ":1: bad 'prompt'"),
        ('{"question": "a"}\n', ":1: a row needs"),
        ('[1, 2]\n', ":1: a row must be a JSON object"),
        ('{"prompt": ' + "[" * 100000 + "\n", ":1: invalid JSON (nested too deeply)"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: 'messages' must"),
    ]
    for i, (text, expected) in enumerate(cases):
        src = tmp_path / f"bad{i}.jsonl"
        src.write_text(text, encoding="utf-8")
        out = tmp_path / f"bad{i}_out.jsonl"
        assert score_main(["--model_path", path, "--input", str(src), "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {src}{expected}"), (err, expected)
        assert not out.exists()
    assert score_main(["--model_path", path, "--input", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        RewardScorer.from_pretrained(path, device="cpu").score_texts(["a", "b"], ["c"])


# --------------------------------------------------------------------------- CLI smoke

def test_cli_smoke_subprocess(export, tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "What is 2+2?", "responses": ["4", "5"]},
                                               {"prompt": "你好", "response": "你好！"}, {"text": "plain text"}])
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "coati.score", "--model_path", str(export[0]), "--input", str(src),
                           "--output", str(out), "--normalize"],
                          check=False, capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_jsonl(out)
    assert len(rows) == 3 and len(rows[0]["scores"]) == 2 and rows[0]["best"] in (0, 1)
    assert isinstance(rows[1]["score"], float) and isinstance(rows[2]["score"], float)
    assert rows[1]["response"] == "你好！"  # UTF-8 kept as is
