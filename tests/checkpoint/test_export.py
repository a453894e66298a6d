"""Export round trip: the HF folder loads with AutoModelForSequenceClassification and scores like the trainer."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from coati.checkpoint.export import export_hf
from coati.data.template import SequenceEncoder
from coati.models.backbones import get_backbone
from coati.models.lora import apply_lora
from coati.models.reward_model import RewardModel
from helpers import tiny_model

TEXTS = [("Human: What is 2+2?", "It is 4."), ("Human: 你好吗？", "我很好，谢谢。"), ("", "A lone answer with no prompt")]


def _perturb(model, seed=1):
    """Move all trainable weights (LoRA B starts at zero, so untouched LoRA would be a no-op to merge)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ["llama", "bloom", "qwen2", "qwen3", "gemma3", "mistral"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_export_scores_equal_trainer_rewards(name, lora_rank, tokenizer, tmp_path):
    backbone = get_backbone(name)
    hf = tiny_model(name, tokenizer)
    if lora_rank:
        hf = apply_lora(hf, backbone.lora_targets, lora_rank, 8.0, 0.0, "all")
    _perturb(hf)
    rm = RewardModel(hf, backbone).eval()
    enc = SequenceEncoder(tokenizer, max_len=64)
    seqs = [enc.encode(p, a).input_ids for p, a in TEXTS]
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        expected = rm(ids, mask)

    export_hf(hf, tokenizer, str(tmp_path), {"model": name})
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.num_labels == 1
    assert type(loaded) is backbone.model_class
    assert not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    # the trained value head is what was saved (not a fresh init)
    head = rm.hf_model.score.weight
    assert torch.allclose(loaded.score.weight, head, atol=0)

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.pad_token_id == tokenizer.pad_token_id != tok.eos_token_id
    assert json.loads((tmp_path / "train_config.json").read_text())["model"] == name
    # merging worked on a copy: the original still has its adapters
    if lora_rank:
        assert any("lora_" in k for k in hf.state_dict())
