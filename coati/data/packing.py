"""Packed batches: the sequences of B pairs or ranked lists placed back to back in rows with no padding between
them, the K answers of an item after one copy of their shared prompt (the groups that
:mod:`coati.models.packed_attention` computes)."""

from __future__ import annotations

import torch

from coati.data.batch import Batch, build_batch, common_prefix_len, list_layout, shared_prefix_len
from coati.data.template import TokenizedPair


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


def _share_groups(seqs: list[list[int]], numbers: list[int], capacity: int) -> list[tuple]:
    """Groups ``(token ids, positions, shape, [(sequence number, column of its last token)...])`` of the K
    sequences of one item that share their first ``p`` tokens: ``[P | T1 | ... | Tj]`` filled in rank order while
    it fits ``capacity`` (0: no limit), a new group with its own copy of ``P`` when the next answer does not fit; a
    group of one answer is a plain sequence."""
    p = common_prefix_len(seqs)
    chunks, size = [[]], p
    for k, s in enumerate(seqs):
        tail = len(s) - p
        if capacity and chunks[-1] and size + tail > capacity:
            chunks.append([])
            size = p
        chunks[-1].append(k)
        size += tail
    out = []
    for chunk in chunks:
        if len(chunk) == 1:
            s = seqs[chunk[0]]
            out.append((list(s), list(range(len(s))), (len(s),), [(numbers[chunk[0]], len(s) - 1)]))
            continue
        ids, pos, ends = list(seqs[chunk[0]][:p]), list(range(p)), []
        for k in chunk:
            ids += seqs[k][p:]
            pos += range(p, len(seqs[k]))
            ends.append((numbers[k], len(ids) - 1))
        out.append((ids, pos, (p, *(len(seqs[k]) - p for k in chunk)), ends))
    return out


def collate_packed(items: list[TokenizedPair], pad_id: int, capacity: int = 0, share_prefix: bool = True,
                   list_weighting: str = "prompt", margin_from_scores: bool = False,
                   keep_ties: bool = False) -> Batch:
    """Pack the N sequences of B pairs (or ranked lists) into rows without padding between them.

    With ``share_prefix`` the K sequences of an item that start with the same tokens (the prompt) become one group
    ``[shared | answer 1 rest | ... | answer K rest]`` computed as if they were separate sequences (see
    :mod:`coati.models.packed_attention`), so the prompt is computed once for all K answers; when only some of
    them share a start (``max_len`` cut the others' prompt), those are such a group (:func:`item_groups`); otherwise,
    each sequence is a group of its own. Positions are each token's position in its
    own sequence, so every reward equals the padded path's.

    Args:
        capacity: tokens per row; 0 puts the whole batch in one row (no padding at all: for backbones whose packed
            attention costs nothing per row, the RoPE ones). With a capacity, groups are placed first-fit-decreasing;
            an item whose shared group is longer than the capacity is cut into several groups, each with its own
            copy of the prompt (a pair: back into its two sequences), never dropped.
        list_weighting, margin_from_scores: as :func:`~coati.data.batch.list_layout`.
    Returns:
        a :class:`~coati.data.batch.Batch` whose ``inputs`` are ``input_ids`` and ``position_ids`` ``[R, L]`` int64,
        ``groups`` ``[G, 3 + Kmax]`` int64 (row, start, prefix_len, answer lengths...; for pairs ``[G, 5]``: row,
        start, prefix_len, chosen_len, rejected_len) and ``reward_index`` ``[N, 2]`` int64: (row, column) of each
        sequence's last token, in :class:`~coati.data.batch.Batch` order. ``computed_tokens`` counts the token
        positions computed (``real_tokens`` minus the shared prefixes' further copies).
    Raises:
        ValueError: empty ``items``, a sequence longer than ``capacity``, or an unknown ``list_weighting``.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    layout = list_layout(items, list_weighting, margin_from_scores, keep_ties)
    groups = []
    for b, it in enumerate(items):
        groups += item_groups(it.sequences, layout.index[b], capacity, share_prefix)
    inputs = pack_groups(groups, len(layout.sequences), pad_id, capacity)
    return build_batch(items, layout, inputs, inputs["input_ids"].numel(), computed=sum(len(g[0]) for g in groups))


#: Sequences of one item that share no start with all the others are grouped with those they share at least this many
#: leading tokens with (:func:`item_groups`); the reward server clusters ``/get_reward`` texts by the same rule.
MIN_SHARED_TOKENS = 8


def prefix_groups(sequences: list[list[int]], min_shared: int = MIN_SHARED_TOKENS) -> list[list[int]]:
    """Cluster sequences that start with the same tokens (the samples of one prompt): indices of each cluster, whose
    members share at least ``min_shared`` leading tokens with its first one (lexicographic order, so that is the
    cluster's common prefix). Every index appears in exactly one cluster; a lone sequence is a cluster of one."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    clusters: list[list[int]] = []
    for i in order:
        if clusters and shared_prefix_len(sequences[clusters[-1][0]], sequences[i]) >= min_shared:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    return clusters


def item_groups(seqs: list[list[int]], numbers: list[int], capacity: int = 0, share_prefix: bool = True) -> list:
    """The packed groups of one item's K >= 1 sequences (numbered ``numbers`` in the batch): with ``share_prefix``
    and a common start, ``[P | T1 | ... | Tj]`` groups (:func:`_share_groups`). Without one (``max_len`` cut the
    prompt of some answers, each by what it needs, so those start at other tokens), the sequences that share a start
    of at least :data:`MIN_SHARED_TOKENS` tokens with each other (:func:`prefix_groups`) are grouped so, in rank
    order; the rest, or all without ``share_prefix``, are one plain group per sequence.

    Returns:
        ``(token ids, positions, shape, [(sequence number, column of its last token in the group)...])`` tuples, as
        :func:`pack_groups` takes them.
    """
    if share_prefix and len(seqs) > 1 and common_prefix_len(seqs) > 0:
        return _share_groups(seqs, numbers, capacity)
    if share_prefix and len(seqs) > 2:  # no start shared by all: those sharing one with each other, in rank order
        clusters = sorted(sorted(c) for c in prefix_groups(seqs))
        if len(clusters) < len(seqs):
            return [g for c in clusters for g in item_groups([seqs[i] for i in c], [numbers[i] for i in c], capacity)]
    return [(list(s), list(range(len(s))), (len(s),), [(n, len(s) - 1)]) for s, n in zip(seqs, numbers)]


def pack_groups(groups: list, num_sequences: int, pad_id: int, capacity: int = 0) -> dict[str, torch.Tensor]:
    """Place groups (:func:`item_groups`) in rows: one row (``capacity`` 0) or first-fit-decreasing rows of
    ``capacity`` tokens.

    Returns:
        the reward model's packed inputs: ``input_ids`` / ``position_ids`` ``[R, L]`` int64, ``groups``
        ``[G, 3 + Kmax]`` int64 (see :func:`collate_packed`) and ``reward_index`` ``[num_sequences, 2]`` int64.
    Raises:
        ValueError: a group longer than ``capacity``.
    """
    if capacity:
        rows = pack_rows([len(g[0]) for g in groups], capacity)
    else:
        rows = [list(range(len(groups)))]
    length = max(sum(len(groups[g][0]) for g in row) for row in rows)
    width = max(2, max(len(g[2]) - 1 for g in groups))  # answer columns (2 for pairs: the 5-column table)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    position_ids = torch.zeros((len(rows), length), dtype=torch.int64)
    reward_index = torch.zeros((num_sequences, 2), dtype=torch.int64)
    table = []
    for row_no, row in enumerate(rows):
        start = 0
        for g in row:
            ids, pos, shape, ends = groups[g]
            n = len(ids)
            input_ids[row_no, start:start + n] = torch.tensor(ids, dtype=torch.int64)
            position_ids[row_no, start:start + n] = torch.tensor(pos, dtype=torch.int64)
            for seq, last in ends:
                reward_index[seq] = torch.tensor([row_no, start + last])
            table.append([row_no, start, *shape] + [0] * (width + 1 - len(shape)))
            start += n
        position_ids[row_no, start:] = torch.arange(length - start)
    return {"input_ids": input_ids, "position_ids": position_ids, "reward_index": reward_index,
            "groups": torch.tensor(table, dtype=torch.int64)}
