"""Ties (--ties rao_kupper / davidson): the tie models in closed form, the data rows that carry ties, the layout
that keeps them (packed == padded), the tie figures of evaluation rows, and a CLI run that keeps UltraFeedback's
tied pairs."""

import json
import math
import subprocess
import sys

import pytest
import torch

from coati.config import LossArgs, TrainConfig
from coati.data.batch import collate_pairs, list_layout
from coati.data.packing import collate_packed
from coati.preflight import validate
from coati.data.formats import DataFormatError, parse_row
from coati.data.sources import load_pairs
from coati.data.template import TokenizedPair
from coati.losses import TieLoss, auto_tie_param, build_loss, log_sig_loss, tie_log_probs
from coati.metrics import PairMetrics
from coati.models.backbones import get_backbone
from coati.models.reward_model import RewardModel
from helpers import REPO, run_env, tiny_model



# ---------------------------------------------------------------- the tie models in closed form

def _rk(ra, rb, nu):
    """Rao-Kupper with strengths pi = e^r and theta = e^nu: P(a beats b), P(tie)."""
    pa, pb, theta = math.exp(ra), math.exp(rb), math.exp(nu)
    win = pa / (pa + theta * pb)
    tie = (theta ** 2 - 1) * pa * pb / ((pa + theta * pb) * (pb + theta * pa))
    return win, tie


def _davidson(ra, rb, nu):
    """Davidson with strengths pi = e^r: P(a beats b), P(tie)."""
    pa, pb = math.exp(ra), math.exp(rb)
    den = pa + pb + nu * math.sqrt(pa * pb)
    return pa / den, nu * math.sqrt(pa * pb) / den


@pytest.mark.parametrize("model, closed_form", [("rao_kupper", _rk), ("davidson", _davidson)])
def test_tie_models_match_their_closed_forms(model, closed_form):
    ra, rb = torch.tensor([0.3, 2.0, -1.0, 0.0], dtype=torch.float64), torch.tensor([0.1, -0.5, 1.5, 0.0])
    for nu in (0.2, 1.3):
        win, tie = tie_log_probs(model, ra - rb, nu)
        for i in range(4):
            p_win, p_tie = closed_form(ra[i].item(), rb[i].item(), nu)
            assert win[i].item() == pytest.approx(math.log(p_win), abs=1e-6)
            assert tie[i].item() == pytest.approx(math.log(p_tie), abs=1e-6)
            p_lose = closed_form(rb[i].item(), ra[i].item(), nu)[0]
            assert p_win + p_tie + p_lose == pytest.approx(1.0, abs=1e-12)  # the three outcomes


@pytest.mark.parametrize("model", ["rao_kupper", "davidson"])
def test_without_ties_and_with_nu_zero_the_loss_is_bradley_terry(model):
    chosen, rejected = torch.tensor([1.0, -0.5, 3.0]), torch.tensor([0.0, 0.5, -2.0])
    margin, weight = torch.tensor([0.2, 0.0, 1.0]), torch.tensor([1.0, 0.5, 0.25])
    loss = TieLoss(model, 0.0)
    assert loss(chosen, rejected, margin, weight).item() == pytest.approx(
        log_sig_loss(chosen, rejected, margin, weight).item(), abs=1e-6)
    assert loss(chosen, rejected).item() == pytest.approx(log_sig_loss(chosen, rejected).item(), abs=1e-6)
    # auto from data without ties is 0, so the loss is Bradley-Terry's
    assert auto_tie_param(model, 0.0) == 0.0


@pytest.mark.parametrize("model", ["rao_kupper", "davidson"])
def test_auto_tie_param_makes_equal_rewards_tie_with_the_data_share(model):
    for share in (0.05, 0.111, 0.5):
        nu = auto_tie_param(model, share)
        assert tie_log_probs(model, torch.zeros(1), nu)[1].exp().item() == pytest.approx(share, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        auto_tie_param(model, 1.0)


def test_tie_loss_is_the_weighted_mean_over_strict_and_tied_comparisons():
    nu = 0.8
    chosen, rejected = torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.4])
    tie_a, tie_b = torch.tensor([0.5]), torch.tensor([-0.25])
    loss = TieLoss("rao_kupper", nu)
    nll = [-math.log(_rk(1.0, 0.0, nu)[0]), -math.log(_rk(0.2, 0.4, nu)[0]), -math.log(_rk(0.5, -0.25, nu)[1])]
    assert loss(chosen, rejected, None, None, tie_a, tie_b, None).item() == pytest.approx(sum(nll) / 3, abs=1e-6)
    w, tw = torch.tensor([0.5, 0.5]), torch.tensor([2.0])
    expected = (0.5 * nll[0] + 0.5 * nll[1] + 2.0 * nll[2]) / 3.0
    assert loss(chosen, rejected, None, w, tie_a, tie_b, tw).item() == pytest.approx(expected, abs=1e-6)
    # through build_loss, with the tie parameter resolved, and a penalty on the strict comparisons only
    built = build_loss(LossArgs(tie_param=nu, penalty="l2", penalty_weight=0.1), ties="rao_kupper")
    l2 = 0.1 * (1.0 + 0.0 + 0.04 + 0.16) / 4
    assert built(chosen, rejected, None, None, tie_a, tie_b, None).item() == pytest.approx(sum(nll) / 3 + l2,
                                                                                         abs=1e-6)
    assert built.tie_log_prob(tie_a, tie_b).item() == pytest.approx(-nll[2], abs=1e-6)


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("options, message", [
    ({"ties": "davidson", "loss_fn": "focal"}, "not with --loss_fn focal"),
    ({"tie_param": 0.5}, "--tie_param is the tie parameter"),
    ({"ties": "rao_kupper", "tie_param": -1.0}, "--tie_param"),
])
def test_tie_options_that_do_not_fit_are_refused(options, message):
    assert any(message in e for e in validate(TrainConfig.from_dict(options)))


# ---------------------------------------------------------------- data

def test_pair_rows_carry_ties_and_scores():
    assert parse_row({"prompt": "q", "chosen": "a", "rejected": "b", "tie": True}).scores == [0.0, 0.0]
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "metadata": {"score_chosen": 7.5, "score_rejected": 7.5}}
    assert parse_row(row).scores == [7.5, 7.5]  # UltraFeedback binarized keeps its ratings there
    assert parse_row({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 9,
                      "score_rejected": 8}).scores == [9.0, 8.0]
    assert parse_row({"prompt": "q", "chosen": "a", "rejected": "b"}).scores is None
    for bad, why in (({"tie": "yes"}, "'tie' must be true or false"), ({"score_chosen": 3}, "both"),
                     ({"score_chosen": 3, "score_rejected": 5}, "below 'score_rejected' 5")):
        with pytest.raises(DataFormatError, match=why):
            parse_row({"prompt": "q", "chosen": "a", "rejected": "b", **bad})


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_ties_are_dropped_and_counted_or_kept(tmp_path):
    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b", "tie": True},
            {"prompt": "q2", "chosen": "a", "rejected": "b", "score_chosen": 2, "score_rejected": 1},
            {"prompt": "q3", "responses": ["a", "b", "c"], "scores": [2, 2, 1]},   # 2 strict comparisons, 1 tie
            {"prompt": "q4", "responses": ["a", "b", "c"], "scores": [1, 1, 1]}]   # 3 ties, nothing strict
    path = _write(tmp_path / "t.jsonl", rows)
    dropped, report = load_pairs([path], seed=None)
    assert [p.prompt[0]["content"] for p in dropped] == ["q2", "q3"]
    src = report.sources[path]
    assert (src.rows_skipped, src.ties_dropped, src.ties_kept, src.comparisons) == (2, 5, 0, 3)
    assert any("all tie" in m and "t.jsonl:1" in m for m in src.skipped)
    assert "ties: 0 tied comparisons kept, 5 dropped" in report.summary()
    # --strict_data does not stop at a tie: it is not a bad row
    assert len(load_pairs([path], seed=None, strict=True)[0]) == 2
    kept, report = load_pairs([path], seed=None, ties="davidson")
    assert len(kept) == 4 and report.ties_kept == 5 and report.ties_dropped == 0 and report.rows_skipped == 0


# ---------------------------------------------------------------- layout: packed == padded

def _list(scores, seed, prompt=(5, 6, 7)):
    g = torch.Generator().manual_seed(seed)
    seqs = [list(prompt) + torch.randint(10, 90, (2 + (3 * i + seed) % 4,), generator=g).tolist() + [2]
            for i in range(len(scores))]
    return TokenizedPair(seqs[0], seqs[1], None, "en", "t", seqs[2:], list(scores))


def test_layout_lists_ties_and_weighs_them_per_prompt():
    items = [_list([3, 3, 1, 0], 0), _list([1.0, 1.0], 1), _list([2, 1], 2)]
    layout = list_layout(items, keep_ties=True)
    # item 0: 5 strict comparisons + 1 tie -> each 1/6; item 1: one tie -> 1; item 2: one strict pair -> 1
    assert len(layout.pairs) == 5 + 1 and len(layout.ties) == 2
    assert layout.weights == [1 / 6] * 5 + [1.0] and layout.tie_weights == [1 / 6, 1.0]
    assert layout.total == 3.0
    assert layout.ties[0] == (layout.index[0][0], layout.index[0][1])
    assert list_layout(items).ties == []  # --ties drop lists none


@pytest.mark.parametrize("model", ["rao_kupper", "davidson"])
def test_a_ranked_list_with_ties_gives_the_same_loss_packed_and_padded(tokenizer, model):
    torch.manual_seed(0)
    rm = RewardModel(tiny_model("llama", tokenizer), get_backbone("llama")).train()
    items = [_list([3, 3, 1, 0], 0), _list([2.0, 2.0], 1), _list([5, 4, 4], 2)]
    loss_fn = TieLoss(model, 0.6)

    def run(batch):
        rm.zero_grad()
        rewards = rm(**batch.inputs)
        loss = loss_fn(rewards[batch.pairs[:, 0]], rewards[batch.pairs[:, 1]], None, batch.weight,
                       rewards[batch.ties[:, 0]], rewards[batch.ties[:, 1]], batch.tie_weight)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in rm.parameters() if p.grad is not None]

    padded = run(collate_pairs(items, tokenizer.pad_token_id, keep_ties=True))
    packed = run(collate_packed(items, tokenizer.pad_token_id, keep_ties=True))
    assert padded[0].item() == pytest.approx(packed[0].item(), abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(padded[1], packed[1]))
    # and equal to the comparisons scored one by one, weighted 1 / C_b per prompt
    with torch.no_grad():
        total, weights = 0.0, 0.0
        for it in items:
            r = torch.cat([rm(**collate_pairs([TokenizedPair(s, s, None, "en", "t")], 0).inputs)[:1]
                           for s in it.sequences])
            comps, ties = it.comparisons(), it.ties()
            for i, j, _ in comps:
                total -= tie_log_probs(model, r[i:i + 1] - r[j:j + 1], 0.6)[0].item() / (len(comps) + len(ties))
            for i, j in ties:
                total -= tie_log_probs(model, r[i:i + 1] - r[j:j + 1], 0.6)[1].item() / (len(comps) + len(ties))
            weights += 1.0
    assert padded[0].item() == pytest.approx(total / weights, abs=1e-5)


def test_tie_figures_of_metrics_rows():
    m = PairMetrics()
    m.add(0.5, torch.tensor([1.0]), torch.tensor([0.0]), ["en"])
    m.add_ties(torch.tensor([-1.0, -3.0]), torch.tensor([0.5, 2.0]), torch.tensor([0.0, 1.0]), ["en", "zh"])
    res = m.result()
    assert (res["ties"], res["tie_nll"], res["tie_abs_dist"]) == (2, 2.0, 0.75)
    assert res["languages"]["zh"] == {"pairs": 0, "ties": 1, "tie_nll": 3.0, "tie_abs_dist": 1.0}


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_cli_keeps_ultrafeedbacks_ties_and_records_the_tie_parameter(tmp_path, data_dir):
    out = tmp_path / "rm"
    cmd = [sys.executable, str(REPO / "train_reward_model.py"), "--model", "llama", "--strategy", "naive",
           "--dataset", str(data_dir / "en" / "ultrafeedback_binarized_train_clean.jsonl"), "--max_samples", "60",
           "--max_len", "64", "--batch_size", "4", "--max_steps", "2", "--eval_split", "0.3", "--ties", "rao_kupper",
           "--disable_tqdm", "--mixed_precision", "fp32", "--save_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training comparisons are ties; --tie_param auto" in proc.stderr
    config = json.loads((out / "train_config.json").read_text())
    pairs, report = load_pairs([config["dataset"][0]], max_samples=60, seed=None, ties="rao_kupper")
    assert report.ties_kept > 0
    assert config["ties"] == "rao_kupper" and config["tie_param"] > 0
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    assert evals[-1].get("ties", 0) + evals[-1]["pairs"] > 0
    assert all(math.isfinite(r["loss"]) for r in evals)
