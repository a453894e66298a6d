"""RewardModel: a transformers ``*ForSequenceClassification`` (optionally LoRA-wrapped) read at the last real token."""

from __future__ import annotations

import torch
from torch import nn

from coati.models import packed_attention
from coati.models.backbones import Backbone


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row.

    Args:
        attention_mask: ``[N, L]`` int/bool, 1 on real tokens; left or right padding.
    Returns:
        ``[N]`` int64 positions. Independent of padding side and of the other rows.
    Raises:
        ValueError: a row has no real token.
    """
    mask = attention_mask.to(torch.bool)
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("a sequence in the batch has no real token (attention_mask all zero)")
    return (mask.shape[-1] - 1) - mask.flip(-1).to(torch.int64).argmax(dim=-1)


def sliding_window(config) -> int | None:
    """The sliding window W of a backbone config when any of its layers attends only W positions back (Gemma 3's
    local layers, Mistral with a ``sliding_window``, Qwen with ``use_sliding_window``), else None."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    return window if window and (types is None or "sliding_attention" in types) else None


class RewardModel(nn.Module):
    """Backbone + value head giving one scalar reward per sequence.

    ``model`` is a ``*ForSequenceClassification`` with ``num_labels == 1`` (possibly a peft ``PeftModel``); its
    ``score`` layer is the value head. The reward is the value head applied to the hidden state of the last real
    token (the EOS or reward token appended to every answer). Position ids are derived from the attention mask, so
    left- and right-padded batches give the same rewards.

    Args:
        model: the HF sequence-classification model (or peft wrapper of one).
        backbone: its registry entry, which says how a packed batch is run (:attr:`Backbone.group_attention`, :attr:`Backbone.dense_packed_forward`); with
            per-group attention the model is switched to ``coati_packed`` here (:func:`packed_attention.enable`).
    """

    #: The sequence-parallel group the forward splits its tokens over (set by ``train.run`` under
    #: ``--sequence_parallel_size`` > 1), or None.
    sequence_parallel = None
    def __init__(self, model: nn.Module, backbone: Backbone):
        super().__init__()
        self.model, self.backbone = model, backbone
        self.length_head: nn.Linear | None = None  # ODIN's length head (add_length_head)
        if backbone.group_attention:
            packed_attention.enable(self.hf_model)

    def add_length_head(self) -> nn.Linear:
        """Give the model a second linear head on the same hidden state, ODIN's length head (Chen et al. 2024, arXiv
        2402.07319, section 4): ``[hidden] -> [1]``, fp32, no bias (as the value head of the LLaMA-style families),
        initialised as transformers initialises ``score`` (normal, std ``initializer_range``). The forward then
        returns both heads' outputs (see :meth:`forward`); the value head ``score`` stays the quality head that the
        export keeps."""
        score = self.hf_model.score
        head = nn.Linear(score.in_features, 1, bias=False, device=score.weight.device, dtype=torch.float32)
        nn.init.normal_(head.weight, std=getattr(self.hf_model.config, "initializer_range", 0.02))
        self.length_head = head
        return head

    def _heads(self, hidden: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The value head on ``[..., hidden]`` states in fp32: ``[...]`` rewards, or with a length head
        ``([..., 2] (quality, length), |w_Q . w_L|)``."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            quality = self.hf_model.score(hidden.float()).squeeze(-1).float()
            if self.length_head is None:
                return quality
            both = torch.stack([quality, self.length_head(hidden.float()).squeeze(-1)], dim=-1)
            overlap = (self.hf_model.score.weight.float().flatten() * self.length_head.weight.flatten()).sum().abs()
            return both, overlap

    @property
    def can_cache_prompt(self) -> bool:
        """Whether padded batches may compute a shared prompt once and continue it through the key/value cache:
        not on a backbone with a sliding window, whose cache drops keys by column (a right-padded prompt's padding
        counted as positions) and so would read other rewards than one row per sequence."""
        return sliding_window(self.hf_model.config) is None

    @property
    def hf_model(self) -> nn.Module:
        """The underlying ``*ForSequenceClassification`` (LoRA layers, if any, injected in place)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, reward_index: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, prompt_ids: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None, prompt_index: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards for a padded batch (one sequence per row) or a packed batch (several sequences per row).

        Padded: ``input_ids`` and ``attention_mask`` ``[N, L]`` (1 on real tokens, padding on either side); the
        reward of row i is read at its last real token.
        Padded with a shared prompt (:func:`coati.data.batch.collate_pairs` with ``share_prefix``): ``prompt_ids``
        and ``prompt_mask`` ``[B, Lp]`` (right-padded) are computed once, their keys and values (transformers' cache)
        are selected for each answer by ``prompt_index`` ``[N]``, and ``input_ids`` / ``attention_mask`` ``[N, La]``
        (the answers' own tokens) continue them at the positions they have in their own sequences.
        Packed (see :mod:`coati.models.packed_attention`): ``input_ids`` and ``position_ids`` ``[R, L]`` (each token's
        position in its own sequence), ``groups`` ``[G, 5]`` int64 (the group table: plain sequences and
        shared-prefix pairs), ``attention_mask`` None, and ``reward_index`` ``[N, 2]`` int64 (row, column) of each
        sequence's last token.

        Returns:
            ``[N]`` float32 rewards, one scalar per sequence (the value head runs in fp32 even under autocast). With a
            length head (:meth:`add_length_head`): ``(rewards [N, 2], overlap)``, each sequence's quality (the value
            head) and length-head outputs, and the 0-dim ``|w_Q . w_L|`` of the two heads' weights (ODIN's
            orthogonality term, computed here, where every strategy has the weights gathered).
        Raises:
            ValueError: a packed batch without ``groups``, or with per-group attention on a model whose attention
            implementation (for example flash-attention) could not be switched to ``coati_packed``; a shared-prompt
            batch under sequence parallelism, or on a model that returns no cache (gradient checkpointing in
            training).
        """
        seq_cls = self.hf_model
        body = getattr(seq_cls, seq_cls.base_model_prefix)
        if prompt_ids is not None:
            if self.sequence_parallel is not None:
                raise ValueError("sequence parallelism takes packed batches or padded ones without a shared prompt")
            if not self.can_cache_prompt:
                raise ValueError(f"a padded batch with a shared prompt cannot run on a backbone with a sliding window "
                                 f"({sliding_window(seq_cls.config)} tokens): use packed batches or one row per "
                                 "answer (collate_pairs without share_prefix)")
            last_hidden = self._cached_prompt_forward(body, input_ids, attention_mask, prompt_ids, prompt_mask,
                                                      prompt_index)
        elif self.sequence_parallel is not None:
            return self._sequence_parallel_forward(body, input_ids, attention_mask, position_ids, reward_index, groups)
        elif reward_index is None:
            # positions count only real tokens (pads get 0); BLOOM (ALiBi) ignores them, deriving the same from the mask
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          position_ids=(attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)).last_hidden_state
            last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        else:
            if groups is None:
                raise ValueError("a packed batch needs its group table (collate_packed's inputs['groups'])")
            if not self.backbone.packs:
                raise ValueError(f"model_type {self.backbone.name!r}: packed batches are not supported (scoring uses "
                                 "padded batches)")
            if self.backbone.dense_packed_forward is not None:
                hidden = self.backbone.dense_packed_forward(body, input_ids, position_ids, groups)
            elif (impl := seq_cls.config._attn_implementation) != packed_attention.PACKED_ATTENTION:
                raise ValueError(f"packed batches need SDPA or eager attention (switched to coati_packed), not "
                                 f"{impl!r}; use padded batches (--packing false)")
            else:
                plan = packed_attention.PackPlan.from_groups(groups, input_ids.shape[0])
                with packed_attention.packed_forward():
                    hidden = body(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                  coati_pack=plan).last_hidden_state
            last_hidden = hidden[reward_index[:, 0], reward_index[:, 1]]
        return self._heads(last_hidden)

    @staticmethod
    def _cached_prompt_forward(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                               prompt_index: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[N, hidden]`` of N answers that continue B prompts computed once (see
        :meth:`forward`). Gradients reach the prompt tokens through the selected keys and values."""
        prompt_len = prompt_mask.to(torch.int64).sum(-1)  # [B]
        out = body(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                   position_ids=torch.arange(prompt_ids.shape[1], device=prompt_ids.device).expand_as(prompt_ids))
        cache = out.cache
        if cache is None:
            raise ValueError("the backbone returned no key/value cache (gradient checkpointing drops it in training): "
                             "a shared prompt needs packed batches or --share_prefix false")
        for layer in cache.layers:
            layer.batch_select_indices(prompt_index)
        mask = attention_mask.to(torch.int64)
        # each answer token's position in its own sequence: its prompt's length + its rank among the real tokens
        position_ids = prompt_len[prompt_index, None] + (mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([prompt_mask[prompt_index].to(mask.dtype), mask], 1)  # [N, Lp + La]
        hidden = body(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids, cache=cache,
                      use_cache=True).last_hidden_state
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]

    def _sequence_parallel_forward(self, body: nn.Module, input_ids: torch.Tensor,
                                   attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                                   reward_index: torch.Tensor | None, groups: torch.Tensor | None) -> torch.Tensor:
        """:meth:`forward` with every row's tokens split over the sequence-parallel group
        (:mod:`coati.strategies.sequence_parallel`): same inputs, same ``[N]`` fp32 rewards on every rank of the group.

        A padded batch runs as a packed one with one plain-sequence group per row (its real tokens, which must be
        contiguous). Rows are padded at the end to a multiple of S, so rank j holds columns ``[j L/S, (j + 1) L/S)``.
        """
        sp = self.sequence_parallel
        if not self.backbone.group_attention:
            raise ValueError("sequence parallelism needs a backbone with per-group attention (llama, internlm2)")
        if reward_index is None:  # padded: one group per row
            mask = attention_mask.to(torch.bool)
            lengths, first = mask.sum(-1), mask.to(torch.int64).argmax(-1)
            last = last_token_index(attention_mask)
            if not bool((last - first + 1 == lengths).all()):
                raise ValueError("sequence parallelism needs each row's real tokens to be contiguous")
            rows = torch.arange(mask.shape[0], device=mask.device)
            zeros = torch.zeros_like(rows)
            groups = torch.stack([rows, first, lengths, zeros, zeros], dim=1)
            position_ids = (mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)
            reward_index = torch.stack([rows, last], dim=1)
        elif groups is None:
            raise ValueError("a packed batch needs its group table (collate_packed's inputs['groups'])")
        pad = -input_ids.shape[1] % sp.size
        if pad:
            input_ids, position_ids = (torch.nn.functional.pad(t, (0, pad)) for t in (input_ids, position_ids))
        plan = packed_attention.PackPlan.from_groups(groups, input_ids.shape[0], sp)
        with packed_attention.packed_forward():
            hidden = body(input_ids=sp.shard(input_ids), position_ids=sp.shard(position_ids), use_cache=False,
                          coati_pack=plan).last_hidden_state
        out = self._heads(hidden)  # [R, L/S] per local token, or [R, L/S, 2] and the heads' overlap
        values = out if self.length_head is None else out[0]
        if self.length_head is None:
            return sp.gather_tokens(values)[reward_index[:, 0], reward_index[:, 1]]  # gathered: [R, L]
        both = torch.stack([sp.gather_tokens(values[..., k]) for k in (0, 1)], dim=-1)
        return both[reward_index[:, 0], reward_index[:, 1]], out[1]
