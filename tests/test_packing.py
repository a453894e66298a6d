"""Packed batches give the same rewards and gradients as padded ones, for every backbone."""

import pytest
import torch

from coati.data.collate import GlobalBatchSampler, collate_packed, collate_pairs, pack_rows
from coati.data.template import TokenizedPair
from coati.losses import log_sig_loss
from coati.models.backbones import BACKBONES, get_backbone
from coati.models.packed_attention import PackPlan, group_attention, packed_causal_mask, shared_prefix_len
from coati.models.reward_model import RewardModel
from conftest import tiny_model


def _pairs(seed=0, n=6, prompt=False):
    """Random pairs; with ``prompt``, chosen and rejected start with the same 5-30 tokens (as real pairs do)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lc, lr = torch.randint(3, 40, (2,), generator=g).tolist()
        n_prompt = int(torch.randint(5, 31, (1,), generator=g)) if prompt else 0
        p = torch.randint(5, 400, (n_prompt,), generator=g).tolist()
        c = p + torch.randint(5, 400, (lc,), generator=g).tolist() + [2]
        r = p + torch.randint(5, 400, (lr,), generator=g).tolist() + [2]
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
    inputs = batch.inputs
    # no shared start: four plain groups; lengths chosen 3, 1; rejected 2, 4 -> FFD rows: [4 + 2], [3 + 1]
    assert inputs["input_ids"].tolist() == [[7, 8, 9, 10, 4, 5], [1, 2, 3, 6, 0, 0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 1]]
    assert inputs["reward_index"].tolist() == [[1, 2], [1, 3], [0, 5], [0, 3]]
    assert inputs["groups"].tolist() == [[0, 0, 4, 0, 0], [0, 4, 2, 0, 0], [1, 0, 3, 0, 0], [1, 3, 1, 0, 0]]
    assert (batch.real_tokens, batch.computed_tokens, batch.total_tokens) == (10, 10, 12)
    assert batch.margin.tolist() == [0.0, 1.0]


def test_collate_packed_shares_the_prompt():
    # pair 0 shares [1, 2]; pair 1 shares nothing; capacity 0 = one row, no padding
    items = [TokenizedPair([1, 2, 3, 9], [1, 2, 5, 9], None, "en", "a"), TokenizedPair([6, 9], [7, 9], None, "en", "b")]
    batch = collate_packed(items, pad_id=0, capacity=0)
    inputs = batch.inputs
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 9, 5, 9, 6, 9, 7, 9]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 0, 1, 0, 1]]
    assert inputs["groups"].tolist() == [[0, 0, 2, 2, 2], [0, 6, 2, 0, 0], [0, 8, 2, 0, 0]]
    assert inputs["reward_index"].tolist() == [[0, 3], [0, 7], [0, 5], [0, 9]]
    assert (batch.real_tokens, batch.computed_tokens, batch.total_tokens) == (12, 10, 10)
    # without sharing, or with a capacity the group does not fit, the pair is two plain sequences
    for batch in (collate_packed(items, 0, 0, share_prefix=False), collate_packed(items, 0, capacity=5)):
        assert batch.computed_tokens == 12
        assert (batch.inputs["groups"][:, 3:] == 0).all()


def test_shared_prefix_len_keeps_each_last_token():
    assert shared_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert shared_prefix_len([1, 2], [1, 2, 3]) == 1  # chosen is a prefix of rejected: it keeps its last token
    assert shared_prefix_len([5, 2], [1, 2]) == 0


def test_packed_causal_mask_blocks():
    # row of 7: plain sequence of 2, then a group [P=1 | C=2 | R=1], then one padding token
    groups = torch.tensor([[0, 0, 2, 0, 0], [0, 2, 1, 2, 1]])
    allowed = (packed_causal_mask(groups, 1, 7, torch.float32)[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0, 0],
                       [0, 0, 1, 1, 1, 0, 0],
                       [0, 0, 1, 0, 0, 1, 0],  # rejected-only token: the shared token and itself, not the chosen
                       [0, 0, 0, 0, 0, 0, 1]]  # padding attends to itself only


@pytest.mark.parametrize("capacity", [128, 0])
@pytest.mark.parametrize("prompt", [False, True])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_packed_equals_padded_rewards_and_gradients(name, prompt, capacity, tokenizer):
    backbone = get_backbone(name)
    pairs = _pairs(prompt=prompt)

    def run(collate):
        torch.manual_seed(0)
        rm = RewardModel(tiny_model(name, tokenizer), backbone).train()
        batch = collate(pairs)
        rewards = rm(**batch.inputs)
        b = len(pairs)
        log_sig_loss(rewards[:b], rewards[b:]).backward()
        grads = {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
        return rewards.detach(), grads

    padded_r, padded_g = run(lambda p: collate_pairs(p, tokenizer.pad_token_id))
    packed = collate_packed(pairs, tokenizer.pad_token_id, capacity)
    rows = packed.inputs["input_ids"].shape[0]
    assert rows == 1 if capacity == 0 else rows > 1  # really packed
    assert (packed.computed_tokens < packed.real_tokens) == prompt  # prompts really shared
    packed_r, packed_g = run(lambda p: collate_packed(p, tokenizer.pad_token_id, capacity))
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


@pytest.mark.parametrize("shape", [(6, 0, 0), (3, 4, 2), (1, 1, 5)])
def test_group_attention_cpu_path_equals_sdpa(shape):
    """The written-out CPU attention equals SDPA with the group's mask (the CUDA path), output and gradients."""
    n = sum(shape)
    plan = PackPlan.from_groups(torch.tensor([[0, 0, *shape]]), 1)
    torch.manual_seed(0)
    qkv = [torch.randn(3, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    outs, grads = [], []
    for fused in (True, False):
        out = group_attention(plan, shape, *qkv, dropout=0.0, scaling=0.3, fused=fused)
        g = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), qkv)
        outs.append(out)
        grads.append(g)
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(*grads))
    # the rejected-only rows really ignore the chosen-only keys
    p, c, r = shape
    if c and r:
        k2 = qkv[1].detach().clone()
        k2[:, p:p + c] += 100.0
        moved = group_attention(plan, shape, qkv[0].detach(), k2, qkv[2].detach(), 0.0, 0.3)
        assert torch.allclose(moved[:, p + c:], outs[1].detach()[:, p + c:], atol=1e-10)
        assert not torch.allclose(moved[:, p:p + c], outs[1].detach()[:, p:p + c])


def test_packed_batch_on_unswitchable_attention_is_a_clear_error(tokenizer):
    hf = tiny_model("llama", tokenizer)
    hf.config._attn_implementation = "flash_attention_2"  # as if loaded with flash-attn: left alone by coati
    rm = RewardModel(hf, get_backbone("llama"))
    assert hf.config._attn_implementation == "flash_attention_2"
    with pytest.raises(ValueError, match="--packing false"):
        rm(**collate_packed(_pairs(n=2), tokenizer.pad_token_id).inputs)
