"""The deterministic rank-aware batch order (:class:`GlobalBatchSampler`) and the loader that collates each batch of
it when it is read (:class:`PairLoader`): what the trainer iterates."""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch

from coati.data.batch import Batch, collate_pairs, item_loss_weight
from coati.data.packing import collate_packed
from coati.data.template import TokenizedPair


class GlobalBatchSampler:
    """Yields this rank's slice of each global batch, identical in content for any number of ranks.

    Each epoch shuffles all indices with ``seed + epoch`` and cuts them into global batches of
    ``batch_size * world_size`` pairs; rank r takes ``[r * batch_size, (r + 1) * batch_size)`` of each. A run on W
    ranks with per-rank batch b therefore trains on exactly the global batches of one process with batch W * b.
    Training drops the last incomplete global batch (equal local sizes keep the gradient mean exact);
    evaluation (``shuffle=False, drop_last=False``) gives every pair to exactly one rank, and every rank the same
    number of batches (a rank's last one may be empty), so strategies whose forward is a collective stay in step.

    With ``lengths`` (group by length, for the padded path), each run of ``group_size`` global batches of the
    shuffled order is sorted by length before it is cut, and the batches are shuffled again, so a batch holds pairs
    of similar length (less padding) while the order over batches stays random.

    Args:
        num_items: dataset size; batch_size: pairs per rank per batch; world_size, rank: process layout.
        lengths: per-item token counts, to group by length (training only).
    """

    def __init__(self, num_items: int, batch_size: int, world_size: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, lengths: list[int] | None = None, group_size: int = 64):
        self.num_items, self.batch_size = num_items, batch_size
        self.lengths, self.group_size = lengths, group_size
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
        for chunk in self.global_batches(self.epoch):
            if self.drop_last:
                mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            else:  # uneven tail: deal pairs round-robin so every pair is seen exactly once
                mine = chunk[self.rank::self.world_size]
            yield mine  # may be empty on some ranks in the last evaluation batch (same batch count on every rank)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The whole global batches of ``epoch`` (the items of all ranks), in order: each rank's batches are slices
        of these."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_items, generator=gen).tolist()
        else:
            order = list(range(self.num_items))
        g = self.batch_size * self.world_size
        if self.lengths is not None and self.shuffle:
            order = self._group_by_length(order, g, gen)
        return [order[start:start + g] for start in range(0, len(self) * g, g)]

    def _group_by_length(self, order: list[int], g: int, gen: torch.Generator) -> list[int]:
        span = g * self.group_size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: self.lengths[i])
            batches += [chunk[b:b + g] for b in range(0, len(chunk), g)]
        full = [b for b in batches if len(b) == g]
        tail = [i for b in batches if len(b) != g for i in b]
        perm = torch.randperm(len(full), generator=gen).tolist()
        return [i for p in perm for i in full[p]] + tail


class PairLoader:
    """This rank's batches of ``pairs``: the :class:`GlobalBatchSampler` order, each batch collated when it is read.

    Args:
        pairs: the tokenized pairs.
        collate: ``items -> Batch`` (:func:`make_collate`).
        sampler: this rank's order.
        fill_empty: when this rank has nothing in a batch (the tail of an evaluation), yield a batch of the first
            pair with ``counted=False`` instead of skipping it (strategies whose forward is a collective).
    """

    def __init__(self, pairs: list[TokenizedPair], collate: Callable[[list[TokenizedPair]], Batch],
                 sampler: GlobalBatchSampler, fill_empty: bool = False, list_weighting: str = "prompt"):
        self.pairs, self.collate, self.sampler, self.fill_empty = pairs, collate, sampler, fill_empty
        self.list_weighting = list_weighting
        #: the pairs' subsets (``source``: their dataset), sorted: the same on every rank
        self.subsets = sorted({p.source for p in pairs})
        self._item_weights: list[float] | None = None  # item_loss_weight of each pair, computed once
        self._totals: tuple[int, list[float]] | None = None

    def global_loss_weights(self, epoch: int) -> list[float]:
        """The loss weight (:func:`~coati.data.batch.item_loss_weight` summed) of every global batch of ``epoch``
        (the items of all ranks), in batch order."""
        if self._item_weights is None:
            self._item_weights = [item_loss_weight(len(p.comparisons()), self.list_weighting) for p in self.pairs]
        if self._totals is None or self._totals[0] != epoch:
            w = self._item_weights
            self._totals = (epoch, [sum(w[j] for j in chunk) for chunk in self.sampler.global_batches(epoch)])
        return self._totals[1]

    def __len__(self) -> int:
        return len(self.sampler)

    def batches(self, epoch: int = 0, start: int = 0, stop: int | None = None) -> Iterator[tuple[Batch, bool]]:
        """``(batch, counted)`` for the batches ``[start, stop)`` of ``epoch``'s order (``counted`` is False only
        for a ``fill_empty`` stand-in)."""
        self.sampler.set_epoch(epoch)
        for idx in list(self.sampler)[start:stop]:
            if idx:
                yield self.collate([self.pairs[j] for j in idx]), True
            elif self.fill_empty:
                yield self.collate([self.pairs[0]]), False


def make_collate(pad_id: int, packing: bool, capacity: int, share_prefix: bool, padding_side: str,
                 list_weighting: str = "prompt", margin_from_scores: bool = False, keep_ties: bool = False
                 ) -> Callable[[list[TokenizedPair]], Batch]:
    """``items -> Batch``: :func:`~coati.data.packing.collate_packed` (rows of ``capacity`` tokens, 0 = one row), or
    :func:`~coati.data.batch.collate_pairs` (with ``share_prefix``: each prompt computed once and continued through
    the key/value cache); ``list_weighting``, ``margin_from_scores`` and ``keep_ties`` as
    :func:`~coati.data.batch.list_layout`."""
    lists = dict(list_weighting=list_weighting, margin_from_scores=margin_from_scores, keep_ties=keep_ties)
    if packing:
        return partial(collate_packed, pad_id=pad_id, capacity=capacity, share_prefix=share_prefix, **lists)
    return partial(collate_pairs, pad_id=pad_id, padding_side=padding_side, share_prefix=share_prefix, **lists)
