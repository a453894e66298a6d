"""Sequence parallelism: the tokens of one packed batch split across the S ranks of a group (DeepSpeed-Ulysses).

Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence Transformer
Models" (arXiv 2309.14509, section 3). The world of W processes is W / S data-parallel groups of S consecutive ranks.
The S ranks of a group hold the same batch; rank j of the group holds the j-th contiguous 1/S of every row's tokens
(rows are padded to a multiple of S first). Everything outside attention (embeddings, norms, MLPs, the value head)
is per token and runs on the local tokens only. Around each attention an all-to-all turns "all heads, 1/S of the
tokens" into "1/S of the heads, all tokens"; the rank runs coati's per-group packed attention (prefix sharing
included) on whole rows for its heads, and a second all-to-all turns the output back. Key/value heads are split
the same way when S divides their number; otherwise they are first repeated to one per query head (more traffic,
same result), so only the number of query heads must be divisible by S.

The value head runs on every local token; its ``[R, L/S]`` outputs are all-gathered (a few floats per token) so every
rank of the group reads each sequence's reward at its last token and computes the same loss. The collectives are one
autograd-aware all-to-all (:class:`_AllToAll`: ``torch.distributed.all_to_all`` forward and backward;
``torch.distributed.nn.functional.all_to_all`` runs on gloo as scatters whose source it takes as a global rank, which
breaks every group but the first); the all-gather's backward sums what the S ranks send,
so each rank's gradient is that of S x the loss for its tokens, and the usual average over all W ranks (DDP's
all-reduce, FSDP's reduce-scatter) then gives exactly the mean over the W / S data-parallel groups of the loss
gradient: no extra reduction, and the loss counts once per pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

class _AllToAll(torch.autograd.Function):
    """``chunks[j]`` goes to rank j of ``group``; returns what each rank j sent here. The backward is the same
    exchange of the gradients in the other direction."""

    @staticmethod
    def forward(ctx, group, *chunks):
        ctx.group = group
        out = [torch.empty_like(c) for c in chunks]
        dist.all_to_all(out, [c.contiguous() for c in chunks], group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        back = [torch.empty_like(g) for g in grads]
        dist.all_to_all(back, [g.contiguous() for g in grads], group=ctx.group)
        return (None, *back)


@dataclass(frozen=True)
class SequenceParallel:
    """One rank's place in its sequence-parallel group: the process group, this rank's index in it, its size S."""

    group: object
    rank: int
    size: int

    def __deepcopy__(self, memo) -> "SequenceParallel":
        """The same group: a copy of a model (FSDP's export template) still splits over this rank's group."""
        return self

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous ``1/S`` of dim 1 of ``t`` (``[R, L, ...]``, ``L`` divisible by S)."""
        n = t.shape[1] // self.size
        return t[:, self.rank * n:(self.rank + 1) * n]

    def gather_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`shard` for ``[R, L/S]``: an all-gather written as an all-to-all of S copies (autograd
        sums the gradients the S ranks send back)."""
        return torch.cat(_AllToAll.apply(self.group, *[t] * self.size), dim=1)

    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[R, H, L/S, D]`` (all heads, local tokens) -> ``[R, H/S, L, D]`` (local heads, all tokens)."""
        return torch.cat(_AllToAll.apply(self.group, *x.chunk(self.size, dim=1)), dim=2)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """``[R, H/S, L, D]`` -> ``[R, H, L/S, D]``: the inverse of :meth:`seq_to_heads`."""
        return torch.cat(_AllToAll.apply(self.group, *x.chunk(self.size, dim=2)), dim=1)


def make_groups(size: int) -> SequenceParallel | None:
    """Split the default process group into groups of ``size`` consecutive ranks (every rank must call this).

    Returns:
        this rank's :class:`SequenceParallel`, or None when ``size`` is 1.
    Raises:
        ValueError: ``size`` does not divide the world size.
    """
    if size == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"--sequence_parallel_size {size} does not divide the {world} processes")
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = SequenceParallel(group, rank - first, size)
    return mine


def head_problem(size: int, heads: int, kv_heads: int | None) -> str | None:
    """Why ``size`` cannot split the attention heads (query heads must divide; key/value heads are repeated when
    they do not), or None."""
    if size > 1 and heads % size:
        return (f"--sequence_parallel_size {size} must divide the {heads} attention heads (key/value heads: "
                f"{kv_heads or heads}); choose a divisor of {heads}")
    return None
