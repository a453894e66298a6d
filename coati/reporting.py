"""Where metrics rows go: ``<folder>/metrics.jsonl`` always, plus an optional TensorBoard or wandb backend.

One :class:`MetricsLog` per run, created on the main rank only. Rows are the trainer's dicts (``step``, ``split``,
numbers, and a nested ``languages: {lang: {...}}``); the backends get one scalar per number, tagged
``<split>/<key>`` (``<split>/<lang>/<key>`` for the languages), at ``row["step"]``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

from coati.config import REPORT_TO
from coati.io import dumps

logger = logging.getLogger(__name__)


def report_to_problem(kind: str) -> str | None:
    """Why ``--report_to kind`` cannot run here, as one line naming the install command (or the valid choices), or
    None when it can. Cheap enough for config validation: ``importlib.util.find_spec``, no import."""
    if kind not in REPORT_TO:
        return f"--report_to: must be one of {', '.join(REPORT_TO)}, got {kind!r}"
    if kind != "none" and importlib.util.find_spec(kind) is None:  # the backend's package has its name
        return (f"--report_to {kind} needs the {kind} package, which is not installed: pip install {kind} "
                f"(or pip install -e '.[{kind}]')")
    return None


def row_scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row as ``{tag: value}``, the way the backends log them.

    A key ``k`` becomes ``<split>/k`` (just ``k`` when the row has no ``split``); the ``languages`` dict becomes
    ``<split>/<lang>/<key>`` and any other nested dict ``<split>/<key>/<subkey>``. ``step`` and ``split`` are not
    scalars; bools, strings, None and lists are skipped. Non-finite floats are kept (both backends draw NaN).
    """
    out: dict[str, float] = {}

    def walk(prefix: str, value) -> None:  # prefix: the tag so far, with a trailing "/"
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}/", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix[:-1]] = value

    split = f"{row['split']}/" if "split" in row else ""
    for key, value in row.items():
        if key not in ("step", "split"):
            walk(split if key == "languages" and isinstance(value, dict) else f"{split}{key}/", value)
    return out


def _trim(path: str, step: int) -> None:
    """Keep the rows of ``path`` with ``step <= step`` (none when ``step`` is 0: a fresh run), so a resumed run
    appends where its checkpoint stopped. A last line cut short (a run killed mid-write) is dropped.

    Raises:
        ValueError: a line other than the last is not a JSON row with a ``step``.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for n, line in enumerate(lines, start=1):
        try:
            row_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if n == len(lines) and not line.endswith("\n"):
                logger.warning("%s: dropping its last line, cut short (%s)", path, e)
                continue
            raise ValueError(f"{path} line {n} is not a metrics row with a step ({e}): fix or delete the file")
        if step > 0 and row_step <= step:
            kept.append(line.rstrip("\n") + "\n")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsLog:
    """Owner of a run's metrics rows: appends them to ``<folder>/metrics.jsonl`` and feeds them to the backend.

    Create it on the main rank only; a context manager (``close`` on exit). Opening it trims metrics.jsonl to the
    rows of steps ``<= start_step`` (empties it when ``start_step`` is 0).

    Backends (``report_to``): ``none``: metrics.jsonl only. ``tensorboard``: ``SummaryWriter`` event files in
    ``<folder>/runs``, one scalar per number (:func:`row_scalars`) at ``row["step"]``; older events of the folder
    above ``start_step`` (all for a fresh run) are purged from view. ``wandb``: ``wandb.init(dir=folder,
    mode=$WANDB_MODE or "offline", config=config)``, a new wandb run per launch; offline runs sit in
    ``<folder>/wandb`` for ``wandb sync``.

    Args:
        folder: the run's output folder (created if missing).
        report_to: one of :data:`REPORT_TO`.
        config: the run's settings, JSON-able, the wandb run config (unused by the other backends).
        start_step: 0 for a fresh run, the checkpoint's step for a resume.
    Raises:
        ValueError: an unknown ``report_to``, its package missing (the line names the install command),
            ``wandb.init`` refusing its settings (e.g. ``WANDB_MODE=online`` without a login), or a corrupt
            metrics.jsonl. OSError: ``folder`` cannot be written.
    """

    def __init__(self, folder: str, report_to: str = "none", config: dict | None = None, start_step: int = 0):
        if problem := report_to_problem(report_to):
            raise ValueError(problem)
        self.folder, self.report_to, self.start_step = folder, report_to, start_step
        self.path = os.path.join(folder, "metrics.jsonl")
        os.makedirs(folder, exist_ok=True)
        _trim(self.path, start_step)
        self._tb = self._wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard shows only the events of steps below a restart's purge_step
            self._tb = SummaryWriter(os.path.join(folder, "runs"), purge_step=start_step + 1 if start_step > 0 else 0)
        elif report_to == "wandb":
            import wandb

            mode = os.environ.get("WANDB_MODE", "offline")
            try:
                self._wandb = wandb.init(dir=folder, mode=mode, config=config)
            except (wandb.errors.Error, ValueError) as e:  # a bad mode is a pydantic ValueError
                reason = " ".join(str(e).split())
                raise ValueError(f"--report_to wandb: wandb.init failed with WANDB_MODE={mode}: {reason}") from e
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        """Append ``row`` to metrics.jsonl (strict JSON, one line, flushed) and log its numbers to the backend.

        Raises:
            ValueError: the row has no integer ``step``, or the log is closed.
        """
        if self._file is None:
            raise ValueError(f"MetricsLog of {self.folder} is closed")
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"a metrics row needs an integer 'step', got {step!r}")
        self._file.write(dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, value in row_scalars(row).items():
                self._tb.add_scalar(tag, value, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(row_scalars(row), step=step)

    def close(self) -> None:
        """Flush and close metrics.jsonl and the backend (TensorBoard writer closed, wandb run finished); idempotent."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._tb = self._wandb = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
