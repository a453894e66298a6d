"""Packed batches give the same rewards and gradients as padded ones, for every backbone."""

import pytest
import torch

from coati.data.collate import GlobalBatchSampler, collate_packed, collate_pairs, pack_rows
from coati.data.template import TokenizedPair
from coati.losses import log_sig_loss
from coati.models.backbones import BACKBONES, get_backbone
from coati.models.reward_model import RewardModel, packed_causal_mask
from conftest import tiny_model


def _pairs(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lc, lr = torch.randint(3, 40, (2,), generator=g).tolist()
        c = torch.randint(5, 400, (lc,), generator=g).tolist() + [2]
        r = torch.randint(5, 400, (lr,), generator=g).tolist() + [2]
        out.append(TokenizedPair(c, r, None, "en", "x"))
    return out


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 8, 2, 6], capacity=10)
    assert rows == [[2, 3], [4, 1], [0]]
    assert all(sum([5, 3, 8, 2, 6][i] for i in r) <= 10 for r in rows)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        pack_rows([11], capacity=10)


def test_collate_packed_layout():
    items = [TokenizedPair([1, 2, 3], [4, 5], None, "en", "a"), TokenizedPair([6], [7, 8, 9, 10], 1.0, "zh", "b")]
    batch = collate_packed(items, pad_id=0, capacity=6)
    inputs = batch["inputs"]
    # lengths: chosen 3, 1; rejected 2, 4 -> FFD rows: [4 + 2], [3 + 1]
    assert inputs["input_ids"].tolist() == [[7, 8, 9, 10, 4, 5], [1, 2, 3, 6, 0, 0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 1]]
    assert inputs["reward_index"].tolist() == [[1, 2], [1, 3], [0, 5], [0, 3]]
    assert (batch["real_tokens"], batch["total_tokens"]) == (10, 12)
    assert batch["margin"].tolist() == [0.0, 1.0]


def test_packed_causal_mask_blocks():
    mask = packed_causal_mask(torch.tensor([[0, 1, 0, 1, 2]]), torch.float32)[0, 0]
    allowed = (mask == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_packed_equals_padded_rewards_and_gradients(name, tokenizer):
    backbone = get_backbone(name)
    pairs = _pairs()

    def run(collate):
        torch.manual_seed(0)
        rm = RewardModel(tiny_model(name, tokenizer), backbone.uses_position_ids).train()
        batch = collate(pairs)
        rewards = rm(**batch["inputs"])
        b = len(pairs)
        log_sig_loss(rewards[:b], rewards[b:]).backward()
        grads = {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
        return rewards.detach(), grads

    padded_r, padded_g = run(lambda p: collate_pairs(p, tokenizer.pad_token_id))
    packed_r, packed_g = run(lambda p: collate_packed(p, tokenizer.pad_token_id, capacity=64))
    assert collate_packed(pairs, tokenizer.pad_token_id, 64)["inputs"]["input_ids"].shape[0] > 1  # really packed
    assert torch.allclose(packed_r, padded_r, atol=1e-5), (packed_r - padded_r).abs().max()
    assert padded_g.keys() == packed_g.keys()
    worst = max((packed_g[k] - padded_g[k]).abs().max().item() for k in padded_g)
    assert worst < 1e-5, worst


def test_group_by_length_keeps_global_batches_and_reduces_spread():
    lengths = [(i * 37) % 101 for i in range(256)]
    plain = GlobalBatchSampler(256, 4, world_size=2, rank=0, seed=3)
    grouped = [GlobalBatchSampler(256, 4, world_size=2, rank=r, seed=3, lengths=lengths) for r in (0, 1)]
    single = GlobalBatchSampler(256, 8, world_size=1, rank=0, seed=3, lengths=lengths)
    for a, b, s in zip(*(list(x) for x in grouped), single):
        assert a + b == s  # two ranks see exactly the single-process global batch
    spread = lambda batches: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)  # noqa
    assert spread(list(single)) < spread(list(GlobalBatchSampler(256, 8, seed=3))) / 3
    assert sorted(i for b in single for i in b) == list(range(256))
    assert len(list(plain)) == 32
