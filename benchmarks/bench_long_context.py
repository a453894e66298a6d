"""Long preference pairs with and without sequence parallelism: peak memory per rank and tokens/s.

For each length in ``--lengths`` one real long pair is built (``scripts/make_long_pairs.py``: earlier hh-rlhf
dialogues joined as history before one pair's real answers, so chosen and rejected share a long prompt), and trained
for ``--warmup`` + ``--steps`` optimizer steps (one pair per step, bf16 autocast, AdamW, gradient checkpointing on all
blocks) on ``S`` ranks for each ``S`` in ``--sp``: ``S = 1`` is one process, ``S > 1`` is ``torchrun --nproc_per_node
S`` with ``--sequence_parallel_size S`` under ``ddp`` (gloo on CPU). Reported per run: the largest peak RSS over the
ranks (training only, after a ``malloc_trim``, as ``bench_memory.py``), the training memory (that peak minus the
resident memory when training starts: activations, gradients and the optimizer state), the step memory (the peak of
the measured steps minus the resident memory before them, optimizer state already allocated: activations and
gradients, the part sequence parallelism divides save the gradients), the step heap (the same, read as the bytes
malloc has handed out and not got back, sampled every 5 ms: live tensors only, where the RSS also keeps what the
allocator freed but did not return), and computed tokens per second.

``--trl`` adds TRL's ``RewardTrainer`` (padded, no sequence parallelism, no prefix sharing) on the same pairs.
``--mmap_threshold 65536`` runs the children with a fixed glibc mmap threshold, so blocks freed during a step go back
to the system and the RSS follows the live heap (glibc's default threshold grows up to 32 MB and keeps freed blocks).

    python benchmarks/bench_long_context.py --model_config small --sp 1 2 --lengths 4096 8192 16384 32768
    python benchmarks/bench_long_context.py --pretrain smollm2-135m --sp 1 3 --lengths 4096 8192
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE, os.path.join(REPO, "scripts")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama")
    p.add_argument("--pretrain", default=None, help="e.g. smollm2-135m (9 heads: S = 3); else --model_config")
    p.add_argument("--model_config", default="small", help="random-init preset (small: 8 heads, 4 key/value heads)")
    p.add_argument("--dataset", nargs="+", default=["hh-rlhf"])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--sp", type=int, nargs="*", default=[1, 2],
                   help="sequence-parallel sizes to run (none: only the --trl rows)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--trl", action="store_true", help="also TRL's RewardTrainer (padded, one process)")
    p.add_argument("--mmap_threshold", type=int, default=0,
                   help="bytes: run the children with glibc's MALLOC_MMAP_THRESHOLD_ set to this (a fixed threshold: "
                        "every larger block is its own mapping, given back to the system when freed); 0 keeps "
                        "glibc's default dynamic threshold")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_tokenizer_for(args):
    """The run's tokenizer (the pretrained backbone's, else SmolLM2's)."""
    from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain
    from coati.models.loading import load_tokenizer

    return load_tokenizer(resolve_pretrain(args.pretrain or SMOLLM2_ALIAS, with_model=False))


def make_pair(tokenizer, raw, tokens: int):
    """One tokenized long pair of at least ``tokens`` tokens (chosen sequence), built from the real pairs ``raw``."""
    import make_long_pairs
    from coati.data.formats import PreferencePair
    from coati.data.template import SequenceEncoder, tokenize_pairs, use_chat_template

    def count(messages):
        return len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
                   ["input_ids"])

    row = make_long_pairs.build(raw, count, tokens, 1)[0]
    pair = PreferencePair(row["prompt"], row["chosen"], row["rejected"], None, "long", "built")
    encoded, _ = tokenize_pairs([pair], SequenceEncoder(tokenizer, max_len=10 ** 9), use_chat_template(tokenizer, "auto"))
    return encoded[0]


def read_pair(path: str):
    """The tokenized pair the parent saved for a child."""
    from coati.data.template import TokenizedPair

    with open(path) as f:
        saved = json.load(f)
    return TokenizedPair(saved["chosen"], saved["rejected"], None, "en", "long")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_mb() -> float:
    """Bytes glibc's malloc has handed out and not got back (``mallinfo2``: in-use chunks of every arena plus
    mmapped blocks), in MB: live tensors, unlike the RSS, which also holds memory freed but kept by the allocator."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2 ** 20


class HeapPeak:
    """The highest :func:`heap_mb` while the ``with`` block runs, sampled every 5 ms by a thread."""

    def __enter__(self) -> "HeapPeak":
        self.start = self.peak = heap_mb()
        self._done = threading.Event()

        def sample():
            while not self._done.is_set():
                self.peak = max(self.peak, heap_mb())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def child(args) -> dict:
    """One run (this process is one rank): train the pair, return this rank's readings (rank 0 gathers them)."""
    import bench_memory
    import torch.distributed as dist

    from coati.config import LoraArgs, ModelArgs, StrategyArgs
    from coati.data.packing import collate_packed
    from coati.losses import log_sig_loss
    from coati.models.loading import build_reward_model
    from coati.strategies import STRATEGIES

    spec = json.loads(args.child)
    pair = read_pair(spec["pair"])
    strategy = STRATEGIES["ddp"](StrategyArgs(strategy="ddp", mixed_precision="bf16",
                                              sequence_parallel_size=spec["sp"]))
    strategy.setup()
    tokenizer = load_tokenizer_for(args)
    torch.manual_seed(0)
    model = build_reward_model(ModelArgs(model=args.model, pretrain=args.pretrain, model_config=args.model_config,
                                         gradient_checkpointing=True), LoraArgs(), tokenizer)
    # train mode, as the trainer sets it: a pretrained model loads in eval mode, where transformers does not
    # recompute (checkpoint) its blocks
    model.train()
    model.sequence_parallel = strategy.sequence_parallel
    wrapped, opt = strategy.prepare(model, lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=True))
    batch = collate_packed([pair], tokenizer.pad_token_id, 0, True)
    before = bench_memory.reset_peak()
    losses, t0, step_start, heap = [], time.perf_counter(), None, HeapPeak()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # optimizer state exists from here: what the measured steps add is the step's own
            step_start = bench_memory.reset_peak() if args.warmup else {"load_peak_rss_mb": 0.0, **before}
            heap.__enter__()
            t0 = time.perf_counter()
        with strategy.autocast():
            rewards = wrapped(**batch.inputs)
        loss = log_sig_loss(rewards[:1], rewards[1:])
        loss.backward()
        strategy.step(opt, 1.0)
        losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    heap.__exit__()
    mine = torch.tensor([max(bench_memory._status_mb("VmHWM"), step_start["load_peak_rss_mb"]),
                         before["start_rss_mb"], step_start["start_rss_mb"], bench_memory._status_mb("VmHWM"),
                         heap.peak - heap.start],
                        dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(strategy.world_size)]
    dist.all_gather(every, mine)
    peaks = [t[0].item() for t in every]
    activations = [t[0].item() - t[1].item() for t in every]
    step_mb = [t[3].item() - t[2].item() for t in every]  # peak of the measured steps over their start
    heap_step = [t[4].item() for t in every]
    strategy.teardown(keep_process_group=True)  # main ends the process with end_process
    return {"peak_rss_mb_max_rank": max(peaks), "activation_mb_max_rank": max(activations),
            "step_mb_max_rank": max(step_mb), "step_heap_mb_max_rank": max(heap_step), "peaks_mb": peaks,
            "computed_tokens": batch.computed_tokens, "tokens_per_s": batch.computed_tokens * args.steps / elapsed,
            "seconds_per_step": elapsed / args.steps, "losses": losses}


def run_trl(args, tokenizer, pair) -> dict:
    """TRL's RewardTrainer on the same pair (padded, chosen and rejected as two sequences), one process."""
    import bench_memory
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from coati.models.backbones import get_backbone
    from coati.models.cache import resolve_pretrain
    from coati.models.loading import build_model

    torch.manual_seed(0)
    if args.pretrain:
        model = AutoModelForSequenceClassification.from_pretrained(resolve_pretrain(args.pretrain), num_labels=1,
                                                                   dtype=torch.float32)
    else:
        model = build_model(get_backbone(args.model), tokenizer, None, args.model_config)
    model.config.pad_token_id = tokenizer.pad_token_id
    data = Dataset.from_dict({"chosen_ids": [pair.chosen_ids] * (args.warmup + args.steps),
                              "rejected_ids": [pair.rejected_ids] * (args.warmup + args.steps)})
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock["before"] = bench_memory.reset_peak()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                clock["step"] = bench_memory.reset_peak()
                clock["heap"] = HeapPeak().__enter__()
                clock["t0"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(output_dir=out, per_device_train_batch_size=1, max_steps=args.warmup + args.steps,
                              learning_rate=1e-5, bf16=True, use_cpu=True, report_to=[], save_strategy="no",
                              max_length=None, gradient_checkpointing=True, disable_dropout=True)
        trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                callbacks=[Clock()])
        trainer.train()
    elapsed = time.perf_counter() - clock["t0"]
    clock["heap"].__exit__()
    tokens = len(pair.chosen_ids) + len(pair.rejected_ids)
    step_peak = bench_memory._status_mb("VmHWM")
    peak = max(step_peak, clock["step"]["load_peak_rss_mb"])
    return {"peak_rss_mb_max_rank": peak, "activation_mb_max_rank": peak - clock["before"]["start_rss_mb"],
            "step_mb_max_rank": step_peak - clock["step"]["start_rss_mb"],
            "step_heap_mb_max_rank": clock["heap"].peak - clock["heap"].start,
            "computed_tokens": tokens, "tokens_per_s": tokens * args.steps / elapsed,
            "seconds_per_step": elapsed / args.steps}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        if args.child.startswith("trl:"):
            result = run_trl(args, load_tokenizer_for(args), read_pair(json.loads(args.child[4:])["pair"]))
        else:
            result = child(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        from coati.strategies.distributed import end_process

        return end_process(0)
    passed = list(argv if argv is not None else sys.argv[1:])
    from coati.data.sources import default_data_dir, load_pairs

    results, tmp = {}, tempfile.mkdtemp(prefix="bench-long-")
    tokenizer = load_tokenizer_for(args)
    raw, _ = load_pairs(args.dataset, default_data_dir(), None, seed=0)
    for length in args.lengths:
        pair = make_pair(tokenizer, raw, length)
        path = os.path.join(tmp, f"pair_{length}.json")
        with open(path, "w") as f:
            json.dump({"chosen": pair.chosen_ids, "rejected": pair.rejected_ids}, f)
        runs = [(f"sp{s}", s) for s in args.sp] + ([("trl", 0)] if args.trl else [])
        for name, s in runs:
            spec = json.dumps({"pair": path, "sp": s})
            launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(s)]
                        if s > 1 else [sys.executable])
            cmd = launcher + [os.path.abspath(__file__), "--child", ("trl:" + spec) if s == 0 else spec] + passed
            try:
                malloc = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      env=dict(os.environ, PYTHONPATH=REPO, **malloc))
            except subprocess.TimeoutExpired:
                results[f"{length}/{name}"] = {"failed": f"timeout after {args.timeout:.0f} s"}
                print(f"{length:6} {name:5} timed out after {args.timeout:.0f} s", flush=True)
                continue
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                results[f"{length}/{name}"] = {"failed": proc.returncode}
                print(f"{length:6} {name:5} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            r = results[f"{length}/{name}"] = json.loads(line[-1][len("RESULT "):])
            r.update(chosen_tokens=len(pair.chosen_ids), rejected_tokens=len(pair.rejected_ids))
            print(f"{length:6} {name:5} peak RSS/rank {r['peak_rss_mb_max_rank']:7.0f} MB  activations/rank "
                  f"{r['activation_mb_max_rank']:7.0f} MB  step/rank {r['step_mb_max_rank']:7.0f} MB  step heap/rank "
                  f"{r['step_heap_mb_max_rank']:7.0f} MB  tokens/s {r['tokens_per_s']:7.1f}  "
                  f"s/step {r['seconds_per_step']:6.1f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**results, "setup": {k: v for k, v in vars(args).items() if k != "child"}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
