"""Structural checks that a loaded model is one normfold can safely work on.

Refused, each with one line naming the problem: an ir_version outside what the installed onnx knows,
a missing or out-of-range default-domain opset, values that are used but never defined (in any
scope), cycles, and initializers whose stored bytes do not match their declared shape.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from normfold.errors import InputError

MIN_IR_VERSION = 3
MIN_OPSET = 7
"""BatchNormalization took its modern form (no `spatial`/`is_test` semantics to emulate) at opset 7."""


def max_opset() -> int:
    """The newest default-domain opset the installed onnx package knows."""
    return onnx.defs.onnx_opset_version()


def default_opset(model: ir.Model) -> int | None:
    """The model's ai.onnx opset version, or None if it imports none."""
    for domain in ("", "ai.onnx"):
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


def validate_model(model: ir.Model, *, name: str) -> None:
    """Raises InputError with one clear line if `model` is structurally unusable."""
    if model.ir_version > onnx.IR_VERSION:
        raise InputError(
            f"{name}: ir_version {model.ir_version} is newer than this onnx package supports ({onnx.IR_VERSION})"
        )
    if model.ir_version < MIN_IR_VERSION:
        raise InputError(f"{name}: ir_version {model.ir_version} is too old (need >= {MIN_IR_VERSION})")
    opset = default_opset(model)
    if opset is None:
        raise InputError(f"{name}: the model imports no ai.onnx opset")
    if opset > max_opset():
        raise InputError(f"{name}: opset {opset} is newer than this onnx package supports ({max_opset()})")
    if opset < MIN_OPSET:
        raise InputError(f"{name}: opset {opset} is too old (need >= {MIN_OPSET})")
    for graph in model.graphs():
        _check_defined(graph, name)
        _check_initializer_sizes(graph, name)
    _check_acyclic(model.graph, name)


def _check_defined(graph: ir.Graph, name: str) -> None:
    for node in graph:
        for value in node.inputs:
            if value is None or value.producer() is not None:
                continue
            if value.is_graph_input() or value.is_initializer():
                continue
            raise InputError(
                f"{name}: node {node.name or node.op_type!r} reads {value.name!r}, which is never defined"
            )
    for value in graph.outputs:
        if value.producer() is None and not value.is_graph_input() and not value.is_initializer():
            raise InputError(f"{name}: graph output {value.name!r} is never defined")


def _check_acyclic(graph: ir.Graph, name: str) -> None:
    try:
        graph.sort()
    except ValueError as exc:
        raise InputError(f"{name}: the graph has a cycle ({exc})") from None


def _check_initializer_sizes(graph: ir.Graph, name: str) -> None:
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not isinstance(tensor, ir.TensorProtoTensor):
            continue
        proto = tensor.raw
        if not proto.HasField("raw_data") or tensor.dtype.bitwidth < 8:
            continue
        expected = tensor.dtype.itemsize * tensor.size
        if len(proto.raw_data) != expected:
            raise InputError(
                f"{name}: initializer {value.name!r} holds {len(proto.raw_data)} bytes but its shape "
                f"{list(tensor.shape)} of {tensor.dtype.name} needs {expected}"
            )
