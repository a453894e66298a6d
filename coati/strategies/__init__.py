"""Strategy registry: ``--strategy`` name -> factory taking keyword options (unused ones are ignored).

Add a strategy = one module with a :class:`~coati.strategies.base.Strategy` subclass + one entry here.
"""

from __future__ import annotations

from typing import Callable

from coati.strategies.base import Strategy, StrategyUnavailable
from coati.strategies.ddp import DDPStrategy
from coati.strategies.fsdp import FSDPStrategy
from coati.strategies.naive import NaiveStrategy

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "naive": lambda **kw: NaiveStrategy(),
    "ddp": lambda **kw: DDPStrategy(dist_timeout=kw.get("dist_timeout", 1800.0)),
    "fsdp": lambda **kw: FSDPStrategy(zero_stage=kw.get("zero_stage", 3), cpu_offload=kw.get("cpu_offload", False),
                                      dist_timeout=kw.get("dist_timeout", 1800.0)),
}


def get_strategy(name: str, **options) -> Strategy:
    """Build the strategy called ``name`` and check that it can run here.

    Raises:
        ValueError: unknown name (lists the choices).
        StrategyUnavailable: it cannot run in this environment (the message names alternatives).
    """
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None
    strategy = factory(**options)
    strategy.check()
    return strategy


__all__ = ["STRATEGIES", "Strategy", "StrategyUnavailable", "get_strategy"]
