"""The training entry point: config -> strategy -> data -> model -> fit -> evaluate -> export."""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import logging
import os
import random
import sys
import time

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from coati.checkpoint import (CheckpointError, ExportError, NonFiniteWeightsError, export_hf, find_resume_checkpoint,
                              fingerprint_mismatch, load_checkpoint_weights, load_resume_checkpoint, read_trainer_state,
                              refuse_foreign_checkpoints, save_resume_checkpoint, verify_checkpoint)
from coati.config import TrainConfig, parse_args
from coati.data.collate import default_row_capacity
from coati.data.formats import DataFormatError
from coati.data.sources import default_data_dir, select_pairs
from coati.data.template import SequenceEncoder, tokenize_pairs, use_chat_template
from coati.losses import build_loss
from coati.models.backbones import get_backbone
from coati.models.loading import (SMOLLM2_ALIAS, CacheError, build_model, enable_gradient_checkpointing,
                                  load_tokenizer, resolve_pretrain, resolve_reward_token)
from coati.models.lora import apply_lora
from coati.models.reward_model import RewardModel
from coati.strategies import StrategyUnavailable, get_strategy
from coati.signals import Interrupted, signals_raise
from coati.trainer import NonFiniteError, Trainer, TrainerOptions

logger = logging.getLogger("coati")

USER_ERRORS = (ValueError, FileNotFoundError, StrategyUnavailable, DataFormatError, PermissionError,
               CheckpointError, NonFiniteError, NonFiniteWeightsError, ExportError, CacheError)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_writable(path: str) -> None:
    """Fail fast when the export folder cannot be written.

    Raises:
        PermissionError: the folder cannot be created or written.
    """
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"--save_path {path} is not writable: {e}") from None


def keep_metrics_until(path: str, step: int) -> None:
    """Drop metrics rows after ``step`` (all of them for a fresh run), so a resumed run appends where it stopped."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(rows if step > 0 else [])


def tokenizer_source(cfg: TrainConfig) -> str:
    """Where the tokenizer comes from: --tokenizer, else the pretrained backbone, else SmolLM2's."""
    if cfg.tokenizer:
        return resolve_pretrain(cfg.tokenizer, with_model=False) if cfg.tokenizer.endswith(".gguf") else cfg.tokenizer
    return resolve_pretrain(cfg.pretrain or SMOLLM2_ALIAS, with_model=False)


#: TrainConfig fields that change what a run computes: a resume checkpoint carries them and refuses a run that differs.
#: (Strategy, logging, checkpoint and packing layout settings are left out: they do not change the math, and a
#: checkpoint resumes under another strategy.)
FINGERPRINT_FIELDS = ("model", "pretrain", "model_config", "tokenizer", "lora_rank", "lora_alpha", "lora_dropout",
                      "lora_train_bias", "loss_fn", "focal_gamma", "penalty", "penalty_weight", "reward_bound",
                      "center_rewards_coefficient", "reward_token", "max_len", "chat_template", "group_by_length",
                      "max_epochs", "max_steps", "lr", "weight_decay", "adam_eps", "warmup_ratio", "max_grad_norm",
                      "bf16", "seed", "init_from")


def run_fingerprint(cfg: TrainConfig, train_tok: list, global_batch: int, total_steps: int) -> dict:
    """What identifies a run: its math-changing settings and the SHA-256 of its training pairs (token ids and
    margins, in order), so a checkpoint never resumes another run's data or settings.

    Returns:
        ``{"settings": {field: value, "global_batch": int, "total_steps": int}, "data_sha256": hex str}``.
    """
    settings = {k: getattr(cfg, k) for k in FINGERPRINT_FIELDS}
    settings.update(global_batch=global_batch, total_steps=total_steps)
    h = hashlib.sha256()
    for p in train_tok:
        h.update(array.array("q", [len(p.chosen_ids), *p.chosen_ids, len(p.rejected_ids), *p.rejected_ids]).tobytes())
        h.update(repr(p.margin).encode())
    return {"settings": settings, "data_sha256": h.hexdigest()}


def check_same_run(path: str, state: dict, fingerprint: dict) -> None:
    """Refuse to resume a checkpoint of another run (one line naming every differing setting).

    Raises:
        CheckpointError: the fingerprints differ.
    """
    diffs = fingerprint_mismatch(state.get("fingerprint"), fingerprint)
    if diffs:
        raise CheckpointError(f"--resume: {path} belongs to another run ({'; '.join(diffs)}); resume with that run's "
                              "settings and data, or start a new run from its weights with --init_from " + path +
                              " and another --save_path")


def run(cfg: TrainConfig) -> dict:
    """Train, evaluate and export; returns the summary written to ``<save_path>/summary.json``."""
    t_start = time.perf_counter()
    strategy = get_strategy(cfg.strategy, zero_stage=cfg.zero_stage, cpu_offload=cfg.cpu_offload,
                            dist_timeout=cfg.dist_timeout, lora=cfg.lora_rank > 0,
                            zero_cpu_offload=cfg.zero_cpu_offload, placement_policy=cfg.placement_policy,
                            mixed_precision=cfg.mixed_precision, max_grad_norm=cfg.max_grad_norm,
                            accumulation_steps=cfg.accumulation_steps,
                            resume_checkpoints=cfg.save_every > 0 or bool(cfg.resume))
    backbone = get_backbone(cfg.model)
    loss_fn = build_loss(cfg.loss_fn, penalty=cfg.penalty, penalty_weight=cfg.penalty_weight,
                         reward_bound=cfg.reward_bound, focal_gamma=cfg.focal_gamma,
                         center_rewards_coefficient=cfg.center_rewards_coefficient)
    check_writable(cfg.save_path)
    if not cfg.resume:
        refuse_foreign_checkpoints(cfg.save_path)
    init_weights = None  # a resume checkpoint whose model weights start this run (--init_from)
    if cfg.init_from:
        if os.path.isfile(os.path.join(cfg.init_from, "manifest.json")):
            verify_checkpoint(cfg.init_from)
            init_weights = cfg.init_from
        elif os.path.isfile(os.path.join(cfg.init_from, "config.json")):
            cfg = dataclasses.replace(cfg, pretrain=cfg.init_from)  # an export: backbone, value head and tokenizer
        else:
            raise CheckpointError(f"--init_from {cfg.init_from}: neither a resume checkpoint (no manifest.json) nor "
                                  "an export folder (no config.json)")
    # model files (a GGUF de-quantized into the cache) are prepared before the process group exists: once, under a
    # file lock, so every rank then loads the same complete folder
    tok_source = tokenizer_source(cfg)
    if cfg.pretrain:
        resolve_pretrain(cfg.pretrain)
    strategy.setup()
    main = strategy.is_main
    if main:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    seed_everything(cfg.seed)

    tokenizer = load_tokenizer(tok_source, cfg.trust_remote_code, cfg.reward_token)
    reward_token_id = resolve_reward_token(tokenizer, cfg.reward_token)
    data_dir = cfg.data_dir or default_data_dir()
    data = select_pairs(cfg.dataset, data_dir, cfg.max_samples, cfg.strict_data, cfg.seed, cfg.eval_dataset,
                        cfg.max_eval_samples, cfg.eval_split)
    chat = use_chat_template(tokenizer, cfg.chat_template)
    encoder = SequenceEncoder(tokenizer, cfg.max_len, reward_token_id)
    train_tok, train_trunc = tokenize_pairs(data.train, encoder, chat)
    eval_tok, eval_trunc = tokenize_pairs(data.eval, encoder, chat)
    if main:
        logger.info("data:\n%s", data.report.summary())
        if data.eval_report is not None:
            logger.info("eval data:\n%s", data.eval_report.summary())
        logger.info("train: %s", train_trunc.summary())
        logger.info("eval: %s", eval_trunc.summary())
        logger.info("chat template: %s; train pairs %d, eval pairs %d, world size %d, device %s", chat,
                    len(train_tok), len(eval_tok), strategy.world_size, strategy.device)

    seed_everything(cfg.seed)
    hf_model = build_model(backbone, tokenizer, cfg.pretrain, cfg.model_config, cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(hf_model, cfg.gradient_checkpointing_ratio)
    if cfg.lora_rank > 0:
        hf_model = apply_lora(hf_model, backbone.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                              cfg.lora_train_bias)
    reward_model = RewardModel(hf_model, backbone.uses_position_ids)
    if main:
        n_train = sum(p.numel() for p in reward_model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in reward_model.parameters())
        logger.info("model: %s, %.1fM parameters, %.2fM trainable", cfg.model, n_all / 1e6, n_train / 1e6)

    def make_optimizer(params):
        # the fused kernel (as transformers' default adamw_torch_fused): one pass over the parameters; measured
        # 0.56 s -> 0.06 s per step for SmolLM2-135M on 2 CPU cores (benchmarks/README.md)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps, fused=True)

    model, optimizer = strategy.prepare(reward_model, make_optimizer)
    if init_weights:
        load_checkpoint_weights(init_weights, strategy, model)
        if main:
            logger.info("initialised the weights from %s (new optimizer, schedule and step)", cfg.init_from)
    metrics_path = os.path.join(cfg.save_path, "metrics.jsonl")
    opts = TrainerOptions(batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
                          accumulation_steps=cfg.accumulation_steps, max_epochs=cfg.max_epochs,
                          max_steps=cfg.max_steps, max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16, seed=cfg.seed,
                          log_every=cfg.log_every, eval_every=cfg.eval_every, padding_side=cfg.padding_side,
                          metrics_path=metrics_path, disable_tqdm=cfg.disable_tqdm, save_every=cfg.save_every,
                          packing=cfg.packing, share_prefix=cfg.share_prefix,
                          max_tokens_per_batch=cfg.max_tokens_per_batch or default_row_capacity(
                              reward_model.packed_attention, cfg.max_len, cfg.share_prefix),
                          group_by_length=cfg.group_by_length, max_bad_steps=cfg.max_bad_steps)
    trainer = Trainer(strategy, model, optimizer, None, loss_fn, train_tok, eval_tok,
                      tokenizer.pad_token_id, opts)
    total = trainer.total_steps
    if total == 0:
        raise ValueError(f"{len(train_tok)} training pairs make no optimizer step with batch_size {cfg.batch_size} "
                         f"x {strategy.world_size} processes x accumulation {cfg.accumulation_steps}")
    trainer.scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    global_batch = cfg.batch_size * cfg.accumulation_steps * strategy.world_size
    fingerprint = run_fingerprint(cfg, train_tok, global_batch, total)
    resume_from = find_resume_checkpoint(cfg.save_path, cfg.resume) if cfg.resume else None
    if resume_from:
        check_same_run(resume_from, read_trainer_state(resume_from), fingerprint)
        state = load_resume_checkpoint(resume_from, strategy, model, optimizer, trainer.scheduler)
        trainer.step = state["step"]
        if main:
            logger.info("resumed from %s at step %d (written under %s)", resume_from, trainer.step, state["strategy"])
    if main:
        keep_metrics_until(metrics_path, trainer.step)
    run_state = {"fingerprint": fingerprint}  # seed, global batch, steps and data are all in it
    trainer.on_save = lambda step: save_resume_checkpoint(cfg.save_path, step, strategy, model, optimizer,
                                                          trainer.scheduler, run_state, cfg.keep_last)
    t_fit, start_step = time.perf_counter(), trainer.step
    trainer.fit()
    fit_s = time.perf_counter() - t_fit
    final_eval = trainer.evaluate() if eval_tok else {}

    pairs_trained = (trainer.step - start_step) * global_batch
    summary = {"steps": trainer.step, "train_pairs": len(train_tok), "eval_pairs": len(eval_tok),
               "world_size": strategy.world_size, "fit_seconds": fit_s, "train_seconds": trainer.train_seconds,
               "train_pairs_per_s": pairs_trained / max(trainer.train_seconds, 1e-9),
               "train_tokens_per_s": trainer.train_tokens / max(trainer.train_seconds, 1e-9),
               "skipped_steps": trainer.skipped_steps, "train_last_epoch": trainer.epoch_metrics,
               "eval": final_eval, "data": data.report.to_dict(),
               "truncation": {"train": vars(train_trunc), "eval": vars(eval_trunc)}}
    export_model = strategy.state_dict_for_export(model)
    if main:
        # reward statistics for normalised scoring (as OpenRLHF stores them): eval set, else the last train epoch
        stats = final_eval or trainer.epoch_metrics
        extra = {"reward_token_id": reward_token_id}
        if stats.get("pairs"):
            extra.update(reward_mean=stats["reward_mean"], reward_std=stats["reward_std"],
                         reward_stats_source="eval" if final_eval else "train_last_epoch")
        # the data folder actually used, so `coati.evaluate --heldout` finds the same pairs in a new shell
        recipe = dict(cfg.to_dict(), data_dir=os.path.abspath(data_dir) if data_dir else None)
        summary["wall_seconds"] = time.perf_counter() - t_start
        export_hf(export_model.model, tokenizer, cfg.save_path, recipe, extra_config=extra,
                  extra_json={"summary.json": summary})
        if final_eval:
            logger.info("eval: acc %.4f dist %.4f loss %.4f over %d pairs %s", final_eval["acc"], final_eval["dist"],
                        final_eval["loss"], final_eval["pairs"],
                        json.dumps({k: {"acc": round(v["acc"], 4), "dist": round(v["dist"], 4), "pairs": v["pairs"]}
                                    for k, v in final_eval["languages"].items()}))
        logger.info("exported to %s (%.0f s in all, %.0f s training)", cfg.save_path, summary["wall_seconds"], fit_s)
    strategy.barrier()
    strategy.teardown()
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse flags, run, and turn user mistakes into one clear line on stderr.

    Exit codes: 0 done; 2 a user error (bad flag, data, checkpoint, non-finite weights, failed export); 130 / 143
    stopped by SIGINT / SIGTERM (after a resume checkpoint when ``--save_every`` is on).
    """
    cfg = parse_args(argv)
    # the same mistake is found by every rank: say it once (rank 0); anything else is a crash of the rank
    # that raised it, shown by that rank, and torchrun then stops the others
    say = os.environ.get("RANK", "0") == "0"
    with signals_raise("training"):
        try:
            run(cfg)
        except Interrupted as e:
            if say:
                print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:  # SIGINT before the handlers were installed
            if say:
                print("error: training was interrupted by SIGINT", file=sys.stderr)
            return 130
        except USER_ERRORS as e:
            if say:
                print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
