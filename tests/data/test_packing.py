"""Packed batches give the same rewards and gradients as padded ones, for every backbone."""

import pytest
import torch

from coati.data.batch import collate_pairs, shared_prefix_len
from coati.data.loader import GlobalBatchSampler
from coati.data.packing import collate_packed, pack_rows
from coati.data.template import TokenizedPair
from coati.losses import log_sig_loss
from coati.models.backbones import BACKBONES, get_backbone
from coati.models import packed_attention
from coati.models.packed_attention import PackPlan, group_attention, packed_causal_mask, varlen_layout
from coati.models.reward_model import RewardModel
from helpers import make_pairs, tiny_model


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
    pairs = make_pairs(prompt=prompt)

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
        rm(**collate_packed(make_pairs(n=2), tokenizer.pad_token_id).inputs)


def _lists(seed=1, n=3):
    """Random ranked lists of 3-5 answers sharing a 5-30 token prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(5, 400, (int(torch.randint(5, 31, (1,), generator=g)),), generator=g).tolist()
        seqs = [p + torch.randint(5, 400, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist() + [2]
                for _ in range(int(torch.randint(3, 6, (1,), generator=g)))]
        out.append(TokenizedPair(seqs[0], seqs[1], None, "en", "x", more_ids=seqs[2:]))
    return out


def _varlen_reference(q, k, v, layout, scaling):
    """``varlen_attn``'s rule written out: each segment's queries against its keys, the causal diagonal aligned to
    the lower right (query j of m sees keys 0 .. n - m + j of n)."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    cu_q, cu_k, outs = layout.cu_q.tolist(), layout.cu_k.tolist(), []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        ks, vs = (t[cu_k[i]:cu_k[i + 1]].transpose(0, 1) for t in (k, v))
        m, n = qs.shape[1], ks.shape[1]
        scores = (qs @ ks.transpose(-1, -2) * scaling).masked_fill(~torch.ones(m, n, dtype=torch.bool).tril(n - m),
                                                                  float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def test_varlen_layout_segments():
    # row 0: plain sequence of 3, then [P=2 | T1=1 | T2=2 | T3=1], one padding token; row 1: [P=1 | T1=2], padding
    plan = PackPlan.from_groups(torch.tensor([[0, 0, 3, 0, 0, 0], [0, 3, 2, 1, 2, 1], [1, 0, 1, 2, 0, 0]]), 2)
    layout = varlen_layout(plan, 10)
    assert layout.cu_q.tolist() == [0, 3, 6, 8, 9, 12]
    assert layout.cu_k.tolist() == [0, 3, 6, 10, 13, 16]
    assert layout.q_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12]
    #        plain     [P|T1]    [P;T2]        [P;T3]     row 1 [P|T1]
    assert layout.kv_index.tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 6, 7, 3, 4, 8, 10, 11, 12]
    assert (layout.max_q, layout.max_k) == (3, 4)
    full = PackPlan.from_groups(torch.tensor([[0, 0, 2, 1, 0], [0, 3, 2, 0, 0]]), 1)
    assert varlen_layout(full, 5).q_index is None  # every position covered: the queries are the batch as it is


@pytest.mark.parametrize("capacity", [160, 0])
@pytest.mark.parametrize("name", ["llama", "internlm2"])
def test_varlen_path_equals_per_group_attention(name, capacity, tokenizer, monkeypatch):
    """The single variable-length call (CUDA's path) over :func:`varlen_layout` gives the rewards and gradients of
    the per-group calls: run here with the kernel written out (:func:`_varlen_reference`), in fp32."""
    items = make_pairs(prompt=True) + _lists()
    batch = collate_packed(items, tokenizer.pad_token_id, capacity)
    assert (batch.total_tokens > batch.computed_tokens) == (capacity > 0)  # padding, so q_index is used
    weights = torch.linspace(-1.0, 2.0, batch.inputs["reward_index"].shape[0])

    layers = []

    def run():
        torch.manual_seed(0)
        rm = RewardModel(tiny_model(name, tokenizer), get_backbone(name)).train()
        layers.append(rm.hf_model.config.num_hidden_layers)
        rewards = rm(**batch.inputs)
        (rewards * weights).sum().backward()
        return rewards.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}

    ref_r, ref_g = run()
    calls = []
    monkeypatch.setattr(packed_attention, "_use_varlen", lambda *a: True)
    monkeypatch.setattr(packed_attention, "_varlen_kernel", lambda *a: calls.append(1) or _varlen_reference(*a))
    var_r, var_g = run()
    assert len(calls) == layers[-1]  # one call per layer
    assert torch.allclose(var_r, ref_r, atol=1e-5), (var_r - ref_r).abs().max()
    assert var_g.keys() == ref_g.keys()
    assert max((var_g[k] - ref_g[k]).abs().max().item() for k in ref_g) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (PyTorch's varlen_attn)")
def test_varlen_kernel_on_cuda_equals_per_group_attention(tokenizer, monkeypatch):
    """On a GPU, in bf16: the real ``varlen_attn`` against the per-group SDPA calls (``COATI_VARLEN_ATTENTION=0``),
    rewards and gradients, within bf16 rounding."""
    items = make_pairs(prompt=True) + _lists()
    batch = collate_packed(items, tokenizer.pad_token_id, 160)
    inputs = {k: v.cuda() for k, v in batch.inputs.items()}

    def run(varlen):
        monkeypatch.setenv("COATI_VARLEN_ATTENTION", "1" if varlen else "0")
        torch.manual_seed(0)
        rm = RewardModel(tiny_model("llama", tokenizer), get_backbone("llama")).cuda().to(torch.bfloat16).train()
        rewards = rm(**inputs)
        rewards.float().sum().backward()
        return rewards.detach().float(), {n: p.grad.float() for n, p in rm.named_parameters() if p.grad is not None}

    calls = []
    real = packed_attention._varlen_kernel
    monkeypatch.setattr(packed_attention, "_varlen_kernel", lambda *a: calls.append(1) or real(*a))
    var_r, var_g = run(True)
    assert calls and not packed_attention._VARLEN.get("failed")
    ref_r, ref_g = run(False)
    assert torch.allclose(var_r, ref_r, atol=3e-2, rtol=3e-2), (var_r - ref_r).abs().max()
    for k in ref_g:
        scale = ref_g[k].abs().max().item() + 1e-6
        assert (var_g[k] - ref_g[k]).abs().max().item() / scale < 5e-2, k


@pytest.mark.parametrize("capacity", [0, 128])
def test_list_whose_prompt_was_cut_for_some_answers_still_shares_it_among_the_others(capacity, tokenizer):
    """max_len cuts each answer's prompt by what that answer needs, so in a ranked list the long answers can start at
    other tokens than the short ones: the short ones still share their prompt (rank order kept), the others are plain
    sequences, and rewards and gradients equal the padded path's."""
    from coati.data.batch import common_prefix_len

    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(5, 400, (n,), generator=g).tolist()  # noqa: E731
    p = rand(12)
    seqs = [p + rand(6) + [2], rand(30) + [2], p + rand(4) + [2], rand(25) + [2], p + rand(9) + [2]]
    pair = make_pairs(n=1, prompt=True)[0]
    items = [TokenizedPair(seqs[0], seqs[1], None, "en", "x", more_ids=seqs[2:]), pair]
    assert common_prefix_len(seqs) == 0 and common_prefix_len([seqs[0], seqs[2], seqs[4]]) == 12
    batch = collate_packed(items, tokenizer.pad_token_id, capacity)
    shapes = [row[2:] for row in batch.inputs["groups"].tolist()]
    assert [12, 7, 5, 10] in shapes  # [P | answers 0, 2, 4] in rank order
    assert [31, 0, 0, 0] in shapes and [26, 0, 0, 0] in shapes  # the answers whose prompt was cut: plain
    assert batch.computed_tokens == batch.real_tokens - 2 * 12 - shared_prefix_len(pair.chosen_ids, pair.rejected_ids)

    def run(collate):
        torch.manual_seed(0)
        rm = RewardModel(tiny_model("llama", tokenizer), get_backbone("llama")).train()
        rewards = rm(**collate(items).inputs)
        (rewards * torch.linspace(-1.0, 1.0, rewards.shape[0])).sum().backward()
        return rewards.detach(), {n: q.grad.clone() for n, q in rm.named_parameters() if q.grad is not None}

    padded_r, padded_g = run(lambda it: collate_pairs(it, tokenizer.pad_token_id))
    packed_r, packed_g = run(lambda it: collate_packed(it, tokenizer.pad_token_id, capacity))
    assert torch.allclose(packed_r, padded_r, atol=1e-5), (packed_r - padded_r).abs().max()
    assert max((packed_g[k] - padded_g[k]).abs().max().item() for k in padded_g) < 1e-5
