"""Training memory: recomputed attention scores and heap trimming leave rewards and gradients unchanged."""

import pytest
import torch

from coati import memory
from coati.data.packing import collate_packed
from coati.losses import log_sig_loss
from coati.models import packed_attention
from coati.models.backbones import get_backbone
from coati.models.reward_model import RewardModel
from helpers import make_pairs, tiny_model


def _train_step(tokenizer, pairs, autocast=False, hooks_every=0, saved=None):
    """Rewards and gradients of one packed step of a tiny LLaMA reward model; ``saved`` collects ``(shape,
    elements of its storage)`` of the tensors autograd keeps for backward."""
    torch.manual_seed(0)
    rm = RewardModel(tiny_model("llama", tokenizer), get_backbone("llama")).train()
    handles = memory.trim_between_blocks(rm, hooks_every) if hooks_every else []
    batch = collate_packed(pairs, tokenizer.pad_token_id, 0)

    def pack(t):
        if saved is not None:  # shape and the bytes of its storage (a broadcast mask is one n x n)
            saved.append((tuple(t.shape), t.untyped_storage().nbytes() // t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        rewards = rm(**batch.inputs)
    b = len(pairs)
    log_sig_loss(rewards[:b], rewards[b:]).backward()
    for h in handles:
        h.remove()
    return rewards.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}, batch


@pytest.mark.parametrize("autocast", [False, True])
def test_recomputed_attention_scores_give_identical_gradients_and_are_not_kept(autocast, tokenizer, monkeypatch):
    pairs = make_pairs(prompt=True)
    kept, recomputed = [], []
    monkeypatch.setattr(packed_attention, "RECOMPUTE_SCORES", False)
    r0, g0, batch = _train_step(tokenizer, pairs, autocast, saved=kept)
    monkeypatch.setattr(packed_attention, "RECOMPUTE_SCORES", True)
    r1, g1, _ = _train_step(tokenizer, pairs, autocast, saved=recomputed)
    assert torch.equal(r0, r1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    sizes = {sum(shape) for _, _, *shape in batch.inputs["groups"].tolist()}

    def square(shapes):  # [H, n, n] scores or probabilities of a group, each head's own (the checkpoint keeps
        # its inputs, among them the group's mask: one n x n shared by all heads and layers)
        return [s for s, elements in shapes if len(s) == 3 and s[1] == s[2] and s[1] in sizes and
                elements >= s[0] * s[1] * s[2] > s[1] * s[2]]

    assert square(kept)  # the written-out path really ran and kept them before
    assert not square(recomputed)


def test_trim_between_blocks_releases_in_forward_and_backward_and_changes_nothing(tokenizer, monkeypatch):
    pairs = make_pairs(prompt=True)
    calls = []
    monkeypatch.setattr(memory, "release_free_heap", lambda: calls.append(1) or True)
    r0, g0, _ = _train_step(tokenizer, pairs)
    assert not calls
    r1, g1, _ = _train_step(tokenizer, pairs, hooks_every=1)
    layers = tiny_model("llama", tokenizer).config.num_hidden_layers
    assert len(calls) == 2 * layers  # after each block's forward, and when its output's gradient arrives
    assert torch.equal(r0, r1)
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


def test_release_free_heap_runs_where_glibc_is_the_c_library():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert memory.release_free_heap() is True
