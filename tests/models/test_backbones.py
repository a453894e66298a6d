"""Backbone entries: ALiBi slopes, default row capacity, lookup by model_type, packed BLOOM == transformers' BLOOM."""

from types import SimpleNamespace

import pytest
import torch
from transformers import (BloomConfig, BloomForSequenceClassification, Gemma3TextConfig, GPT2Config, LlamaConfig,
                          MistralConfig, Qwen2Config, Qwen3Config)

from coati.models import bloom
from coati.models.backbones import BACKBONES, backbone_for, build_config, detect, get_backbone
from coati.models.reward_model import RewardModel


def test_alibi_slopes_closed_form():
    # 4 heads (a power of two): 2 ** (-8 i / 4), i = 1..4
    assert bloom.alibi_slopes(4).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]
    # 6 heads: the 4 above, then the odd-indexed slopes of 8 heads, 2 ** (-8 j / 8) for j = 1, 3
    assert bloom.alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    assert bloom.alibi_slopes(6).dtype == torch.float32
    with pytest.raises(ValueError, match="num_heads"):
        bloom.alibi_slopes(0)


def test_row_capacity():
    for name in ("llama", "internlm2", "qwen2", "qwen3", "gemma3", "mistral"):  # per-group attention: the whole batch in one row
        assert get_backbone(name).row_capacity(256, True) == get_backbone(name).row_capacity(256, False) == 0
    assert get_backbone("bloom").row_capacity(256, True) == 512  # dense mask: the longest shared-prefix group
    assert get_backbone("bloom").row_capacity(256, False) == 256
    assert get_backbone("bloom").row_capacity(256, True, requested=300) == 300  # --max_tokens_per_batch wins
    assert get_backbone("llama").row_capacity(256, True, requested=300) == 300


def test_backbone_for():
    assert backbone_for(LlamaConfig()) is BACKBONES["llama"]
    assert backbone_for(MistralConfig()) is BACKBONES["mistral"]
    assert backbone_for(Qwen2Config()) is BACKBONES["qwen2"]
    assert backbone_for(Qwen3Config()) is BACKBONES["qwen3"]
    assert backbone_for(Gemma3TextConfig()) is BACKBONES["gemma3"]
    assert backbone_for(BloomConfig()) is BACKBONES["bloom"]
    assert backbone_for(SimpleNamespace(model_type="internlm2")) is BACKBONES["internlm2"]
    with pytest.raises(ValueError, match="model_type 'gpt2' is not a supported backbone.*llama"):
        backbone_for(GPT2Config())


def test_detect_reads_model_type_from_the_folder(tmp_path):
    Qwen3Config().save_pretrained(tmp_path)
    assert detect(str(tmp_path)) is BACKBONES["qwen3"]
    GPT2Config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not a supported backbone"):
        detect(str(tmp_path))
    with pytest.raises(ValueError, match="--model auto reads the model_type of .*nowhere"):
        detect(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma3", "mistral"])
def test_new_families_build_their_own_classes_from_presets(name):
    backbone = get_backbone(name)
    config = build_config(backbone, "tiny", vocab_size=64, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    assert isinstance(config, backbone.config_class) and config.model_type in backbone.model_types
    model = backbone.model_class(config)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(backbone.lora_targets) <= names  # every LoRA target exists in the model
    assert backbone_for(config) is backbone


def test_gemma3_tiny_preset_has_a_window_shorter_than_test_rows():
    config = build_config(get_backbone("gemma3"), "tiny", vocab_size=64, pad_token_id=0, eos_token_id=1,
                          bos_token_id=2)
    assert config.layer_types == ["sliding_attention", "full_attention"] and config.sliding_window == 32


def test_per_group_attention_is_switched_on_only_where_the_entry_says():
    llama = get_backbone("llama")
    hf = llama.model_class(build_config(llama, "tiny", vocab_size=64, pad_token_id=0, eos_token_id=2, bos_token_id=1))
    assert RewardModel(hf, llama).hf_model.config._attn_implementation == "coati_packed"
    hf = BloomForSequenceClassification(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2, num_labels=1))
    before = hf.config._attn_implementation
    assert RewardModel(hf, get_backbone("bloom")).hf_model.config._attn_implementation == before


def _tiny_bloom_batches():
    """A 6-head BLOOM (not a power of two) and the same three sequences padded and packed (one row: a shared-prefix
    pair [P | C | R], then a plain sequence S)."""
    torch.manual_seed(0)
    model = BloomForSequenceClassification(BloomConfig(vocab_size=512, hidden_size=48, n_layer=2, n_head=6,
                                                       num_labels=1, pad_token_id=0)).eval()
    g = torch.Generator().manual_seed(1)
    p, c, r, s = (torch.randint(3, 512, (n,), generator=g) for n in (9, 5, 7, 12))
    seqs = [torch.cat([p, c]), torch.cat([p, r]), s]
    length = max(map(len, seqs))
    ids, mask = torch.zeros(3, length, dtype=torch.int64), torch.zeros(3, length, dtype=torch.int64)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    n = len(p) + len(c) + len(r)
    positions = [torch.arange(len(p) + len(c)), len(p) + torch.arange(len(r)), torch.arange(len(s))]
    packed = dict(input_ids=torch.cat([p, c, r, s])[None], position_ids=torch.cat(positions)[None],
                  groups=torch.tensor([[0, 0, len(p), len(c), len(r)], [0, n, len(s), 0, 0]]),
                  reward_index=torch.tensor([[0, len(p) + len(c) - 1], [0, n - 1], [0, n + len(s) - 1]]))
    return model, (ids, mask), packed


def test_packed_bloom_equals_transformers_bloom_for_six_heads(monkeypatch):
    """Our slopes and mask reproduce transformers' own (padded) BLOOM forward; wrong slopes would not."""
    model, (ids, mask), packed = _tiny_bloom_batches()
    rm = RewardModel(model, get_backbone("bloom"))
    with torch.no_grad():
        padded = rm(ids, mask)
        assert torch.allclose(rm(**packed), padded, atol=1e-5), (rm(**packed) - padded).abs().max()
        # the comparison can fail: the power-of-two formula applied to 6 heads gives other rewards
        monkeypatch.setattr(bloom, "alibi_slopes", lambda n, device=None: torch.tensor(
            [2.0 ** (-8 * i / n) for i in range(1, n + 1)], device=device))
        assert (rm(**packed) - padded).abs().max() > 1e-4  # 10x the tolerance above
