"""The training loop: step planning, skipped non-finite steps, the stand-in batches of a collective evaluation."""

import math

import pytest
import torch

from coati.checkpoint.resume import list_checkpoints, verify_checkpoint
from coati.config import OptimArgs
from coati.data.loader import GlobalBatchSampler, PairLoader, make_collate
from coati.data.template import TokenizedPair
from coati.losses import log_sig_loss
from coati.trainer import NonFiniteError, plan_steps
from helpers import tiny_trainer


@pytest.mark.parametrize("batches, accumulation, epochs, max_steps, expected", [
    (10, 1, 1, None, (10, 10)), (10, 3, 2, None, (3, 6)), (10, 3, 2, 4, (3, 4)), (2, 3, 5, None, (0, 0)),
])
def test_plan_steps_drops_incomplete_windows_and_caps_at_max_steps(batches, accumulation, epochs, max_steps,
                                                                   expected):
    optim = OptimArgs(accumulation_steps=accumulation, max_epochs=epochs, max_steps=max_steps)
    assert plan_steps(batches, optim) == expected


def test_an_evaluation_tail_gives_every_pair_once_and_stand_ins_only_when_asked(tokenizer):
    pairs = [TokenizedPair([5 + i, 2], [20 + i, 7, 2], None, "en", "x") for i in range(5)]
    collate = make_collate(tokenizer.pad_token_id, False, 0, True, "right")

    def loader(rank, fill):
        sampler = GlobalBatchSampler(5, 2, world_size=2, rank=rank, shuffle=False, drop_last=False)
        return list(PairLoader(pairs, collate, sampler, fill_empty=fill).batches())

    counted = []
    for rank in (0, 1):
        batches = loader(rank, fill=True)
        assert len(batches) == 2  # every rank runs the same number of forwards (5 pairs, 2 per rank per batch)
        counted += [t for b, ok in batches if ok for t in b.inputs["input_ids"][:len(b.langs), 0].tolist()]
    assert sorted(counted) == [5, 6, 7, 8, 9]  # every pair once; rank 1's last batch is a stand-in
    assert [ok for _, ok in loader(1, fill=True)] == [True, False] and len(loader(1, fill=False)) == 1


def _trainer(tokenizer, tmp_path, loss_fn, **opts):
    return tiny_trainer(tokenizer, tmp_path, loss_fn, **opts)


def _nan_on(calls_to_poison):
    calls = {"n": 0}

    def loss_fn(c, r, m):
        calls["n"] += 1
        loss = log_sig_loss(c, r, m)
        return loss * float("nan") if calls["n"] in calls_to_poison else loss
    return loss_fn


def test_non_finite_steps_are_skipped_and_counted(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, _nan_on({3, 4}))
    snapshots = []
    original = trainer.strategy.step
    trainer.strategy.step = lambda opt, max_norm: (snapshots.append(trainer.step), original(opt, max_norm))[1]
    rows = trainer.fit()
    assert trainer.step == 8 and trainer.skipped_steps == 2
    assert snapshots == [0, 1, 4, 5, 6, 7]  # no update at steps 3 and 4 (0-based 2 and 3)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in rows if r.get("pairs"))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_bad_steps_stop_with_a_last_good_checkpoint(tokenizer, tmp_path):
    from coati.checkpoint.resume import save_resume_checkpoint

    trainer = _trainer(tokenizer, tmp_path, _nan_on(set(range(3, 100))), max_bad_steps=3, save_every=100)
    trainer.on_save = lambda step: save_resume_checkpoint(str(tmp_path), step, trainer.strategy, trainer.model,
                                                          trainer.optimizer, trainer.scheduler, {}, 2)
    good = {}
    original = trainer.strategy.step

    def step_and_remember(opt, max_norm):
        norm = original(opt, max_norm)
        good.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return norm
    trainer.strategy.step = step_and_remember
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        trainer.fit()
    newest = list_checkpoints(str(tmp_path))[-1]
    verify_checkpoint(newest)
    assert newest.endswith("step-000004")  # steps 3, 4, 5 were bad: the state is that of step 2, saved at 4
    assert all(torch.equal(good[k], v) for k, v in trainer.model.state_dict().items())


# ------------------------------------------------------------------------------------------ checkpoints


def test_max_train_minutes_ends_training_after_the_step_that_crosses_it(tokenizer, tmp_path, monkeypatch):
    """A fake clock that moves 10 s per loss computation: with a 0.5-minute budget, the training time seen before
    the update of step k is 10 k s, so step 3 is the last (30 s >= 30 s); the run then ends normally."""
    import coati.trainer as trainer_module

    clock = {"now": 0.0}
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock["now"])

    def slow_loss(c, r, m):
        clock["now"] += 10.0
        return log_sig_loss(c, r, m)

    trainer = _trainer(tokenizer, tmp_path, slow_loss, max_train_minutes=0.5)
    rows = trainer.fit()
    assert trainer.step == 3 and trainer.total_steps == 8 and trainer.stopped_by_time
    assert [r["step"] for r in rows] == [1, 2, 3]
    unlimited = _trainer(tokenizer, tmp_path / "b", slow_loss)
    unlimited.fit()
    assert unlimited.step == 8 and not unlimited.stopped_by_time


def test_evaluation_rows_carry_the_reward_length_correlation(tokenizer, tmp_path):
    from coati.metrics import length_bias

    trainer = _trainer(tokenizer, tmp_path, log_sig_loss)
    g = torch.Generator().manual_seed(3)
    lens = [(3, 9), (8, 2), (5, 5), (12, 4), (2, 7)]
    pairs = [TokenizedPair(torch.randint(5, 300, (a,), generator=g).tolist() + [2],
                           torch.randint(5, 300, (b,), generator=g).tolist() + [2], None, "en", "x",
                           answer_lengths=[a, b]) for a, b in lens]
    collate = make_collate(tokenizer.pad_token_id, False, 0, True, "right")
    trainer.evaluation = PairLoader(pairs, collate, GlobalBatchSampler(5, 2, shuffle=False, drop_last=False))
    row = trainer.evaluate()
    whole = collate(pairs)
    with torch.no_grad():
        rewards = trainer.model.eval()(**whole.inputs)
    expected = length_bias(rewards[:5], rewards[5:], *whole.pair_lengths())
    assert whole.pair_lengths()[0].tolist() == [a for a, _ in lens]
    expected.pop("spearman")  # needs every score at once: not in training rows
    assert row["length_bias"] == pytest.approx(expected, abs=1e-6)
    assert row["length_bias"]["pairs_chosen_longer"] == 2 and row["length_bias"]["pairs_equal_length"] == 1
