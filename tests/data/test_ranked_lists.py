"""Ranked lists of K answers: parsing, one group per prompt, the listwise loss and metrics, all checked against
the same comparisons expanded into pairs and computed one pair at a time (the pair path)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from coati.config import LossArgs
from coati.data.batch import collate_pairs, list_layout
from coati.data.packing import collate_packed
from coati.data.formats import DataFormatError, parse_row
from coati.data.sources import load_pairs
from coati.data.template import TokenizedPair
from coati.losses import build_loss
from coati.metrics import PairMetrics, top1_correct
from coati.models.backbones import BACKBONES, get_backbone
from coati.models.packed_attention import PackPlan, _group_mask, group_attention
from coati.models.reward_model import RewardModel
from helpers import tiny_model


# ---------------------------------------------------------------- formats

def test_ranked_outputs_keeps_every_answer_in_rank_order():
    pair = parse_row({"instruction": "q", "output": ["best", "second", "third", "fourth"]})
    assert pair.responses == ["best", "second", "third", "fourth"] and pair.scores is None
    assert (pair.chosen, pair.rejected, pair.more) == ("best", "second", ["third", "fourth"])


def test_scored_list_sorts_by_score_and_keeps_ties():
    pair = parse_row({"prompt": "q", "responses": ["c", "a", "b", {"role": "assistant", "content": "d"}],
                      "scores": [1, 3, 2, 1]})
    assert pair.responses == ["a", "b", "c", "d"] and pair.scores == [3.0, 2.0, 1.0, 1.0]
    ranked = parse_row({"prompt": "q", "responses": ["x", "y", "z"], "ranking": [2, 1, 3]})
    assert ranked.responses == ["y", "x", "z"]


def test_blank_and_repeated_answers_are_dropped_and_counted():
    pair = parse_row({"instruction": "q", "output": ["a", " ", "b", "a", "\u200b", "c"]})
    assert pair.responses == ["a", "b", "c"] and pair.dropped == 3


@pytest.mark.parametrize("row, why", [
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1]}, "1 values for 2"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, "x"]}, r"scores\[1\] must be a finite"),
    ({"prompt": "q", "responses": ["a", "a"], "ranking": [1, 2]}, "at least 2 distinct"),
    ({"instruction": "q", "output": ["a", 3]}, "item 1"),
    ({"prompt": "q", "responses": [{"role": "user", "content": "a"}, "b"], "scores": [1, 0]}, "assistant"),
])
def test_bad_lists_are_refused_with_the_reason(row, why):
    with pytest.raises(DataFormatError, match=why):
        parse_row(row)


def test_completions_layout_uses_overall_score():
    row = {"instruction": "q", "completions": [{"response": "low", "overall_score": 2},
                                               {"response": "high", "overall_score": 9.5},
                                               {"response": "no score"},
                                               {"response": "mid", "fine-grained_score": 5}]}
    pair = parse_row(row)
    assert pair.responses == ["high", "mid", "low"] and pair.scores == [9.5, 5.0, 2.0] and pair.dropped == 1


def test_real_oaast_ranks_all_comparisons_and_max_responses_counts_the_cut(data_dir):
    full, report = load_pairs(["oaast-rm-zh"], str(data_dir), seed=None)
    src = report.sources["oaast-rm-zh"]
    expected = sum(len(p.responses) * (len(p.responses) - 1) // 2 for p in full)
    assert src.comparisons == report.comparisons == expected > len(full)  # more than the top-2 pairs
    assert src.lists == sum(1 for p in full if p.more) > 0
    capped, capped_report = load_pairs(["oaast-rm-zh"], str(data_dir), seed=None, max_responses=2)
    assert len(capped) == len(full) and all(not p.more for p in capped)
    assert capped_report.sources["oaast-rm-zh"].responses_capped == sum(len(p.more) for p in full)
    assert "beyond --max_responses" in capped_report.summary()


# ---------------------------------------------------------------- comparisons and layout

def _item(k: int, scores=None, prompt=(5, 6, 7), margin=None, lang="en", seed=0) -> TokenizedPair:
    g = torch.Generator().manual_seed(seed)
    seqs = [list(prompt) + torch.randint(10, 90, (2 + (3 * i + seed) % 4,), generator=g).tolist() + [2]
            for i in range(k)]
    return TokenizedPair(seqs[0], seqs[1], margin, lang, "t", seqs[2:], scores)


def test_comparisons_are_all_ordered_pairs_without_ties():
    assert [(i, j) for i, j, _ in _item(4).comparisons()] == list(itertools.combinations(range(4), 2))
    tied = _item(4, scores=[3.0, 3.0, 1.0, 0.5]).comparisons(margin_from_scores=True)
    assert [(i, j, m) for i, j, m in tied] == [(0, 2, 2.0), (0, 3, 2.5), (1, 2, 2.0), (1, 3, 2.5), (2, 3, 0.5)]


def test_layout_of_pairs_is_the_pair_batch_order():
    items = [_item(2, seed=s) for s in range(3)]
    layout = list_layout(items)
    assert layout.pairs == [(0, 3), (1, 4), (2, 5)] and layout.weights is None and layout.margins is None
    batch = collate_packed(items, 0)
    assert batch.inputs["groups"].shape[1] == 5 and batch.weight is None


def test_layout_weights_each_prompt_once():
    items = [_item(3), _item(2, seed=1), _item(4, scores=[2.0, 2.0, 1.0, 0.0], seed=2)]
    layout = list_layout(items)
    counts = [3, 1, 5]
    assert layout.weights == [1 / c for c in counts for _ in range(c)]
    assert list_layout(items, "pair").weights is None
    assert layout.best == [True, True, True, False, False, True, False, False, False]  # answer-major order


# ---------------------------------------------------------------- attention of one group [P | T1 | ... | TK]

def test_group_of_k_answers_split_attention_equals_its_mask():
    shape = (3, 2, 4, 1, 3)
    n = sum(shape)
    allowed = _group_mask(shape, torch.device("cpu"))
    assert not allowed[3 + 2:3 + 2 + 4, 3:5].any() and not allowed[3 + 2 + 4 + 1:, 3:10].any()
    plan = PackPlan.from_groups(torch.tensor([[0, 0, *shape]]), 1)
    torch.manual_seed(0)
    qkv = [torch.randn(2, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    outs = [group_attention(plan, shape, *qkv, 0.0, 0.3, fused=fused) for fused in (True, False)]
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    ref = torch.softmax((qkv[0] @ qkv[1].transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf")), -1) @ qkv[2]
    assert torch.allclose(outs[0], ref, atol=1e-10)


# ---------------------------------------------------------------- listwise == pairs one at a time

def _items():
    """Lists of K = 5, 3 (with ties), 2 and 3 answers sharing each prompt; margins on one."""
    return [_item(5, seed=1), _item(3, scores=[4.0, 4.0, 1.0], prompt=(9, 8, 7, 6), seed=2),
            _item(2, margin=0.5, seed=3, lang="zh"), _item(3, scores=[3.0, 2.0, 0.0], seed=4)]


def _expanded(items, margin_from_scores):
    """Each comparison as its own pair, with its prompt's weight (1 / C_b) and margin."""
    out = []
    for it in items:
        comps = it.comparisons(margin_from_scores)
        for i, j, m in comps:
            out.append((TokenizedPair(it.sequences[i], it.sequences[j], m, it.lang, it.source), 1.0 / len(comps)))
    return out


@pytest.mark.parametrize("weighting", ["prompt", "pair"])
@pytest.mark.parametrize("packing", ["packed", "one_row", "padded", "padded_shared", "padded_shared_left"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_listwise_loss_and_gradients_equal_pairs_one_at_a_time(name, packing, weighting, tokenizer):
    backbone = get_backbone(name)
    items = _items()
    loss_args = LossArgs(penalty="l2", center_rewards_coefficient=0.1)
    loss_fn = build_loss(loss_args)
    collate = {"packed": lambda it: collate_packed(it, tokenizer.pad_token_id, 40, list_weighting=weighting,
                                                   margin_from_scores=True),
               "one_row": lambda it: collate_packed(it, tokenizer.pad_token_id, 0, list_weighting=weighting,
                                                    margin_from_scores=True),
               "padded": lambda it: collate_pairs(it, tokenizer.pad_token_id, list_weighting=weighting,
                                                  margin_from_scores=True),
               "padded_shared": lambda it: collate_pairs(it, tokenizer.pad_token_id, list_weighting=weighting,
                                                         margin_from_scores=True, share_prefix=True),
               "padded_shared_left": lambda it: collate_pairs(it, tokenizer.pad_token_id, "left",
                                                              list_weighting=weighting, margin_from_scores=True,
                                                              share_prefix=True)}[packing]

    def model():
        torch.manual_seed(0)
        return RewardModel(tiny_model(name, tokenizer), backbone).train()

    rm = model()
    batch = collate(items)
    if packing != "padded":
        assert batch.computed_tokens < batch.real_tokens  # prompts really shared
    if packing.startswith("padded_shared"):  # each prompt is one row, computed once for its answers
        assert batch.inputs["prompt_ids"].shape[0] == len(items)
        prompt_lens = [3, 4, 3, 3]
        assert batch.computed_tokens == batch.real_tokens - sum((len(it.sequences) - 1) * p
                                                                for it, p in zip(items, prompt_lens))
    elif packing != "padded":
        assert batch.inputs["groups"].shape[1] == 3 + 5
    if packing.startswith("padded_shared") and not rm.can_cache_prompt:
        # a sliding-window cache keeps keys by column, so the prompt's padding would shift the window: refused
        # (training's loaders never build such a batch for these backbones: train.run's cache_prompt)
        with pytest.raises(ValueError, match="sliding window"):
            rm(**batch.inputs)
        return
    rewards = rm(**batch.inputs)
    chosen, rejected = rewards[batch.pairs[:, 0]], rewards[batch.pairs[:, 1]]
    args = (chosen, rejected, batch.margin) + (() if batch.weight is None else (batch.weight,))
    loss = loss_fn(*args)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}

    ref = model()
    pairs = _expanded(items, True)
    total_w = sum(w for _, w in pairs) if weighting == "prompt" else len(pairs)
    ref_loss = 0.0
    for pair, w in pairs:
        one = collate_pairs([pair], tokenizer.pad_token_id)
        r = ref(**one.inputs)
        part = loss_fn(r[:1], r[1:], one.margin) * ((w if weighting == "prompt" else 1.0) / total_w)
        part.backward()
        ref_loss += part.item()
    assert abs(loss.item() - ref_loss) < 1e-5, (loss.item(), ref_loss)
    worst = max((grads[k] - p.grad).abs().max().item() for k, p in ref.named_parameters() if p.grad is not None)
    assert worst < 1e-5, worst


def test_long_list_is_split_into_groups_that_each_share_the_prompt(tokenizer):
    item = _item(5, prompt=tuple(range(20, 32)), seed=5)
    longest = max(map(len, item.sequences))
    batch = collate_packed([item], tokenizer.pad_token_id, capacity=longest + 6)
    groups = batch.inputs["groups"]
    assert groups.shape[0] > 1 and all(int(g[2]) == 12 for g in groups if int(g[4]))  # shared prompt in each
    assert len(set(map(tuple, batch.inputs["reward_index"].tolist()))) == 5  # every answer placed once
    rm = RewardModel(tiny_model("llama", tokenizer), get_backbone("llama"))
    with torch.no_grad():
        packed = rm(**batch.inputs)
        alone = torch.cat([rm(**collate_pairs([TokenizedPair(s, s, None, "en", "t")], 0).inputs)[:1]
                           for s in item.sequences])
    assert torch.allclose(packed, alone, atol=1e-5)


# ---------------------------------------------------------------- metrics

def test_top1_closed_form_and_pairs_give_acc():
    rewards = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.4])  # item 0: answers 0, 2, 4; item 1: answers 1, 3
    item = torch.tensor([0, 1, 0, 1, 0])
    best = torch.tensor([True, True, False, False, False])
    assert top1_correct(rewards, item, best, 2).tolist() == [True, False]
    tie = top1_correct(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), torch.tensor([True, False]), 1)
    assert tie.tolist() == [False]  # a tie for the top is wrong, as in acc
    m = PairMetrics()
    m.add(0.3, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), ["en", "zh"])
    m.add_top1(torch.tensor([True, False]), ["en", "zh"])
    res = m.result()
    assert res["top1"] == res["acc"] == 0.5 and res["prompts"] == 2
    assert res["languages"]["en"]["top1"] == 1.0 and res["languages"]["zh"]["top1"] == 0.0


def test_list_file_trains_and_reports_top1(tmp_path, tokenizer):
    """A JSON-lines file of scored lists through the trainer's data path: every comparison counted."""
    from coati.config import DataArgs
    from coati.data.prepare import prepare_data

    rows = [{"prompt": f"question {i}", "responses": [f"answer {i} {j}" for j in range(4)],
             "scores": [4, 3, 3, 1]} for i in range(6)]
    path = tmp_path / "lists.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = prepare_data(DataArgs(dataset=[str(path)], max_len=64), 0, tokenizer, tokenizer.eos_token_id)
    assert data.selection.report.comparisons == 6 * 5
    batch = collate_packed(data.train[:3], tokenizer.pad_token_id)
    assert batch.pairs.shape == (15, 2) and len(batch.langs) == 15 and batch.item_langs == ["en"] * 3
