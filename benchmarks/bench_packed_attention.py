"""Packed attention, one layer, forward + backward: the written-out CPU path vs the mask-free split SDPA path.

Both run :func:`coati.models.packed_attention.packed_sdpa_attention` on one packed row of shared-prefix groups shaped
like a batch of 8 hh-rlhf pairs at max length 256 (SmolLM2-135M heads: 9 query and 3 key/value heads of 64), in bf16;
only the per-group kernel differs (``group_attention(fused=...)``: False = scores, mask and softmax written out,
True = :func:`~coati.models.packed_attention.causal_split_attention`). ``--scales`` multiplies every group's lengths,
to find the group length from which the split path is faster (``SPLIT_ATTENTION_MIN_LEN``). Prints milliseconds per
layer.

    python benchmarks/bench_packed_attention.py --scales 1 2 4 8 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coati.models import packed_attention  # noqa: E402

# (prefix, chosen rest, rejected rest) of 8 pairs: shared prompts of ~90 tokens, answers of ~45 (as measured)
SHAPES = [(120, 40, 55), (60, 70, 30), (95, 20, 48), (150, 35, 60), (40, 90, 85), (110, 25, 30), (75, 60, 40),
          (80, 45, 50)]


def time_layer(fused: bool, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, reps: int,
               scale: int = 1) -> float:
    """Milliseconds per forward + backward of one layer's packed attention (group lengths x ``scale``)."""
    groups, start = [], 0
    for p, c, r in ((p * scale, c * scale, r * scale) for p, c, r in SHAPES):
        groups.append([0, start, p, c, r])
        start += p + c + r
    groups = torch.tensor(groups)
    torch.manual_seed(0)
    q = torch.randn(1, start, heads, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(1, start, kv_heads, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(1, start, kv_heads, dim, dtype=dtype, requires_grad=True)
    real = packed_attention.group_attention

    def step():
        plan = packed_attention.PackPlan.from_groups(groups, 1)
        out, _ = packed_attention.packed_sdpa_attention(None, q.transpose(1, 2), k.transpose(1, 2),
                                                        v.transpose(1, 2), None, scaling=dim ** -0.5,
                                                        coati_pack=plan)
        out.float().sum().backward()

    with mock.patch.object(packed_attention, "group_attention",
                           lambda *a, **kw: real(*a, **{**kw, "fused": fused})):
        step()
        t = time.perf_counter()
        for _ in range(reps):
            step()
    return (time.perf_counter() - t) / reps * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv_heads", type=int, default=3)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--fp32", action="store_true", help="fp32 instead of bf16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--scales", type=int, nargs="+", default=[1], help="group length multipliers")
    args = p.parse_args(argv)
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    print(f"one row of {len(SHAPES)} shared-prefix groups, {args.heads} heads of {args.head_dim}, {dtype}, "
          f"{torch.get_num_threads()} threads; ms per layer (forward + backward)")
    print("| scale | tokens in the row | mean group length | written-out ms | split SDPA ms | written-out / split |")
    print("|---|---|---|---|---|---|")
    for scale in args.scales:
        reps = max(1, args.reps // scale)
        written, split = (time_layer(fused, args.heads, args.kv_heads, args.head_dim, dtype, reps, scale)
                          for fused in (False, True))
        tokens = sum(map(sum, SHAPES)) * scale
        print(f"| {scale} | {tokens} | {tokens / len(SHAPES):.0f} | {written:.1f} | {split:.1f} | "
              f"{written / split:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
