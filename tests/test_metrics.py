"""coati.metrics: closed-form values, ECE of crafted scores, and PairMetrics (batched sums) == pair_metrics."""

import math

import pytest
import torch

from coati.metrics import (LANGS, PairMetrics, calibration_bins, ece_from_bins, expected_calibration_error,
                           grouped_metrics, pair_metrics)

# the keys PairMetrics and pair_metrics both compute from sums over pairs
SUM_KEYS = ("pairs", "acc", "dist", "dist_std", "chosen_reward", "rejected_reward", "reward_mean", "reward_std")


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- closed forms

def test_pair_metrics_match_hand_computed_values():
    chosen = torch.tensor([2.0, 0.0, 1.0, -1.0])
    rejected = torch.tensor([0.0, 0.0, 3.0, -1.5])
    # margins 2, 0, -2, 0.5: correct (r_c > r_r) for pairs 0 and 3 only (the tie counts as wrong)
    m = pair_metrics(chosen, rejected, bins=10)
    assert m["pairs"] == 4
    assert m["acc"] == pytest.approx(0.5)
    assert m["dist"] == pytest.approx((2 + 0 - 2 + 0.5) / 4)  # 0.125
    # population variance of the margins: (4 + 0 + 4 + 0.25) / 4 - 0.125^2 = 2.046875
    assert m["dist_std"] == pytest.approx(math.sqrt(2.046875))
    assert m["chosen_reward"] == pytest.approx(0.5) and m["rejected_reward"] == pytest.approx(0.375)
    # 8 rewards 2, 0, 1, -1, 0, 0, 3, -1.5: mean 3.5 / 8; population variance 17.25 / 8 - mean^2
    assert m["reward_mean"] == pytest.approx(0.4375)
    assert m["reward_std"] == pytest.approx(math.sqrt(17.25 / 8 - 0.4375 ** 2))  # 1.40173
    # confidences max(p, 1-p), p = sigmoid(margin): s(2) = 0.8808 (bin (0.8, 0.9], correct),
    # 0.5 (bin (0.4, 0.5], wrong), s(2) (bin (0.8, 0.9], wrong), s(0.5) = 0.6225 (bin (0.6, 0.7], correct)
    s2, s05 = _sig(2.0), _sig(0.5)
    assert s2 == pytest.approx(0.880797, abs=1e-6) and s05 == pytest.approx(0.622459, abs=1e-6)
    ece = 2 / 4 * abs(0.5 - s2) + 1 / 4 * abs(0.0 - 0.5) + 1 / 4 * abs(1.0 - s05)
    assert ece == pytest.approx(0.4097838, abs=1e-6)
    assert m["ece"] == pytest.approx(ece, abs=1e-9)
    assert expected_calibration_error(chosen, rejected, 10) == pytest.approx(ece, abs=1e-9)
    table = {round(b["lo"], 1): b for b in m["calibration"] if b["count"]}
    assert sorted(table) == [0.4, 0.6, 0.8]
    assert table[0.8]["count"] == 2 and table[0.8]["acc"] == 0.5
    assert table[0.8]["confidence"] == pytest.approx(s2)
    assert table[0.4]["acc"] == 0.0 and table[0.6]["acc"] == 1.0
    assert sum(b["count"] for b in m["calibration"]) == 4 and len(m["calibration"]) == 10
    # one bin: |mean accuracy - mean confidence|
    one = expected_calibration_error(chosen, rejected, 1)
    assert one == pytest.approx(abs(0.5 - (s2 + 0.5 + s2 + s05) / 4), abs=1e-9)  # 0.221013


def test_ties_count_as_wrong_everywhere():
    tie = torch.tensor([1.5, 1.5, 1.5])
    m = pair_metrics(tie, tie.clone(), bins=2)
    assert m["acc"] == 0.0 and m["dist"] == 0.0 and m["dist_std"] == 0.0
    # each tie: p = 0.5, confidence 0.5 in the first of two bins, wrong -> ECE |0 - 0.5|
    assert [b["count"] for b in m["calibration"]] == [3, 0] and m["calibration"][0]["acc"] == 0.0
    assert m["ece"] == pytest.approx(0.5)
    batched = PairMetrics()
    batched.add(0.1, tie, tie.clone(), ["en", "zh", "en"])
    res = batched.result()
    assert res["acc"] == 0.0 and res["languages"]["en"]["acc"] == 0.0 and res["languages"]["zh"]["acc"] == 0.0


def test_ece_of_crafted_scores_with_known_bins():
    # p = sigmoid(r_c - r_r): a tie (p 0.5, wrong), two pairs at p 0.7 (right), one at p 0.1 (conf 0.9, wrong)
    d = math.log(7 / 3)  # sigmoid(log(7/3)) = 0.7
    chosen = torch.tensor([0.0, d, d, 0.0], dtype=torch.float64)
    rejected = torch.tensor([0.0, 0.0, 0.0, math.log(9.0)], dtype=torch.float64)  # sigmoid(-log 9) = 0.1
    table = calibration_bins(chosen, rejected, 5)  # (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]
    assert [b["count"] for b in table] == [0, 0, 1, 2, 1]
    assert [b["acc"] for b in table] == [None, None, 0.0, 1.0, 0.0]
    assert [b["confidence"] for b in table[2:]] == pytest.approx([0.5, 0.7, 0.9])
    # ECE = (1 * |0 - 0.5| + 2 * |1 - 0.7| + 1 * |0 - 0.9|) / 4 = 2.0 / 4
    assert ece_from_bins(table) == pytest.approx(0.5, abs=1e-12)
    assert pair_metrics(chosen, rejected, bins=5)["ece"] == pytest.approx(0.5, abs=1e-12)
    # one bin: |mean acc 0.5 - mean confidence (0.5 + 0.7 + 0.7 + 0.9) / 4| = 0.2 (the errors partly cancel)
    assert expected_calibration_error(chosen, rejected, 1) == pytest.approx(0.2, abs=1e-12)
    # a hand-made table: only non-empty bins count, weighted by their share of the pairs
    hand = [{"count": 3, "acc": 1.0, "confidence": 0.6}, {"count": 0, "acc": None, "confidence": None},
            {"count": 1, "acc": 0.0, "confidence": 0.8}]
    assert ece_from_bins(hand) == pytest.approx(3 / 4 * 0.4 + 1 / 4 * 0.8)
    assert math.isnan(ece_from_bins([{"count": 0, "acc": None, "confidence": None}]))


def test_ece_extremes_and_edge_cases():
    # confident and right: margins so large that p = 1 in float64 -> conf 1 in the last bin, ECE 0
    assert expected_calibration_error(torch.tensor([100.0, 50.0]), torch.tensor([0.0, 0.0])) == pytest.approx(0.0)
    # confident and wrong: ECE 1
    assert expected_calibration_error(torch.tensor([0.0]), torch.tensor([100.0])) == pytest.approx(1.0)
    # p = 0.75 for every pair and 3 of 4 right: calibrated
    d = math.log(3.0)  # sigmoid(log 3) = 0.75
    c = torch.tensor([d, d, d, -d], dtype=torch.float64)
    assert expected_calibration_error(c, torch.zeros(4, dtype=torch.float64)) == pytest.approx(0.0, abs=1e-12)
    assert [b["count"] for b in calibration_bins(c, torch.zeros(4), 5)] == [0, 0, 0, 4, 0]  # (0.6, 0.8]
    assert pair_metrics(torch.zeros(0), torch.zeros(0)) == {"pairs": 0}
    assert math.isnan(expected_calibration_error(torch.zeros(0), torch.zeros(0)))
    with pytest.raises(ValueError):
        pair_metrics(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError):
        calibration_bins(torch.zeros(2), torch.zeros(2), 0)
    with pytest.raises(ValueError, match="bins must be >= 1"):
        pair_metrics(torch.zeros(2), torch.ones(2), bins=0)


def test_pair_metrics_std_of_offset_rewards():
    # rewards far from 0: the sums-based float64 variance still matches the two-pass one
    g = torch.Generator().manual_seed(0)
    chosen = 1000.0 + torch.randn(500, generator=g, dtype=torch.float64)
    rejected = 1000.0 + torch.randn(500, generator=g, dtype=torch.float64)
    m = pair_metrics(chosen, rejected)
    assert m["reward_std"] == pytest.approx(torch.cat([chosen, rejected]).std(unbiased=False).item(), rel=1e-9)
    assert m["dist_std"] == pytest.approx((chosen - rejected).std(unbiased=False).item(), rel=1e-9)


# --------------------------------------------------------------------------- PairMetrics


def test_pair_metrics_class_closed_form():
    m = PairMetrics()
    assert m.result() == {"pairs": 0, "languages": {}}
    m.add(0.5, torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), ["en", "zh"])
    m.add(0.2, torch.tensor([3.0]), torch.tensor([3.0]), ["zh"])  # a tie counts as wrong
    res = m.result()
    assert res["pairs"] == 3 and res["acc"] == pytest.approx(1 / 3)
    assert res["dist"] == pytest.approx((1 - 1 + 0) / 3)
    assert res["dist_std"] == pytest.approx(math.sqrt(2 / 3))  # margins 1, -1, 0
    assert res["loss"] == pytest.approx((0.5 * 2 + 0.2) / 3)  # batch losses weighted by their pairs
    assert res["reward_mean"] == pytest.approx(10 / 6)  # rewards 2, 0, 3, 1, 1, 3
    assert res["reward_std"] == pytest.approx(math.sqrt(24 / 6 - (10 / 6) ** 2))
    en, zh = res["languages"]["en"], res["languages"]["zh"]
    assert en == pytest.approx({"pairs": 1, "acc": 1.0, "dist": 1.0, "dist_std": 0.0, "chosen_reward": 2.0,
                                "rejected_reward": 1.0, "reward_mean": 1.5, "reward_std": 0.5, "loss": 0.5})
    assert zh["pairs"] == 2 and zh["acc"] == 0.0 and zh["dist"] == pytest.approx(-0.5)
    assert zh["loss"] == pytest.approx((0.5 + 0.2) / 2)


def _batches():
    """Three batches of integer rewards (so ties occur), float32 like the model's output, with language codes."""
    g = torch.Generator().manual_seed(7)
    out = []
    for size, loss in ((5, 0.9), (8, 0.4), (3, 0.7)):
        c = torch.randint(-2, 3, (size,), generator=g).float()
        r = torch.randint(-2, 3, (size,), generator=g).float()
        langs = [LANGS[int(i)] for i in torch.randint(0, len(LANGS), (size,), generator=g)]
        out.append((loss, c, r, langs))
    return out


def test_batched_sums_equal_pair_metrics_of_the_concatenation():
    batches = _batches()
    m = PairMetrics()
    for loss, c, r, langs in batches:
        m.add(loss, c, r, langs)
    res = m.result()
    chosen, rejected = torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches])
    langs = [lg for b in batches for lg in b[3]]
    assert bool((chosen == rejected).any())  # the data has ties
    whole = pair_metrics(chosen, rejected)
    for key in SUM_KEYS:
        assert res[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-12), key
    assert res["loss"] == pytest.approx(sum(loss * c.numel() for loss, c, _, _ in batches) / 16)
    # per-language rows: the same as pair_metrics / grouped_metrics of that language's pairs
    groups = grouped_metrics(chosen, rejected, langs)
    assert set(res["languages"]) == set(groups) == set(LANGS)
    for lang in LANGS:
        sel = torch.tensor([lg == lang for lg in langs])
        direct = pair_metrics(chosen[sel], rejected[sel])
        for key in SUM_KEYS:
            assert res["languages"][lang][key] == pytest.approx(direct[key], rel=1e-12, abs=1e-12), (lang, key)
            assert groups[lang][key] == direct[key], (lang, key)


def test_other_languages_count_only_overall():
    m = PairMetrics()
    m.add(0.3, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0]), ["fr", "en"])
    res = m.result()
    assert res["pairs"] == 2 and res["acc"] == 0.5
    assert list(res["languages"]) == ["en"] and res["languages"]["en"]["acc"] == 0.0
    with pytest.raises(ValueError, match="2 pairs but 1 language codes"):
        m.add(0.3, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0]), ["en"])
    with pytest.raises(ValueError):
        m.add(0.3, torch.tensor([1.0, 2.0]), torch.tensor([0.0]), ["en", "en"])
    with pytest.raises(ValueError, match="group labels"):
        grouped_metrics(torch.zeros(2), torch.zeros(2), ["en"])


class _TwoRanks:
    """A stand-in strategy: reducing over the data-parallel ranks adds the sums of a second rank's PairMetrics."""

    def __init__(self, other: PairMetrics):
        self.other = other

    def reduce_data(self, tensor):
        tensor += self.other.sums
        return tensor


def test_reduce_over_ranks_equals_one_process_seeing_all_pairs():
    batches = _batches()
    rank0, rank1, single = PairMetrics(), PairMetrics(), PairMetrics()
    for i, batch in enumerate(batches):
        (rank0 if i % 2 == 0 else rank1).add(*batch)
        single.add(*batch)
    assert rank0.reduce(_TwoRanks(rank1)) is rank0
    reduced, expected = rank0.result(), single.result()
    assert reduced["pairs"] == expected["pairs"] == 16
    for key in SUM_KEYS + ("loss",):
        assert reduced[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    for lang in expected["languages"]:
        assert reduced["languages"][lang] == pytest.approx(expected["languages"][lang], rel=1e-12, abs=1e-12)


def test_pair_metrics_per_subset_closed_form():
    m = PairMetrics(subsets=["hh-rlhf", "oaast-rm-zh"])
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, 1.5, 0.0])
    m.add(0.5, chosen, rejected, ["en", "en", "zh", "zh"], ["hh-rlhf", "hh-rlhf", "oaast-rm-zh", "other"])
    m.add_top1(torch.tensor([True, False]), ["en", "zh"], ["hh-rlhf", "oaast-rm-zh"])
    out = m.result()
    hh, oaast = out["subsets"]["hh-rlhf"], out["subsets"]["oaast-rm-zh"]
    assert (hh["pairs"], hh["acc"], hh["dist"]) == (2, 0.5, 0.0)  # margins +1 and -1
    assert (oaast["pairs"], oaast["acc"], oaast["dist"]) == (1, 1.0, 0.5)  # "other" counts only overall
    assert out["pairs"] == 4 and out["languages"]["zh"]["pairs"] == 2
    assert hh["top1"] == 1.0 and oaast["top1"] == 0.0
    assert "subsets" not in PairMetrics().result()
    with pytest.raises(ValueError, match="subset names"):
        m.add(0.5, chosen, rejected, ["en"] * 4, ["hh-rlhf"])


# --------------------------------------------------------------------------- length bias

# four pairs: (chosen reward, rejected reward) and their answers' lengths in tokens
LB_CHOSEN, LB_REJECTED = [1.0, 2.0, 0.5, 3.0], [0.0, 2.5, 1.0, 1.0]
LB_CHOSEN_LEN, LB_REJECTED_LEN = [10, 5, 3, 8], [4, 9, 3, 2]


def _pearson_by_hand(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_length_bias_matches_hand_computed_values():
    from coati.metrics import length_bias

    rewards = LB_CHOSEN + LB_REJECTED
    lengths = LB_CHOSEN_LEN + LB_REJECTED_LEN
    # ranks by hand, ties at their mean rank: rewards 1.0 x3 share ranks 3-5, lengths 3 x2 share ranks 2-3
    reward_ranks = [4, 6, 2, 8, 1, 7, 4, 4]
    length_ranks = [8, 5, 2.5, 6, 4, 7, 2.5, 1]
    m = length_bias(torch.tensor(LB_CHOSEN), torch.tensor(LB_REJECTED), torch.tensor(LB_CHOSEN_LEN),
                    torch.tensor(LB_REJECTED_LEN))
    assert m["pearson"] == pytest.approx(_pearson_by_hand(rewards, lengths), abs=1e-12)
    assert m["pearson"] == pytest.approx(0.5665745113741707, abs=1e-12)
    assert m["spearman"] == pytest.approx(_pearson_by_hand(reward_ranks, length_ranks), abs=1e-12)
    # pair 0: longer and right; pair 1: shorter and wrong; pair 2: equal lengths; pair 3: longer and right
    assert (m["pairs_chosen_longer"], m["acc_chosen_longer"]) == (2, 1.0)
    assert (m["pairs_chosen_shorter"], m["acc_chosen_shorter"]) == (1, 0.0)
    assert m["pairs_equal_length"] == 1
    assert m["longer_wins_acc"] == 0.5  # the rule is right on pairs 0 and 3; an equal length counts as wrong


def test_length_bias_edge_cases():
    from coati.metrics import length_bias, spearman

    # equal lengths everywhere: no correlation (None), no longer/shorter pairs, the rule never right
    m = length_bias(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0]), torch.tensor([4, 4]), torch.tensor([4, 4]))
    assert m["pearson"] is None and m["spearman"] is None
    assert m["acc_chosen_longer"] is None and m["acc_chosen_shorter"] is None and m["longer_wins_acc"] == 0.0
    # a reward that is its length: r = 1, a monotone transform: rho = 1
    lengths = torch.tensor([3.0, 50.0, 7.0, 2.0])
    assert spearman(lengths.log(), lengths) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="answer lengths"):
        length_bias(torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(2))


def test_length_bias_of_batched_sums_equals_the_whole():
    from coati.metrics import length_bias

    lengths = (torch.tensor(LB_CHOSEN_LEN), torch.tensor(LB_REJECTED_LEN))
    m = PairMetrics()
    for part in (slice(0, 1), slice(1, 4)):
        m.add(0.5, torch.tensor(LB_CHOSEN)[part], torch.tensor(LB_REJECTED)[part], ["en"] * (part.stop - part.start),
              lengths=(lengths[0][part], lengths[1][part]))
    whole = length_bias(torch.tensor(LB_CHOSEN), torch.tensor(LB_REJECTED), *lengths)
    whole.pop("spearman")  # ranks need every score: the training rows leave it out
    res = m.result()
    assert res["length_bias"] == pytest.approx(whole, abs=1e-12)
    assert res["languages"]["en"]["length_bias"] == pytest.approx(whole, abs=1e-12)
    # a batch without lengths: no length block (it would describe only part of the pairs)
    m.add(0.5, torch.tensor([1.0]), torch.tensor([0.0]), ["en"])
    assert "length_bias" not in m.result()
