"""Handing freed heap memory back to the operating system while a model trains on CPU (glibc).

glibc keeps the memory that freed tensors occupied inside its heap, and a step's many short-lived activations of
different sizes leave it full of holes that later tensors do not fill: in the main job (SmolLM2-135M + LoRA, 4 pairs
per process, fp32) a training step's resident memory (RSS) reached 5.1-6.0 GB with 2.3-2.9 GB of tensors alive, and
with gradient checkpointing 2.7-3.5 GB with under 0.5 GB alive (benchmarks/README.md, "Main job memory per rank"). A
fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_``) removes the holes but maps and zeroes every large tensor anew
(17-80% more CPU time per step there); :func:`trim_between_blocks` instead has glibc release the free pages of its
heap (``malloc_trim``) after every few transformer blocks, forward and backward, so the holes are released as they
form: 3.3-4.0 GB there, at 13-33% more CPU time per step (released pages are faulted in again by the next step).
The trainer installs it on CPU; ``COATI_HEAP_TRIM=0`` leaves it out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch
from torch import nn

_LIBC: list = []  # [handle or None], looked up once


def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or not Linux)."""
    if not _LIBC:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(libc.malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]


def release_free_heap() -> bool:
    """Return the free pages of glibc's heap to the operating system (``malloc_trim(0)``): the RSS falls to the
    memory in use plus what the allocator cannot release. Returns False where glibc is not the C library."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def heap_trim_enabled() -> bool:
    """False when the environment sets ``COATI_HEAP_TRIM=0`` (the trainer then installs no
    :func:`trim_between_blocks` hooks)."""
    return os.environ.get("COATI_HEAP_TRIM", "1") != "0"


def trim_between_blocks(model: nn.Module, every: int = 3, backward: bool = True) -> list:
    """Release glibc's free heap pages after the forward of every ``every``-th transformer block and, with
    ``backward``, also when the gradient reaches that block's output (a gradient hook that leaves the gradient
    unchanged).

    The blocks are transformers' ``GradientCheckpointingLayer`` s (the decoder layers of every backbone coati
    loads through transformers); a model without them is left alone. Rewards and gradients are unchanged: only
    when the allocator hands free pages back changes. Meant for CPU training; a no-op without glibc.

    Returns:
        the hook handles (``handle.remove()`` undoes it); empty when nothing was installed.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if every < 1 or _malloc_trim() is None:
        return []
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]

    def after_block(module, args, output):
        release_free_heap()
        out = output[0] if isinstance(output, (tuple, list)) else output
        if backward and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(_release_in_backward)

    return [block.register_forward_hook(after_block) for block in blocks[every - 1::every]]


def _release_in_backward(grad: torch.Tensor) -> None:
    release_free_heap()
