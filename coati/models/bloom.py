"""BLOOM backbone: presets, ALiBi slopes, and the forward of a packed batch.

ALiBi adds ``-slope_h * distance`` to the attention scores (Press et al., "Train Short, Test Long", arXiv 2108.12409,
section 3). BLOOM's attention takes no per-group plan, so a packed batch runs its blocks with the dense mask of
:func:`coati.models.packed_attention.packed_causal_mask`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from coati.models.packed_attention import packed_causal_mask

BLOOM_PRESETS = {
    "tiny": dict(hidden_size=64, n_layer=2, n_head=4),
    "small": dict(hidden_size=256, n_layer=4, n_head=8),
    # bloom-560m shape (random weights)
    "560m": dict(hidden_size=1024, n_layer=24, n_head=16),
}


def alibi_slopes(num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """ALiBi head slopes (Press et al., arXiv 2108.12409, section 3).

    For ``n`` heads, ``n`` a power of two, head ``i = 1..n`` has slope ``2 ** (-8 i / n)``. Otherwise, as BLOOM and
    the paper's reference code do: the ``p = 2 ** floor(log2 n)`` slopes of ``p`` heads, then the first ``n - p``
    odd-indexed slopes of ``2p`` heads, ``2 ** (-8 (2j - 1) / (2p))`` for ``j = 1..n-p``.

    Returns:
        ``[num_heads]`` float32 on ``device``.
    Raises:
        ValueError: ``num_heads < 1``.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be at least 1, got {num_heads}")
    p = 2 ** math.floor(math.log2(num_heads))
    exponents = [8 * i / p for i in range(1, p + 1)] + [4 * (2 * j - 1) / p for j in range(1, num_heads - p + 1)]
    return torch.tensor([2.0 ** -e for e in exponents], dtype=torch.float32, device=device)


def packed_forward(body: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   groups: torch.Tensor) -> torch.Tensor:
    """Last hidden states of a packed batch on a transformers ``BloomModel``.

    The ALiBi bias is ``slope_h * key_position`` (as transformers', equal to the paper's up to a per-query constant
    that softmax ignores) with positions restarting in each sequence; with the block-diagonal mask every sequence
    gets the hidden states it gets alone in a padded batch.

    Args:
        body: a ``BloomModel`` (embeddings, ``h`` blocks, ``ln_f``).
        input_ids, position_ids: ``[R, L]`` int64; groups: ``[G, 5]`` int64 group table
            (:mod:`coati.models.packed_attention`).
    Returns:
        ``[R, L, hidden]`` in the model's dtype.
    """
    hidden = body.word_embeddings_layernorm(body.word_embeddings(input_ids))
    rows, length = input_ids.shape
    slopes = alibi_slopes(body.num_heads, input_ids.device)
    alibi = (slopes[None, :, None] * position_ids[:, None, :]).reshape(rows * body.num_heads, 1, length)
    alibi, mask = alibi.to(hidden.dtype), packed_causal_mask(groups, rows, length, hidden.dtype)
    for block in body.h:
        hidden = block(hidden, alibi=alibi, attention_mask=mask, use_cache=False)[0]
    return body.ln_f(hidden)
