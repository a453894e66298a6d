"""The registry entry type shared by every pluggable component (losses, penalties, backbones, strategies).

Adding a component is one entry in its registry dict (``LOSSES`` in :mod:`coati.losses`, ``BACKBONES`` in
:mod:`coati.models.backbones`, ``STRATEGIES`` in :mod:`coati.strategies`); the parser offers the registry's keys as
the flag's choices and refuses another component's options (:func:`coati.preflight.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Registered:
    """A registry entry (losses, penalties): ``build(group) -> component`` from the options group it belongs to,
    and ``takes``, the options of that group it reads; setting another component's option is a parse-time error."""

    build: Any
    takes: tuple[str, ...] = ()


