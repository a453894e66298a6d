"""Packed attention, one layer, forward + backward: coati's written-out CPU path vs ``scaled_dot_product_attention``.

Both run :func:`coati.models.packed_attention.packed_sdpa_attention` on one packed row of shared-prefix groups shaped
like a batch of 8 hh-rlhf pairs at max length 256 (SmolLM2-135M heads: 9 query and 3 key/value heads of 64), in bf16;
only the per-group kernel differs (``group_attention(fused=...)``). Prints milliseconds per layer.

    python benchmarks/bench_packed_attention.py
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


def time_layer(fused: bool, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, reps: int) -> float:
    """Milliseconds per forward + backward of one layer's packed attention."""
    groups, start = [], 0
    for p, c, r in SHAPES:
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
    args = p.parse_args(argv)
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    tokens = sum(map(sum, SHAPES))
    print(f"one row of {tokens} tokens in {len(SHAPES)} shared-prefix groups, {args.heads} heads of {args.head_dim}, "
          f"{dtype}, {torch.get_num_threads()} threads")
    res = {name: time_layer(fused, args.heads, args.kv_heads, args.head_dim, dtype, args.reps)
           for name, fused in (("sdpa", True), ("written-out", False))}
    for name, ms in res.items():
        print(f"{name:12} {ms:7.1f} ms per layer (forward + backward)")
    print(f"speed-up of the written-out path: {res['sdpa'] / res['written-out']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
