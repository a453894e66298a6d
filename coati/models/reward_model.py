"""RewardModel: a transformers ``*ForSequenceClassification`` (optionally LoRA-wrapped) read at the last real token."""

from __future__ import annotations

import torch
from torch import nn


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
    length = mask.shape[-1]
    return (length - 1) - mask.flip(-1).to(torch.int64).argmax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` int64 positions counting only real tokens (0 at each row's first real token; pads get 0)."""
    return (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)


class RewardModel(nn.Module):
    """Backbone + value head giving one scalar reward per sequence.

    ``model`` is a ``*ForSequenceClassification`` with ``num_labels == 1`` (possibly a peft ``PeftModel``); its
    ``score`` layer is the value head. The reward is the value head applied to the hidden state of the last real
    token (the EOS or reward token appended to every answer). For RoPE backbones the position ids are derived from
    the attention mask, so left- and right-padded batches give the same rewards.

    Args:
        model: the HF sequence-classification model (or peft wrapper of one).
        uses_position_ids: pass mask-derived ``position_ids`` to the backbone (RoPE models); False for ALiBi.
    """

    def __init__(self, model: nn.Module, uses_position_ids: bool):
        super().__init__()
        self.model = model
        self.uses_position_ids = uses_position_ids

    @property
    def hf_model(self) -> nn.Module:
        """The underlying ``*ForSequenceClassification`` (LoRA layers, if any, injected in place)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards for a batch of sequences.

        Args:
            input_ids: ``[N, L]`` int64 token ids.
            attention_mask: ``[N, L]`` 1 on real tokens, 0 on padding (either side).
        Returns:
            ``[N]`` float32 rewards, one scalar per sequence (the value head runs in fp32 even under autocast).
        """
        seq_cls = self.hf_model
        body = getattr(seq_cls, seq_cls.base_model_prefix)
        kwargs = {}
        if self.uses_position_ids:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
        idx = last_token_index(attention_mask)
        last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        with torch.autocast(device_type=last_hidden.device.type, enabled=False):
            return seq_cls.score(last_hidden.float()).squeeze(-1).float()
