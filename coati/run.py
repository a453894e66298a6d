"""A training run composed from a validated config (no argv): model files -> strategy -> data -> model -> fit ->
evaluate -> export. The command line that builds the config is :mod:`coati.cli.train`."""

from __future__ import annotations

import logging
import os
import random
import time

import numpy as np
import torch

from coati.checkpoint.export import LENGTH_HEAD_FILE, export_hf
from coati.checkpoint.fingerprint import run_fingerprint
from coati.checkpoint.resume import (init_from_kind, load_checkpoint_weights, prepare_save_path, resume_run,
                                     save_resume_checkpoint)
from coati.config import OptimArgs, TrainConfig
from coati.data.prepare import RunData, make_loaders, prepare_data
from coati.data.sources import content_digest, pairs_digest
from coati.losses import auto_tie_param, build_loss
from coati.model_card import render_model_card
from coati.models.cache import base_model_info, resolve_pretrain
from coati.models.loading import build_reward_model, prepare_model_files, resolve_model
from coati.preflight import check_model_fits, sequence_parallel_problems
from coati.reporting import MetricsLog
from coati.strategies import STRATEGIES
from coati.trainer import NonFiniteError, Trainer, plan_steps, plan_warmup

logger = logging.getLogger("coati")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(optim: OptimArgs):
    """``params -> AdamW`` with the run's settings; the fused kernel (as transformers' default adamw_torch_fused):
    one pass over the parameters, measured 0.56 s -> 0.06 s per step for SmolLM2-135M on 2 CPU cores
    (benchmarks/README.md)."""
    return lambda params: torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, eps=optim.adam_eps,
                                            fused=True)


def summarize(trainer: Trainer, data: RunData, final_eval: dict, global_batch: int, fit_s: float,
              start_step: int) -> dict:
    """The run's ``summary.json``: steps (done, planned, whether ``--max_train_minutes`` ended training first), pairs,
    speed, skipped steps, the last epoch's and the final metrics."""
    seconds = max(trainer.train_seconds, 1e-9)
    return {"steps": trainer.step, "total_steps": trainer.total_steps, "stopped_by_time": trainer.stopped_by_time,
            "train_pairs": len(data.train), "eval_pairs": len(data.eval),
            "eval_pairs_sha256": pairs_digest(data.selection.eval),
            "world_size": trainer.strategy.world_size, "sequence_parallel_size": trainer.strategy.sp_size,
            "fit_seconds": fit_s, "train_seconds": trainer.train_seconds,
            "train_pairs_per_s": (trainer.step - start_step) * global_batch / seconds,
            "train_tokens_per_s": trainer.train_tokens / seconds, "skipped_steps": trainer.skipped_steps,
            "train_last_epoch": trainer.epoch_metrics, "eval": final_eval, "data": data.selection.report.to_dict(),
            "truncation": {k: vars(v) for k, v in data.truncation.items()}}


def export(cfg: TrainConfig, model, tokenizer, reward_token_id: int, data: RunData, summary: dict,
           final_eval: dict, epoch_metrics: dict) -> None:
    """Write the export (main rank): the model, tokenizer, ``train_config.json`` (a recipe that reproduces the run,
    with the data folder actually used, so ``coati.evaluate --heldout`` finds the same pairs in a new shell), the
    reward statistics for normalised scoring (as OpenRLHF stores them: eval set, else the last train epoch),
    ``summary.json``, with ``--length_head`` the length head's ``[1, hidden]`` weight as ``length_head.safetensors``
    (the export's own value head ``score`` is the quality head: a plain reward model), and the ``README.md`` model card (:func:`coati.model_card.render_model_card`: base model and
    license, recipe, data counts, final held-out figures)."""
    stats = final_eval or epoch_metrics
    extra = {"reward_token_id": reward_token_id}
    if stats.get("pairs"):
        extra.update(reward_mean=stats["reward_mean"], reward_std=stats["reward_std"],
                     reward_stats_source="eval" if final_eval else "train_last_epoch")
    recipe = dict(cfg.to_dict(), data_dir=os.path.abspath(data.data_dir) if data.data_dir else None)
    summary["train_config_sha256"] = content_digest(recipe)  # checked by the scorer: an edited recipe is refused
    card = render_model_card(cfg.to_dict(), summary, *base_model_info(cfg.backbone.pretrain))
    heads = {} if model.length_head is None else {
        LENGTH_HEAD_FILE: {"weight": model.length_head.weight.detach().float().cpu().contiguous()}}
    export_hf(model.model, tokenizer, cfg.log.save_path, recipe, extra_config=extra,
              extra_json={"summary.json": summary}, adapter=cfg.log.export_adapter, extra_text={"README.md": card},
              extra_tensors=heads)
    if final_eval:
        langs = {k: {"acc": round(v["acc"], 4), "dist": round(v["dist"], 4), "pairs": v["pairs"]}
                 for k, v in final_eval["languages"].items()}
        logger.info("eval: acc %.4f dist %.4f loss %.4f over %d pairs %s", final_eval["acc"], final_eval["dist"],
                    final_eval["loss"], final_eval["pairs"], langs)


def check_updates_applied(trainer: Trainer, data: RunData, start_step: int) -> None:
    """Refuse to call a run good when none of its optimizer steps updated the weights (each one skipped for a
    non-finite loss or gradient, fewer in a row than ``--max_bad_steps``): the export would be the initial model.

    Raises:
        NonFiniteError: one line with the steps skipped, whether for the loss or the gradient, and the training
            data's largest ``|margin|`` when it has margins (a margin column the loss cannot use shows up here).
    """
    done = trainer.step - start_step
    if done == 0 or trainer.applied_steps:
        return
    margins = [abs(p.margin) for p in data.train if p.margin is not None]
    hint = f"; the training data's largest |margin| is {max(margins):.3g}" if margins else ""
    loss = trainer.skipped_for_loss
    raise NonFiniteError(f"none of the {done} optimizer steps of this run updated the weights: {loss} had a "
                         f"non-finite loss and {done - loss} a non-finite gradient norm (fewer in a row than "
                         f"--max_bad_steps {trainer.optim.max_bad_steps}){hint}; nothing was exported. Check the "
                         "data, lower --lr, or train in fp32")


def resolve_tie_param(cfg, pairs: list, log: bool = False):
    """``cfg`` with ``--tie_param auto`` resolved from the training pairs (:func:`coati.losses.auto_tie_param` of the
    share of tied comparisons among all of theirs), so that train_config.json and the resume fingerprint record the
    value used; ``cfg`` itself under ``--ties drop`` or with a value given.

    Raises:
        ValueError: the training comparisons are all ties (nothing to rank).
    """
    if cfg.data.ties == "drop" or cfg.loss.tie_param is not None:
        return cfg
    ties = sum(len(p.ties()) for p in pairs)
    strict = sum(len(p.comparisons()) for p in pairs)
    if not strict:
        raise ValueError(f"--ties {cfg.data.ties}: the {ties} training comparisons are all ties, so there is no "
                         "preference to learn")
    nu = auto_tie_param(cfg.data.ties, ties / (ties + strict))
    if log:
        logger.info("--ties %s: %d of %d training comparisons are ties; --tie_param auto = %.4f", cfg.data.ties, ties,
                    ties + strict, nu)
    return cfg.replace(tie_param=nu)


def run(cfg: TrainConfig, exit_after: bool = False) -> dict:
    """Train, evaluate and export a validated config (:func:`coati.cli.train.parse_args`) into its ``--save_path``,
    checked and locked for the run (:func:`coati.checkpoint.resume.prepare_save_path`); returns the summary written to
    ``<save_path>/summary.json``.

    ``exit_after``: the caller ends the process right after a successful run (the CLI does, with ``os._exit``), so a
    process group of several ranks is left for the operating system to reclaim rather than destroyed (see
    :meth:`coati.strategies.distributed.ProcessGroupMixin.teardown` for the gloo deadlock that avoids)."""
    t_start = time.perf_counter()
    lock = prepare_save_path(cfg.log.save_path, resuming=bool(cfg.optim.resume), overwrite=cfg.log.overwrite_output_dir)
    try:
        return _run(cfg, t_start, exit_after)
    finally:
        lock.release()


def _run(cfg: TrainConfig, t_start: float, exit_after: bool) -> dict:
    init_from = cfg.optim.init_from and init_from_kind(cfg.optim.init_from)
    if init_from == "export":
        cfg = cfg.replace(pretrain=cfg.optim.init_from)
    tokenizer, reward_token_id = prepare_model_files(cfg.backbone)
    family, chosen = resolve_model(cfg.backbone)
    if family != cfg.backbone.model:  # --model auto: the recipe written with the export names the family
        cfg = cfg.replace(model=family)
    # again now that the family is known and a GGUF checkpoint is converted (its config.json readable)
    sp = cfg.strategy.sequence_parallel_size > 1
    folder = resolve_pretrain(cfg.backbone.pretrain) if sp and cfg.backbone.pretrain else None
    if problems := sequence_parallel_problems(cfg, folder):
        raise ValueError("; ".join(problems))
    strategy = STRATEGIES[cfg.strategy.strategy](cfg.strategy)
    strategy.setup()
    try:
        return _train(cfg, strategy, tokenizer, reward_token_id, chosen, init_from, t_start, exit_after)
    except BaseException:
        strategy.abandon()  # a run that failed in this process leaves no process group behind
        raise


def _train(cfg: TrainConfig, strategy, tokenizer, reward_token_id: int, chosen: str | None, init_from: str | None,
           t_start: float, exit_after: bool) -> dict:
    save_path = cfg.log.save_path
    main = strategy.is_main
    if main:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        if chosen:
            logger.info(chosen)
    seed_everything(cfg.optim.seed)
    data = prepare_data(cfg.data, cfg.optim.seed, tokenizer, reward_token_id)
    cfg = resolve_tie_param(cfg, data.train, main)
    if main:
        layout = f" ({strategy.data_world_size} data-parallel x {strategy.sp_size} sequence-parallel)" \
            if strategy.sp_size > 1 else ""
        logger.info("%s\nworld size %d%s, device %s", data.summary(), strategy.world_size, layout, strategy.device)

    seed_everything(cfg.optim.seed)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.strategy.mixed_precision, torch.float32)
    reward_model = build_reward_model(cfg.backbone, cfg.lora, tokenizer, compute_dtype, strategy.device)
    check_model_fits(cfg, reward_model.model.config, main)
    reward_model.sequence_parallel = strategy.sequence_parallel
    if cfg.loss.length_head:
        reward_model.add_length_head()
    if main:
        n_train = sum(p.numel() for p in reward_model.parameters() if p.requires_grad)
        stored = sum(p.numel() * p.element_size() for p in reward_model.parameters())
        kind = "4-bit" if cfg.backbone.load_in_4bit else "8-bit" if cfg.backbone.load_in_8bit else "fp32"
        if cfg.lora.uses_lora and not cfg.backbone.quantized:
            kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype, kind)
        logger.info("model: %s (%s backbone), parameters stored in %.1f MB, %.2fM trainable", cfg.backbone.model,
                    kind, stored / 2**20, n_train / 1e6)
    optim = cfg.optim
    if init_from == "checkpoint":  # into the plain module: every strategy then wraps (or casts) the loaded weights
        load_checkpoint_weights(optim.init_from, strategy, reward_model)
        if main:
            logger.info("initialised the weights from %s (new optimizer, schedule and step)", optim.init_from)
    model, optimizer = strategy.prepare(reward_model, make_optimizer(optim), accumulates=optim.accumulation_steps > 1)
    capacity = reward_model.backbone.row_capacity(cfg.data.max_len, cfg.data.share_prefix,
                                                  cfg.data.max_tokens_per_batch)
    train, evaluation = make_loaders(data, cfg.data, optim.batch_size, optim.eval_batch_size or optim.batch_size,
                                     optim.seed, tokenizer.pad_token_id, capacity, strategy,
                                     cfg.loss.list_weighting, cfg.loss.margin_from_scores,
                                     cache_prompt=not cfg.backbone.gradient_checkpointing and strategy.sp_size == 1
                                     and reward_model.can_cache_prompt)
    total = plan_steps(len(train), optim)[1]
    if total == 0:
        raise ValueError(f"{len(data.train)} training pairs make no optimizer step with batch_size "
                         f"{optim.batch_size} x {strategy.data_world_size} data-parallel processes x accumulation "
                         f"{optim.accumulation_steps}")
    # imported here: transformers.optimization pulls in trainer_utils -> peft -> bitsandbytes (about 2.5 s of a
    # process start on a 2-core CPU), which a run that stops at a data or setup error never needs
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, plan_warmup(total, optim), total)
    global_batch = optim.batch_size * optim.accumulation_steps * strategy.data_world_size
    run_state = {"fingerprint": run_fingerprint(cfg.to_dict(), data.train, global_batch, total)}
    start = resume_run(save_path, optim.resume, run_state["fingerprint"], strategy, model, optimizer,
                       scheduler) if optim.resume else 0
    metrics_log = MetricsLog(save_path, cfg.log.report_to, cfg.to_dict(), start) if main else None
    try:
        trainer = Trainer(strategy, model, optimizer, scheduler, build_loss(cfg.loss, cfg.data.ties), train,
                          evaluation, optim,
                          cfg.log,
                          write_row=metrics_log.write if metrics_log else None,
                          on_save=lambda step: save_resume_checkpoint(save_path, step, strategy, model, optimizer,
                                                                      scheduler, run_state, optim.keep_last),
                          start_step=start, length_head=(cfg.loss.length_loss_weight, cfg.loss.orthogonal_loss_weight)
                          if cfg.loss.length_head else None, length_groups=cfg.loss.length_groups)
        t_fit = time.perf_counter()
        trainer.fit()
        fit_s = time.perf_counter() - t_fit
        check_updates_applied(trainer, data, start)
        final_eval = trainer.evaluate()
    finally:
        if metrics_log:
            metrics_log.close()
    summary = summarize(trainer, data, final_eval, global_batch, fit_s, start)
    export_model = strategy.export_model(model)
    if main:
        summary["wall_seconds"] = time.perf_counter() - t_start
        export(cfg, export_model, tokenizer, reward_token_id, data, summary, final_eval, trainer.epoch_metrics)
        logger.info("exported to %s (%.0f s in all, %.0f s training)", save_path, summary["wall_seconds"], fit_s)
    strategy.barrier()
    strategy.teardown(keep_process_group=exit_after)
    return summary
