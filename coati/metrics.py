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

Given each answer's length in tokens (``l_c``, ``l_r``: the answer alone, before any cut to ``max_len``), a
``length_bias`` block (:func:`length_bias`) says how much the rewards follow length:

* ``pearson`` / ``spearman``: correlation of reward with length over the 2N (reward, length) points of the pairs'
  chosen and rejected answers (an answer of a ranked list counts once per comparison it is in); Spearman's is
  Pearson's of the ranks, ties given their mean rank (Spearman 1904); None when either side is constant;
* ``pairs_chosen_longer`` / ``acc_chosen_longer``: the pairs with ``l_c > l_r`` and their ``acc``; likewise
  ``..._chosen_shorter`` for ``l_c < l_r`` (None without such pairs), and ``pairs_equal_length``;
* ``longer_wins_acc``: the acc of the length-only rule "the longer answer wins" on the same pairs, i.e. the share
  with ``l_c > l_r`` (equal lengths count as wrong, as a tie in ``acc``).

A reward that ranks by length scores high on ``acc_chosen_longer`` and low on ``acc_chosen_shorter``; ODIN (Chen et
al. 2024, arXiv 2402.07319, section 5) reports the Pearson correlation as the length bias of a reward model.

Every quantity but the ECE and Spearman's correlation is a ratio of sums over pairs, so :class:`PairMetrics` can add
batches and all-reduce over ranks before dividing, and :func:`pair_metrics` over one tensor gives the same numbers
(the training rows carry ``length_bias`` without ``spearman``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LANGS = ("en", "zh")
# columns of a pair's row (and of a sum of rows): loss, pair count, correct, dist, chosen, rejected,
# squared rewards r_c^2 + r_r^2, squared dist; then per prompt (PairMetrics.add_top1): prompts, top-1 right; then
# with answer lengths: pairs with lengths, l_c + l_r, l_c^2 + l_r^2, r_c l_c + r_r l_r, pairs with l_c > l_r and
# those of them right, pairs with l_c < l_r and those of them right; then per tie (PairMetrics.add_ties): ties,
# -log P(tie), |r_a - r_b|
(_LOSS, _PAIRS, _CORRECT, _DIST, _CHOSEN, _REJECTED, _REWARD_SQ, _DIST_SQ, _PROMPTS, _TOP1, _LEN_PAIRS, _LEN, _LEN_SQ,
 _REWARD_LEN, _LONGER, _LONGER_RIGHT, _SHORTER, _SHORTER_RIGHT, _TIES, _TIE_NLL, _TIE_ABS) = range(21)
_COLUMNS = 21


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


def _as_lengths(lengths: tuple | None, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(l_c, l_r)`` as flat float64 CPU tensors of ``n`` values, or None; ValueError for another size."""
    if lengths is None:
        return None
    lc, lr = (torch.as_tensor(x).detach().double().cpu().flatten() for x in lengths)
    if lc.numel() != n or lr.numel() != n:
        raise ValueError(f"{n} pairs but {lc.numel()} chosen and {lr.numel()} rejected answer lengths")
    return lc, lr


def _pair_columns(c: torch.Tensor, r: torch.Tensor, loss: float = 0.0,
                  lengths: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``[N, 21]`` float64 rows, one per pair, whose column sums :func:`_summary` turns into metrics (the length
    columns zero without ``lengths``)."""
    d = c - r
    zero = torch.zeros_like(c)
    right = (c > r).double()
    if lengths is None:
        length_cols = [zero] * 8
    else:
        lc, lr = lengths
        longer, shorter = (lc > lr).double(), (lc < lr).double()
        length_cols = [torch.ones_like(c), lc + lr, lc * lc + lr * lr, c * lc + r * lr, longer, longer * right,
                       shorter, shorter * right]
    return torch.stack([torch.full_like(c, loss), torch.ones_like(c), right, d, c, r, c * c + r * r, d * d, zero,
                        zero, *length_cols, zero, zero, zero], dim=1)


def _std(sum_x: float, sum_sq: float, n: float) -> float:
    """Population standard deviation from sums: ``sqrt(max(E[x^2] - E[x]^2, 0))``."""
    return max(sum_sq / n - (sum_x / n) ** 2, 0.0) ** 0.5


def _correlation(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float | None:
    """Pearson's r from sums over n points; None when either variable is constant (or n < 2)."""
    if n < 2:
        return None
    cov, vx, vy = sxy - sx * sy / n, sxx - sx * sx / n, syy - sy * sy / n
    if vx <= 1e-12 * max(sxx, 1e-300) or vy <= 1e-12 * max(syy, 1e-300):
        return None
    return max(-1.0, min(1.0, cov / (vx * vy) ** 0.5))


def _length_summary(v: list[float]) -> dict:
    """The ``length_bias`` block (module docstring) of a column sum, ``spearman`` left out."""
    n = v[_LEN_PAIRS]
    return {"pearson": _correlation(2 * n, v[_CHOSEN] + v[_REJECTED], v[_LEN], v[_REWARD_SQ], v[_LEN_SQ],
                                    v[_REWARD_LEN]),
            "pairs_chosen_longer": int(v[_LONGER]),
            "acc_chosen_longer": v[_LONGER_RIGHT] / v[_LONGER] if v[_LONGER] else None,
            "pairs_chosen_shorter": int(v[_SHORTER]),
            "acc_chosen_shorter": v[_SHORTER_RIGHT] / v[_SHORTER] if v[_SHORTER] else None,
            "pairs_equal_length": int(n - v[_LONGER] - v[_SHORTER]), "longer_wins_acc": v[_LONGER] / n}


def _summary(s: torch.Tensor, loss: bool = False) -> dict:
    """The metrics (module docstring; ``loss`` too if asked, never ``ece``; ``length_bias`` without ``spearman``
    when every pair came with answer lengths; ``ties``, ``tie_nll``, ``tie_abs_dist`` when ties were added) of a
    column sum ``s`` ``[21]``; ``{"pairs": 0}`` (with the tie figures, if any) when it holds no pair."""
    v = s.tolist()
    n = v[_PAIRS]
    ties = {} if not v[_TIES] else {"ties": int(v[_TIES]), "tie_nll": v[_TIE_NLL] / v[_TIES],
                                    "tie_abs_dist": v[_TIE_ABS] / v[_TIES]}
    if n == 0:
        return {"pairs": 0, **ties}
    out = {"pairs": int(n), "acc": v[_CORRECT] / n, "dist": v[_DIST] / n, "dist_std": _std(v[_DIST], v[_DIST_SQ], n),
           "chosen_reward": v[_CHOSEN] / n, "rejected_reward": v[_REJECTED] / n,
           "reward_mean": (v[_CHOSEN] + v[_REJECTED]) / (2 * n),
           "reward_std": _std(v[_CHOSEN] + v[_REJECTED], v[_REWARD_SQ], 2 * n)}
    if loss:
        out["loss"] = v[_LOSS] / n
    if v[_PROMPTS]:
        out.update(prompts=int(v[_PROMPTS]), top1=v[_TOP1] / v[_PROMPTS])
    if v[_LEN_PAIRS] == n:
        out["length_bias"] = _length_summary(v)
    return {**out, **ties}


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
            sources: Sequence[str] | None = None, lengths: tuple | None = None) -> None:
        """Accumulate one batch: its mean ``loss`` (weighted by its pair count), ``[B]`` rewards (any float dtype and
        device; summed in float64 on CPU), ``B`` language codes (one outside :data:`LANGS` counts only overall),
        optionally ``B`` subset names (one not in ``subsets`` counts only overall and per language) and the answers'
        lengths in tokens ``(l_c [B], l_r [B])`` (the rows then carry ``length_bias`` when every batch had them).

        Raises:
            ValueError: ``chosen`` and ``rejected`` differ in size, or ``langs``, ``sources`` or ``lengths`` has
                another length.
        """
        c, r = _as_pairs(chosen, rejected)
        if len(langs) != c.numel() or (sources is not None and len(sources) != c.numel()):
            raise ValueError(f"{c.numel()} pairs but {len(langs)} language codes"
                             + ("" if sources is None else f" and {len(sources)} subset names"))
        rows = _pair_columns(c, r, float(loss), _as_lengths(lengths, c.numel()))
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

    def add_ties(self, log_prob: torch.Tensor, a: torch.Tensor, b: torch.Tensor, langs: Sequence[str],
                 sources: Sequence[str] | None = None) -> None:
        """Accumulate one batch's T tied comparisons (``--ties``): ``[T]`` log-probabilities of the ties under the
        tie model (:func:`coati.losses.tie_log_probs`), the ``[T]`` rewards of both answers, their languages and
        subsets. The rows then carry ``ties`` (count), ``tie_nll`` (mean -log P(tie): lower is better) and
        ``tie_abs_dist`` (mean |r_a - r_b|, 0 for a perfect tie).

        Raises:
            ValueError: the sizes differ.
        """
        nll = -log_prob.detach().double().cpu().flatten()
        gap = (a.detach().double().cpu() - b.detach().double().cpu()).abs().flatten()
        if not (nll.numel() == gap.numel() == len(langs)) or (sources is not None and len(sources) != len(langs)):
            raise ValueError(f"{nll.numel()} tie log-probabilities, {gap.numel()} reward gaps, {len(langs)} language "
                             "codes")
        rows = torch.zeros(nll.numel(), _COLUMNS, dtype=torch.float64)
        rows[:, _TIES], rows[:, _TIE_NLL], rows[:, _TIE_ABS] = 1.0, nll, gap
        self.sums[0] += rows.sum(0)
        for j, mine in self._groups(langs, sources):
            self.sums[j] += rows[mine].sum(0)

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
                            if self.sums[j, _PAIRS] > 0 or self.sums[j, _TIES] > 0}
        if self.subsets:
            out["subsets"] = {name: _summary(self.sums[k], loss=True)
                              for k, name in enumerate(self.subsets, start=1 + len(LANGS))
                              if self.sums[k, _PAIRS] > 0 or self.sums[k, _TIES] > 0}
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


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``[n]`` float64 values, tied values given their mean rank."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    mean = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    count = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(x))
    return (mean / count)[inverse]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson's correlation of two ``[n]`` tensors (computed in float64); None when either is constant or n < 2."""
    a, b = x.detach().double().cpu().flatten(), y.detach().double().cpu().flatten()
    return _correlation(a.numel(), a.sum().item(), b.sum().item(), (a * a).sum().item(), (b * b).sum().item(),
                        (a * b).sum().item())


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two ``[n]`` tensors: :func:`pearson` of their ranks, ties at their mean rank
    (Spearman 1904); None when either is constant or n < 2."""
    a, b = x.detach().double().cpu().flatten(), y.detach().double().cpu().flatten()
    return pearson(_ranks(a), _ranks(b)) if a.numel() else None


def length_bias(chosen: torch.Tensor, rejected: torch.Tensor, chosen_len, rejected_len) -> dict:
    """The ``length_bias`` block (module docstring) of ``[N]`` rewards and their answers' ``[N]`` lengths in tokens.

    Returns:
        ``pearson``, ``spearman``, ``pairs_chosen_longer``, ``acc_chosen_longer``, ``pairs_chosen_shorter``,
        ``acc_chosen_shorter``, ``pairs_equal_length``, ``longer_wins_acc``; None for a figure without pairs to
        compute it on (``{}`` for N = 0).
    Raises:
        ValueError: the four sizes differ.
    """
    c, r = _as_pairs(chosen, rejected)
    lengths = _as_lengths((chosen_len, rejected_len), c.numel())
    if not c.numel():
        return {}
    block = _length_summary(_pair_columns(c, r, lengths=lengths).sum(0).tolist())
    return {"pearson": block.pop("pearson"), "spearman": spearman(torch.cat([c, r]), torch.cat(lengths)), **block}


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10, lengths: tuple | None = None) -> dict:
    """Metrics (module docstring) of ``[N]`` chosen and rejected rewards (any float dtype, computed in float64).

    Args:
        lengths: ``(l_c [N], l_r [N])``, the answers' lengths in tokens: adds the :func:`length_bias` block.
    Returns:
        ``pairs``, ``acc``, ``dist``, ``dist_std``, ``chosen_reward``, ``rejected_reward``, ``reward_mean``,
        ``reward_std`` (as :class:`PairMetrics` fed the same pairs, up to summation order), ``ece`` over ``bins``
        bins and ``calibration`` (the :func:`calibration_bins` table), and ``length_bias`` with ``lengths``;
        ``{"pairs": 0}`` for N = 0.
    Raises:
        ValueError: the sizes of ``chosen``, ``rejected`` and ``lengths`` differ, or ``bins`` < 1.
    """
    c, r = _as_pairs(chosen, rejected)
    table = calibration_bins(c, r, bins)
    out = _summary(_pair_columns(c, r).sum(0))
    if out["pairs"]:
        out.update(ece=ece_from_bins(table), calibration=table)
        if lengths is not None:
            out["length_bias"] = length_bias(c, r, *lengths)
    return out


def grouped_metrics(chosen: torch.Tensor, rejected: torch.Tensor, groups: Sequence[str], bins: int = 10,
                    lengths: tuple | None = None) -> dict:
    """``{group: pair_metrics(...)}`` for each distinct label in ``groups`` (``N`` strings), sorted by name
    (``lengths`` ``(l_c [N], l_r [N])`` as :func:`pair_metrics`).

    Raises:
        ValueError: ``groups`` has another length than the ``[N]`` rewards; as :func:`pair_metrics`.
    """
    if len(groups) != chosen.numel():
        raise ValueError(f"{chosen.numel()} pairs but {len(groups)} group labels")
    masks = {name: torch.tensor([g == name for g in groups], dtype=torch.bool) for name in sorted(set(groups))}
    split = (lambda m: None) if lengths is None else \
        (lambda m: tuple(torch.as_tensor(x).flatten()[m] for x in lengths))
    return {name: pair_metrics(chosen.flatten()[m], rejected.flatten()[m], bins, split(m)) for name, m in masks.items()}
