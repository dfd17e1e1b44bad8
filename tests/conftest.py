"""Shared by every test: the test model, built once (seconds on CPU) and cached by recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Without a GPU, the Triton kernels' tests run under Triton's interpreter (float32 on the CPU)
# where triton is installed (.ci/run installs it); set before any kernel is defined.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a dependency
    pass

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
