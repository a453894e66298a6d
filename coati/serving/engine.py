"""The model side of the reward server: :class:`RewardEngine` turns request texts into scored token ids and scores
groups of them in as few forward passes as fit.

A ``/get_reward`` text (:meth:`RewardEngine.encode_query`) is the full prompt + response as the policy produced it
(its chat template already applied). It is tokenized as it is (no special tokens added but the tokenizer's BOS where
training has one); trailing whitespace and pad tokens are dropped, and the reward token (the export's
``reward_token_id``, else the EOS) is appended unless the text already ends with it, so a policy output that ends with
its EOS and one that does not get the same score. A text longer than ``max_len`` loses tokens from its start (after
the BOS), never the reward token, as training cuts a prompt.

The responses of one prompt are one packed group ``[P | R1 | ... | RN]`` whose prompt is computed once
(:mod:`coati.models.packed_attention`); backbones without packed attention are scored in padded batches.
"""

import math

import torch

from coati.data.packing import item_groups, pack_groups
from coati.data.template import Encoded

def coati_version() -> str:
    """The installed coati-rm version (``"unknown"`` when not installed as a package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coati-rm")
    except PackageNotFoundError:
        return "unknown"


class RewardEngine:
    """Scores groups of encoded sequences in one forward pass, the prompt of each group computed once.

    Args:
        scorer: a loaded :class:`~coati.scoring.RewardScorer` (its model, tokenizer, encoder and layout).
        max_batch_tokens: token positions per forward pass; larger batches are split between whole groups.

    Attributes:
        packed: the backbone packs (:attr:`~coati.models.backbones.Backbone.packs`: a family coati trains), so
            groups are packed rows with shared prompts; otherwise padded batches, one row per sequence.
        forward_passes: forward passes run so far; sequences_scored: sequences scored so far; positions_computed:
            token positions run through the model so far, packed backbones only (a shared prompt counts once).
    """

    def __init__(self, scorer, max_batch_tokens: int = 16384):
        self.scorer, self.max_batch_tokens = scorer, max_batch_tokens
        backbone = scorer.model.backbone
        self.packed = backbone.packs
        self.capacity = backbone.row_capacity(scorer.encoder.max_len, True) if self.packed else 0
        self.forward_passes = self.sequences_scored = self.positions_computed = 0

    # ------------------------------------------------------------------ encoding (event-loop side, cheap)

    def encode_query(self, text: str) -> Encoded:
        """One ``/get_reward`` text as scored token ids (see the module docstring): its tokens, the reward token at
        the end, at most ``max_len`` tokens (the start cut, ``prompt_truncated`` set).

        Raises:
            ValueError: an empty text (nothing but whitespace).
        """
        scorer = self.scorer
        enc, tok = scorer.encoder, scorer.tokenizer
        text = text.rstrip()
        if not text:
            raise ValueError("is empty")
        ids = tok(text, add_special_tokens=False).input_ids
        pad = tok.pad_token_id
        while ids and ids[-1] == pad and pad != enc.reward_token_id:
            ids.pop()
        prefix = enc.prefix if scorer.layout == "coati" else []
        if prefix and ids[:len(prefix)] != prefix:
            ids = prefix + ids
        if not ids or ids[-1] != enc.reward_token_id:
            ids.append(enc.reward_token_id)
        return enc.fit_whole(ids, prefix)

    # ------------------------------------------------------------------ scoring (worker thread)

    @torch.no_grad()
    def rewards(self, groups: list[list[list[int]]]) -> list[list[float]]:
        """Raw rewards of ``groups`` (each a list of token-id sequences ending in the reward token), in the same
        nesting and order. Called from one thread at a time (the server's worker thread). Packed: the sequences of a
        group that share a start are one packed group, the prompt computed once
        (:func:`~coati.data.packing.item_groups`).

        Raises:
            ValueError: a reward that is not finite (see :meth:`~coati.scoring.RewardScorer.score_ids`).
        """
        if not self.packed:  # padded batches, one row per sequence
            flat = [s for g in groups for s in g]
            values = self.scorer.score_ids(flat).tolist()
            self.forward_passes += -(-len(flat) // self.scorer.batch_size)
        else:
            values = []
            for chunk in self._chunks(groups):
                packed, count = [], 0  # each sequence numbered in the order of ``values``
                for seqs in chunk:  # sequences sharing a start: one group each start (item_groups)
                    packed += item_groups(seqs, list(range(count, count + len(seqs))), self.capacity)
                    count += len(seqs)
                inputs = pack_groups(packed, count, self.scorer.tokenizer.pad_token_id, self.capacity)
                self.positions_computed += inputs["input_ids"].numel()
                out = self.scorer.model(**{k: v.to(self.scorer.device) for k, v in inputs.items()})
                values += out.float().cpu().tolist()
                self.forward_passes += 1
            if not all(map(math.isfinite, values)):
                raise ValueError("a score is not finite (NaN/inf): the model's forward pass overflowed or the export "
                                 "is broken")
        self.sequences_scored += len(values)
        res, start = [], 0
        for g in groups:
            res.append(values[start:start + len(g)])
            start += len(g)
        return res

    def _chunks(self, groups: list[list[list[int]]]) -> list[list[list[list[int]]]]:
        """The groups of each forward pass, in order: consecutive groups while their tokens fit ``max_batch_tokens``
        (a group larger than that is a pass of its own)."""
        chunks, size = [[]], 0
        for g in groups:
            n = sum(map(len, g))
            if chunks[-1] and size + n > self.max_batch_tokens:
                chunks.append([])
                size = 0
            chunks[-1].append(g)
            size += n
        return chunks
