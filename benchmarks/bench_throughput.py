"""Training throughput: coati packed vs coati padded vs TRL's RewardTrainer, on the same pairs and tokens.

Every mode trains the same model (same init, full fine-tuning, AdamW) on the same real hh-rlhf pairs, tokenized once
by coati (TRL receives the token ids, so all three see exactly the same tokens); only pairs whose chosen and rejected
sequences both fit ``--max_len`` are used, so nobody truncates or drops anything. Each mode runs in its own child
process (a clean peak-RSS reading) for ``--warmup`` + ``--steps`` optimizer steps; the warm-up steps are not timed.

MFU = model FLOPs per second / a matmul ceiling measured here (square GEMMs, bf16 and fp32). Model FLOPs per real
token = 6 x non-embedding parameters + 12 x layers x hidden x context (Kaplan et al., "Scaling Laws for Neural
Language Models", arXiv 2001.08361, section 2.1; attention term with the mean sequence length as context).

    python benchmarks/bench_throughput.py --pretrain smollm2-135m --pairs 160 --max_len 256 --batch_size 8 --bf16 \
        --steps 8 --json benchmarks/results_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = ("coati_packed", "coati_packed_unshared", "coati_padded", "trl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama", help="backbone family")
    p.add_argument("--pretrain", default=None, help="pretrained weights (e.g. smollm2-135m); else random init")
    p.add_argument("--model_config", default="135m", help="random-init preset when --pretrain is omitted")
    p.add_argument("--dataset", nargs="+", default=["hh-rlhf"], help="datasets (as for training)")
    p.add_argument("--pairs", type=int, default=160, help="pairs to draw the batches from")
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights and optimizer) in every mode")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to train (cuda: peak memory is torch's peak allocation on the GPU)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before timing")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max_tokens_per_batch", type=int, default=0,
                   help="packed row capacity (0 = as training: one row for RoPE backbones, 2 x --max_len for BLOOM)")
    p.add_argument("--gradient_checkpointing", choices=("on", "off"), default="off",
                   help="activation recomputation in the coati modes")
    p.add_argument("--gradient_checkpointing_ratio", type=float, default=1.0,
                   help="share of the blocks recomputed in the coati modes (as training's flag of that name)")
    p.add_argument("--trl_gradient_checkpointing", choices=("on", "off"), default="on",
                   help="activation recomputation in TRL (its RewardConfig default is on)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- shared set-up

def load_setup(args):
    """Tokenizer, the pairs that fit max_len (tokenized once), and a model factory with a fixed init."""
    from coati.data.sources import default_data_dir, load_pairs
    from coati.data.template import SequenceEncoder, tokenize_pairs, use_chat_template
    from coati.models.backbones import get_backbone
    from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain
    from coati.models.loading import build_model, load_tokenizer

    tokenizer = load_tokenizer(resolve_pretrain(args.pretrain or SMOLLM2_ALIAS, with_model=False))
    raw, _ = load_pairs(args.dataset, default_data_dir(), None, seed=args.seed)
    encoder = SequenceEncoder(tokenizer, max_len=10 ** 9)  # no truncation: keep only what fits below
    tokenized, _ = tokenize_pairs(raw[: args.pairs * 4], encoder, use_chat_template(tokenizer, "auto"))
    fits = [p for p in tokenized if max(len(p.chosen_ids), len(p.rejected_ids)) <= args.max_len][: args.pairs]
    if len(fits) < args.batch_size * (args.steps + args.warmup):
        print(f"note: {len(fits)} pairs fit; batches repeat", file=sys.stderr)
    backbone = get_backbone(args.model)

    def make_model():
        torch.manual_seed(args.seed)
        return build_model(backbone, tokenizer, args.pretrain, args.model_config)

    return tokenizer, fits, backbone, make_model


def batches(pairs, batch_size, count, seed):
    """``count`` batches of pair indices in one fixed shuffled order (repeating if needed)."""
    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < batch_size * count:
        order += torch.randperm(len(pairs), generator=g).tolist()
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]


# ---------------------------------------------------------------------------------------------- modes (children)

def run_coati(args, mode: str) -> dict:
    from coati.data.batch import collate_pairs
    from coati.data.packing import collate_packed
    from coati.losses import log_sig_loss
    from coati.models.loading import enable_gradient_checkpointing
    from coati.models.reward_model import RewardModel

    tokenizer, pairs, backbone, make_model = load_setup(args)
    hf_model = make_model()
    if args.gradient_checkpointing == "on":
        enable_gradient_checkpointing(hf_model, args.gradient_checkpointing_ratio)
    model = RewardModel(hf_model, backbone).to(args.device).train()
    # as TRL (transformers' default optim adamw_torch_fused, weight decay 0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    plan = batches(pairs, args.batch_size, args.warmup + args.steps, args.seed)
    share = mode == "coati_packed"
    capacity = backbone.row_capacity(args.max_len, share, args.max_tokens_per_batch)
    real = computed = total = 0
    t0 = None
    for step, idx in enumerate(plan):
        if step == args.warmup:
            t0 = time.perf_counter()
        items = [pairs[i] for i in idx]
        batch = (collate_pairs(items, tokenizer.pad_token_id) if mode == "coati_padded"
                 else collate_packed(items, tokenizer.pad_token_id, capacity, share_prefix=share))
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            rewards = model(**{k: v.to(args.device) for k, v in batch.inputs.items()})
        b = len(items)
        loss = log_sig_loss(rewards[:b], rewards[b:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            real += batch.real_tokens
            computed += batch.computed_tokens
            total += batch.total_tokens
    elapsed = time.perf_counter() - t0
    return finish(args, model.hf_model, elapsed, real, computed, total, len(pairs))


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    tokenizer, pairs, _, make_model = load_setup(args)
    plan = batches(pairs, args.batch_size, args.warmup + args.steps, args.seed)
    # feed TRL the exact batches the coati modes train on, in order (no shuffling of its own)
    rows = [pairs[i] for idx in plan for i in idx]
    data = Dataset.from_dict({"chosen_ids": [p.chosen_ids for p in rows],
                              "rejected_ids": [p.rejected_ids for p in rows]})
    # TRL's collator right-pads each batch to its longest sequence: count what it feeds the model for timed steps
    timed = [[pairs[i] for i in idx] for idx in plan[args.warmup:]]
    real = sum(len(p.chosen_ids) + len(p.rejected_ids) for b in timed for p in b)
    total = sum(2 * len(b) * max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in b) for b in timed)
    clock = {}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                clock["t0"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=len(plan),
                              learning_rate=args.lr, lr_scheduler_type="constant", bf16=args.bf16,
                              use_cpu=args.device == "cpu",
                              logging_steps=10 ** 6, report_to=[], save_strategy="no", max_length=None,
                              dataloader_num_workers=0, seed=args.seed, max_grad_norm=1.0, disable_dropout=True,
                              gradient_checkpointing=args.trl_gradient_checkpointing == "on")
        trainer = RewardTrainer(model=make_model(), args=config, train_dataset=data, processing_class=tokenizer,
                                callbacks=[Clock()])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
        trainer.train()
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - clock["t0"]
        return finish(args, trainer.model, elapsed, real, real, total, len(pairs))


def finish(args, model, elapsed: float, real: int, computed: int, total: int, pool: int) -> dict:
    """One mode's figures. ``real``: tokens of the sequences trained on; ``computed``: non-padding token positions
    the model computed (fewer than ``real`` when prompts are shared); ``total``: positions computed, padding
    included."""
    n_pairs = args.steps * args.batch_size
    config = model.config
    non_emb = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return {"pairs_per_s": n_pairs / elapsed, "tokens_per_s": real / elapsed,
            "computed_tokens_per_s": computed / elapsed, "padding_fraction": 1 - computed / total,
            "shared_prefix_fraction": 1 - computed / real, "computed_tokens": computed, "total_tokens": total,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "pairs_used": n_pairs,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if args.device == "cuda" else None,
            "pairs_pool": pool, "seconds": elapsed, "real_tokens": real, "mean_seq_len": real / (2 * n_pairs),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "non_embedding_params": non_emb}


# ---------------------------------------------------------------------------------------------- parent

def matmul_ceiling(dtype: torch.dtype, device: str = "cpu", n: int = 2048, reps: int = 4, trials: int = 5) -> float:
    """Measured GEMM throughput (FLOP/s) for square ``n`` matrices of ``dtype``: the best of ``trials`` timings."""
    if device == "cuda":
        n, reps = 8192, 20
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_trl(args) if args.child == "trl" else run_coati(args, args.child)
        print("RESULT " + json.dumps(result))
        return 0
    ceilings = {name: matmul_ceiling(dtype, args.device)
                for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    results = {}
    for mode in args.modes:
        passed = argv if argv is not None else sys.argv[1:]
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode] + passed
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{mode} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[mode] = json.loads(line[-1][len("RESULT "):])
    ceiling = ceilings["bf16" if args.bf16 else "fp32"]
    for r in results.values():
        flops_per_token = 6 * r["non_embedding_params"] + 12 * r["layers"] * r["hidden"] * r["mean_seq_len"]
        # only the FLOPs really executed on non-padding positions count (a shared prompt counts once)
        r["model_tflops_per_s"] = r["computed_tokens_per_s"] * flops_per_token / 1e12
        r["mfu"] = r["computed_tokens_per_s"] * flops_per_token / ceiling
    out = {**results, "setup": {k: v for k, v in vars(args).items() if k != "child"},
           "matmul_ceiling_tflops": {k: v / 1e12 for k, v in ceilings.items()},
           "cpu_threads": torch.get_num_threads()}
    header = (f"{'mode':22} {'pairs/s':>8} {'tokens/s':>9} {'padding':>8} {'shared':>7} {'peak MB':>8} {'pairs':>6} "
              f"{'MFU':>6}")
    print(header)
    for mode, r in results.items():
        print(f"{mode:22} {r['pairs_per_s']:8.2f} {r['tokens_per_s']:9.0f} {r['padding_fraction']:8.1%} "
              f"{r['shared_prefix_fraction']:7.1%} {r['peak_rss_mb']:8.0f} {r['pairs_used']:6d} {r['mfu']:6.1%}")
    for mode in ("coati_packed", "coati_packed_unshared"):
        if "trl" in results and mode in results:
            print(f"{mode} / TRL pairs per second: {results[mode]['pairs_per_s'] / results['trl']['pairs_per_s']:.2f}x")
    print(f"matmul ceiling: bf16 {ceilings['bf16'] / 1e12:.3f} TFLOP/s, fp32 {ceilings['fp32'] / 1e12:.3f} TFLOP/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
