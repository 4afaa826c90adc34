"""Export torch modules to ONNX with BatchNormalization nodes kept unfolded.

The dynamo exporter runs with ``optimize=False`` because its onnxscript
optimizer fuses BatchNormalization into the preceding Conv/ConvTranspose/Gemm.
The TorchScript exporter runs with ``training=PRESERVE`` and constant folding
off for the same reason.

LayerNorm spelling: the dynamo exporter emits LayerNormalization; the
TorchScript exporter emits LayerNormalization from opset 17 and the
decomposed ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div(/Mul/Add) below it.
Integer inputs (token ids, masks) keep their dtype; ``dtype="float16"``
exports a half-precision copy of the module on float16 example inputs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import torch

from . import build
from . import example_inputs as seeded_inputs

EXPORTERS = ("dynamo", "torchscript")
DTYPES = ("float32", "float16")


def to_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence[np.ndarray | torch.Tensor],
    path: str | os.PathLike | None = None,
    *,
    opset: int = 18,
    exporter: str = "dynamo",
    dynamic_batch: bool = False,
    dtype: str = "float32",
) -> onnx.ModelProto:
    """Export ``module`` traced on ``example_inputs``; save to ``path`` if given.

    Inputs are named ``input`` (or ``input_0``, ``input_1``, ...) and outputs
    ``output``. Shapes are static unless ``dynamic_batch`` makes dim 0 of
    every input the symbolic ``batch``. ``dtype="float16"`` exports a
    ``.half()`` copy of ``module`` (``module`` itself is left alone) with its
    floating-point inputs cast to float16; integer inputs keep their dtype.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    args = tuple(torch.as_tensor(x) for x in example_inputs)
    if dtype == "float16":
        module = copy.deepcopy(module).half()
        args = tuple(a.half() if a.is_floating_point() else a for a in args)
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    with _quiet():
        if exporter == "dynamo":
            model = _export_dynamo(module, args, names, opset, dynamic_batch)
        else:
            model = _export_torchscript(module, args, names, opset, dynamic_batch)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


def build_onnx(
    name: str,
    seed: int = 0,
    path: str | os.PathLike | None = None,
    *,
    opset: int = 18,
    exporter: str = "dynamo",
    dynamic_batch: bool = False,
    dtype: str = "float32",
    **size_kwargs: Any,
) -> onnx.ModelProto:
    """Build the registered model ``name`` from ``seed`` and export it.

    ``size_kwargs`` go to the factory; their ``seq`` and ``vocab`` (token
    models) also shape the example inputs. ``dtype`` as for :func:`to_onnx`.
    """
    module = build(name, seed, **size_kwargs)
    inputs = seeded_inputs(name, seed, seq=size_kwargs.get("seq"), vocab=size_kwargs.get("vocab"))
    return to_onnx(
        module, inputs, path, opset=opset, exporter=exporter, dynamic_batch=dynamic_batch, dtype=dtype
    )


def _export_dynamo(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str], opset: int, dynamic_batch: bool
) -> onnx.ModelProto:
    dynamic_shapes = tuple({0: "batch"} for _ in args) if dynamic_batch else None
    with _cached_torchlib_registry():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            optimize=False,
            opset_version=opset,
            input_names=names,
            output_names=["output"],
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    model = program.model_proto
    _fix_conv3d_zero_bias(model)
    return model


def _export_torchscript(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str], opset: int, dynamic_batch: bool
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    dynamic_axes = {n: {0: "batch"} for n in [*names, "output"]} if dynamic_batch else None
    torch.onnx.export(
        module,
        args,
        buffer,
        dynamo=False,
        opset_version=opset,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        input_names=names,
        output_names=["output"],
        dynamic_axes=dynamic_axes,
    )
    return onnx.load_from_string(buffer.getvalue())


def _fix_conv3d_zero_bias(model: onnx.ModelProto) -> None:
    """Work around onnxscript#2931 (still in onnxscript 0.7.2).

    For a bias-less Conv3d, torchlib expands a zero bias to the shape
    ``Concat(Shape(W)[:1], [2])``, i.e. [C_out, 2], which onnxruntime rejects.
    Point the Expand at ``Shape(W)[:1]`` as conv1d/conv2d do and drop the
    Concat. A no-op on graphs without the pattern.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    dead = []
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 3:
            continue
        expand = producer.get(conv.input[2])
        concat = producer.get(expand.input[1]) if expand is not None and expand.op_type == "Expand" else None
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            continue
        shape = producer.get(concat.input[0])
        if shape is not None and shape.op_type == "Shape" and shape.input[0] == conv.input[1]:
            expand.input[1] = concat.input[0]
            dead += [concat, producer[concat.input[1]]]
    for node in dead:
        used = {name for n in graph.node for name in n.input} | {out.name for out in graph.output}
        if not used.intersection(node.output):
            graph.node.remove(node)


@functools.cache
def _torchlib_registry(build: Callable[..., Any], opset_version: int) -> Any:
    return build(opset_version=opset_version)


@contextlib.contextmanager
def _cached_torchlib_registry() -> Iterator[None]:
    """Reuse the dynamo exporter's operator registry across exports.

    ``torch.onnx.export(dynamo=True)`` rebuilds it from onnxscript's torchlib
    on every call (about 2.5 s: ``inspect.getsource`` on ~500 functions),
    which dominates exporting a small model. Export only reads the registry
    (we pass no ``custom_translation_table``), so one per opset is kept. A
    torch without the private hook exports uncached.
    """
    try:
        from torch.onnx._internal.exporter import _registration

        registry_cls = _registration.ONNXRegistry
        original = registry_cls.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return
    build = original.__get__(None, registry_cls)

    def from_torchlib(cls: type, opset_version: int | None = None) -> Any:
        if opset_version is None:
            return build()
        return _torchlib_registry(build, opset_version)

    registry_cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_cls.from_torchlib = original


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter warnings, log records below ERROR and stdout prints."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
