"""Training memory: full fine-tuning, LoRA (fp32 base), LoRA (bf16 base), QLoRA, and TRL's QLoRA, on the same pairs.

Every mode trains the same backbone (same checkpoint, same value-head init) on the same real hh-rlhf pairs in the
same batches, bf16 autocast, AdamW, for ``--warmup`` + ``--steps`` optimizer steps, each in its own child process:

- ``full``: full fine-tuning (fp32 weights, gradients and AdamW state);
- ``lora_fp32_base``: LoRA with the frozen backbone stored in fp32 (coati before QLoRA);
- ``lora_bf16_base``: LoRA with the frozen linear weights stored in bf16 (coati's LoRA under bf16 now);
- ``qlora``: ``--load_in_4bit`` (NF4, double quantisation, bf16 compute) + LoRA, value head fp32;
- ``trl_qlora``: TRL's QLoRA path: ``AutoModelForSequenceClassification`` + ``BitsAndBytesConfig`` (the same NF4
  settings) + a peft ``LoraConfig`` handed to ``RewardTrainer`` (its padded batches, the same pairs in the same order).

LoRA everywhere: rank ``--lora_rank`` on the backbone's attention and MLP projections, the value head trained in full.
Peak memory on CPU is the process's peak RSS twice: over the whole run (loading included) and over training only
(the kernel's high-water mark is reset, ``/proc/self/clear_refs``, just before the first step); on CUDA it is
``torch.cuda.max_memory_allocated``. A random-init preset (``--model_config 1b``) is built once and saved to a temporary
folder (in bf16 by default, as released checkpoints are), so every mode (and 4-bit loading) reads the same checkpoint.

    python benchmarks/bench_memory.py --pretrain smollm2-135m --json benchmarks/results_memory_135m.json
    python benchmarks/bench_memory.py --model_config 1b --modes lora_fp32_base lora_bf16_base qlora trl_qlora \
        --json benchmarks/results_memory_1b.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

MODES = ("full", "lora_fp32_base", "lora_bf16_base", "qlora", "trl_qlora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama", help="backbone family")
    p.add_argument("--pretrain", default=None, help="pretrained weights (e.g. smollm2-135m); else --model_config")
    p.add_argument("--model_config", default="1b", help="random-init preset, saved once to a temporary folder")
    p.add_argument("--checkpoint_dtype", choices=("bf16", "fp32"), default="bf16",
                   help="dtype the random-init preset is saved in (released checkpoints ship bf16)")
    p.add_argument("--dataset", nargs="+", default=["hh-rlhf"])
    p.add_argument("--pairs", type=int, default=64, help="pairs to draw the batches from")
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--gradient_checkpointing", choices=("on", "off"), default="on",
                   help="activation recomputation in every mode (TRL's RewardConfig default is on)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak() -> dict:
    """Start a new peak-memory reading: the CUDA allocator's, or the kernel's RSS high-water mark (VmHWM).

    Memory that loading freed is handed back to the kernel first (``gc.collect`` and glibc's ``malloc_trim``), so the
    new mark starts from what is live, not from what the allocator kept after loading. Returns the readings the reset
    ends: ``load_peak_rss_mb`` (the high-water mark of loading) and ``start_rss_mb`` (resident when training starts).
    """
    load_peak = _status_mb("VmHWM")
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the mark starts from the RSS as it is
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return {"load_peak_rss_mb": load_peak, "start_rss_mb": _status_mb("VmRSS")}


def peak_mb(device: str, before: dict) -> dict:
    """The training high-water marks (RSS, MB; on CUDA also ``max_memory_allocated``, MiB) and the run's overall peak."""
    train = _status_mb("VmHWM")
    return {"train_peak_rss_mb": train, "run_peak_rss_mb": max(train, before["load_peak_rss_mb"]), **before,
            "train_peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None}


def setup(args):
    """The tokenizer, the pairs (as bench_throughput: tokenized once, only those that fit) and the batch plan."""
    import bench_throughput

    tokenizer, pairs, backbone, _ = bench_throughput.load_setup(args)
    plan = bench_throughput.batches(pairs, args.batch_size, args.warmup + args.steps, args.seed)
    return tokenizer, pairs, backbone, plan


def run_coati(args, mode: str) -> dict:
    from coati.config import LoraArgs, ModelArgs
    from coati.data.packing import collate_packed
    from coati.losses import log_sig_loss
    from coati.models.loading import build_reward_model

    tokenizer, pairs, backbone, plan = setup(args)
    torch.manual_seed(args.seed)
    model_args = ModelArgs(model=args.model, pretrain=args.pretrain, load_in_4bit=mode == "qlora",
                           gradient_checkpointing=args.gradient_checkpointing == "on")
    lora = LoraArgs(lora_rank=0 if mode == "full" else args.lora_rank, lora_alpha=2.0 * args.lora_rank)
    compute = torch.float32 if mode == "lora_fp32_base" else torch.bfloat16  # the dtype the frozen base is kept in
    model = build_reward_model(model_args, lora, tokenizer, compute, args.device).to(args.device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=True)
    capacity = backbone.row_capacity(args.max_len, True)
    before = reset_peak()
    losses, t0 = [], None
    for step, idx in enumerate(plan):
        if step == args.warmup:
            t0 = time.perf_counter()
        items = [pairs[i] for i in idx]
        batch = collate_packed(items, tokenizer.pad_token_id, capacity)
        with torch.autocast(args.device, dtype=torch.bfloat16):
            rewards = model(**{k: v.to(args.device) for k, v in batch.inputs.items()})
        loss = log_sig_loss(rewards[:len(items)], rewards[len(items):])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if args.device == "cuda":
        torch.cuda.synchronize()
    return finish(args, model, time.perf_counter() - t0, losses, before)


def run_trl(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from coati.models.cache import resolve_pretrain

    tokenizer, pairs, backbone, plan = setup(args)
    rows = [pairs[i] for idx in plan for i in idx]  # the coati modes' batches, in order
    data = Dataset.from_dict({"chosen_ids": [p.chosen_ids for p in rows],
                              "rejected_ids": [p.rejected_ids for p in rows]})
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrain(args.pretrain), num_labels=1, quantization_config=bnb, dtype=torch.float32,
        device_map={"": args.device}, pad_token_id=tokenizer.pad_token_id)
    targets = [t for t in backbone.lora_targets if any(n.endswith(t) for n, _ in model.named_modules())]
    peft_config = LoraConfig(r=args.lora_rank, lora_alpha=2.0 * args.lora_rank, target_modules=targets,
                             modules_to_save=["score"], task_type="SEQ_CLS")
    clock, losses = {}, []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock["before"] = reset_peak()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                clock["t0"] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=len(plan),
                              learning_rate=args.lr, lr_scheduler_type="constant", bf16=True,
                              use_cpu=args.device == "cpu", logging_steps=1, report_to=[], save_strategy="no",
                              max_length=None, dataloader_num_workers=0, seed=args.seed, max_grad_norm=1.0,
                              disable_dropout=True, gradient_checkpointing=args.gradient_checkpointing == "on")
        trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                peft_config=peft_config, callbacks=[Clock()])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
        trainer.train()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return finish(args, trainer.model, time.perf_counter() - clock["t0"], losses, clock["before"])


def finish(args, model, elapsed: float, losses: list[float], before: dict) -> dict:
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"pairs_per_s": args.steps * args.batch_size / elapsed, "seconds": elapsed, "losses": losses,
            "parameter_mb": stored / 2 ** 20, "trainable_params": trainable, **peak_mb(args.device, before)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_trl(args) if args.child == "trl_qlora" else run_coati(args, args.child)
        print("RESULT " + json.dumps(result))
        return 0
    passed = list(argv if argv is not None else sys.argv[1:])
    folder = None
    if args.pretrain is None:  # one random-init checkpoint for every mode
        from coati.models.backbones import get_backbone
        from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain
        from coati.models.loading import build_model, load_tokenizer

        folder = tempfile.mkdtemp(prefix=f"bench-memory-{args.model_config}-")
        tokenizer = load_tokenizer(resolve_pretrain(SMOLLM2_ALIAS, with_model=False))
        torch.manual_seed(args.seed)
        model = build_model(get_backbone(args.model), tokenizer, None, args.model_config)
        model.to(torch.bfloat16 if args.checkpoint_dtype == "bf16" else torch.float32).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        passed += ["--pretrain", folder]
    results = {}
    try:
        for mode in args.modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode] + passed
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
                results[mode] = {"failed": proc.returncode}
                continue
            results[mode] = json.loads(line[-1][len("RESULT "):])
            r = results[mode]
            print(f"{mode:16} pairs/s {r['pairs_per_s']:6.2f}  train peak RSS {r['train_peak_rss_mb']:8.0f} MB  "
                  f"start RSS {r['start_rss_mb']:6.0f} MB  load peak RSS {r['load_peak_rss_mb']:6.0f} MB  parameters {r['parameter_mb']:8.0f} MB  "
                  f"losses {[round(x, 4) for x in r['losses']]}", flush=True)
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    setup_info = {k: v for k, v in vars(args).items() if k != "child"}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**results, "setup": setup_info, "cpu_threads": torch.get_num_threads()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
