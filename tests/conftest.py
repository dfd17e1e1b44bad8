"""Shared by every test: the test model, built once (seconds on CPU) and cached by recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("STARCHAT_TEST_MODEL", REPO / ".test-model"))


@pytest.fixture(scope="session")
def test_model() -> Path:
    from lsp_server.testing.tiny_model import build

    return build(MODEL_DIR)


@pytest.fixture(scope="session")
def tokenizer(test_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(test_model)
