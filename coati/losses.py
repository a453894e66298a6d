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

Ties (``--ties rao_kupper`` / ``davidson``): :class:`TieLoss` extends the signature with the T tied comparisons,
``loss(chosen, rejected, margin, weight, tie_a [T], tie_b [T], tie_weight [T] | None)``, and takes the weighted mean
over the M strict and T tied comparisons together.

Add a loss = one function + one entry in ``LOSSES``: a :class:`~coati.registry.Registered` whose ``build`` takes the
:class:`~coati.config.LossArgs` group and returns the loss, and whose ``takes`` names the options it reads (a new
option is one field of ``LossArgs``). A penalty likewise in ``PENALTIES``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from coati.config import LossArgs
from coati.registry import Registered

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


# ---------------------------------------------------------------------------------------------- ties

#: ``--ties`` values that keep tied comparisons, each a Bradley-Terry model with ties.
TIE_MODELS = ("rao_kupper", "davidson")


def tie_log_probs(model: str, diff: torch.Tensor, nu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log P(a beats b), log P(a ties b))`` of reward differences ``d = r_a - r_b`` under a model with ties.

    * ``rao_kupper`` (Rao and Kupper, JASA 1967, eq. 2.1, with ``theta = e^nu``, ``pi = e^r``):
      ``P(win) = sigmoid(d - nu)``, ``P(tie) = (e^{2 nu} - 1) e^d / ((e^d + e^nu)(1 + e^{d + nu}))``;
      at ``d = 0`` the tie has probability ``tanh(nu / 2)``.
    * ``davidson`` (Davidson, JASA 1970, eq. 2.1, ``pi = e^r``): ``P(win) = 1 / (1 + e^{-d} + nu e^{-d/2})``,
      ``P(tie) = nu e^{-d/2} / (1 + e^{-d} + nu e^{-d/2})``; at ``d = 0`` the tie has probability ``nu / (2 + nu)``.

    With ``nu = 0`` both give Bradley-Terry's ``log P(win) = logsigmoid(d)`` (and a tie probability of 0: log is
    -inf). Computed in fp32 with log-sum-exp forms, finite for any finite ``d`` when ``nu > 0``.

    Args:
        model: ``"rao_kupper"`` or ``"davidson"``; diff: ``[T]`` reward differences (any float dtype); nu: >= 0.
    Raises:
        ValueError: another model, or ``nu`` < 0.
    """
    if nu < 0:
        raise ValueError(f"the tie parameter must be >= 0, got {nu}")
    d = diff.float()
    if model == "rao_kupper":
        win = F.logsigmoid(d - nu)
        tie = (math.log(math.expm1(2 * nu)) if nu > 0 else float("-inf")) + d - torch.logaddexp(d, torch.full_like(
            d, nu)) - F.softplus(d + nu)
        return win, tie
    if model == "davidson":
        log_nu = math.log(nu) if nu > 0 else float("-inf")
        terms = torch.stack([torch.zeros_like(d), -d, log_nu - d / 2])
        norm = torch.logsumexp(terms, dim=0)
        return -norm, log_nu - d / 2 - norm
    raise ValueError(f"unknown tie model {model!r}; choose one of: {', '.join(TIE_MODELS)}")


def auto_tie_param(model: str, tie_share: float) -> float:
    """The tie parameter at which two answers with equal rewards tie with probability ``tie_share`` (the share of
    ties among the training comparisons): ``2 artanh(p)`` for Rao-Kupper, ``2p / (1 - p)`` for Davidson
    (:func:`tie_log_probs` at ``d = 0``); 0 (Bradley-Terry) without ties.

    Raises:
        ValueError: ``tie_share`` outside [0, 1) (data of ties only has no preference to learn), or another model.
    """
    if not 0.0 <= tie_share < 1.0:
        raise ValueError(f"the share of tied comparisons must be in [0, 1), got {tie_share}")
    if model == "rao_kupper":
        return 2.0 * math.atanh(tie_share)
    if model == "davidson":
        return 2.0 * tie_share / (1.0 - tie_share)
    raise ValueError(f"unknown tie model {model!r}; choose one of: {', '.join(TIE_MODELS)}")


class TieLoss:
    """Negative log-likelihood of a Bradley-Terry model with ties over strict and tied comparisons.

    ``loss(chosen [M], rejected [M], margin [M] | None, weight [M] | None, tie_a [T], tie_b [T], tie_weight)``:
    the weighted mean, over the M strict comparisons and the T ties together, of ``-log P(chosen beats rejected)``
    (its difference less the margin, as in :func:`log_sig_loss`) and ``-log P(a ties b)``
    (:func:`tie_log_probs`). Weights are those of :func:`weighted_mean` (None: 1 each). Without ties and with
    ``nu = 0`` it equals :func:`log_sig_loss`. Returns a 0-dim float32 tensor.

    Args:
        model: ``"rao_kupper"`` or ``"davidson"``; nu: the tie parameter (>= 0), fixed.
    """

    def __init__(self, model: str, nu: float):
        tie_log_probs(model, torch.zeros(1), nu)  # checks both
        self.model, self.nu = model, float(nu)

    def tie_log_prob(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[T]`` log-probabilities that answers with rewards ``a`` and ``b`` tie."""
        return tie_log_probs(self.model, a.float() - b.float(), self.nu)[1]

    def __call__(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None, tie_a: torch.Tensor | None = None,
                 tie_b: torch.Tensor | None = None, tie_weight: torch.Tensor | None = None) -> torch.Tensor:
        win = -tie_log_probs(self.model, _diff(chosen, rejected, margin), self.nu)[0]
        if tie_a is None or not tie_a.numel():
            return weighted_mean(win, weight)
        tie = -self.tie_log_prob(tie_a, tie_b)
        if (weight is None) != (tie_weight is None):
            raise ValueError("give weights for both the strict and the tied comparisons, or for neither")
        values = torch.cat([win, tie])
        return weighted_mean(values, None if weight is None else torch.cat([weight, tie_weight]))


# ---------------------------------------------------------------------------------------------- ODIN length head

def pearson_corr(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor | None = None,
                 eps: float = 1e-8) -> torch.Tensor:
    """Pearson's correlation of two ``[n]`` tensors in fp32, differentiable: ``cov(x, y) / (std x std y + eps)``
    (0 for n < 2 or a constant side, through the ``eps``).

    With ``groups`` (``[n]`` int64 labels) it is the pooled within-group correlation: each side is centred on its
    group's mean before the covariance and the deviations are taken, so what differs between the groups' means (two
    languages whose answers differ in length and in mean reward) does not count; one group gives the plain value.
    """
    x, y = x.float(), y.float()
    if groups is None:
        a, b = x - x.mean(), y - y.mean()
    else:
        a, b = x - group_means(x, groups), y - group_means(y, groups)
    return (a * b).mean() / ((a.pow(2).mean() * b.pow(2).mean()).sqrt() + eps)


def group_means(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``[n]`` float: each element's group mean, for ``values`` ``[n]`` float and ``groups`` ``[n]`` int64 labels
    (any integers; a group is the elements with one label)."""
    labels, index = torch.unique(groups.to(values.device), return_inverse=True)
    sums = values.new_zeros(len(labels)).index_add(0, index, values)
    sizes = torch.bincount(index, minlength=len(labels)).to(values.dtype)
    return (sums / sizes)[index]


def length_head_loss(quality: torch.Tensor, length_out: torch.Tensor, lengths: torch.Tensor, overlap: torch.Tensor,
                     length_weight: float = 1.0, orthogonal_weight: float = 1.0,
                     groups: torch.Tensor | None = None) -> torch.Tensor:
    """ODIN's disentangling terms (Chen et al., "ODIN: Disentangled Reward Mitigates Hacking in RLHF", ICML 2024,
    arXiv 2402.07319, section 4): ``length_weight * (|rho(r_Q, L)| - rho(r_L, L)) + orthogonal_weight * overlap``.

    ``rho`` is Pearson's correlation over the sequences of a batch (all ranks' sequences, gathered by the caller):
    the quality head's output ``r_Q`` is pushed to be uncorrelated with the answer length ``L`` and the length
    head's ``r_L`` to carry it; ``overlap`` is ``|w_Q . w_L|`` of the two heads' weights
    (:meth:`coati.models.reward_model.RewardModel.add_length_head`). The pairwise loss, added by the caller, is taken
    on ``r_Q + r_L``. With ``groups`` (``--length_groups language``: a label per sequence) both correlations are
    pooled within the groups (:func:`pearson_corr`), a departure from the paper's one batch-wide correlation: in a
    mixed-language batch the languages' different answer lengths would otherwise stand for "length" and leave each
    language's own length bias in place.

    Args:
        quality, length_out: ``[n]`` the two heads' outputs; lengths: ``[n]`` answer lengths in tokens (any dtype);
        overlap: 0-dim float; groups: ``[n]`` int64 labels, or None for one group.
    Returns:
        0-dim float32.
    """
    lengths = lengths.to(device=quality.device, dtype=torch.float32)
    decorrelate = pearson_corr(quality, lengths, groups).abs() - pearson_corr(length_out, lengths, groups)
    return length_weight * decorrelate + orthogonal_weight * overlap.float()


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


def build_loss(args: LossArgs, ties: str = "drop") -> LossFn:
    """One callable of the common signature: ``loss + penalty_weight * penalty + c * mean((r_c + r_r)^2)``.

    With ``ties`` a tie model (``--ties rao_kupper`` / ``davidson``) the loss is :class:`TieLoss` with
    ``args.tie_param`` (resolved by then: ``auto`` needs the data, :func:`auto_tie_param`), in place of
    ``--loss_fn`` (log_sig or log_exp, the model it extends); the penalty and the centering term apply to the strict
    comparisons.

    The penalty is averaged over all chosen and rejected scores of the comparisons, and the centering term over the
    comparisons, both with the comparisons' weights (so a ranked list gives exactly what its pairs, expanded and
    weighted the same, give). The centering term follows TRL's ``center_rewards_coefficient`` (Eisenstein et al.,
    "Helping or Herding?", arXiv 2312.09244, section 3).

    Raises:
        ValueError: unknown loss or penalty name (the message lists the choices).
    """
    loss_fn = _entry(LOSSES, args.loss_fn, "loss").build(args)
    if ties != "drop":
        if args.tie_param is None:
            raise ValueError("--tie_param auto is resolved from the training data before the loss is built")
        loss_fn = TieLoss(ties, args.tie_param)
    pen = _entry(PENALTIES, args.penalty, "penalty").build(args)
    weight, center = args.penalty_weight, args.center_rewards_coefficient
    if pen is None and center == 0.0:
        return loss_fn

    def combined(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                 pair_weight: torch.Tensor | None = None, *tied: torch.Tensor | None) -> torch.Tensor:
        total = loss_fn(chosen, rejected, margin, pair_weight, *tied)
        if pen is not None:
            both = None if pair_weight is None else torch.cat([pair_weight, pair_weight])
            total = total + weight * pen(torch.cat([chosen, rejected]), both)
        if center:
            total = total + center * weighted_mean((chosen.float() + rejected.float()).pow(2), pair_weight)
        return total

    if isinstance(loss_fn, TieLoss):
        combined.tie_log_prob = loss_fn.tie_log_prob
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
