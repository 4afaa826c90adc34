"""Seeded model factories used by tests and benchmarks.

Importing this package does not import torch: ``CNN_FACTORIES`` and
``TRANSFORMER_FACTORIES`` name each factory by module path and load it on
first use; ``FACTORIES`` is a read-only view of both.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np


INPUT_KINDS = ("normal", "tokens", "ones")


@dataclass(frozen=True)
class ModelSpec:
    """A lazily imported factory and the inputs its default sizes expect.

    ``input_kinds`` says how each input is drawn: "normal" float32 N(0, 1),
    "tokens" int64 uniform in [0, vocab), "ones" int64 ones (an attention
    mask); empty means every input is "normal".
    """

    module: str
    function: str
    input_shapes: tuple[tuple[int, ...], ...]
    input_kinds: tuple[str, ...] = ()
    vocab: int = 0

    @property
    def kinds(self) -> tuple[str, ...]:
        """``input_kinds``, with the empty default spelled out."""
        return self.input_kinds or ("normal",) * len(self.input_shapes)

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


def _tokens(
    function: str, shapes: tuple[tuple[int, ...], ...] = ((2, 8),), kinds: tuple[str, ...] = ("tokens",)
) -> ModelSpec:
    return ModelSpec("transformer_zoo", function, shapes, kinds, vocab=101)


TRANSFORMER_FACTORIES: dict[str, ModelSpec] = {
    "gpt2_tied": _tokens("gpt2_tied"),
    "vit": ModelSpec("transformer_zoo", "vit", ((2, 3, 32, 32),), ("normal",)),
    "opt": _tokens("opt"),
    "bloom": _tokens("bloom"),
    "gpt_neox": _tokens("gpt_neox"),
    "bert_post_ln": _tokens("bert_post_ln", ((2, 8), (2, 8)), ("tokens", "ones")),
    "llama": _tokens("llama"),
    "tiny_gpt": _tokens("tiny_gpt"),
}

FACTORIES: Mapping[str, ModelSpec] = MappingProxyType({**CNN_FACTORIES, **TRANSFORMER_FACTORIES})


def build(name: str, seed: int = 0, **size_kwargs: Any) -> Any:
    """Build the registered torch module ``name`` (eval mode) from ``seed``."""
    return FACTORIES[name].load()(seed, **size_kwargs)


def example_inputs(
    name: str, seed: int = 0, *, batch: int | None = None, seq: int | None = None, vocab: int | None = None
) -> list[np.ndarray]:
    """Seeded inputs for ``name``, drawn as its spec's ``input_kinds`` say.

    ``batch`` overrides dim 0 of every input; for token models ``seq``
    overrides dim 1 of the token and mask inputs and ``vocab`` the range of
    the token ids (pass the same ``seq``/``vocab`` as to ``build``).
    """
    rng = np.random.default_rng(seed)
    spec = FACTORIES[name]
    high = spec.vocab if vocab is None else vocab
    inputs = []
    for shape, kind in zip(spec.input_shapes, spec.kinds, strict=True):
        if batch is not None:
            shape = (batch, *shape[1:])
        if seq is not None and kind != "normal":
            shape = (shape[0], seq, *shape[2:])
        if kind == "normal":
            inputs.append(rng.standard_normal(shape, dtype=np.float32))
        elif kind == "tokens":
            inputs.append(rng.integers(0, high, shape, dtype=np.int64))
        elif kind == "ones":
            inputs.append(np.ones(shape, dtype=np.int64))
        else:
            raise ValueError(f"unknown input kind {kind!r} of {name!r}")
    return inputs
