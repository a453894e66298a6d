"""Pairwise reward-model losses.

Every loss has one signature::

    loss(chosen_rewards: [B] float, rejected_rewards: [B] float, margin: [B] float | None) -> scalar float32

and is computed in fp32 with ``F.logsigmoid`` (never ``log(sigmoid(x))``, which returns -inf once sigmoid underflows),
so it is finite with finite gradients for margins of any size. Add a loss = one function + one entry in ``LOSSES``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _diff(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
    d = chosen.float() - rejected.float()
    if margin is not None:
        d = d - margin.float()
    return d


def log_sig_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood: mean of ``-logsigmoid(r_c - r_r - m)``.

    Bradley & Terry (1952); as a reward-model loss: Ouyang et al., "Training language models to follow instructions
    with human feedback" (arXiv 2203.02155), section 3.5, eq. 1. The optional margin ``m`` follows Llama 2
    (arXiv 2307.09288), section 3.2.2.

    Args:
        chosen: ``[B]`` rewards of the preferred answers (any float dtype; computed in fp32).
        rejected: ``[B]`` rewards of the dispreferred answers.
        margin: ``[B]`` or None; required reward gap per pair.
    Returns:
        0-dim float32 tensor; ``log 2 = 0.6931`` when both rewards are equal and margin is 0.
    """
    return -F.logsigmoid(_diff(chosen, rejected, margin)).mean()


def log_exp_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Coati's ``LogExpLoss``: mean of ``log(1 + exp(r_r - r_c + m))``.

    Mathematically equal to :func:`log_sig_loss` (``log(1 + e^{-x}) = -logsigmoid(x)``); it is computed as
    ``softplus(-x)``, which is stable for large ``|x|``. Shapes and dtype as in :func:`log_sig_loss`.
    """
    return F.softplus(-_diff(chosen, rejected, margin)).mean()


LOSSES: dict[str, LossFn] = {
    "log_sig": log_sig_loss,
    "log_exp": log_exp_loss,
}


def get_loss(name: str) -> LossFn:
    """Look up a loss by its CLI name.

    Raises:
        ValueError: unknown name; the message lists the choices.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}") from None
