"""Variable-length attention over packed rows, with the prompt of each pair or ranked list computed once (prefix
sharing).

A packed batch is a few rows of tokens holding *groups* back to back. A group is either one sequence, or K >= 2
sequences that start with the same tokens, laid out as ``[P | T1 | ... | TK]``: the shared start (``P``, normally
the prompt), then the rest of each sequence (``Ti``, its answer). For a preference pair that is ``[P | C | R]``
(chosen, then rejected); for a ranked list of K answers (InstructGPT, arXiv 2203.02155, section 3.5) all K answers
share one ``P``. Each ``Ti`` attends to ``P`` and to itself, never to another answer, and takes the positions it has
in its own sequence (``len(P)``, ``len(P) + 1``, ...). Every hidden state is then exactly the one the sequence would
get alone, while ``P`` is computed once instead of K times; its gradient is the sum of what the K sequences send it,
as in the unshared computation. The idea is that of Wang et al., "Accelerating Direct Preference Optimization with
Prefix Sharing" (arXiv 2410.20305, section 3), here for any K.

Groups are described by a ``[G, 2 + 1 + Kmax]`` int64 tensor of ``(row, start, prefix_len, len_T1, ..., len_TK)``,
zero-padded on the right (so a batch of pairs has 5 columns: ``(row, start, prefix_len, chosen_len,
rejected_len)``); a plain sequence of ``n`` tokens is ``(row, start, n, 0, ...)``. A group's *shape* is the table
row without ``(row, start)``; zeros in it are ignored. Tokens of a row that no group covers are padding.

RoPE backbones (LLaMA, InternLM2) run the attention of each group separately (the attention implementation
``coati_packed``, registered with transformers below: mask-free ``scaled_dot_product_attention`` calls, or for short
groups on CPU written-out attention, see :func:`group_attention`), so a row may be as long as the whole batch at no
quadratic cost: one row, no padding.
On CUDA in half precision the whole batch is instead one call of PyTorch's variable-length flash attention
(``torch.nn.attention.varlen.varlen_attn``, see :func:`varlen_layout`): a fixed number of kernels per layer, however
many groups and answers the batch holds. Set ``COATI_VARLEN_ATTENTION=0`` to keep the per-group calls there.
ALiBi backbones (BLOOM) run transformers' own attention with the dense additive mask of :func:`packed_causal_mask`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

#: Name of the attention implementation registered with transformers.
PACKED_ATTENTION = "coati_packed"

_PACKED_FORWARD = contextvars.ContextVar("coati_packed_forward", default=False)

logger = logging.getLogger(__name__)


def tails(shape) -> list[int]:
    """The answer lengths ``[len_T1, ..., len_TK]`` of a group shape ``(prefix_len, len_T1, ...)``, zeros dropped."""
    return [int(t) for t in shape[1:] if t]


def longest_sequence(shape) -> int:
    """The longest sequence of a group shape ``(prefix_len, len_T1, ...)``: ``prefix_len + max(len_Ti)``."""
    return int(shape[0]) + max(tails(shape), default=0)


def _group_mask(shape, device: torch.device, window: int | None = None) -> torch.Tensor:
    """``[n, n]`` bool (True = attend) for one group ``[P | T1 | ... | TK]`` of shape ``(p, len_T1, ...)`` (plain
    sequence: no tails): causal, and no answer sees another. With a sliding ``window`` W, a token at position i of
    its own sequence also sees only the keys at positions ``> i - W`` (W keys, itself included: transformers'
    ``sliding_window`` rule), positions counted in each sequence as it is alone."""
    p, rest = int(shape[0]), tails(shape)
    n = p + sum(rest)
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    end = p
    for t in rest:
        allowed[end + t:, end:end + t] = False
        end += t
    if window is not None:
        pos = torch.cat([torch.arange(p, device=device)] + [torch.arange(p, p + t, device=device) for t in rest])
        allowed &= pos[:, None] - pos[None, :] < window
    return allowed


def packed_causal_mask(groups: torch.Tensor, rows: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask of a packed batch (for backbones that take a dense mask, such as BLOOM).

    Each group's block on the diagonal is its :func:`_group_mask` (the rule the per-group attention uses); tokens of
    different groups never attend to each other. A padding token attends only to itself (no row of the softmax is
    empty).

    Args:
        groups: ``[G, 3 + Kmax]`` int64 group table (module docstring); rows, length: the batch shape ``[R, L]``.
    Returns:
        ``[R, 1, L, L]`` of ``dtype``: 0 where allowed, else the dtype's min.
    """
    allowed = torch.eye(length, dtype=torch.bool, device=groups.device).repeat(rows, 1, 1)
    for r, s, *shape in groups.tolist():
        n = sum(shape)
        allowed[r, s:s + n, s:s + n] = _group_mask(shape, groups.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=groups.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class PackPlan:
    """What the ``coati_packed`` attention needs, built once per forward from the group table.

    ``rows[r]`` lists ``(start, n, shape)`` for the groups of row r in order, ``shape`` = ``(prefix_len, len_T1,
    ..., len_TK)`` (module docstring). Masks and additive biases are built once per shape and dtype, then shared by
    all layers.
    """

    rows: list[list[tuple[int, int, tuple[int, ...]]]]
    device: torch.device
    #: the longest sequence of any group (:func:`longest_sequence`), compared with a layer's sliding window
    longest: int = 0
    #: the sequence-parallel group whose ranks each hold 1/S of the rows' tokens, or None (travels with the plan, so
    #: activation recomputation during backward splits the same way)
    sequence_parallel: object = None
    _cache: dict = field(default_factory=dict)

    @classmethod
    def from_groups(cls, groups: torch.Tensor, num_rows: int, sequence_parallel=None) -> "PackPlan":
        """Build the plan; raises ValueError when groups overlap or are out of order within a row."""
        rows, longest = [[] for _ in range(num_rows)], 0
        for r, s, p, *rest in groups.tolist():
            if rows[r] and rows[r][-1][0] + rows[r][-1][1] > s:
                raise ValueError(f"packed groups overlap or are out of order in row {r} at column {s}")
            shape = (p, *tails((p, *rest)))
            rows[r].append((s, sum(shape), shape))
            longest = max(longest, longest_sequence(shape))
        return cls(rows, groups.device, longest, sequence_parallel)

    def mask(self, shape: tuple[int, ...], dtype: torch.dtype | None = None,
             window: int | None = None) -> torch.Tensor | None:
        """``[n, n]`` mask of a group, built once: bool (True = attend; None for a plain sequence, which is causal)
        or, given ``dtype``, additive of that dtype (0 allowed, -inf not) for any group; ``window``: a sliding
        window applied too (see :func:`_group_mask`)."""
        shape = (shape[0], *tails(shape))
        if dtype is None and len(shape) == 1 and window is None:
            return None
        if (shape, dtype, window) not in self._cache:
            allowed = _group_mask(shape, self.device, window)
            self._cache[shape, dtype, window] = allowed if dtype is None else torch.zeros(
                allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, float("-inf"))
        return self._cache[shape, dtype, window]

    def lower_right(self, q_len: int, kv_len: int) -> torch.Tensor:
        """``[q_len, kv_len]`` bool causal mask aligned to the lower right (query j sees keys ``0 .. kv_len - q_len
        + j``), built once per size and shared by all layers: what ``causal_lower_right`` materialises on every
        call on CPU."""
        key = ("lower_right", q_len, kv_len)
        if key not in self._cache:
            self._cache[key] = torch.ones(q_len, kv_len, dtype=torch.bool, device=self.device).tril(kv_len - q_len)
        return self._cache[key]

    def varlen(self, length: int) -> "VarlenLayout":
        """The :func:`varlen_layout` of this plan for rows of ``length`` tokens, built once and shared by all
        layers."""
        key = ("varlen", length)
        if key not in self._cache:
            self._cache[key] = varlen_layout(self, length)
        return self._cache[key]


def causal_split_attention(shape: tuple[int, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           dropout: float, scaling: float, plan: PackPlan | None = None) -> torch.Tensor:
    """Attention of one group with no mask written out: memory linear in the group length.

    A plain sequence is one causal call. A group ``[P | T1 | ... | TK]`` is K calls: ``[P | T1]`` on itself
    (causal), and for each later answer ``Ti`` its queries against the keys and values of ``[P ; Ti]`` with the
    causal diagonal aligned to the lower right (``torch.nn.attention.bias.causal_lower_right``: query j of Ti sees P
    and Ti's first j + 1 tokens), the alignment flash-attention's variable-length kernel uses. Same result as the
    group's boolean mask (:func:`_group_mask`).

    Args:
        shape: ``(prefix_len, len_T1, ..., len_TK)`` (zeros ignored); q, k, v: ``[H, n, D]`` (key/value heads
            repeated).
        plan: on CPU, where ``causal_lower_right`` writes its mask out on every call, the masks are taken from the
            plan's cache (:meth:`PackPlan.lower_right`, same values) instead.
    Returns:
        ``[H, n, D]``.
    """
    dev = q.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else \
        torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    # autocast leaves SDPA's inputs as they come (RoPE's q, k are fp32); a batch dimension is added because CPU
    # SDPA takes its flash kernel (memory linear in n) only for 4-D inputs: 3-D ones fall back to the math kernel,
    # which writes out and keeps the n x n scores (1 GB at n = 8192 and 4 heads, bf16)
    q, k, v = (t.to(dtype)[None] for t in (q, k, v))
    p, rest = int(shape[0]), tails(shape)
    if not rest:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling)[0]
    pc = p + rest[0]
    outs = [F.scaled_dot_product_attention(q[:, :, :pc], k[:, :, :pc], v[:, :, :pc], is_causal=True,
                                           dropout_p=dropout, scale=scaling)]
    start, cached = pc, plan is not None and q.device.type == "cpu"
    for t in rest[1:]:
        keys, values = (torch.cat([x[:, :, :p], x[:, :, start:start + t]], dim=2) for x in (k, v))
        mask = plan.lower_right(t, p + t) if cached else causal_lower_right(t, p + t)
        outs.append(F.scaled_dot_product_attention(q[:, :, start:start + t], keys, values, attn_mask=mask,
                                                   dropout_p=dropout, scale=scaling))
        start += t
    return torch.cat(outs, dim=2)[0]


#: Groups at least this long run :func:`causal_split_attention` on CPU; shorter ones the written-out path. CUDA
#: always uses the split path. Measured with ``benchmarks/bench_packed_attention.py --scales`` (benchmarks/README.md):
#: in bf16 the written-out path takes 0.6x the split path's time at a mean group length of 189, 0.88x at 567 and
#: 2.8x at 756. In fp32 the split path was 1.1-1.6x faster at every length, but short fp32 groups keep the
#: written-out path: both are equally close to fp64 (7e-7 per call), yet with the SDPA kernel the 3-step
#: sequence-parallel parity gap of ``tests/strategies/test_sequence_parallel.py`` (S = 2 against one process, SGD
#: lr 0.5) grew from 2e-6 to 1.4e-5, past the 1e-5 that coati's parity guarantees are stated in.
SPLIT_ATTENTION_MIN_LEN = 640


def group_attention(plan: PackPlan, shape: tuple[int, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    dropout: float, scaling: float, fused: bool | None = None, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Attention of one group, ``[H, n, D]`` in and out.

    Two paths with the same result. :func:`causal_split_attention` (``scaled_dot_product_attention`` with no mask:
    memory linear in ``n``) on CUDA and, on CPU, for groups of at least :data:`SPLIT_ATTENTION_MIN_LEN` tokens. For
    shorter groups on CPU, scores, softmax (fp32) and the weighted sum are written out (faster in half precision,
    steadier across layouts in fp32): one ``baddbmm`` adds the mask. In training the ``n x n`` scores are not kept
    for backward but recomputed there (:data:`RECOMPUTE_SCORES`), so both paths keep memory linear in ``n``.
    ``fused`` forces one path (True: split SDPA).

    A layer's sliding ``window`` (Gemma 3's local layers, Mistral, Qwen with ``use_sliding_window``) that is shorter
    than the group's longest sequence, and a logit ``softcap`` (``softcap * tanh(scores / softcap)`` before the
    mask, Gemma 2's soft-capping), take the written-out path on every device, with the window in the mask: the
    group is attended exactly as each sequence alone would be, never as full attention.
    """
    limited = window is not None and longest_sequence(shape) > window
    if limited or softcap is not None:
        fused = False
    elif fused is None:
        fused = q.device.type != "cpu" or q.shape[1] >= SPLIT_ATTENTION_MIN_LEN
    if fused:
        return causal_split_attention(shape, q, k, v, dropout, scaling, plan)
    n = q.shape[1]
    mask = plan.mask(shape, q.dtype, window if limited else None).expand(q.shape[0], n, n)
    if RECOMPUTE_SCORES and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # keep only q, k and v for backward, which recomputes the scores and probabilities from them (the same
        # kernels on the same inputs: the same values and gradients as keeping them); q and k are cast to
        # autocast's dtype first, as its matrix product would cast them, so that the half-precision copies are kept
        # rather than RoPE's fp32 ones
        dtype = _compute_dtype(q)
        return checkpoint(_written_out_attention, mask, q.to(dtype), k.to(dtype), v, dropout, scaling, softcap,
                          use_reentrant=False, preserve_rng_state=bool(dropout))
    return _written_out_attention(mask, q, k, v, dropout, scaling, softcap)


#: Training (autograd on) recomputes the written-out path's ``n x n`` scores and probabilities of each group in
#: backward instead of keeping them (:func:`group_attention`): bit-identical gradients, one more ``baddbmm`` and
#: softmax per group. Kept, they were the largest share of a bf16 step's saved activations in the main job
#: (SmolLM2-135M, 30 layers x 9 heads, groups of up to 2 x ``--max_len`` tokens: fp32 probabilities plus their bf16
#: copy, 37%; 20% in fp32; benchmarks/README.md, "Main job memory").
RECOMPUTE_SCORES = True


def _written_out_attention(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
                           scaling: float, softcap: float | None) -> torch.Tensor:
    """Scores (one ``baddbmm`` adding the additive ``mask``, or soft-capped then masked), fp32 softmax and the
    weighted sum of one group: ``[H, n, D]`` in and out, ``mask`` ``[H, n, n]``."""
    if softcap is None:
        scores = torch.baddbmm(mask, q, k.transpose(-1, -2), alpha=scaling)
    else:
        scores = torch.tanh((q @ k.transpose(-1, -2)) * (scaling / softcap)) * softcap + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return probs @ v


@dataclass
class VarlenLayout:
    """A packed batch as the query and key *segments* of one variable-length attention call (see
    :func:`varlen_layout`). Positions are flat: ``row * L + column``.

    Attributes:
        q_index: ``[Tq]`` int64, the positions some group covers, in order (the queries); None when every position
            is covered (no padding), so the queries are the whole batch as it is.
        kv_index: ``[Tk]`` int64, the positions of each segment's keys and values, segment after segment.
        cu_q, cu_k: ``[S + 1]`` int32 cumulative segment lengths of queries and keys (``cu[0] = 0``).
        max_q, max_k: the longest query and key segment.
    """

    q_index: torch.Tensor | None
    kv_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def varlen_layout(plan: PackPlan, length: int) -> VarlenLayout:
    """Segments of the whole batch for variable-length attention with a causal diagonal aligned to the lower right
    (query j of a segment of ``m`` queries and ``n`` keys sees keys ``0 .. n - m + j``; flash-attention's rule).

    A plain sequence is one segment, its tokens both queries and keys. A group ``[P | T1 | ... | TK]`` is K
    segments: ``[P | T1]`` on itself, then for each later answer ``Ti`` its tokens as queries against the keys of
    ``[P ; Ti]``, the rule of :func:`causal_split_attention`. The queries of all segments, in order, are exactly the
    tokens the groups cover, in order.

    Args:
        plan: the batch's groups; length: the row length ``L``.
    Returns:
        :class:`VarlenLayout` on the plan's device.
    """
    q_runs, k_runs = [], []  # (flat start, size); one list of key runs per segment
    for r, groups in enumerate(plan.rows):
        for start, _n, shape in groups:
            s = r * length + start
            p, rest = int(shape[0]), tails(shape)
            first = p + (rest[0] if rest else 0)
            q_runs.append((s, first))
            k_runs.append([(s, first)])
            pos = s + first
            for t in rest[1:]:
                q_runs.append((pos, t))
                k_runs.append([(s, p), (pos, t)])
                pos += t
    q_lens = [n for _, n in q_runs]
    k_lens = [sum(n for _, n in runs) for runs in k_runs]

    def index(runs) -> torch.Tensor:
        return torch.cat([torch.arange(a, a + n, dtype=torch.int64) for a, n in runs])

    def cumulative(lens) -> torch.Tensor:
        return torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)

    covered = sum(q_lens) == len(plan.rows) * length
    return VarlenLayout(None if covered else index(q_runs).to(plan.device),
                        index([run for runs in k_runs for run in runs]).to(plan.device),
                        cumulative(q_lens).to(plan.device), cumulative(k_lens).to(plan.device), max(q_lens),
                        max(k_lens))


#: ``function``: PyTorch's ``varlen_attn`` or None; ``kwargs``: what its signature takes (see
#: :func:`_varlen_function`); ``failed``: set once it raised in this process (per-group calls from then on).
_VARLEN: dict = {}


def _varlen_function():
    """PyTorch's ``varlen_attn`` (PyTorch 2.10 and later) or None, imported once; its keyword arguments are read
    from its signature then (``is_causal`` in 2.10, ``window_size`` later; ``scale``, ``enable_gqa``)."""
    if "function" not in _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        _VARLEN["function"] = varlen_attn
        if varlen_attn is not None:
            params = inspect.signature(varlen_attn).parameters
            _VARLEN["kwargs"] = ({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True},
                                 "scale" in params, "enable_gqa" in params)
    return _VARLEN["function"]


def _varlen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VarlenLayout,
                   scaling: float) -> torch.Tensor:
    """PyTorch's ``varlen_attn`` over ``layout``: ``q`` ``[Tq, H, D]``, ``k``, ``v`` ``[Tk, H_kv, D]`` in, ``[Tq, H,
    D]`` out (called only where :func:`_use_varlen` said it can be)."""
    varlen_attn = _varlen_function()
    causal, takes_scale, takes_gqa = _VARLEN["kwargs"]
    kwargs = dict(causal, **({"scale": scaling} if takes_scale else {}))
    if k.shape[1] != q.shape[1]:
        if takes_gqa:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, **kwargs)


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's where it is on (RoPE leaves q, k in fp32 then), else the query's."""
    dev = query.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype


def _use_varlen(query: torch.Tensor, dropout: float, scaling: float, window: int | None = None,
                softcap: float | None = None, longest: int = 0) -> bool:
    """Whether :func:`_varlen_rows_attention` is tried: CUDA, half precision (the flash kernels' only dtypes), no
    dropout, head size a multiple of 8 up to 256, a ``varlen_attn`` that takes this softmax scale (PyTorch 2.10's
    takes only the default ``D ** -0.5``), not switched off (``COATI_VARLEN_ATTENTION=0``) and not failed before in
    this process; and no soft-capping, nor a sliding window shorter than the batch's ``longest`` sequence (those
    take the per-group calls)."""
    dim = query.shape[-1]
    if softcap is not None or (window is not None and longest > window):
        return False
    if not (query.is_cuda and _compute_dtype(query) in (torch.float16, torch.bfloat16) and not dropout
            and dim % 8 == 0 and dim <= 256 and os.environ.get("COATI_VARLEN_ATTENTION", "1") != "0"
            and not _VARLEN.get("failed") and _varlen_function() is not None):
        return False
    return _VARLEN["kwargs"][1] or abs(scaling - dim ** -0.5) <= 1e-12


def _varlen_rows_attention(plan: PackPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           scaling: float) -> torch.Tensor | None:
    """Per-group attention of whole packed rows as one variable-length call: ``query`` ``[R, H, L, D]``, ``key``,
    ``value`` ``[R, H_kv, L, D]`` in; ``[R, L, H, D]`` out (zeros where no group covers a token), or None when the
    kernel failed (logged once; the caller then runs :func:`_rows_attention`, as it will from then on). Same result
    as :func:`_rows_attention` up to the kernels' rounding."""
    rows, heads, length, dim = query.shape
    dtype = _compute_dtype(query)
    layout = plan.varlen(length)
    q, k, v = (t.transpose(1, 2).reshape(rows * length, t.shape[1], dim).to(dtype) for t in (query, key, value))
    if layout.q_index is not None:
        q = q.index_select(0, layout.q_index)
    k, v = k.index_select(0, layout.kv_index), v.index_select(0, layout.kv_index)
    try:
        out = _varlen_kernel(q, k, v, layout, scaling)
    except RuntimeError as e:  # an unsupported GPU or build: fall back for the rest of the process
        _VARLEN["failed"] = True
        logger.warning("variable-length attention failed (%s); using per-group attention calls", e)
        return None
    if layout.q_index is not None:
        out = out.new_zeros(rows * length, heads, dim).index_copy(0, layout.q_index, out)
    return out.view(rows, length, heads, dim)


def _rows_attention(plan: PackPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                    scaling: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Per-group attention of whole packed rows: ``[R, H, L, D]`` in (key/value repeated to H heads) and out;
    ``window`` and ``softcap`` as :func:`group_attention` takes them."""
    length = query.shape[2]
    out_rows = []
    for r, groups in enumerate(plan.rows):
        # split (not slice) the row: the backward of a split is one concatenation, where slices would each
        # fill a zero tensor the size of the row
        spans, pos = [], 0  # (size, group shape, or None for tokens no group covers)
        for start, n, shape in groups + [(length, 0, None)]:
            spans += [(start - pos, None)] * (start > pos) + [(n, shape)] * (n > 0)
            pos = start + n
        parts = zip(*(t[r].split([size for size, _ in spans], dim=1) for t in (query, key, value)))
        pieces = [group_attention(plan, shape, q, k, v, dropout, scaling, window=window, softcap=softcap)
                  if shape else torch.zeros_like(q)
                  for (_, shape), (q, k, v) in zip(spans, parts)]
        out_rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.stack(out_rows)


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          coati_pack: PackPlan | None = None, sliding_window: int | None = None,
                          softcap: float | None = None, **kwargs):
    """Attention function registered with transformers as ``coati_packed``.

    Without ``coati_pack`` it is transformers' SDPA attention unchanged (padded batches, generation). With it, each
    group of each row attends only within itself (module docstring); positions no group covers (padding) get zeros.
    When the plan has a sequence-parallel group (:mod:`coati.strategies.sequence_parallel`) the inputs hold this
    rank's 1/S of the tokens: two all-to-alls around the per-group attention give it whole rows for 1/S of the heads.
    On CUDA in half precision the per-group calls are one variable-length call (:func:`_varlen_rows_attention`).

    Args:
        query: ``[R, H, L, D]``; key, value: ``[R, H_kv, L, D]`` (grouped-query heads are repeated).
        attention_mask: ignored in packed mode (transformers builds none there).
        scaling: softmax scale (default ``D ** -0.5``; Gemma 3 passes ``query_pre_attn_scalar ** -0.5``).
        sliding_window: the layer's window W (each token sees the W latest positions of its own sequence, itself
            included), applied to every group longer than W; None = full causal attention.
        softcap: attention logit soft-capping (``softcap * tanh(scores / softcap)``), or None.
    Returns:
        ``([R, L, H, D]`` attention output, None) as transformers' attention functions do.
    Raises:
        ValueError: a packed batch on a layer whose attention is not causal (``module.is_causal`` False, e.g. a
            bidirectional Gemma 3 embedding model).
    """
    if coati_pack is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if softcap is not None:  # SDPA cannot cap logits: transformers' written-out attention can
            from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

            return eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, sliding_window=sliding_window, softcap=softcap, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if getattr(module, "is_causal", True) is False:
        raise ValueError(f"packed batches need causal attention; {type(module).__name__} is bidirectional: use "
                         "padded batches (--packing false)")
    heads, dim = query.shape[1], query.shape[3]
    scaling = dim ** -0.5 if scaling is None else scaling
    sp = coati_pack.sequence_parallel
    if sp is not None:
        if key.shape[1] % sp.size:  # key/value heads S does not divide: one per query head
            key = key.repeat_interleave(heads // key.shape[1], dim=1)
            value = value.repeat_interleave(heads // value.shape[1], dim=1)
        query, key, value = (sp.seq_to_heads(t) for t in (query, key, value))
    use = _use_varlen(query, dropout, scaling, sliding_window, softcap, coati_pack.longest)
    out = _varlen_rows_attention(coati_pack, query, key, value, scaling) if use else None
    if out is not None:
        out = out.transpose(1, 2)  # [R, H, L, D], a view
    else:
        if key.shape[1] != query.shape[1]:
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        out = _rows_attention(coati_pack, query, key, value, dropout, scaling, sliding_window, softcap)
    if sp is not None:
        out = sp.heads_to_seq(out)
    return out.transpose(1, 2).contiguous(), None


def _packed_mask(*args, **kwargs):
    """transformers' SDPA mask, skipped (None) inside a packed forward, whose attention builds its own."""
    if _PACKED_FORWARD.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


@contextlib.contextmanager
def packed_forward():
    """Context of a packed forward: transformers builds no attention mask for ``coati_packed`` inside it."""
    token = _PACKED_FORWARD.set(True)
    try:
        yield
    finally:
        _PACKED_FORWARD.reset(token)


def enable(model) -> bool:
    """Register ``coati_packed`` with transformers' attention and mask interfaces and switch a model from SDPA (or
    eager) attention to it.

    Padded batches give the same results as before (SDPA); packed batches can then share prefixes. The
    implementation name is not written into ``config.json`` by ``save_pretrained``.

    Returns:
        True when enabled; False when the model uses another implementation (for example flash-attention), which
        is left alone.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, _packed_mask)
    current = getattr(model.config, "_attn_implementation", None)
    if current not in (None, "sdpa", "eager", PACKED_ATTENTION):
        return False
    if current != PACKED_ATTENTION:
        model.set_attn_implementation(PACKED_ATTENTION)
    return True
