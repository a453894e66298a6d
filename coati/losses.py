"""Pairwise reward-model losses and reward penalties.

Every loss has one signature::

    loss(chosen_rewards: [M] float, rejected_rewards: [M] float, margin: [M] float | None,
         weight: [M] float | None = None) -> scalar float32

over M comparisons (the pairs of a batch, or the ordered pairs of ranked lists), and is computed in fp32 with
``F.logsigmoid`` (never ``log(sigmoid(x))``, which returns -inf once sigmoid underflows), so it is finite with finite
gradients for margins of any size. It is the weighted mean ``sum_m w_m l_m / sum_m w_m`` of the per-pair losses
(the plain mean when ``weight`` is None): with ``w = 1 / C_b`` for the C_b comparisons of prompt b, each prompt
weighs one, as in InstructGPT's listwise loss (arXiv 2203.02155, section 3.5, eq. 1). Loss hyper-parameters are
keyword-only arguments with defaults (e.g. focal's ``gamma``). A penalty maps ``[2M]`` scores (each comparison's
chosen and rejected rewards) and their weights to one scalar. :func:`build_loss` binds a loss, a penalty and the
centering term into one callable of the common signature.

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


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``values.mean()``, or ``sum(w * values) / sum(w)`` with ``weight`` (same shape; fp32)."""
    if weight is None:
        return values.mean()
    w = weight.to(device=values.device, dtype=torch.float32)
    return (values * w).sum() / w.sum()


def log_sig_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood: mean of ``-logsigmoid(r_c - r_r - m)``.

    Bradley & Terry (1952); as a reward-model loss: Ouyang et al., "Training language models to follow instructions
    with human feedback" (arXiv 2203.02155), section 3.5, eq. 1. The optional margin ``m`` follows Llama 2
    (arXiv 2307.09288), section 3.2.2.

    Args:
        chosen: ``[B]`` rewards of the preferred answers (any float dtype; computed in fp32).
        rejected: ``[B]`` rewards of the dispreferred answers.
        margin: ``[B]`` or None; required reward gap per pair.
        weight: ``[B]`` or None; per-pair weights of the mean (:func:`weighted_mean`).
    Returns:
        0-dim float32 tensor; ``log 2 = 0.6931`` when both rewards are equal and margin is 0.
    """
    return weighted_mean(-F.logsigmoid(_diff(chosen, rejected, margin)), weight)


def log_exp_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Coati's ``LogExpLoss``: mean of ``log(1 + exp(r_r - r_c + m))``.

    Mathematically equal to :func:`log_sig_loss` (``log(1 + e^{-x}) = -logsigmoid(x)``); it is computed as
    ``softplus(-x)``, which is stable for large ``|x|``. Shapes and dtype as in :func:`log_sig_loss`.
    """
    return weighted_mean(F.softplus(-_diff(chosen, rejected, margin)), weight)


def focal_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, *, gamma: float = 2.0) -> torch.Tensor:
    """InternLM2's focal ranking loss: mean of ``-(1 - 2 max(0, P - 1/2))^gamma * log P`` with ``P = sigmoid(d)``.

    ``d = r_c - r_r - m``. Source: InternLM2 technical report (arXiv 2403.17297), section 4.2.1 ("Conditional
    Reward Model", difficulty decay). Pairs already ranked confidently (P near 1) are down-weighted; ``gamma = 0``
    gives :func:`log_sig_loss`. ``log P`` is ``logsigmoid(d)``; P itself is ``sigmoid(d)`` (both finite for any d).
    Shapes and dtype as in :func:`log_sig_loss`.
    """
    d = _diff(chosen, rejected, margin)
    decay = (1.0 - 2.0 * (torch.sigmoid(d) - 0.5).clamp(min=0.0)).pow(gamma)
    return weighted_mean(-(decay * F.logsigmoid(d)), weight)


LOSSES: dict[str, Registered] = {
    "log_sig": Registered(lambda args: log_sig_loss),
    "log_exp": Registered(lambda args: log_exp_loss),
    "focal": Registered(lambda args: partial(focal_loss, gamma=args.focal_gamma), takes=("focal_gamma",)),
}


def log_barrier_penalty(scores: torch.Tensor, weight: torch.Tensor | None = None, *,
                        bound: float = 5.0) -> torch.Tensor:
    """Log barrier keeping scores inside ``(-bound, bound)``: mean of ``-(log(bound + r) + log(bound - r))``.

    Scores are clamped to ``+-(bound - 1e-3)`` inside the logarithms so the value stays finite. Source: InternLM2
    technical report (arXiv 2403.17297), section 4.2.1. At r = 0 it equals ``-2 log(bound)``.

    Args:
        scores: ``[N]`` rewards (chosen and rejected together); weight: ``[N]`` or None (:func:`weighted_mean`).
    Returns a 0-dim float32 tensor.
    """
    r = scores.float().clamp(-bound + 1e-3, bound - 1e-3)
    return weighted_mean(-(torch.log(bound + r) + torch.log(bound - r)), weight)


def l2_penalty(scores: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) mean of ``r^2`` over the ``[N]`` scores; a soft pull of rewards towards 0."""
    return weighted_mean(scores.float().pow(2), weight)


PENALTIES: dict[str, Registered] = {
    "none": Registered(lambda args: None),
    "log_barrier": Registered(lambda args: partial(log_barrier_penalty, bound=args.reward_bound),
                              takes=("penalty_weight", "reward_bound")),
    "l2": Registered(lambda args: l2_penalty, takes=("penalty_weight",)),
}


def build_loss(args: LossArgs) -> LossFn:
    """One callable of the common signature: ``loss + penalty_weight * penalty + c * mean((r_c + r_r)^2)``.

    The penalty is averaged over all chosen and rejected scores of the comparisons, and the centering term over the
    comparisons, both with the comparisons' weights (so a ranked list gives exactly what its pairs, expanded and
    weighted the same, give). The centering term follows TRL's ``center_rewards_coefficient`` (Eisenstein et al.,
    "Helping or Herding?", arXiv 2312.09244, section 3).

    Raises:
        ValueError: unknown loss or penalty name (the message lists the choices).
    """
    loss_fn = _entry(LOSSES, args.loss_fn, "loss").build(args)
    pen = _entry(PENALTIES, args.penalty, "penalty").build(args)
    weight, center = args.penalty_weight, args.center_rewards_coefficient
    if pen is None and center == 0.0:
        return loss_fn

    def combined(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                 pair_weight: torch.Tensor | None = None) -> torch.Tensor:
        total = loss_fn(chosen, rejected, margin, pair_weight)
        if pen is not None:
            both = None if pair_weight is None else torch.cat([pair_weight, pair_weight])
            total = total + weight * pen(torch.cat([chosen, rejected]), both)
        if center:
            total = total + center * weighted_mean((chosen.float() + rejected.float()).pow(2), pair_weight)
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
