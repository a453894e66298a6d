"""Pairwise reward-model losses and reward penalties.

Every loss has one signature::

    loss(chosen_rewards: [B] float, rejected_rewards: [B] float, margin: [B] float | None) -> scalar float32

and is computed in fp32 with ``F.logsigmoid`` (never ``log(sigmoid(x))``, which returns -inf once sigmoid underflows),
so it is finite with finite gradients for margins of any size. Loss hyper-parameters are keyword-only arguments with
defaults (e.g. focal's ``gamma``). A penalty maps the ``[2B]`` scores (chosen and rejected together) to one scalar.
:func:`build_loss` binds a loss, a penalty and the centering term into one callable of the common signature.

Add a loss = one function + one entry in ``LOSSES``: a :class:`~coati.config.Registered` whose ``build`` takes the
:class:`~coati.config.LossArgs` group and returns the loss, and whose ``takes`` names the options it reads (a new
option is one field of ``LossArgs``). A penalty likewise in ``PENALTIES``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from coati.config import LossArgs, Registered

LossFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _diff(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
    d = chosen.float() - rejected.float()
    return d if margin is None else d - margin.float()


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


def focal_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, *,
               gamma: float = 2.0) -> torch.Tensor:
    """InternLM2's focal ranking loss: mean of ``-(1 - 2 max(0, P - 1/2))^gamma * log P`` with ``P = sigmoid(d)``.

    ``d = r_c - r_r - m``. Source: InternLM2 technical report (arXiv 2403.17297), section 4.2.1 ("Conditional
    Reward Model", difficulty decay). Pairs already ranked confidently (P near 1) are down-weighted; ``gamma = 0``
    gives :func:`log_sig_loss`. ``log P`` is ``logsigmoid(d)``; P itself is ``sigmoid(d)`` (both finite for any d).
    Shapes and dtype as in :func:`log_sig_loss`.
    """
    d = _diff(chosen, rejected, margin)
    weight = (1.0 - 2.0 * (torch.sigmoid(d) - 0.5).clamp(min=0.0)).pow(gamma)
    return -(weight * F.logsigmoid(d)).mean()


LOSSES: dict[str, Registered] = {
    "log_sig": Registered(lambda args: log_sig_loss),
    "log_exp": Registered(lambda args: log_exp_loss),
    "focal": Registered(lambda args: partial(focal_loss, gamma=args.focal_gamma), takes=("focal_gamma",)),
}


def log_barrier_penalty(scores: torch.Tensor, *, bound: float = 5.0) -> torch.Tensor:
    """Log barrier keeping scores inside ``(-bound, bound)``: mean of ``-(log(bound + r) + log(bound - r))``.

    Scores are clamped to ``+-(bound - 1e-3)`` inside the logarithms so the value stays finite. Source: InternLM2
    technical report (arXiv 2403.17297), section 4.2.1. At r = 0 it equals ``-2 log(bound)``.

    Args:
        scores: ``[N]`` rewards (chosen and rejected together). Returns a 0-dim float32 tensor.
    """
    r = scores.float().clamp(-bound + 1e-3, bound - 1e-3)
    return -(torch.log(bound + r) + torch.log(bound - r)).mean()


def l2_penalty(scores: torch.Tensor) -> torch.Tensor:
    """Mean of ``r^2`` over the ``[N]`` scores; a soft pull of rewards towards 0."""
    return scores.float().pow(2).mean()


PENALTIES: dict[str, Registered] = {
    "none": Registered(lambda args: None),
    "log_barrier": Registered(lambda args: partial(log_barrier_penalty, bound=args.reward_bound),
                              takes=("penalty_weight", "reward_bound")),
    "l2": Registered(lambda args: l2_penalty, takes=("penalty_weight",)),
}


def build_loss(args: LossArgs) -> LossFn:
    """One callable of the common signature: ``loss + penalty_weight * penalty + c * mean((r_c + r_r)^2)``.

    The penalty is averaged over all chosen and rejected scores. The centering term follows TRL's
    ``center_rewards_coefficient`` (Eisenstein et al., "Helping or Herding?", arXiv 2312.09244, section 3).

    Raises:
        ValueError: unknown loss or penalty name (the message lists the choices).
    """
    loss_fn = _entry(LOSSES, args.loss_fn, "loss").build(args)
    pen = _entry(PENALTIES, args.penalty, "penalty").build(args)
    weight, center = args.penalty_weight, args.center_rewards_coefficient
    if pen is None and center == 0.0:
        return loss_fn

    def combined(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
        total = loss_fn(chosen, rejected, margin)
        if pen is not None:
            total = total + weight * pen(torch.cat([chosen, rejected]))
        if center:
            total = total + center * (chosen.float() + rejected.float()).pow(2).mean()
        return total

    return combined


def get_loss(name: str) -> LossFn:
    """The loss called ``name`` with its default hyper-parameters.

    Raises:
        ValueError: unknown name; the message lists the choices.
    """
    return _entry(LOSSES, name, "loss").build(LossArgs())


def _entry(registry: dict[str, Registered], name: str, what: str) -> Registered:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(registry)}")
    return registry[name]
