"""Seeded model factories used by tests and benchmarks.

Importing this package does not import torch: ``CNN_FACTORIES`` names each
factory by module path and loads it on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """A lazily imported factory and the input shapes its default sizes expect."""

    module: str
    function: str
    input_shapes: tuple[tuple[int, ...], ...]

    def load(self) -> Callable[..., Any]:
        """Import and return the factory ``fn(seed=0, **size_kwargs)``."""
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.function)


def _cnn(function: str, *shapes: tuple[int, ...]) -> ModelSpec:
    return ModelSpec("cnn", function, shapes)


CNN_FACTORIES: dict[str, ModelSpec] = {
    "resnet_like": _cnn("resnet_like", (1, 3, 32, 32)),
    "resnet50": _cnn("resnet50", (1, 3, 224, 224)),
    "mobilenet_like": _cnn("mobilenet_like", (1, 3, 32, 32)),
    "convtranspose_decoder": _cnn("convtranspose_decoder", (1, 32, 4, 4)),
    "mlp_bn": _cnn("mlp_bn", (4, 32)),
    "conv1d_bn": _cnn("conv1d_bn", (2, 4, 64)),
    "conv3d_bn": _cnn("conv3d_bn", (1, 2, 8, 12, 12)),
}


def build(name: str, seed: int = 0, **size_kwargs: Any) -> Any:
    """Build the registered torch module ``name`` (eval mode) from ``seed``."""
    return CNN_FACTORIES[name].load()(seed, **size_kwargs)


def example_inputs(name: str, seed: int = 0, *, batch: int | None = None) -> list[np.ndarray]:
    """Seeded float32 N(0, 1) inputs for ``name``; ``batch`` overrides dim 0."""
    rng = np.random.default_rng(seed)
    shapes = CNN_FACTORIES[name].input_shapes
    if batch is not None:
        shapes = tuple((batch, *shape[1:]) for shape in shapes)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
