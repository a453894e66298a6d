"""The docs document every registry key (docs/registries.md) and every flag (the flags tables of docs/training.md)."""

from pathlib import Path

import pytest

from coati.cli.train import build_parser
from coati.data.formats import FORMATS
from coati.data.sources import NAMED_DATASETS
from coati.losses import LOSSES, PENALTIES
from coati.models.backbones import BACKBONES
from coati.strategies import STRATEGIES

DOCS = Path(__file__).resolve().parents[1] / "docs"
REGISTRIES = (DOCS / "registries.md").read_text(encoding="utf-8")
TRAINING = (DOCS / "training.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("registry", [BACKBONES, LOSSES, PENALTIES, STRATEGIES, FORMATS, NAMED_DATASETS])
def test_docs_list_every_registry_key(registry):
    for key in registry:
        assert f"`{key}`" in REGISTRIES, key


def test_docs_list_every_flag():
    for action in build_parser()._actions:
        if action.dest != "help":
            assert f"`--{action.dest}`" in TRAINING, action.dest
