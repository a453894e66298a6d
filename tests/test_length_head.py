"""--length_head (ODIN): the loss terms in closed form, a synthetic length-only preference that the quality head
learns to ignore, the export (one score head, the length head beside it), and 2-process DDP == one process."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from coati.config import TrainConfig
from coati.preflight import validate
from coati.data.template import TokenizedPair
from coati.losses import length_head_loss, log_sig_loss, pearson_corr
from coati.metrics import pearson
from helpers import REPO, run_env, tiny_trainer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _corr(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_length_head_loss_in_closed_form():
    quality, length_out = [0.5, -1.0, 2.0, 0.0, 1.5], [1.0, 3.0, -2.0, 0.5, 4.0]
    lengths = [10, 40, 5, 20, 80]
    loss = length_head_loss(torch.tensor(quality), torch.tensor(length_out), torch.tensor(lengths),
                            torch.tensor(0.3), length_weight=2.0, orthogonal_weight=0.5)
    expected = 2.0 * (abs(_corr(quality, lengths)) - _corr(length_out, lengths)) + 0.5 * 0.3
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # a constant side has no correlation (0, not NaN)
    assert pearson_corr(torch.ones(4), torch.tensor([1.0, 2.0, 3.0, 4.0])).item() == 0.0
    # gradients flow to both heads' outputs
    q, lo = torch.tensor(quality, requires_grad=True), torch.tensor(length_out, requires_grad=True)
    length_head_loss(q, lo, torch.tensor(lengths), torch.tensor(0.0)).backward()
    assert q.grad.abs().sum() > 0 and lo.grad.abs().sum() > 0


def test_grouped_correlation_ignores_what_differs_between_groups():
    # two groups whose means differ in both sides (a long-answer language with higher rewards), no relation inside
    # either group: the batch-wide correlation is strong, the pooled within-group one is 0
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 10.0, 11.0, 10.0, 11.0])
    y = torch.tensor([1.0, 1.0, 3.0, 3.0, 101.0, 101.0, 103.0, 103.0])
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])
    assert pearson_corr(x, y).item() > 0.99
    assert pearson_corr(x, y, groups).item() == pytest.approx(0.0, abs=1e-6)
    # closed form: each side centred on its group mean, then Pearson's correlation of the deviations
    x = [0.5, -1.0, 2.0, 0.0, 1.5, 3.0]
    y = [10, 40, 5, 20, 80, 30]
    labels = [1, 1, 1, 2, 2, 2]
    dx, dy = [], []
    for g in (1, 2):
        xs, ys = [a for a, k in zip(x, labels) if k == g], [b for b, k in zip(y, labels) if k == g]
        dx += [a - sum(xs) / 3 for a in xs]
        dy += [b - sum(ys) / 3 for b in ys]
    expected = sum(a * b for a, b in zip(dx, dy)) / math.sqrt(sum(a * a for a in dx) * sum(b * b for b in dy))
    got = pearson_corr(torch.tensor(x), torch.tensor(y, dtype=torch.float32), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # one group gives the plain value
    one = pearson_corr(torch.tensor(x), torch.tensor(y, dtype=torch.float32), torch.zeros(6, dtype=torch.int64))
    assert one.item() == pytest.approx(_corr(x, y), abs=1e-6)
    # the length head's output equal to the length correlates 1 within every group
    loss = length_head_loss(torch.tensor(x), torch.tensor(y, dtype=torch.float32), torch.tensor(y), torch.tensor(0.0),
                            groups=torch.tensor(labels))
    assert loss.item() == pytest.approx(abs(expected) - 1.0, abs=1e-5)


def test_language_groups_reach_the_trainers_length_terms(tokenizer, tmp_path):
    """A mixed-language batch: --length_groups language takes the correlations within each language, batch over
    all sequences; a one-language batch gives the same loss either way."""
    from coati.data.loader import make_collate

    g = torch.Generator().manual_seed(3)
    items = []
    for k, (lang, lens) in enumerate((("en", [4, 9]), ("zh", [20, 14]), ("en", [7, 3]), ("zh", [25, 30]))):
        prompt = torch.randint(5, 300, (4,), generator=g).tolist()
        seqs = [prompt + torch.randint(5, 300, (n,), generator=g).tolist() + [2] for n in lens]
        items.append(TokenizedPair(seqs[0], seqs[1], None, lang, "x", answer_lengths=lens))
    collate = make_collate(tokenizer.pad_token_id, False, 0, True, "right")
    losses = {}
    for groups in ("language", "batch"):
        trainer = tiny_trainer(tokenizer, tmp_path / groups, log_sig_loss, length_head=True, length_groups=groups)
        for name, batch in (("mixed", collate(items)), ("en", collate(items[::2]))):
            loss, *_ = trainer._forward(batch)
            with torch.no_grad():
                both, overlap = trainer.model(**batch.inputs)
            total = both.sum(-1)
            labels = torch.tensor([0 if batch.item_langs[i] == "en" else 1 for i in batch.item])
            lengths = batch.lengths.float()
            split = labels if groups == "language" else None
            expected = (log_sig_loss(total[batch.pairs[:, 0]], total[batch.pairs[:, 1]], None)
                        + pearson_corr(both[:, 0], lengths, split).abs() - pearson_corr(both[:, 1], lengths, split)
                        + overlap)
            assert loss.item() == pytest.approx(expected.item(), abs=1e-5), (groups, name)
            losses[groups, name] = loss.item()
    assert losses["language", "en"] == pytest.approx(losses["batch", "en"], abs=1e-6)
    assert abs(losses["language", "mixed"] - losses["batch", "mixed"]) > 1e-3


def test_length_head_flags_are_checked():
    assert any("add --length_head" in e for e in validate(TrainConfig.from_dict({"length_loss_weight": 2.0})))
    assert any("--orthogonal_loss_weight" in e for e in validate(TrainConfig.from_dict(
        {"length_head": True, "orthogonal_loss_weight": -1.0})))
    assert not validate(TrainConfig.from_dict({"length_head": True, "length_loss_weight": 0.5}))
    assert any("--length_groups is an option of --length_head" in e
               for e in validate(TrainConfig.from_dict({"length_groups": "batch"})))


def _length_pairs(n, seed):
    """Pairs whose only signal is length: the chosen answer is the longer one, both random tokens."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        a, b = sorted(torch.randint(2, 30, (2,), generator=g).tolist())
        b += 1  # chosen strictly longer
        prompt = torch.randint(5, 300, (4,), generator=g).tolist()
        chosen = torch.randint(5, 300, (b,), generator=g).tolist()
        rejected = torch.randint(5, 300, (a,), generator=g).tolist()
        pairs.append(TokenizedPair(prompt + chosen + [2], prompt + rejected + [2], None, "en", "x",
                                   answer_lengths=[b, a]))
    return pairs


def _fit(tokenizer, folder, length_head):
    from coati.data.loader import GlobalBatchSampler, PairLoader, make_collate

    trainer = tiny_trainer(tokenizer, folder, log_sig_loss, batch_size=16, length_head=length_head)
    collate = make_collate(tokenizer.pad_token_id, False, 0, True, "right")
    train, held = _length_pairs(192, 0), _length_pairs(64, 1)
    trainer.train = PairLoader(train, collate, GlobalBatchSampler(len(train), 16, seed=0))
    trainer.steps_per_epoch, trainer.total_steps = 12, 36
    trainer.optim = trainer.optim.__class__(**{**vars(trainer.optim), "max_epochs": 3, "batch_size": 16})
    trainer.fit()
    batch = collate(held)
    with torch.no_grad():
        out = trainer.model.eval()(**batch.inputs)
    quality = out[0][:, 0] if isinstance(out, tuple) else out
    return pearson(quality, batch.lengths.double()), out


def test_the_quality_head_learns_to_ignore_a_length_only_preference(tokenizer, tmp_path):
    plain, _ = _fit(tokenizer, tmp_path / "plain", length_head=False)
    odin, out = _fit(tokenizer, tmp_path / "odin", length_head=True)
    length_corr = pearson(out[0][:, 1], torch.cat([torch.tensor([p.answer_lengths for p in _length_pairs(64, 1)])
                                                    [:, k] for k in (0, 1)]).double())
    assert plain > 0.5  # without the length head the reward follows length
    assert abs(odin) < 0.2 and abs(odin) < plain / 3  # the quality head does not
    assert length_corr > 0.5  # the length head carries it


@pytest.mark.slow
def test_export_keeps_the_quality_head_and_ddp_equals_one_process(tmp_path):
    # two languages, so each rank's language labels are gathered with its rewards (--length_groups language)
    common = ["--model", "llama", "--dataset", "hh-rlhf", "dpo-zh-demo", "--max_samples", "32", "--max_len", "96", "--lr", "1e-3",
              "--adam_eps", "1e-6", "--log_every", "1", "--disable_tqdm", "--seed", "7", "--mixed_precision", "fp32",
              "--max_steps", "4", "--length_head", "--lora_rank", "4", "--eval_split", "0.2"]

    def train(extra, nproc, out):
        launcher = [sys.executable] if nproc == 1 else TORCHRUN + ["--standalone", "--nproc_per_node", str(nproc)]
        proc = subprocess.run(launcher + [str(REPO / "train_reward_model.py")] + common + extra + ["--save_path",
                              str(out)], capture_output=True, text=True, env=run_env(), timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out

    one = train(["--strategy", "naive", "--batch_size", "4"], 1, tmp_path / "one")
    for strategy in ("ddp", "fsdp"):
        two = train(["--strategy", strategy, "--batch_size", "2"], 2, tmp_path / strategy)
        losses = [[r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())
                   if r["split"] == "train"] for p in (one, two)]
        assert len(losses[0]) == 4 and max(abs(a - b) for a, b in zip(*losses)) < 1e-5, strategy
        for name in ("model.safetensors", "length_head.safetensors"):
            wa, wb = load_file(one / name), load_file(two / name)
            assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5, name
    # the export is a plain reward model: one score head, which is the trainer's quality head
    model = AutoModelForSequenceClassification.from_pretrained(one)
    head = load_file(one / "length_head.safetensors")["weight"]
    assert head.shape == model.score.weight.shape and not torch.equal(head, model.score.weight)
    assert not any("length" in k for k in load_file(one / "model.safetensors"))
    assert "length_head.safetensors" in (one / "README.md").read_text(encoding="utf-8")  # the model card says so
    from coati.scoring import RewardScorer

    scorer = RewardScorer.from_pretrained(str(one), device="cpu")
    ids = scorer.encode(["How are you?"], ["Fine, thanks."])
    with torch.no_grad():
        hf = model(torch.tensor(ids)).logits[0, 0].item()
    assert scorer.score_texts(["How are you?"], ["Fine, thanks."])[0] == pytest.approx(hf, abs=1e-4)
    evals = [r for r in map(json.loads, (one / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    assert "pearson" in evals[-1]["length_bias"]


def test_ranked_lists_with_a_length_head_take_the_weighted_loss_on_the_sum(tokenizer, tmp_path):
    """A batch of ranked lists (packed): the trainer's loss is the per-prompt weighted pairwise loss on quality +
    length outputs plus the length terms over every sequence, and the metrics see the quality outputs."""
    from coati.data.packing import collate_packed

    trainer = tiny_trainer(tokenizer, tmp_path, log_sig_loss, length_head=True, length_loss_weight=0.5)
    g = torch.Generator().manual_seed(5)
    items = []
    for k, lens in ((3, [9, 4, 6]), (2, [3, 7]), (4, [2, 8, 5, 11])):
        prompt = torch.randint(5, 300, (4,), generator=g).tolist()
        seqs = [prompt + torch.randint(5, 300, (n,), generator=g).tolist() + [2] for n in lens]
        items.append(TokenizedPair(seqs[0], seqs[1], None, "en", "x", seqs[2:], answer_lengths=lens))
    batch = collate_packed(items, tokenizer.pad_token_id)
    loss, chosen, rejected, rewards = trainer._forward(batch)
    with torch.no_grad():
        both, overlap = trainer.model(**batch.inputs)
    total = both.sum(-1)
    pairwise = log_sig_loss(total[batch.pairs[:, 0]], total[batch.pairs[:, 1]], None, batch.weight)
    lengths = batch.lengths.float()
    expected = pairwise + 0.5 * (abs(_corr(both[:, 0].tolist(), lengths.tolist()))
                                 - _corr(both[:, 1].tolist(), lengths.tolist())) + overlap
    assert batch.weight is not None and len(batch.pairs) == 3 + 1 + 6
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert torch.allclose(rewards, both[:, 0], atol=1e-6) and torch.allclose(chosen, both[batch.pairs[:, 0], 0],
                                                                              atol=1e-6)
