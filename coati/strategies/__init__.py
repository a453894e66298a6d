"""Strategy registry: ``--strategy`` name -> factory taking keyword options (unused ones are ignored).

Add a strategy = one module with a :class:`~coati.strategies.base.Strategy` subclass + one entry here.
"""

from __future__ import annotations

from typing import Callable

from coati.strategies.base import Strategy, StrategyUnavailable
from coati.strategies.colossalai import ColossalAIGeminiStrategy, ColossalAIZero2Strategy
from coati.strategies.ddp import DDPStrategy
from coati.strategies.fsdp import FSDPStrategy
from coati.strategies.naive import NaiveStrategy

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "naive": lambda **kw: NaiveStrategy(),
    "ddp": lambda **kw: DDPStrategy(dist_timeout=kw.get("dist_timeout", 1800.0)),
    "fsdp": lambda **kw: FSDPStrategy(zero_stage=kw.get("zero_stage", 3), cpu_offload=kw.get("cpu_offload", False),
                                      dist_timeout=kw.get("dist_timeout", 1800.0)),
    "colossalai_zero2": lambda **kw: ColossalAIZero2Strategy(
        mixed_precision=kw.get("mixed_precision", "bf16"), zero_cpu_offload=kw.get("zero_cpu_offload", False),
        dist_timeout=kw.get("dist_timeout", 1800.0), lora=kw.get("lora", False),
        max_grad_norm=kw.get("max_grad_norm", 1.0), resume_checkpoints=kw.get("resume_checkpoints", False)),
    "colossalai_gemini": lambda **kw: ColossalAIGeminiStrategy(
        mixed_precision=kw.get("mixed_precision", "bf16"), placement_policy=kw.get("placement_policy", "static"),
        dist_timeout=kw.get("dist_timeout", 1800.0), lora=kw.get("lora", False),
        max_grad_norm=kw.get("max_grad_norm", 1.0), accumulation_steps=kw.get("accumulation_steps", 1),
        resume_checkpoints=kw.get("resume_checkpoints", False)),
}
STRATEGIES["gemini"] = STRATEGIES["colossalai_gemini"]  # alias


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
