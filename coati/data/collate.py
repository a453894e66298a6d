"""Padded batches of preference pairs and the deterministic, rank-aware batch order."""

from __future__ import annotations

from typing import Iterator

import torch

from coati.data.template import TokenizedPair


def collate_pairs(items: list[TokenizedPair], pad_id: int, padding_side: str = "right") -> dict:
    """Stack B pairs into one padded batch of 2B sequences: all chosen first, then all rejected.

    Returns:
        ``input_ids`` ``[2B, L]`` int64 and ``attention_mask`` ``[2B, L]`` int64 (L = longest sequence),
        ``margin`` ``[B]`` float32 or None (missing margins count as 0 when any pair has one),
        ``langs`` and ``sources``: lists of B strings.
    Raises:
        ValueError: empty ``items`` or an unknown padding side.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.int64)
    for row, s in enumerate(seqs):
        sl = slice(0, len(s)) if padding_side == "right" else slice(length - len(s), length)
        input_ids[row, sl] = torch.tensor(s, dtype=torch.int64)
        attention_mask[row, sl] = 1
    margin = None
    if any(it.margin is not None for it in items):
        margin = torch.tensor([0.0 if it.margin is None else float(it.margin) for it in items], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin,
            "langs": [it.lang for it in items], "sources": [it.source for it in items]}


class GlobalBatchSampler:
    """Yields this rank's slice of each global batch, identical in content for any number of ranks.

    Each epoch shuffles all indices with ``seed + epoch`` and cuts them into global batches of
    ``batch_size * world_size`` pairs; rank r takes ``[r * batch_size, (r + 1) * batch_size)`` of each. A run on W
    ranks with per-rank batch b therefore trains on exactly the global batches of one process with batch W * b.
    Training drops the last incomplete global batch (equal local sizes keep the gradient mean exact);
    evaluation (``shuffle=False, drop_last=False``) gives every pair to exactly one rank, and every rank the same
    number of batches (a rank's last one may be empty), so strategies whose forward is a collective stay in step.

    Args:
        num_items: dataset size; batch_size: pairs per rank per batch; world_size, rank: process layout.
    """

    def __init__(self, num_items: int, batch_size: int, world_size: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        self.num_items, self.batch_size = num_items, batch_size
        self.world_size, self.rank = world_size, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        g = self.batch_size * self.world_size
        return self.num_items // g if self.drop_last else -(-self.num_items // g)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=gen).tolist()
        else:
            order = list(range(self.num_items))
        g = self.batch_size * self.world_size
        for start in range(0, len(self) * g, g):
            chunk = order[start:start + g]
            if self.drop_last:
                mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            else:  # uneven tail: deal pairs round-robin so every pair is seen exactly once
                mine = chunk[self.rank::self.world_size]
            yield mine  # may be empty on some ranks in the last evaluation batch (same batch count on every rank)
