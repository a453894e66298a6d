"""Reward models trained elsewhere: a TRL-style ``*ForSequenceClassification`` export (no train_config.json) and
InternLM2's released reward-model layout (``InternLM2ForRewardModel``: backbone + ``v_head``, ``reward_token_id``),
each scored by RewardScorer / coati.evaluate and checked against an independent forward pass."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from coati.cli.evaluate import main
from coati.models.backbones import build_config, get_backbone
from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain
from coati.scoring import RewardScorer
from helpers import TOKENIZER_DIR, internlm2_config, internlm2_weights, reference_hidden, write_internlm2

TOL = 1e-5
TEXTS = [("What is the capital of France?", "Paris."), ("Name a colour.", "Blue, like the sky."),
         ("你好吗？", "我很好，谢谢。"), ("Say nothing.", "Fine")]


@pytest.fixture(scope="module")
def trl_export(tmp_path_factory):
    """A tiny LLaMA reward model saved the way TRL's RewardTrainer leaves it: save_pretrained of the model and the
    untouched tokenizer (SmolLM2: pad = EOS = <|im_end|>, with a chat template), no train_config.json."""
    tok = AutoTokenizer.from_pretrained(resolve_pretrain(SMOLLM2_ALIAS, with_model=False))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    config = build_config(get_backbone("llama"), "tiny", len(tok), tok.pad_token_id, tok.eos_token_id,
                          tok.bos_token_id)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("trl_rm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


def _hf_reward(path: str, ids: list[int]) -> float:
    """transformers' own forward and pooling (the last token that is not pad_token_id), one sequence alone."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


def test_trl_export_chat_layout_equals_transformers_forward(trl_export):
    path, tok = trl_export
    scorer = RewardScorer.from_pretrained(path, device="cpu", batch_size=3)
    assert scorer.layout == "chat" and scorer.strip_pad_id == tok.pad_token_id
    got = scorer.score_texts([p for p, _ in TEXTS], [r for _, r in TEXTS])
    for (prompt, response), score in zip(TEXTS, got):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                      tokenize=True, return_dict=True)["input_ids"]
        assert score == pytest.approx(_hf_reward(path, ids), abs=TOL)


def test_trl_export_text_layout_reads_where_transformers_reads(trl_export):
    """TRL appends the EOS text to plain-text data; with pad == EOS transformers' pooling then reads the token
    before it, and so must the scorer."""
    path, tok = trl_export
    scorer = RewardScorer.from_pretrained(path, device="cpu", layout="text")
    got = scorer.score_texts([p for p, _ in TEXTS], [r for _, r in TEXTS])
    for (prompt, response), score in zip(TEXTS, got):
        ids = tok("\n\nHuman: " + prompt + "\n\nAssistant: " + response + tok.eos_token).input_ids
        assert ids[-1] == tok.pad_token_id
        assert score == pytest.approx(_hf_reward(path, ids), abs=TOL)


def test_evaluate_reads_a_trl_export(trl_export, tmp_path):
    path, tok = trl_export
    rows = [{"prompt": p, "chosen": r, "rejected": "No."} for p, r in TEXTS]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert main(["--model_path", path, "--dataset", str(data), "--output_dir", str(tmp_path / "eval"),
                 "--disable_tqdm"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    wins = 0
    for p, r in TEXTS:
        c, j = ([tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                         tokenize=True, return_dict=True)["input_ids"] for a in (r, "No.")])
        wins += _hf_reward(path, c) > _hf_reward(path, j)
    assert report["pairs"] == len(TEXTS) and report["acc"] == pytest.approx(wins / len(TEXTS))


# ------------------------------------------------------------------------------------ InternLM2 reward models

REWARD_TOKEN = 92527
CHATML = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def internlm2_rm(tmp_path_factory):
    """A tiny checkpoint in the released InternLM2-Reward layout: InternLM2 names, ``v_head.weight`` [1, hidden],
    ``reward_token_id`` in config.json, the remote-code tokenizer config with a ChatML template."""
    if not (TOKENIZER_DIR / "tokenizer.model").is_file():
        pytest.fail(f"{TOKENIZER_DIR}/tokenizer.model is missing (set COATI_TOKENIZER_DIR)")
    cfg = internlm2_config(92544, max_pos=128)
    cfg.update(architectures=["InternLM2ForRewardModel"], reward_token_id=REWARD_TOKEN,
               auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModel": "modeling_internlm2.InternLM2ForRewardModel"})
    w = internlm2_weights(cfg, seed=5)
    del w["output.weight"]  # a reward model has no LM head
    w["v_head.weight"] = torch.randn(1, cfg["hidden_size"], generator=torch.Generator().manual_seed(6)) * 0.3
    folder = write_internlm2(tmp_path_factory.mktemp("internlm2_rm"), cfg, w)
    (folder / "tokenizer.model").write_bytes((TOKENIZER_DIR / "tokenizer.model").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHATML,
        "added_tokens_decoder": {"92543": {"content": "<|im_start|>", "special": True},
                                 "92542": {"content": "<|im_end|>", "special": True}}}), encoding="utf-8")
    return folder, cfg, w


def test_internlm2_reward_layout_equals_reference(internlm2_rm):
    folder, cfg, w = internlm2_rm
    scorer = RewardScorer.from_pretrained(str(folder), device="cpu", batch_size=2)
    assert scorer.layout == "chat" and scorer.append_reward_token and scorer.strip_pad_id is None
    got = scorer.score_texts([p for p, _ in TEXTS], [r for _, r in TEXTS])
    tok = scorer.tokenizer
    for (prompt, response), score in zip(TEXTS, got):
        text = f"<s><|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"
        ids = tok(text, add_special_tokens=False).input_ids + [REWARD_TOKEN]
        assert ids[1] == 92543  # <|im_start|> kept its checkpoint id
        hidden = reference_hidden(w, cfg, torch.tensor([ids]))  # InternLM2's math on its own tensor names
        expected = (hidden[0, -1] @ w["v_head.weight"][0].double()).item()
        assert score == pytest.approx(expected, abs=TOL)


def test_internlm2_checkpoint_without_v_head_is_refused(tmp_path, capsys):
    cfg = internlm2_config(92544)
    folder = write_internlm2(tmp_path / "base", cfg, internlm2_weights(cfg))
    (folder / "tokenizer.model").write_bytes((TOKENIZER_DIR / "tokenizer.model").read_bytes())
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    assert main(["--model_path", str(folder), "--dataset", str(data), "--output_dir", str(tmp_path / "o"),
                 "--layout", "text", "--disable_tqdm"]) == 2
    assert "no v_head.weight" in capsys.readouterr().err
