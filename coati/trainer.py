"""Training and evaluation loops: one forward for chosen + rejected, metrics all-reduced over ranks."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import zlib
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from coati.checkpoint.export import NonFiniteWeightsError
from coati.config import WARMUP_MAX_STEPS, LogArgs, OptimArgs
from coati.data.batch import Batch
from coati.data.loader import PairLoader
from coati.memory import heap_trim_enabled, trim_between_blocks
from coati.losses import length_head_loss
from coati.metrics import PairMetrics, top1_correct
from coati.signals import Interrupted, StopFlag, signal_name
from coati.strategies.base import Strategy, all_finite

logger = logging.getLogger(__name__)

class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


def plan_steps(batches_per_epoch: int, optim: OptimArgs) -> tuple[int, int]:
    """``(steps per epoch, total optimizer steps)``: incomplete accumulation windows are dropped, ``--max_steps``
    caps the ``--max_epochs`` total."""
    per_epoch = batches_per_epoch // optim.accumulation_steps
    total = per_epoch * optim.max_epochs
    return per_epoch, min(total, optim.max_steps) if optim.max_steps else total


def plan_warmup(total_steps: int, optim: OptimArgs) -> int:
    """Optimizer steps of linear warm-up before the cosine decay (``num_warmup_steps`` of the scheduler, which spans
    ``total_steps``; during warm-up step s, counted from 0, runs at s / warm-up x the peak rate).

    * ``--warmup_steps N``: N, as given (it may exceed ``total_steps``: the rate then never reaches its peak);
    * ``--warmup_steps auto`` (None): floor(``--warmup_ratio`` x ``total_steps``), at most
      :data:`~coati.config.WARMUP_MAX_STEPS`. Rounding down keeps the warm-up within its share of a short run
      (4 planned steps at 3%: none); the cap keeps it from eating a long plan that ends early: with
      ``--max_train_minutes`` ``total_steps`` is only the plan (the 15-minute run of benchmarks/README.md made 60 of
      918 planned steps, of which 3% = 27 went to warm-up before this cap), so the warm-up is bounded by the cap, not
      by the plan. The time limit itself does not enter, so a resumed run rebuilds the same schedule (its
      fingerprint leaves ``--max_train_minutes`` out).

    Args:
        total_steps: the planned optimizer steps (:func:`plan_steps`' total), >= 0.

    Returns:
        the warm-up length in optimizer steps (>= 0).

    Raises:
        ValueError: ``total_steps`` < 0.
    """
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    if optim.warmup_steps is not None:
        return optim.warmup_steps
    share = math.floor(optim.warmup_ratio * total_steps + 1e-9)  # 0.29 x 100 is 28.999999999999996 in floats
    return min(share, WARMUP_MAX_STEPS)


class Trainer:
    """Fits a reward model under a strategy: it only loops; everything it uses is given at construction.

    Args:
        model: the prepared (possibly wrapped) module whose forward is ``(**batch.inputs) -> [2B]`` float32 rewards.
        optimizer, scheduler: built after ``strategy.prepare`` (the scheduler over ``plan_steps``' total).
        loss_fn: ``(chosen [M], rejected [M], margin [M] | None[, weight [M]]) -> scalar`` over a batch's M
            comparisons (``weight`` passed only for ranked lists weighted per prompt); see :mod:`coati.losses`.
        train, evaluation: this rank's :class:`~coati.data.loader.PairLoader` of the training / evaluation pairs
            (``evaluation`` None: nothing to evaluate).
        optim, log: the optimisation/loop and logging option groups.
        write_row: called with every metrics row on the main rank (metrics.jsonl and the ``--report_to`` backend).
        on_save: ``step -> checkpoint folder``, called every ``--save_every`` steps (and before stopping).
        start_step: the step a resumed run continues from (the data order continues exactly there).
        length_head: ``(length_loss_weight, orthogonal_loss_weight)`` of ``--length_head``, used when the model
            returns both heads' outputs (:meth:`~coati.models.reward_model.RewardModel.add_length_head`).
        length_groups: ``--length_groups``: "language" pools the length correlations within each language of the
            batch, "batch" takes them over the whole batch (:func:`coati.losses.length_head_loss`).
    """

    def __init__(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 loss_fn: Callable, train: PairLoader, evaluation: PairLoader | None, optim: OptimArgs,
                 log: LogArgs, write_row: Callable[[dict], None] | None = None,
                 on_save: Callable[[int], str] | None = None, start_step: int = 0,
                 length_head: tuple[float, float] | None = None, length_groups: str = "language"):
        self.strategy, self.model, self.optimizer, self.scheduler = strategy, model, optimizer, scheduler
        self.loss_fn, self.train, self.evaluation = loss_fn, train, evaluation
        self.optim, self.log, self.write_row, self.on_save = optim, log, write_row, on_save
        self.steps_per_epoch, self.total_steps = plan_steps(len(train), optim)
        self.step = start_step
        self.length_head, self.length_groups = length_head, length_groups
        self.history: list[dict] = []
        self.epoch_metrics: dict = {}  # online train metrics of the last epoch (all ranks, all its batches)
        self.last_checkpoint: tuple[int, str] | None = None  # (step, folder) of the newest checkpoint written
        self.stop = StopFlag()  # SIGINT / SIGTERM during fit: finish the step, checkpoint, stop
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        # on CPU the heap's free pages go back to the system every few blocks, forward and backward (glibc keeps a
        # step's freed activations resident otherwise: coati.memory); COATI_HEAP_TRIM=0 turns it off
        self._heap_trim = trim_between_blocks(model) if strategy.device.type == "cpu" and heap_trim_enabled() else []
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient (whole run)
        self.applied_steps = 0  # optimizer steps of this process's fit that updated the weights
        self.skipped_for_loss = 0  # of the skipped steps, those whose loss was not finite (else the gradient norm)
        self.train_seconds = 0.0  # training time of this process's run, evaluation and checkpoints excluded
        self.train_tokens = 0  # real tokens trained on by all ranks in this run
        self._bad_streak = 0
        self.stopped_by_time = False  # training ended at --max_train_minutes, before total_steps

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, chosen [M], rejected [M], rewards [N])`` of one batch's M comparisons of N sequences."""
        dev = self.strategy.device
        with self.strategy.autocast():
            rewards = self.model(**{k: v.to(dev) for k, v in batch.inputs.items()})
        if isinstance(rewards, tuple):  # --length_head (ODIN): ([N, 2] quality and length outputs, |w_Q . w_L|)
            return self._length_head_forward(batch, *rewards)
        pairs = batch.pairs.to(dev)
        return self._pairwise(batch, rewards), rewards[pairs[:, 0]], rewards[pairs[:, 1]], rewards

    def _pairwise(self, batch: Batch, rewards: torch.Tensor) -> torch.Tensor:
        """The pairwise loss (and ties) of one batch's ``[N]`` rewards."""
        dev = rewards.device
        pairs = batch.pairs.to(dev)
        margin = batch.margin.to(dev) if batch.margin is not None else None
        weight = None if batch.weight is None else batch.weight.to(dev)
        if batch.ties is not None:
            ties = batch.ties.to(dev)
            tie_weight = None if batch.tie_weight is None else batch.tie_weight.to(dev)
            return self.loss_fn(rewards[pairs[:, 0]], rewards[pairs[:, 1]], margin, weight, rewards[ties[:, 0]],
                                rewards[ties[:, 1]], tie_weight)
        if weight is None:
            return self.loss_fn(rewards[pairs[:, 0]], rewards[pairs[:, 1]], margin)
        return self.loss_fn(rewards[pairs[:, 0]], rewards[pairs[:, 1]], margin, weight)

    def _length_head_forward(self, batch: Batch, both: torch.Tensor, overlap: torch.Tensor):
        """ODIN's loss (:func:`coati.losses.length_head_loss`): the pairwise loss on quality + length outputs plus
        the disentangling terms over every data-parallel rank's sequences of this micro-batch. The quality outputs
        (the exported reward) are what the metrics see."""
        if batch.lengths is None:
            raise ValueError("--length_head needs each answer's length in tokens (TokenizedPair.answer_lengths)")
        quality, length_out = both[:, 0], both[:, 1]
        gathered = self.strategy.gather_data(torch.stack([quality, length_out], dim=1))
        lengths = self.strategy.gather_data(batch.lengths.to(both.device, torch.float32)[:, None])[:, 0]
        weights = self.length_head or (1.0, 1.0)
        groups = None
        if self.length_groups == "language":
            labels = torch.tensor([zlib.crc32(lang.encode()) for lang in batch.item_langs], dtype=torch.int64)
            groups = self.strategy.gather_data(labels[batch.item].to(both.device)[:, None])[:, 0]
        loss = self._pairwise(batch, quality + length_out) + length_head_loss(
            gathered[:, 0], gathered[:, 1], lengths, overlap, *weights, groups=groups)
        pairs = batch.pairs.to(quality.device)
        return loss, quality[pairs[:, 0]], quality[pairs[:, 1]], quality

    def _add(self, metrics: PairMetrics, value: float, batch: Batch, chosen, rejected, rewards) -> None:
        metrics.add(value, chosen, rejected, batch.langs, batch.sources, batch.pair_lengths())
        tie_log_prob = getattr(self.loss_fn, "tie_log_prob", None)
        if batch.ties is not None and tie_log_prob is not None:
            a, b = rewards[batch.ties[:, 0].to(rewards.device)], rewards[batch.ties[:, 1].to(rewards.device)]
            metrics.add_ties(tie_log_prob(a, b), a, b, batch.tie_langs, batch.tie_sources)
        metrics.add_top1(top1_correct(rewards, batch.item, batch.best, len(batch.item_langs)), batch.item_langs,
                         batch.item_sources)

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.strategy.is_main and self.write_row is not None:
            self.write_row(row)

    def fit(self) -> list[dict]:
        """Train up to ``total_steps`` optimizer steps, starting at ``self.step`` (non-zero after a resume: the data
        order continues exactly where it stopped). Returns the metrics rows (also written to metrics.jsonl)."""
        with self.stop.installed():
            return self._fit()

    def _save(self) -> str:
        if self.last_checkpoint is None or self.last_checkpoint[0] != self.step:
            self.last_checkpoint = (self.step, self.on_save(self.step))
        return self.last_checkpoint[1]

    def _fit(self) -> list[dict]:
        strategy, opts, total, spe = self.strategy, self.optim, self.total_steps, self.steps_per_epoch
        accumulation = opts.accumulation_steps
        bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=self.log.disable_tqdm or not strategy.is_main)
        window, t0, tokens = PairMetrics(), time.perf_counter(), [0, 0, 0]
        self.model.train()
        start_epoch = self.step // spe if spe else 0
        for epoch in range(start_epoch, opts.max_epochs):
            if self.step >= total:
                break
            epoch_sums = PairMetrics()
            first = (self.step - epoch * spe) * accumulation
            bad_micro = False
            for i, (batch, _) in enumerate(self.train.batches(epoch, first, spe * accumulation), start=first):
                last_micro = (i + 1) % accumulation == 0
                tokens[0] += batch.real_tokens
                tokens[1] += batch.computed_tokens
                tokens[2] += batch.total_tokens
                ctx = contextlib.nullcontext() if last_micro else strategy.no_sync(self.model)
                with ctx:
                    loss, chosen, rejected, rewards = self._forward(batch)
                    scale = self._loss_scale(batch, epoch, i)
                    strategy.backward(loss / accumulation if scale is None else loss * scale)
                value = loss.item()  # one device sync per micro-batch
                finite = math.isfinite(value)
                bad_micro = bad_micro or not finite
                if finite:
                    self._add(window, value, batch, chosen, rejected, rewards)
                    self._add(epoch_sums, value, batch, chosen, rejected, rewards)
                if not last_micro:
                    continue
                budget = opts.max_train_minutes
                over = bool(budget) and self.train_seconds + time.perf_counter() - t0 >= 60.0 * budget
                stop, over = self._update(bad_micro, over)
                bad_micro = False
                self.scheduler.step()
                self.step += 1
                bar.update(1)
                if self.step % self.log.log_every == 0 or self.step == total or over:
                    row = self._train_row(window, epoch, t0, tokens)
                    if row["pairs"]:  # a window of only skipped steps has no metrics
                        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['acc']:.3f}", dist=f"{row['dist']:.3f}")
                    window, t0, tokens = PairMetrics(), time.perf_counter(), [0, 0, 0]
                pause = time.perf_counter()  # evaluation and checkpoints do not count as training time
                if opts.eval_every and self.step % opts.eval_every == 0 and self.step != total:
                    self.evaluate()
                    self.model.train()
                if opts.save_every and self.step % opts.save_every == 0 and self.on_save is not None:
                    self._save()
                t0 += time.perf_counter() - pause
                if stop:
                    bar.close()
                    self._stop_now(total)
                if over:
                    self.stopped_by_time = True
                    logger.info("--max_train_minutes %s reached after %d of %d steps: evaluating and exporting",
                                budget, self.step, total)
                if self.step >= total or over:
                    break
            self.epoch_metrics = {"epoch": epoch, **epoch_sums.reduce(strategy).result()}
            if self.stopped_by_time:
                break
        bar.close()
        return self.history

    def _loss_scale(self, batch: Batch, epoch: int, index: int) -> float | None:
        """Factor on micro-batch ``index``'s loss (a weighted mean over this rank's comparisons) before backward, so
        that the gradient the strategy averages over D data-parallel ranks and A accumulated micro-batches is the
        weighted mean over every comparison of the optimizer step: ``w_local * D / w_step``, with ``w`` the loss
        weights (:func:`~coati.data.batch.item_loss_weight`; ``w_step`` over all ranks' micro-batches of the step).
        None (the caller divides by A) when every rank's micro-batches weigh the same (pairs, or lists weighted per
        prompt); it matters for ranked lists weighted per pair, whose comparison counts differ between batches."""
        accumulation, world = self.optim.accumulation_steps, self.strategy.data_world_size
        first = index - index % accumulation
        step_total = sum(self.train.global_loss_weights(epoch)[first:first + accumulation])
        if not step_total or batch.loss_weight * world * accumulation == step_total:
            return None
        return batch.loss_weight * world / step_total

    def _update(self, bad_loss: bool, over_time: bool = False) -> tuple[bool, bool]:
        """Clip and apply the accumulated gradients, or skip the update when the loss or the gradient norm is not
        finite on any rank (the skip is counted; ``max_bad_steps`` in a row stop the run).

        The ranks agree, in one all-reduce, on a bad loss, on a stop signal received by any of them and on a rank
        past ``--max_train_minutes`` (``over_time``), so all of them stop after the same step.

        Returns:
            ``(signalled, over_time)``: a rank received SIGINT / SIGTERM (the caller stops after this step), and a
            rank is past the training-time budget (the caller ends training normally after this step).
        Raises:
            NonFiniteError: ``max_bad_steps`` consecutive skipped steps; a resume checkpoint of the last good state
                is written first when checkpointing is on.
            NonFiniteWeightsError: the update made a parameter NaN or infinite (nothing more is saved).
        """
        opts, strategy = self.optim, self.strategy
        flag = torch.tensor([float(bad_loss), float(self.stop.signum is not None), float(over_time)],
                            dtype=torch.float64)
        strategy.all_reduce(flag)
        bad, stop, over_time = (v > 0 for v in flag.tolist())
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            norm = strategy.step(self.optimizer, opts.max_grad_norm)
            bad = norm is not None and not bool(torch.isfinite(norm))
        if not bad:
            self._bad_streak = 0
            self.applied_steps += 1
            if not all_finite(strategy, self._trainable):
                saved = f"; the newest checkpoint ({self.last_checkpoint[1]}) holds finite weights" \
                    if self.last_checkpoint else ""
                raise NonFiniteWeightsError(f"the update of step {self.step + 1} made parameters NaN or infinite "
                                            f"(finite gradients, so the step size is too large: lower --lr); nothing "
                                            f"was exported{saved}")
            return stop, over_time
        self.skipped_steps += 1
        self.skipped_for_loss += int(flag[0].item() > 0)
        self._bad_streak += 1
        if self._bad_streak >= opts.max_bad_steps:
            saved = ""
            if opts.save_every and self.on_save is not None:
                self._save()  # parameters are still those of the last good step
                saved = ("; the last state with finite updates is in the newest checkpoint (resume with --resume "
                         "auto)")
            raise NonFiniteError(f"{self._bad_streak} optimizer steps in a row had a non-finite loss or gradient "
                                 f"(up to step {self.step + 1}); stopping{saved}. Lower --lr, check the data, or "
                                 "try without --bf16")
        return stop, over_time

    def _stop_now(self, total: int) -> None:
        """Stop after a signal: write a resume checkpoint when checkpointing is on, then raise Interrupted."""
        signum = self.stop.signum or signal.SIGTERM  # another rank may have received it
        if self.optim.save_every and self.on_save is not None:
            done = f"resume checkpoint {self._save()} written; continue with --resume auto"
        else:
            done = "no resume checkpoint (--save_every is 0) and nothing exported"
        raise Interrupted(signum, f"stopped by {signal_name(signum)} after step {self.step} of {total}: {done}")

    def _train_row(self, window: PairMetrics, epoch: int, t0: float, tokens: list[int]) -> dict:
        elapsed = time.perf_counter() - t0
        counts = torch.tensor([float(t) for t in tokens], dtype=torch.float64)
        self.strategy.reduce_data(counts)
        res = window.reduce(self.strategy).result()
        self.train_seconds += elapsed
        self.train_tokens += int(counts[0].item())
        row = {"step": self.step, "split": "train", "epoch": epoch, **res,
               "lr": self.scheduler.get_last_lr()[0], "pairs_per_s": res.get("pairs", 0) / elapsed,
               "tokens_per_s": counts[0].item() / elapsed,  # real tokens (padding excluded)
               "padding_fraction": 1.0 - counts[1].item() / max(counts[2].item(), 1.0),
               # share of the sequences' tokens not computed a second time thanks to prefix sharing
               "shared_prefix_fraction": 1.0 - counts[1].item() / max(counts[0].item(), 1.0),
               "skipped_steps": self.skipped_steps}
        self._log(row)
        return row

    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> dict:
        """Metrics over the evaluation pairs, each pair scored once on exactly one rank.

        Returns:
            the all-reduced metrics row (``step``, ``split``, ``loss``, ``acc``, ``dist``, ``chosen_reward``,
            ``rejected_reward``, ``pairs``, ``languages``, ``subsets``: per dataset), also logged; {} when there is
            nothing to evaluate.
        """
        if self.evaluation is None:
            return {}
        self.model.eval()
        metrics = PairMetrics(getattr(self.evaluation, "subsets", ()))
        bar = tqdm(total=len(self.evaluation), desc=split, leave=False, dynamic_ncols=True,
                   disable=self.log.disable_tqdm or not self.strategy.is_main)
        for batch, counted in self.evaluation.batches():
            loss, chosen, rejected, rewards = self._forward(batch)  # a stand-in batch still joins the collective
            if counted:
                self._add(metrics, loss.item(), batch, chosen, rejected, rewards)
            bar.update(1)
        bar.close()
        row = {"step": self.step, "split": split, **metrics.reduce(self.strategy).result()}
        self._log(row)
        return row
