"""Training and evaluation loops: one forward for chosen + rejected, metrics all-reduced over ranks."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from coati.checkpoint import NonFiniteWeightsError
from coati.data.collate import GlobalBatchSampler, collate_packed, collate_pairs
from coati.data.template import TokenizedPair
from coati.io import dumps
from coati.signals import Interrupted, StopFlag, signal_name
from coati.strategies.base import Strategy

LANGS = ("en", "zh")
# columns of a metrics accumulator row: loss * pairs, pairs, correct, margin sum, chosen sum, rejected sum,
# sum of squared rewards (chosen and rejected)
_COLS = 7


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


class PairMetrics:
    """Sums over pairs (overall and per language) that are all-reduced before dividing.

    Definitions: ``acc`` = share of pairs with r_c > r_r (ties count as wrong); ``dist`` = mean of r_c - r_r;
    ``chosen_reward`` / ``rejected_reward`` = mean rewards; ``loss`` = pair-weighted mean loss; ``reward_mean`` /
    ``reward_std`` = mean and (population) standard deviation over all 2N chosen and rejected rewards.
    """

    def __init__(self):
        self.sums = torch.zeros(1 + len(LANGS), _COLS, dtype=torch.float64)

    def add(self, loss: float, chosen: torch.Tensor, rejected: torch.Tensor, langs: list[str]) -> None:
        """Accumulate one batch. ``chosen``/``rejected``: ``[B]`` rewards; ``loss``: the batch-mean loss."""
        c, r = chosen.detach().double().cpu(), rejected.detach().double().cpu()
        rows = torch.stack([torch.full_like(c, loss), torch.ones_like(c), (c > r).double(), c - r, c, r,
                            c * c + r * r], dim=1)
        self.sums[0] += rows.sum(0)
        for j, lang in enumerate(LANGS, start=1):
            sel = torch.tensor([lg == lang for lg in langs], dtype=torch.bool)
            if sel.any():
                self.sums[j] += rows[sel].sum(0)

    def reduce(self, strategy: Strategy) -> "PairMetrics":
        """All-reduce the sums over ranks (in place)."""
        strategy.all_reduce(self.sums)
        return self

    @staticmethod
    def _row(s: torch.Tensor) -> dict[str, float]:
        n = s[1].item()
        if n == 0:
            return {"pairs": 0}
        mean = (s[4].item() + s[5].item()) / (2 * n)
        var = max(s[6].item() / (2 * n) - mean * mean, 0.0)
        return {"loss": s[0].item() / n, "acc": s[2].item() / n, "dist": s[3].item() / n,
                "chosen_reward": s[4].item() / n, "rejected_reward": s[5].item() / n, "pairs": int(n),
                "reward_mean": mean, "reward_std": var ** 0.5}

    def result(self) -> dict:
        """Overall metrics plus ``languages: {lang: {...}}`` for languages seen."""
        out = self._row(self.sums[0])
        out["languages"] = {lang: self._row(self.sums[j]) for j, lang in enumerate(LANGS, start=1)
                            if self.sums[j, 1] > 0}
        return out


@dataclass
class TrainerOptions:
    """Loop settings (a subset of TrainConfig, kept plain so the trainer does not depend on the CLI)."""

    batch_size: int
    eval_batch_size: int
    accumulation_steps: int
    max_epochs: int
    max_steps: int | None
    max_grad_norm: float
    bf16: bool
    seed: int
    log_every: int
    eval_every: int
    padding_side: str
    metrics_path: str | None
    disable_tqdm: bool = False
    save_every: int = 0
    max_bad_steps: int = 5
    packing: bool = False
    max_tokens_per_batch: int = 0  # packed row capacity (tokens); 0 = the whole batch in one row
    share_prefix: bool = True  # packed: compute the prompt shared by chosen and rejected once
    group_by_length: bool = False


class Trainer:
    """Fits a reward model on tokenized pairs under a strategy.

    Args:
        model: the prepared (possibly wrapped) module whose forward is ``(input_ids, attention_mask) -> [N] rewards``.
        optimizer, scheduler: built by the caller after ``strategy.prepare``.
        loss_fn: ``(chosen [B], rejected [B], margin [B] | None) -> scalar``; see :mod:`coati.losses`.
        pad_id: padding token id.
    """

    def __init__(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 loss_fn: Callable, train_pairs: list[TokenizedPair], eval_pairs: list[TokenizedPair],
                 pad_id: int, opts: TrainerOptions):
        self.strategy, self.model, self.optimizer, self.scheduler = strategy, model, optimizer, scheduler
        self.loss_fn, self.train_pairs, self.eval_pairs = loss_fn, train_pairs, eval_pairs
        self.pad_id, self.opts = pad_id, opts
        lengths = [len(p.chosen_ids) + len(p.rejected_ids) for p in train_pairs] if opts.group_by_length else None
        self.sampler = GlobalBatchSampler(len(train_pairs), opts.batch_size, strategy.world_size, strategy.rank,
                                          shuffle=True, seed=opts.seed, drop_last=True, lengths=lengths)
        self.step = 0
        self.history: list[dict] = []
        self.epoch_metrics: dict = {}  # online train metrics of the last epoch (all ranks, all its batches)
        self.on_save: Callable[[int], str] | None = None  # called with the step every `save_every` steps
        self.last_checkpoint: tuple[int, str] | None = None  # (step, folder) of the newest checkpoint written
        self.stop = StopFlag()  # SIGINT / SIGTERM during fit: finish the step, checkpoint, stop
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient (whole run)
        self.train_seconds = 0.0  # training time of this process's run, evaluation and checkpoints excluded
        self.train_tokens = 0  # real tokens trained on by all ranks in this run
        self._bad_streak = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (incomplete accumulation windows are dropped)."""
        return len(self.sampler) // self.opts.accumulation_steps

    @property
    def total_steps(self) -> int:
        """Optimizer steps this run will take."""
        total = self.steps_per_epoch * self.opts.max_epochs
        return min(total, self.opts.max_steps) if self.opts.max_steps else total

    def _autocast(self):
        if self.opts.bf16:
            return torch.autocast(device_type=self.strategy.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def collate(self, items: list[TokenizedPair]) -> dict:
        """A packed or padded batch of ``items`` (see :mod:`coati.data.collate`)."""
        if self.opts.packing:
            return collate_packed(items, self.pad_id, self.opts.max_tokens_per_batch, self.opts.share_prefix)
        return collate_pairs(items, self.pad_id, self.opts.padding_side)

    def _forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.strategy.device
        with self._autocast():
            rewards = self.model(**{k: v.to(dev) for k, v in batch["inputs"].items()})
        b = rewards.shape[0] // 2
        chosen, rejected = rewards[:b], rewards[b:]
        margin = batch["margin"].to(dev) if batch["margin"] is not None else None
        return self.loss_fn(chosen, rejected, margin), chosen, rejected

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.strategy.is_main and self.opts.metrics_path:
            with open(self.opts.metrics_path, "a", encoding="utf-8") as f:
                f.write(dumps(row) + "\n")

    def fit(self) -> list[dict]:
        """Train up to ``total_steps`` optimizer steps, starting at ``self.step`` (non-zero after a resume: the data
        order continues exactly where it stopped). Returns the metrics rows (also written to metrics.jsonl)."""
        with self.stop.installed():
            return self._fit(self.total_steps, self.steps_per_epoch)

    def _save(self) -> str:
        if self.last_checkpoint is None or self.last_checkpoint[0] != self.step:
            self.last_checkpoint = (self.step, self.on_save(self.step))
        return self.last_checkpoint[1]

    def _fit(self, total: int, spe: int) -> list[dict]:
        opts, strategy = self.opts, self.strategy
        bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=opts.disable_tqdm or not strategy.is_main)
        window, t0, tokens = PairMetrics(), time.perf_counter(), [0, 0, 0]
        self.model.train()
        start_epoch = self.step // spe if spe else 0
        for epoch in range(start_epoch, opts.max_epochs):
            if self.step >= total:
                break
            self.sampler.set_epoch(epoch)
            epoch_sums = PairMetrics()
            batches = list(self.sampler)[: spe * opts.accumulation_steps]
            first = (self.step - epoch * spe) * opts.accumulation_steps
            bad_micro = False
            for i in range(first, len(batches)):
                last_micro = (i + 1) % opts.accumulation_steps == 0
                batch = self.collate([self.train_pairs[j] for j in batches[i]])
                tokens[0] += batch["real_tokens"]
                tokens[1] += batch["computed_tokens"]
                tokens[2] += batch["total_tokens"]
                ctx = contextlib.nullcontext() if last_micro else strategy.no_sync(self.model)
                with ctx:
                    loss, chosen, rejected = self._forward(batch)
                    strategy.backward(loss / opts.accumulation_steps)
                value = loss.item()  # one device sync per micro-batch
                finite = math.isfinite(value)
                bad_micro = bad_micro or not finite
                if finite:
                    window.add(value, chosen, rejected, batch["langs"])
                    epoch_sums.add(value, chosen, rejected, batch["langs"])
                if not last_micro:
                    continue
                stop = self._update(bad_micro)
                bad_micro = False
                self.scheduler.step()
                self.step += 1
                bar.update(1)
                if self.step % opts.log_every == 0 or self.step == total:
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
                if self.step >= total:
                    break
            self.epoch_metrics = {"epoch": epoch, **epoch_sums.reduce(strategy).result()}
        bar.close()
        return self.history

    def _update(self, bad_loss: bool) -> bool:
        """Clip and apply the accumulated gradients, or skip the update when the loss or the gradient norm is not
        finite on any rank (the skip is counted; ``max_bad_steps`` in a row stop the run).

        The ranks agree, in one all-reduce, on a bad loss and on a stop signal received by any of them.

        Returns:
            True when a rank received SIGINT / SIGTERM: the caller stops after this step.
        Raises:
            NonFiniteError: ``max_bad_steps`` consecutive skipped steps; a resume checkpoint of the last good state
                is written first when checkpointing is on.
            NonFiniteWeightsError: the update made a parameter NaN or infinite (nothing more is saved).
        """
        opts, strategy = self.opts, self.strategy
        flag = torch.tensor([float(bad_loss), float(self.stop.signum is not None)], dtype=torch.float64)
        strategy.all_reduce(flag)
        bad, stop = flag[0].item() > 0, flag[1].item() > 0
        if opts.max_grad_norm > 0 or strategy.checks_grad_norm:
            norm = strategy.clip_grad_norm(self.model, opts.max_grad_norm if opts.max_grad_norm > 0 else float("inf"))
            bad = bad or (strategy.checks_grad_norm and not bool(torch.isfinite(norm)))
        if not bad:
            strategy.optimizer_step(self.optimizer)
            self._bad_streak = 0
            if not strategy.all_finite(self._trainable):
                saved = f"; the newest checkpoint ({self.last_checkpoint[1]}) holds finite weights" \
                    if self.last_checkpoint else ""
                raise NonFiniteWeightsError(f"the update of step {self.step + 1} made parameters NaN or infinite "
                                            f"(finite gradients, so the step size is too large: lower --lr); nothing "
                                            f"was exported{saved}")
            return stop
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
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
        return stop

    def _stop_now(self, total: int) -> None:
        """Stop after a signal: write a resume checkpoint when checkpointing is on, then raise Interrupted."""
        signum = self.stop.signum or signal.SIGTERM  # another rank may have received it
        if self.opts.save_every and self.on_save is not None:
            done = f"resume checkpoint {self._save()} written; continue with --resume auto"
        else:
            done = "no resume checkpoint (--save_every is 0) and nothing exported"
        raise Interrupted(signum, f"stopped by {signal_name(signum)} after step {self.step} of {total}: {done}")

    def _train_row(self, window: PairMetrics, epoch: int, t0: float, tokens: list[int]) -> dict:
        elapsed = time.perf_counter() - t0
        counts = torch.tensor([float(t) for t in tokens], dtype=torch.float64)
        self.strategy.all_reduce(counts)
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
    def evaluate(self, pairs: list[TokenizedPair] | None = None, split: str = "eval", log: bool = True) -> dict:
        """Metrics over ``pairs`` (default: the eval pairs), each pair scored once on exactly one rank.

        Returns:
            the all-reduced metrics row (``step``, ``split``, ``loss``, ``acc``, ``dist``, ``chosen_reward``,
            ``rejected_reward``, ``pairs``, ``languages``); {} when there is nothing to evaluate.
        """
        pairs = self.eval_pairs if pairs is None else pairs
        if not pairs:
            return {}
        self.model.eval()
        sampler = GlobalBatchSampler(len(pairs), self.opts.eval_batch_size, self.strategy.world_size,
                                     self.strategy.rank, shuffle=False, drop_last=False)
        metrics = PairMetrics()
        bar = tqdm(total=len(sampler), desc=split, leave=False, dynamic_ncols=True,
                   disable=self.opts.disable_tqdm or not self.strategy.is_main)
        for idx in sampler:
            if not idx:  # this rank has nothing left in the last batch
                if self.strategy.lockstep_forward:  # still join the collective forward, count nothing
                    self._forward(self.collate([pairs[0]]))
                continue
            batch = self.collate([pairs[j] for j in idx])
            loss, chosen, rejected = self._forward(batch)
            metrics.add(loss.item(), chosen, rejected, batch["langs"])
            bar.update(1)
        bar.close()
        row = {"step": self.step, "split": split, **metrics.reduce(self.strategy).result()}
        if log:
            self._log(row)
        return row

