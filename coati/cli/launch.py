"""``python -m coati.launch``: torchrun (same arguments) that stops on SIGINT / SIGTERM without a traceback.

On a signal, torchrun forwards it to every worker, and each coati rank finishes its step, writes a resume
checkpoint (with ``--save_every``) and exits with one line (see :mod:`coati.signals`); torchrun itself then prints a
``SignalException`` traceback and exits 1. This wrapper runs torchrun's own ``main`` unchanged and turns that
exception into the conventional exit code (128 + signal number: 130 for SIGINT, 143 for SIGTERM). Give torchrun
``--shutdown_timeout`` (seconds, default 30) longer than one training step plus one checkpoint, or it kills the
workers before they finish.

Usage::

    python -m coati.launch --standalone --nproc_per_node 2 train_reward_model.py --strategy ddp ...
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv``; returns its exit code, or 128 + the signal number after a stop signal."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(sys.argv[1:] if argv is None else argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
