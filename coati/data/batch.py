"""The typed :class:`Batch` of preference pairs or ranked lists: their sequences numbered answer-major with their
comparisons and loss weights (:func:`list_layout`), and the padded layout (:func:`collate_pairs`). Packed rows
are :mod:`coati.data.packing`; the rank-aware order and loader, :mod:`coati.data.loader`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from coati.data.template import TokenizedPair


@dataclass
class Batch:
    """One micro-batch of B prompts (pairs, or ranked lists of K answers) as N sequences and M comparisons.

    Sequences are numbered answer-major: the first answer of every item, then the second of every item, then the
    third of the items that have one, and so on; for B pairs that is the 2B sequences, all chosen first, then all
    rejected, and the M = B comparisons are ``(i, B + i)``.

    Attributes:
        inputs: the reward model's keyword arguments (its ``[N]`` rewards follow the sequence order). Padded
            (:func:`collate_pairs`): ``input_ids`` and ``attention_mask`` ``[N, L]`` int64 (L = longest
            sequence). Packed (:func:`~coati.data.packing.collate_packed`): ``input_ids`` and ``position_ids``
            ``[R, L]`` int64, ``groups`` ``[G, 3 + Kmax]`` int64 and ``reward_index`` ``[N, 2]`` int64.
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


def shared_prefix_len(chosen: list[int], rejected: list[int]) -> int:
    """Length of the common start of two token sequences, leaving each at least its last token.

    Returns:
        ``p`` with ``chosen[:p] == rejected[:p]`` and ``p <= min(len) - 1`` (each sequence keeps its own last token,
        where its reward is read).
    """
    limit = min(len(chosen), len(rejected)) - 1
    return next((p for p in range(limit) if chosen[p] != rejected[p]), max(limit, 0))


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the start that all K >= 2 sequences share, leaving each its last token
    (:func:`shared_prefix_len` of the first against each other)."""
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
    share at their start, :func:`shared_prefix_len`) is a row of a prompt batch
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
        return build_batch(items, layout, {"input_ids": input_ids, "attention_mask": attention_mask}, input_ids.numel())
    prompt_ids, prompt_mask = pad_sequences([it.sequences[0][:p] for it, p in zip(items, prefix)], pad_id, "right")
    answers = [s[prefix[b]:] for s, b in zip(layout.sequences, layout.item)]
    input_ids, attention_mask = pad_sequences(answers, pad_id, padding_side)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_ids": prompt_ids,
              "prompt_mask": prompt_mask, "prompt_index": torch.tensor(layout.item, dtype=torch.int64)}
    return build_batch(items, layout, inputs, input_ids.numel() + prompt_ids.numel(),
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


def build_batch(items: list[TokenizedPair], layout: ListLayout, inputs: dict, total_tokens: int,
                computed: int | None = None) -> Batch:
    """The :class:`Batch` of ``items`` laid out by ``layout`` around the model ``inputs`` (padded or packed): the
    comparisons with their margins, weights, languages and sources, the tied pairs, each sequence's answer length;
    ``total_tokens`` the positions of ``inputs``, ``computed`` the positions a forward computes (default: the real
    tokens). Shared by the padded (:func:`collate_pairs`) and packed (:func:`coati.data.packing.collate_packed`)
    layouts."""
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
