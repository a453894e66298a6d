"""Partial gradient checkpointing: the chosen share of blocks recomputes, and gradients do not change."""

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from coati.data.packing import collate_packed
from coati.losses import log_sig_loss
from coati.models.backbones import get_backbone
from coati.models.loading import build_model, enable_gradient_checkpointing
from coati.models.reward_model import RewardModel
from helpers import make_pairs


def _grads(name, tokenizer, ratio):
    backbone = get_backbone(name)
    torch.manual_seed(0)
    hf = build_model(backbone, tokenizer, None, "small")  # 4 blocks
    recomputed = enable_gradient_checkpointing(hf, ratio) if ratio else 0
    blocks = [m for m in hf.modules() if isinstance(m, GradientCheckpointingLayer)]
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):  # transformers keeps a block's own hooks outside the checkpoint: count its parts
        for part in block.children():
            part.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    rm = RewardModel(hf, backbone).train()
    pairs = make_pairs(prompt=True)
    batch = collate_packed(pairs, tokenizer.pad_token_id, backbone.row_capacity(128, share_prefix=True))  # 0 or 256
    rewards = rm(**batch.inputs)
    log_sig_loss(rewards[:len(pairs)], rewards[len(pairs):]).backward()
    return recomputed, calls, {n: p.grad for n, p in rm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_partial_checkpointing_keeps_gradients(name, tokenizer):
    _, once, plain = _grads(name, tokenizer, 0)
    for ratio, expected in ((0.5, 2), (1.0, 4), (0.1, 1)):
        recomputed, calls, grads = _grads(name, tokenizer, ratio)
        assert recomputed == expected
        # a recomputed block runs (part of) its forward again in backward
        assert [c > o for c, o in zip(calls, once)] == [True] * expected + [False] * (4 - expected), (ratio, calls)
        worst = max((grads[k] - plain[k]).abs().max().item() for k in plain)
        assert worst < 1e-6, (ratio, worst)


def test_checkpointing_ratio_out_of_range(tokenizer):
    hf = build_model(get_backbone("llama"), tokenizer, None, "tiny")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        enable_gradient_checkpointing(hf, 0.0)
