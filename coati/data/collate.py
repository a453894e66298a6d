"""Padded batches of preference pairs and the deterministic, rank-aware batch order."""

from __future__ import annotations

from typing import Iterator

import torch

from coati.data.template import TokenizedPair
from coati.models.packed_attention import shared_prefix_len


def collate_pairs(items: list[TokenizedPair], pad_id: int, padding_side: str = "right") -> dict:
    """Stack B pairs into one padded batch of 2B sequences: all chosen first, then all rejected.

    Returns:
        ``inputs``: the model's keyword arguments, ``input_ids`` ``[2B, L]`` int64 and ``attention_mask`` ``[2B, L]``
        int64 (L = longest sequence); ``margin`` ``[B]`` float32 or None (missing margins count as 0 when any pair
        has one); ``langs``, ``sources``: lists of B strings; ``real_tokens`` (tokens of the 2B sequences),
        ``computed_tokens`` (non-padding positions the model computes; equal here) and ``total_tokens`` (positions
        computed, padding included): ints; the padding fraction is 1 - computed / total.
    Raises:
        ValueError: empty ``items`` or an unknown padding side.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    input_ids, attention_mask = pad_sequences(seqs, pad_id, padding_side)
    return _batch(items, {"input_ids": input_ids, "attention_mask": attention_mask}, seqs, input_ids.numel())


def pad_sequences(seqs, pad_id: int, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad N token-id sequences to the longest one.

    Returns:
        ``input_ids`` ``[N, L]`` int64 (``pad_id`` on padding) and ``attention_mask`` ``[N, L]`` int64 (1 on real
        tokens).
    Raises:
        ValueError: an unknown padding side.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.int64)
    for row, s in enumerate(seqs):
        sl = slice(0, len(s)) if padding_side == "right" else slice(length - len(s), length)
        input_ids[row, sl] = torch.as_tensor(list(s), dtype=torch.int64)
        attention_mask[row, sl] = 1
    return input_ids, attention_mask


def _batch(items: list[TokenizedPair], inputs: dict, seqs: list[list[int]], total_tokens: int,
           computed: int | None = None) -> dict:
    margin = None
    if any(it.margin is not None for it in items):
        margin = torch.tensor([0.0 if it.margin is None else float(it.margin) for it in items], dtype=torch.float32)
    real = sum(map(len, seqs))
    return {"inputs": inputs, "margin": margin, "langs": [it.lang for it in items],
            "sources": [it.source for it in items], "real_tokens": real, "total_tokens": total_tokens,
            "computed_tokens": real if computed is None else computed}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequence lengths into rows of at most ``capacity`` tokens.

    Returns:
        rows as lists of sequence indices (longest first within the order of placement); deterministic.
    Raises:
        ValueError: a sequence longer than ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a packed row of {capacity} "
                             "(--max_tokens_per_batch must be at least --max_len)")
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def collate_packed(items: list[TokenizedPair], pad_id: int, capacity: int = 0, share_prefix: bool = True) -> dict:
    """Pack the 2B sequences of B pairs into rows without padding between them.

    With ``share_prefix`` a pair whose chosen and rejected sequences start with the same tokens (the prompt) becomes
    one group ``[shared | chosen rest | rejected rest]`` computed as if the two were separate sequences (see
    :mod:`coati.models.packed_attention`), so the prompt is computed once; otherwise, or when the pair shares no
    token, each sequence is a group of its own. Positions are each token's position in its own sequence, so every
    reward equals the padded path's.

    Args:
        capacity: tokens per row; 0 puts the whole batch in one row (no padding at all: for backbones whose packed
            attention costs nothing per row, the RoPE ones). With a capacity, groups are placed first-fit-decreasing
            and a shared-prefix group longer than the capacity is split back into its two sequences.
    Returns:
        like :func:`collate_pairs`, with ``inputs`` = ``input_ids`` and ``position_ids`` ``[R, L]`` int64,
        ``groups`` ``[G, 5]`` int64 (row, start, prefix_len, chosen_len, rejected_len) and ``reward_index``
        ``[2B, 2]`` int64: (row, column) of each sequence's last token, chosen first. ``computed_tokens`` counts the
        token positions computed (``real_tokens`` minus the shared prefixes' second copies).
    Raises:
        ValueError: empty ``items`` or a sequence longer than ``capacity``.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    b = len(items)
    # each group: (token ids, positions, prefix_len, chosen_len, rejected_len, sequence index of each last token)
    groups = []
    for i, it in enumerate(items):
        c, r = list(it.chosen_ids), list(it.rejected_ids)
        p = shared_prefix_len(c, r) if share_prefix else 0
        if p > 0 and (not capacity or len(c) + len(r) - p <= capacity):
            ids = c + r[p:]
            pos = list(range(len(c))) + list(range(p, len(r)))
            groups.append((ids, pos, p, len(c) - p, len(r) - p, (i, len(c) - 1), (b + i, len(ids) - 1)))
        else:
            groups.append((c, list(range(len(c))), len(c), 0, 0, (i, len(c) - 1)))
            groups.append((r, list(range(len(r))), len(r), 0, 0, (b + i, len(r) - 1)))
    if capacity:
        rows = pack_rows([len(g[0]) for g in groups], capacity)
    else:
        rows = [list(range(len(groups)))]
    length = max(sum(len(groups[g][0]) for g in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    position_ids = torch.zeros((len(rows), length), dtype=torch.int64)
    reward_index = torch.zeros((2 * b, 2), dtype=torch.int64)
    table = []
    for row_no, row in enumerate(rows):
        start = 0
        for g in row:
            ids, pos, p, nc, nr, *ends = groups[g]
            n = len(ids)
            input_ids[row_no, start:start + n] = torch.tensor(ids, dtype=torch.int64)
            position_ids[row_no, start:start + n] = torch.tensor(pos, dtype=torch.int64)
            for seq, last in ends:
                reward_index[seq] = torch.tensor([row_no, start + last])
            table.append([row_no, start, p, nc, nr])
            start += n
        position_ids[row_no, start:] = torch.arange(length - start)
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "reward_index": reward_index,
              "groups": torch.tensor(table, dtype=torch.int64)}
    seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    return _batch(items, inputs, seqs, input_ids.numel(), computed=sum(len(g[0]) for g in groups))


def default_row_capacity(per_group_attention: bool, max_len: int, share_prefix: bool) -> int:
    """The packed row capacity when ``--max_tokens_per_batch`` is 0.

    Returns:
        0 (the whole batch in one row) for a model whose packed attention runs group by group (RoPE backbones);
        otherwise (a dense mask, BLOOM) the longest group: ``2 * max_len`` with prefix sharing, else ``max_len``.
    """
    if per_group_attention:
        return 0
    return (2 if share_prefix else 1) * max_len


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
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=gen).tolist()
        else:
            order = list(range(self.num_items))
        g = self.batch_size * self.world_size
        if self.lengths is not None and self.shuffle:
            order = self._group_by_length(order, g, gen)
        for start in range(0, len(self) * g, g):
            chunk = order[start:start + g]
            if self.drop_last:
                mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            else:  # uneven tail: deal pairs round-robin so every pair is seen exactly once
                mine = chunk[self.rank::self.world_size]
            yield mine  # may be empty on some ranks in the last evaluation batch (same batch count on every rank)

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
