"""Tiny transformers GPT-2 models and token data for the LayerNorm-removal tests."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from finetune_helpers import tiny_data, tiny_gpt2  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return tiny_gpt2()


@pytest.fixture
def data():
    return tiny_data()


@pytest.fixture
def ids():
    return torch.from_numpy(np.random.default_rng(7).integers(0, 64, size=(3, 16)))
