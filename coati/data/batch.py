"""Batches of preference pairs (padded or packed), the deterministic rank-aware batch order, and the loader that
joins them: what the trainer iterates."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from coati.data.template import TokenizedPair
from coati.models.packed_attention import shared_prefix_len


@dataclass
class Batch:
    """One micro-batch of B prompts (pairs, or ranked lists of K answers) as N sequences and M comparisons.

    Sequences are numbered answer-major: the first answer of every item, then the second of every item, then the
    third of the items that have one, and so on; for B pairs that is the 2B sequences, all chosen first, then all
    rejected, and the M = B comparisons are ``(i, B + i)``.

    Attributes:
        inputs: the reward model's keyword arguments (its ``[N]`` rewards follow the sequence order). Padded
            (:func:`collate_pairs`): ``input_ids`` and ``attention_mask`` ``[N, L]`` int64 (L = longest
            sequence). Packed (:func:`collate_packed`): ``input_ids`` and ``position_ids`` ``[R, L]`` int64,
            ``groups`` ``[G, 3 + Kmax]`` int64 and ``reward_index`` ``[N, 2]`` int64.
        margin: ``[M]`` float32 required reward gaps, or None (missing margins count as 0 when any pair has one).
        langs: the M comparisons' languages (their prompt's).
        real_tokens: tokens of the N sequences; computed_tokens: token positions the model computes (shared
            prompts once); total_tokens: positions computed, padding included. Padding fraction = 1 - computed / total.
        pairs: ``[M, 2]`` int64 (winner, loser) sequence indices of the comparisons.
        weight: ``[M]`` float32 loss weights (``1 / C_b`` for the C_b comparisons of prompt b, ``--list_weighting
            prompt``), or None for equal weights (all pairs, or ``--list_weighting pair``).
        item: ``[N]`` int64 index (0..B-1) of the prompt each sequence answers; best: ``[N]`` bool, the sequence
            is one of its prompt's top-ranked answers (for ``top1``); item_langs: the B prompts' languages.
        sources, item_sources: the M comparisons' and the B prompts' subsets (their pair's ``source``: the dataset).
        loss_weight: the denominator of the loss's weighted mean over this batch (:func:`item_loss_weight` summed),
            which the trainer sets against the same total over all ranks' batches of an optimizer step.
        lengths: ``[N]`` int64 answer lengths in tokens (:attr:`~coati.data.template.TokenizedPair.answer_lengths`),
            or None when an item has none.
        ties: ``[T, 2]`` int64 sequence indices of the T tied comparisons (kept with a tie loss, ``--ties``), or
            None; tie_weight: ``[T]`` float32 loss weights of the ties (as ``weight``), or None when ``weight``
            is None.
        tie_langs, tie_sources: the ties' languages and subsets.
    """

    inputs: dict[str, torch.Tensor]
    margin: torch.Tensor | None
    langs: list[str]
    real_tokens: int
    computed_tokens: int
    total_tokens: int
    pairs: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    item: torch.Tensor | None = None
    best: torch.Tensor | None = None
    item_langs: list[str] | None = None
    loss_weight: float = 0.0
    sources: list[str] | None = None
    item_sources: list[str] | None = None
    lengths: torch.Tensor | None = None
    ties: torch.Tensor | None = None
    tie_weight: torch.Tensor | None = None
    tie_langs: list[str] | None = None
    tie_sources: list[str] | None = None

    def pair_lengths(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(winner [M], loser [M])`` int64 answer lengths of the comparisons, or None without :attr:`lengths`."""
        if self.lengths is None:
            return None
        return self.lengths[self.pairs[:, 0]], self.lengths[self.pairs[:, 1]]


@dataclass
class ListLayout:
    """The sequences and comparisons of B items in :class:`Batch` order (:func:`list_layout`).

    Attributes:
        sequences: the N token-id lists; index: ``index[b][k]`` = sequence number of item b's answer k.
        pairs: ``[(winner, loser)]`` sequence numbers; margins: one per pair (None when none of the items has one).
        weights: one per pair, or None (all equal); item, best: per sequence (see :class:`Batch`).
        total: the items' :func:`item_loss_weight` summed.
        ties, tie_weights: the tied comparisons ``(i, j)`` (sequence numbers) and their weights (None when all
            weights are equal), with ``keep_ties``.
    """

    sequences: list[list[int]]
    index: list[list[int]]
    pairs: list[tuple[int, int]]
    margins: list[float] | None
    weights: list[float] | None
    item: list[int]
    best: list[bool]
    total: float = 0.0
    ties: list[tuple[int, int]] = field(default_factory=list)
    tie_weights: list[float] | None = None


def item_loss_weight(comparisons: int, list_weighting: str = "prompt") -> float:
    """An item's share of the denominator of the weighted mean the loss takes over a batch's comparisons
    (:func:`list_layout`), from its number of comparisons: ``prompt``: 1 for a prompt with a comparison (its ``C_b``
    comparisons weigh ``1 / C_b``); ``pair``: its number of comparisons. A pair weighs 1 either way."""
    return float(comparisons > 0) if list_weighting == "prompt" else float(comparisons)


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the start that all K >= 2 sequences share, leaving each its last token
    (:func:`~coati.models.packed_attention.shared_prefix_len` of the first against each other)."""
    return min(shared_prefix_len(seqs[0], s) for s in seqs[1:])


def list_layout(items: list[TokenizedPair], list_weighting: str = "prompt",
                margin_from_scores: bool = False, keep_ties: bool = False) -> ListLayout:
    """Number the answers of B pairs or ranked lists answer-major and list their comparisons
    (:meth:`~coati.data.template.TokenizedPair.comparisons`).

    Args:
        list_weighting: ``prompt``: each prompt's C_b comparisons weigh ``1 / C_b`` (a prompt is one batch element,
            InstructGPT, arXiv 2203.02155, section 3.5); ``pair``: every comparison weighs the same. A batch of
            pairs has equal weights either way (``weights`` None).
        margin_from_scores: per-pair margins from score differences (scored lists).
        keep_ties: also list the tied comparisons (equal scores); a prompt's ``C_b`` then counts them too, so
            ``--list_weighting prompt`` weighs its strict and tied comparisons ``1 / C_b`` alike.
    Raises:
        ValueError: an unknown ``list_weighting``.
    """
    if list_weighting not in ("prompt", "pair"):
        raise ValueError(f"list_weighting must be 'prompt' or 'pair', got {list_weighting!r}")
    seqs = [it.sequences for it in items]
    index = [[0] * len(s) for s in seqs]
    sequences, item, best = [], [], []
    for k in range(max(map(len, seqs))):
        for b, s in enumerate(seqs):
            if k < len(s):
                index[b][k] = len(sequences)
                sequences.append(s[k])
                item.append(b)
                scores = items[b].scores
                best.append(k == 0 if scores is None else scores[k] == scores[0])
    pairs, margins, weights, total, ties, tie_weights = [], [], [], 0.0, [], []
    for b, it in enumerate(items):
        comps = it.comparisons(margin_from_scores)
        tied = it.ties() if keep_ties else []
        count = len(comps) + len(tied)
        for i, j, m in comps:
            pairs.append((index[b][i], index[b][j]))
            margins.append(m)
            weights.append(1.0 / count)
        for i, j in tied:
            ties.append((index[b][i], index[b][j]))
            tie_weights.append(1.0 / count)
        total += item_loss_weight(count, list_weighting)
    equal = list_weighting == "pair" or len(set(weights + tie_weights)) <= 1
    return ListLayout(sequences, index, pairs, None if all(m is None for m in margins) else
                      [0.0 if m is None else float(m) for m in margins], None if equal else weights, item, best,
                      total, ties, None if equal else tie_weights)


def collate_pairs(items: list[TokenizedPair], pad_id: int, padding_side: str = "right",
                  list_weighting: str = "prompt", margin_from_scores: bool = False,
                  share_prefix: bool = False, keep_ties: bool = False) -> Batch:
    """Stack B pairs (or ranked lists) into one padded :class:`Batch` of N sequences.

    Without ``share_prefix`` every sequence is a row of its own (``computed_tokens == real_tokens``: each answer's
    prompt is computed with it). With ``share_prefix`` the prompt of each item (the tokens all its K sequences
    share at their start, :func:`~coati.models.packed_attention.shared_prefix_len`) is a row of a prompt batch
    computed once, and each answer is a row that continues it through the model's key/value cache
    (:meth:`coati.models.reward_model.RewardModel.forward`): the same rewards as one row per sequence. A batch in
    which some item's sequences share no token falls back to one row per sequence.

    Returns:
        a :class:`Batch` whose ``inputs`` are ``input_ids`` and ``attention_mask`` ``[N, L]`` int64; shared:
        ``input_ids`` / ``attention_mask`` ``[N, La]`` hold the answers' own tokens (after the prompt),
        ``prompt_ids`` / ``prompt_mask`` ``[B, Lp]`` int64 the prompts (right-padded) and ``prompt_index`` ``[N]``
        int64 the prompt row of each answer.
    Raises:
        ValueError: empty ``items``, an unknown padding side or ``list_weighting``.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    layout = list_layout(items, list_weighting, margin_from_scores, keep_ties)
    prefix = [common_prefix_len(it.sequences) for it in items] if share_prefix else []
    if not prefix or min(prefix) == 0:
        input_ids, attention_mask = pad_sequences(layout.sequences, pad_id, padding_side)
        return _batch(items, layout, {"input_ids": input_ids, "attention_mask": attention_mask}, input_ids.numel())
    prompt_ids, prompt_mask = pad_sequences([it.sequences[0][:p] for it, p in zip(items, prefix)], pad_id, "right")
    answers = [s[prefix[b]:] for s, b in zip(layout.sequences, layout.item)]
    input_ids, attention_mask = pad_sequences(answers, pad_id, padding_side)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_ids": prompt_ids,
              "prompt_mask": prompt_mask, "prompt_index": torch.tensor(layout.item, dtype=torch.int64)}
    return _batch(items, layout, inputs, input_ids.numel() + prompt_ids.numel(),
                  computed=sum(prefix) + sum(map(len, answers)))


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


def _batch(items: list[TokenizedPair], layout: ListLayout, inputs: dict, total_tokens: int,
           computed: int | None = None) -> Batch:
    margin = None if layout.margins is None else torch.tensor(layout.margins, dtype=torch.float32)
    weight = None if layout.weights is None else torch.tensor(layout.weights, dtype=torch.float32)
    real = sum(map(len, layout.sequences))
    langs = [items[layout.item[w]].lang for w, _ in layout.pairs]
    lengths = None
    if all(it.answer_lengths is not None for it in items):
        lengths = torch.zeros(len(layout.sequences), dtype=torch.int64)
        for it, idx in zip(items, layout.index):
            lengths[idx] = torch.tensor(it.answer_lengths, dtype=torch.int64)
    tie_owner = [items[layout.item[a]] for a, _ in layout.ties]
    ties = dict(ties=torch.tensor(layout.ties, dtype=torch.int64).reshape(-1, 2),
                tie_weight=None if layout.tie_weights is None else torch.tensor(layout.tie_weights, dtype=torch.float32),
                tie_langs=[it.lang for it in tie_owner], tie_sources=[it.source for it in tie_owner]) \
        if layout.ties else {}
    return Batch(inputs, margin, langs, real, real if computed is None else computed, total_tokens, **ties,
                 pairs=torch.tensor(layout.pairs, dtype=torch.int64).reshape(-1, 2), weight=weight,
                 item=torch.tensor(layout.item, dtype=torch.int64), best=torch.tensor(layout.best, dtype=torch.bool),
                 item_langs=[it.lang for it in items], loss_weight=layout.total,
                 sources=[items[layout.item[w]].source for w, _ in layout.pairs],
                 item_sources=[it.source for it in items], lengths=lengths)


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
        list_weighting, margin_from_scores: as :func:`list_layout`.
    Returns:
        a :class:`Batch` whose ``inputs`` are ``input_ids`` and ``position_ids`` ``[R, L]`` int64, ``groups``
        ``[G, 3 + Kmax]`` int64 (row, start, prefix_len, answer lengths...; for pairs ``[G, 5]``: row, start,
        prefix_len, chosen_len, rejected_len) and ``reward_index`` ``[N, 2]`` int64: (row, column) of each
        sequence's last token, in :class:`Batch` order. ``computed_tokens`` counts the token positions computed
        (``real_tokens`` minus the shared prefixes' further copies).
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
    return _batch(items, layout, inputs, inputs["input_ids"].numel(), computed=sum(len(g[0]) for g in groups))


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
