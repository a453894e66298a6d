"""Where a training step of the main job keeps its memory: one process, the main job's batches, step by step.

Builds the model and the training batches exactly as ``train_reward_model.py --config examples/rm_bilingual.yaml``
does for rank 0 of 2 processes (extra flags are passed on, e.g. ``--mixed_precision fp32 --batch_size 8``), then
runs ``--steps`` forward + backward passes (no optimizer step: the memory of one step is the question) and prints
for each:

- the tensors autograd keeps for backward, summed by kind (``n x n`` attention scores, the MLP's 1536-wide
  activations, the 576-wide ones, ...), each storage counted once and the parameters not at all;
- the bytes glibc's malloc has handed out and not got back (``mallinfo2``, sampled every 3 ms): the live heap,
  before the step, after its forward, and at its peak (``--sample_ms 0`` turns the sampler off, for timings);
- the process's RSS after the forward and after the backward, and its high-water mark (``VmHWM``) so far.

The difference between the RSS and the live heap is what glibc keeps of freed memory. Switches for the experiments
of benchmarks/README.md ("Main job memory"):

    --keep_scores        keep the written-out attention's scores for backward (coati before the change)
    --split              every group through the split SDPA path (``SPLIT_ATTENTION_MIN_LEN`` 0)
    --heap_trim N        malloc_trim every N blocks, forward and backward (what the trainer does on CPU: 3)
    --heap_trim_forward_only   the same in forward only
    --mmap_threshold B   glibc's mmap threshold fixed at B bytes (``mallopt``, as ``MALLOC_MMAP_THRESHOLD_``)
    --layers L           keep only the first L blocks (to read a bf16 step's make-up where bf16 is slow)

    COATI_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/bench_step_memory.py --steps 2 \
        --mixed_precision fp32 --heap_trim 3
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import os
import sys
import threading
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = _MallInfo2
M_MMAP_THRESHOLD = -3


def live_heap_mb() -> float:
    """Bytes malloc has handed out and not got back: in-use chunks of every arena plus mmapped blocks."""
    info = LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2 ** 20


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def kind(t: torch.Tensor) -> str:
    shape = tuple(t.shape)
    if len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] > 64:
        name = "n x n"
    else:
        name = f"last dim {shape[-1] if shape else 0}"
    return f"{name} {str(t.dtype).removeprefix('torch.')}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--keep_scores", action="store_true")
    p.add_argument("--split", action="store_true")
    p.add_argument("--heap_trim", type=int, default=0)
    p.add_argument("--heap_trim_forward_only", action="store_true")
    p.add_argument("--mmap_threshold", type=int, default=0)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--sample_ms", type=float, default=3.0,
                   help="live-heap sampling interval; 0 = no sampler (mallinfo2 takes the arenas' locks: time steps "
                        "without it)")
    args, rest = p.parse_known_args(argv)

    from coati.cli.train import parse_args
    from coati.data.prepare import make_loaders, prepare_data
    from coati.memory import trim_between_blocks
    from coati.models import packed_attention
    from coati.models.loading import build_reward_model, prepare_model_files
    from coati.strategies.naive import NaiveStrategy

    packed_attention.RECOMPUTE_SCORES = not args.keep_scores
    if args.split:
        packed_attention.SPLIT_ATTENTION_MIN_LEN = 0
    cfg = parse_args(["--config", os.path.join(REPO, "examples", "rm_bilingual.yaml"), "--strategy", "naive",
                      "--save_path", os.path.join("/tmp", "bench_step_memory")] + rest)
    tokenizer, reward_token_id = prepare_model_files(cfg.backbone)
    data = prepare_data(cfg.data, cfg.optim.seed, tokenizer, reward_token_id)
    strategy = NaiveStrategy(cfg.strategy)
    strategy.setup()
    strategy.world_size, strategy.rank = 2, 0  # rank 0's batches of the 2-process main job
    torch.manual_seed(cfg.optim.seed)
    dtype = {"bf16": torch.bfloat16}.get(cfg.strategy.mixed_precision, torch.float32)
    model = build_reward_model(cfg.backbone, cfg.lora, tokenizer, dtype, torch.device("cpu")).train()
    if args.layers:
        body = getattr(model.hf_model, model.hf_model.base_model_prefix)
        body.layers = body.layers[:args.layers]
    if args.heap_trim:
        trim_between_blocks(model, args.heap_trim, backward=not args.heap_trim_forward_only)
    if args.mmap_threshold:
        LIBC.mallopt(M_MMAP_THRESHOLD, args.mmap_threshold)
    capacity = model.backbone.row_capacity(cfg.data.max_len, cfg.data.share_prefix, cfg.data.max_tokens_per_batch)
    train, _ = make_loaders(data, cfg.data, cfg.optim.batch_size, cfg.optim.batch_size, cfg.optim.seed,
                            tokenizer.pad_token_id, capacity, strategy)
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}

    peak = [0.0]

    def sample():
        while True:
            peak[0] = max(peak[0], live_heap_mb())
            time.sleep(args.sample_ms / 1000)

    if args.sample_ms > 0:
        threading.Thread(target=sample, daemon=True).start()
    for step, (batch, _) in enumerate(train.batches(0, 0, args.steps)):
        seen, saved = set(), collections.Counter()

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                saved[kind(t)] += storage.nbytes()
            return t

        gc.collect()
        before = live_heap_mb()
        peak[0] = before
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), strategy.autocast():
            rewards = model(**batch.inputs)
        after_forward, rss_forward = live_heap_mb(), status_mb("VmRSS")
        pairs = batch.pairs
        loss = -torch.nn.functional.logsigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).mean()
        loss.backward()
        groups = batch.inputs["groups"].tolist()
        print(f"step {step}: {batch.inputs['input_ids'].numel()} positions in {len(groups)} groups (longest "
              f"{max(sum(g[2:]) for g in groups)}); {time.perf_counter() - t0:.1f} s, CPU {time.process_time() - c0:.1f}"
              f" s; live heap MB: before {before:.0f}, after forward {after_forward:.0f}, peak {peak[0]:.0f}; RSS MB: "
              f"after forward {rss_forward:.0f}, after backward {status_mb('VmRSS'):.0f}, high-water mark "
              f"{status_mb('VmHWM'):.0f}")
        for name, size in saved.most_common():
            print(f"    kept for backward: {name:24s} {size / 2 ** 20:8.1f} MB")
        print(f"    kept for backward in all: {sum(saved.values()) / 2 ** 20:.1f} MB")
        model.zero_grad(set_to_none=True)
        del rewards, loss


if __name__ == "__main__":
    main()
