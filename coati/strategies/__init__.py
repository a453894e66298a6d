"""Strategy registry: ``--strategy`` name -> the :class:`~coati.strategies.base.Strategy` class, built from the
:class:`~coati.config.StrategyArgs` group (``STRATEGIES[name](cfg.strategy)``).

Add a strategy = one module with a ``Strategy`` subclass (its ``takes``, ``precisions``, ``refuses`` and
``unavailable`` say which options it reads and what it cannot do; a new option is one field of ``StrategyArgs``)
plus one entry here.
"""

from __future__ import annotations

from coati.strategies.base import Strategy, StrategyUnavailable
from coati.strategies.colossalai import ColossalAIDDPStrategy, ColossalAIGeminiStrategy, ColossalAIZero2Strategy
from coati.strategies.ddp import DDPStrategy
from coati.strategies.fsdp import FSDPStrategy
from coati.strategies.naive import NaiveStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "naive": NaiveStrategy,
    "ddp": DDPStrategy,
    "fsdp": FSDPStrategy,
    "colossalai_ddp": ColossalAIDDPStrategy,
    "colossalai_zero2": ColossalAIZero2Strategy,
    "colossalai_gemini": ColossalAIGeminiStrategy,
}
STRATEGIES["gemini"] = STRATEGIES["colossalai_gemini"]  # alias

__all__ = ["STRATEGIES", "Strategy", "StrategyUnavailable"]
