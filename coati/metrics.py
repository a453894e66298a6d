"""Metrics of scored preference pairs, one definition each, shared by training, evaluation and scoring.

For N pairs with rewards ``r_c,i`` (chosen) and ``r_r,i`` (rejected), unitless logits:

* ``acc``: share of pairs with ``r_c > r_r`` (a tie counts as wrong);
* ``dist``: mean of ``r_c - r_r`` (Coati's name; the markdown report calls it "margin"), ``dist_std`` its
  population standard deviation;
* ``chosen_reward`` / ``rejected_reward``: mean rewards;
* ``reward_mean`` / ``reward_std``: mean and population standard deviation over all 2N rewards (the statistics
  ``config.json`` stores for normalisation);
* ``ece``: expected calibration error of the Bradley-Terry probability ``sigmoid(r_c - r_r)``
  (:func:`calibration_bins`, :func:`ece_from_bins`);
* ``loss`` (training only, :class:`PairMetrics`): pair-weighted mean loss;
* ``top1`` (:class:`PairMetrics`, when given ranked lists): share of prompts whose top-ranked answer gets the highest
  reward (:func:`top1_correct`); ``prompts`` their count. For pairs ``top1`` equals ``acc``.

For ranked lists the pairs are all the ordered pairs of each prompt's answers (C(K, 2) of a strictly ranked list).

Every quantity but the ECE is a ratio of sums over pairs, so :class:`PairMetrics` can add batches and all-reduce
over ranks before dividing, and :func:`pair_metrics` over one tensor gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LANGS = ("en", "zh")
# columns of a pair's row (and of a sum of rows): loss, pair count, correct, dist, chosen, rejected,
# squared rewards r_c^2 + r_r^2, squared dist; then per prompt (PairMetrics.add_top1): prompts, top-1 right
_LOSS, _PAIRS, _CORRECT, _DIST, _CHOSEN, _REJECTED, _REWARD_SQ, _DIST_SQ, _PROMPTS, _TOP1 = range(10)
_COLUMNS = 10


def top1_correct(rewards: torch.Tensor, item: torch.Tensor, best: torch.Tensor, num_items: int) -> torch.Tensor:
    """Per prompt, whether a top-ranked answer gets a strictly higher reward than every other answer.

    Args:
        rewards: ``[N]`` rewards (any float dtype and device); item: ``[N]`` int64 prompt index (0..B-1) of each;
        best: ``[N]`` bool, the answer is one of its prompt's top-ranked (tied best) answers.
    Returns:
        ``[B]`` bool on CPU (a tie for the highest reward between a best and another answer is wrong, as in ``acc``).
    """
    r = rewards.detach().double().cpu()
    item, best = item.cpu(), best.cpu()
    low = torch.full((num_items,), float("-inf"), dtype=torch.float64)
    top = low.scatter_reduce(0, item[best], r[best], "amax")
    rest = low.scatter_reduce(0, item[~best], r[~best], "amax")
    return top > rest


def _as_pairs(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``chosen`` and ``rejected`` as flat float64 CPU tensors ``[N]``; ValueError when their sizes differ."""
    c, r = chosen.detach().double().cpu().flatten(), rejected.detach().double().cpu().flatten()
    if c.shape != r.shape:
        raise ValueError(f"chosen has {c.numel()} rewards but rejected has {r.numel()}")
    return c, r


def _pair_columns(c: torch.Tensor, r: torch.Tensor, loss: float = 0.0) -> torch.Tensor:
    """``[N, 10]`` float64 rows, one per pair, whose column sums :func:`_summary` turns into metrics."""
    d = c - r
    zero = torch.zeros_like(c)
    return torch.stack([torch.full_like(c, loss), torch.ones_like(c), (c > r).double(), d, c, r, c * c + r * r,
                        d * d, zero, zero], dim=1)


def _std(sum_x: float, sum_sq: float, n: float) -> float:
    """Population standard deviation from sums: ``sqrt(max(E[x^2] - E[x]^2, 0))``."""
    return max(sum_sq / n - (sum_x / n) ** 2, 0.0) ** 0.5


def _summary(s: torch.Tensor, loss: bool = False) -> dict:
    """The metrics (module docstring; ``loss`` too if asked, never ``ece``) of a column sum ``s`` ``[10]``;
    ``{"pairs": 0}`` when it holds no pair."""
    v = s.tolist()
    n = v[_PAIRS]
    if n == 0:
        return {"pairs": 0}
    out = {"pairs": int(n), "acc": v[_CORRECT] / n, "dist": v[_DIST] / n, "dist_std": _std(v[_DIST], v[_DIST_SQ], n),
           "chosen_reward": v[_CHOSEN] / n, "rejected_reward": v[_REJECTED] / n,
           "reward_mean": (v[_CHOSEN] + v[_REJECTED]) / (2 * n),
           "reward_std": _std(v[_CHOSEN] + v[_REJECTED], v[_REWARD_SQ], 2 * n)}
    if loss:
        out["loss"] = v[_LOSS] / n
    if v[_PROMPTS]:
        out.update(prompts=int(v[_PROMPTS]), top1=v[_TOP1] / v[_PROMPTS])
    return out


class PairMetrics:
    """Sums over pairs (overall, per language in :data:`LANGS` and per subset) that are all-reduced before dividing.

    The metrics are those of the module docstring, ``loss`` and ``top1`` included, without ``ece`` (it needs every
    score). The sums are a ``[1 + len(LANGS) + len(subsets), 10]`` float64 CPU tensor ``sums`` (row 0 overall, row
    j the language ``LANGS[j-1]``, then one row per subset in the order given).

    Args:
        subsets: the subset names (the ``source`` of each pair: its dataset) to report apart; every rank must give
            the same list, since the rows are all-reduced by position. Empty: languages only.
    """

    def __init__(self, subsets: Sequence[str] = ()):
        self.subsets = tuple(subsets)
        self.sums = torch.zeros(1 + len(LANGS) + len(self.subsets), _COLUMNS, dtype=torch.float64)

    def _groups(self, langs: Sequence[str], sources: Sequence[str] | None):
        """``(row, [n] bool)`` for every language and (with ``sources``) subset row."""
        for j, lang in enumerate(LANGS, start=1):
            yield j, torch.tensor([lg == lang for lg in langs], dtype=torch.bool)
        if sources is not None:
            for k, name in enumerate(self.subsets, start=1 + len(LANGS)):
                yield k, torch.tensor([s == name for s in sources], dtype=torch.bool)

    def add(self, loss: float, chosen: torch.Tensor, rejected: torch.Tensor, langs: Sequence[str],
            sources: Sequence[str] | None = None) -> None:
        """Accumulate one batch: its mean ``loss`` (weighted by its pair count), ``[B]`` rewards (any float dtype and
        device; summed in float64 on CPU), ``B`` language codes (one outside :data:`LANGS` counts only overall) and
        optionally ``B`` subset names (one not in ``subsets`` counts only overall and per language).

        Raises:
            ValueError: ``chosen`` and ``rejected`` differ in size, or ``langs`` or ``sources`` has another length.
        """
        c, r = _as_pairs(chosen, rejected)
        if len(langs) != c.numel() or (sources is not None and len(sources) != c.numel()):
            raise ValueError(f"{c.numel()} pairs but {len(langs)} language codes"
                             + ("" if sources is None else f" and {len(sources)} subset names"))
        rows = _pair_columns(c, r, float(loss))
        self.sums[0] += rows.sum(0)
        for j, mine in self._groups(langs, sources):
            self.sums[j] += rows[mine].sum(0)

    def add_top1(self, correct: torch.Tensor, langs: Sequence[str], sources: Sequence[str] | None = None) -> None:
        """Accumulate one batch's prompts: ``[B]`` bool :func:`top1_correct`, their ``B`` language codes and
        optionally their ``B`` subset names.

        Raises:
            ValueError: ``langs`` or ``sources`` has another length.
        """
        if len(langs) != correct.numel() or (sources is not None and len(sources) != correct.numel()):
            raise ValueError(f"{correct.numel()} prompts but {len(langs)} language codes")
        right = correct.cpu().double().flatten()
        self.sums[0, _PROMPTS] += right.numel()
        self.sums[0, _TOP1] += right.sum()
        for j, mine in self._groups(langs, sources):
            self.sums[j, _PROMPTS] += mine.sum()
            self.sums[j, _TOP1] += right[mine].sum()

    def reduce(self, strategy) -> PairMetrics:
        """Sum ``sums`` over the data-parallel ranks with ``strategy.reduce_data(tensor)`` (the ranks of a
        sequence-parallel group hold the same pairs and count once), in place; returns ``self``."""
        strategy.reduce_data(self.sums)
        return self

    def result(self) -> dict:
        """Overall metrics (``{"pairs": 0}`` before any pair) plus ``languages: {lang: {...}}`` for languages seen and,
        when subsets were named, ``subsets: {name: {...}}`` for those seen."""
        out = _summary(self.sums[0], loss=True)
        out["languages"] = {lang: _summary(self.sums[j], loss=True) for j, lang in enumerate(LANGS, start=1)
                            if self.sums[j, _PAIRS] > 0}
        if self.subsets:
            out["subsets"] = {name: _summary(self.sums[k], loss=True)
                              for k, name in enumerate(self.subsets, start=1 + len(LANGS))
                              if self.sums[k, _PAIRS] > 0}
        return out


def calibration_bins(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10) -> list[dict]:
    """Reliability table of the Bradley-Terry preference probability, in the binary form of Guo et al. (2017).

    For pair i, ``p_i = sigmoid(r_c,i - r_r,i)`` is the model's probability that the chosen answer is preferred.
    The prediction is correct iff ``r_c,i > r_r,i`` (ties are wrong, as in ``acc``); its confidence is
    ``conf_i = max(p_i, 1 - p_i)`` in [0.5, 1]. Bins are the ``bins`` equal-width intervals of [0, 1],
    ``I_b = ((b-1)/M, b/M]`` for b = 1..M (the first also holds 0), and pair i falls in the bin holding ``conf_i``
    (so with M = 10 only the bins above 0.5, plus ``(0.4, 0.5]`` for ties, can be filled).

    Args:
        chosen, rejected: ``[N]`` rewards (any float dtype, computed in float64).
        bins: number of bins M >= 1.
    Returns:
        M dicts ``{"lo", "hi", "count", "acc", "confidence"}`` (``acc`` / ``confidence`` are the bin means, None
        for an empty bin).
    Raises:
        ValueError: ``bins`` < 1, or the sizes of ``chosen`` and ``rejected`` differ.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    c, r = _as_pairs(chosen, rejected)
    p = torch.sigmoid(c - r)
    conf = torch.maximum(p, 1 - p)
    idx = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()  # (b/M, (b+1)/M] -> b, with 0 -> bin 0
    counts = torch.bincount(idx, minlength=bins).tolist()
    correct = torch.bincount(idx, weights=(c > r).double(), minlength=bins).tolist()
    confidence = torch.bincount(idx, weights=conf, minlength=bins).tolist()
    return [{"lo": b / bins, "hi": (b + 1) / bins, "count": n, "acc": correct[b] / n if n else None,
             "confidence": confidence[b] / n if n else None} for b, n in enumerate(counts)]


def ece_from_bins(table: Sequence[dict]) -> float:
    """ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over the bins of a :func:`calibration_bins` table.

    Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017 (arXiv 1706.04599), section 2,
    applied to the binary prediction "chosen is preferred" with probability sigmoid(r_c - r_r). Rewards are logits,
    so their scale matters: right ranking with margins too large or too small still gives a high ECE.

    Returns:
        a float in [0, 1] (0: perfectly calibrated); NaN when the table holds no pair.
    """
    n = sum(b["count"] for b in table)
    if n == 0:
        return float("nan")
    return sum(b["count"] / n * abs(b["acc"] - b["confidence"]) for b in table if b["count"])


def expected_calibration_error(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10) -> float:
    """:func:`ece_from_bins` of :func:`calibration_bins` (``[N]`` rewards, its ValueError); NaN for N = 0."""
    return ece_from_bins(calibration_bins(chosen, rejected, bins))


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10) -> dict:
    """Metrics (module docstring) of ``[N]`` chosen and rejected rewards (any float dtype, computed in float64).

    Returns:
        ``pairs``, ``acc``, ``dist``, ``dist_std``, ``chosen_reward``, ``rejected_reward``, ``reward_mean``,
        ``reward_std`` (as :class:`PairMetrics` fed the same pairs, up to summation order), ``ece`` over ``bins``
        bins and ``calibration`` (the :func:`calibration_bins` table); ``{"pairs": 0}`` for N = 0.
    Raises:
        ValueError: the sizes of ``chosen`` and ``rejected`` differ, or ``bins`` < 1.
    """
    c, r = _as_pairs(chosen, rejected)
    table = calibration_bins(c, r, bins)
    out = _summary(_pair_columns(c, r).sum(0))
    if out["pairs"]:
        out.update(ece=ece_from_bins(table), calibration=table)
    return out


def grouped_metrics(chosen: torch.Tensor, rejected: torch.Tensor, groups: Sequence[str], bins: int = 10) -> dict:
    """``{group: pair_metrics(...)}`` for each distinct label in ``groups`` (``N`` strings), sorted by name.

    Raises:
        ValueError: ``groups`` has another length than the ``[N]`` rewards; as :func:`pair_metrics`.
    """
    if len(groups) != chosen.numel():
        raise ValueError(f"{chosen.numel()} pairs but {len(groups)} group labels")
    masks = {name: torch.tensor([g == name for g in groups], dtype=torch.bool) for name in sorted(set(groups))}
    return {name: pair_metrics(chosen.flatten()[m], rejected.flatten()[m], bins) for name, m in masks.items()}
