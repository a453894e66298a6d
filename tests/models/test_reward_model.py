"""The reward is read at the last real token, whatever the padding side or the rest of the batch."""

import pytest
import torch

from coati.data.batch import collate_pairs
from coati.data.template import TokenizedPair
from coati.models.backbones import get_backbone
from coati.models.reward_model import RewardModel, last_token_index
from helpers import tiny_model

SEQS = [[5, 6, 7, 8, 9, 2], [11, 12, 2], [20, 21, 22, 23, 24, 25, 26, 27, 28, 2]]


def _reward_model(name, tokenizer):
    return RewardModel(tiny_model(name, tokenizer), get_backbone(name))


def _batch(seqs, pad_id, side):
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad_id)
    mask = torch.zeros((len(seqs), length), dtype=torch.int64)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def test_last_token_index_both_sides():
    mask_r = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask_l = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask_r).tolist() == [2, 4]
    assert last_token_index(mask_l).tolist() == [4, 4]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[0, 0]]))


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_rewards_independent_of_padding_side_and_batch(name, tokenizer):
    rm = _reward_model(name, tokenizer)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.cat([rm(*_batch([s], pad, "right")) for s in SEQS])
        right = rm(*_batch(SEQS, pad, "right"))
        left = rm(*_batch(SEQS, pad, "left"))
        other = rm(*_batch([SEQS[1], [30] * 40 + [2], SEQS[0], SEQS[2]], pad, "left"))
    assert right.dtype == torch.float32 and right.shape == (3,)
    assert torch.allclose(alone, right, atol=1e-5)
    assert torch.allclose(alone, left, atol=1e-5)
    assert torch.allclose(alone[[1, 0, 2]], other[[0, 2, 3]], atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_reward_is_value_head_at_last_real_token(name, tokenizer):
    rm = _reward_model(name, tokenizer)
    hf = rm.hf_model
    ids, mask = _batch(SEQS, tokenizer.pad_token_id, "right")
    with torch.no_grad():
        rewards = rm(ids, mask)
        for i, s in enumerate(SEQS):
            hidden = getattr(hf, hf.base_model_prefix)(torch.tensor([s])).last_hidden_state[0, -1]
            assert rewards[i].item() == pytest.approx((hf.score.weight[0] @ hidden).item(), abs=1e-5)


def test_the_pad_token_is_moved_off_the_reward_token():
    from transformers import AutoTokenizer

    from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain
    from coati.models.loading import choose_pad_token_id, prepare_tokenizer

    raw = AutoTokenizer.from_pretrained(resolve_pretrain(SMOLLM2_ALIAS, with_model=False))
    raw.pad_token = raw.eos_token  # the LLaMA-style default that would make exports read the reward one token early
    eos = raw.eos_token_id
    assert prepare_tokenizer(raw).pad_token_id not in (None, eos)
    assert choose_pad_token_id(raw, reward_token_id=7) == raw.pad_token_id  # already distinct: kept
    assert choose_pad_token_id(raw, reward_token_id=raw.pad_token_id) != raw.pad_token_id


def test_collate_layout():
    items = [TokenizedPair([1, 2, 3], [1, 2], 0.5, "en", "a"), TokenizedPair([4], [5, 6, 7, 8], None, "zh", "b")]
    batch = collate_pairs(items, pad_id=0, padding_side="left")
    assert batch.inputs["input_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 4], [0, 0, 1, 2], [5, 6, 7, 8]]
    assert batch.inputs["attention_mask"].sum(1).tolist() == [3, 1, 2, 4]
    assert (batch.real_tokens, batch.total_tokens) == (10, 16)
    assert batch.margin.tolist() == [0.5, 0.0]
    assert batch.langs == ["en", "zh"]


def test_margin_column_reaches_the_loss(tokenizer):
    """A `margin` key in the data enters log_sig as -logsigmoid(r_c - r_r - m)."""
    import math

    from coati.data.formats import parse_row
    from coati.data.template import SequenceEncoder, tokenize_pairs
    from coati.config import LossArgs
    from coati.losses import build_loss

    rows = [{"prompt": "Q1", "chosen": "good", "rejected": "bad", "margin": 2.0},
            {"prompt": "Q2", "chosen": "fine", "rejected": "poor"}]
    pairs = [parse_row(r) for r in rows]
    assert [p.margin for p in pairs] == [2.0, None]
    tok_pairs, _ = tokenize_pairs(pairs, SequenceEncoder(tokenizer, 32), chat_template=False)
    batch = collate_pairs(tok_pairs, tokenizer.pad_token_id)
    assert batch.margin.tolist() == [2.0, 0.0]
    zeros = torch.zeros(2)
    loss = build_loss(LossArgs())(zeros, zeros, batch.margin)
    assert loss.item() == pytest.approx((math.log1p(math.exp(2.0)) + math.log(2)) / 2, abs=1e-6)


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_a_shared_prompt_padded_batch_is_refused_where_a_sliding_window_would_shift(name, tokenizer):
    """transformers' sliding-window cache keeps keys by column: a right-padded prompt batch longer than the window
    would read other rewards (measured: 0.1 off for gemma3 tiny, prompts of 10-70 tokens, window 32), so it is
    refused, and one row per answer gives the packed rewards."""
    from coati.data.packing import collate_packed

    g = torch.Generator().manual_seed(0)
    pairs = []
    for n_prompt in (50, 10, 70):
        p = torch.randint(5, 400, (n_prompt,), generator=g).tolist()
        pairs.append(TokenizedPair(p + torch.randint(5, 400, (20,), generator=g).tolist() + [2],
                                   p + torch.randint(5, 400, (45,), generator=g).tolist() + [2], None, "en", "x"))
    rm = RewardModel(tiny_model(name, tokenizer), get_backbone(name))
    assert not rm.can_cache_prompt
    with pytest.raises(ValueError, match="sliding window"):
        rm(**collate_pairs(pairs, tokenizer.pad_token_id, share_prefix=True).inputs)
    with torch.no_grad():
        padded = rm(**collate_pairs(pairs, tokenizer.pad_token_id).inputs)
        packed = rm(**collate_packed(pairs, tokenizer.pad_token_id, 0).inputs)
    assert torch.allclose(padded, packed, atol=1e-5)
    assert RewardModel(tiny_model("qwen2", tokenizer), get_backbone("qwen2")).can_cache_prompt
