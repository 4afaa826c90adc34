"""Structural checks that a model is one normfold can safely work on.

Two layers, both answering with one line that names the problem:

- `validate_proto` runs on the raw protobuf, before onnx-ir wraps it, so nothing is allocated from
  untrusted sizes: subgraphs nested deeper than MAX_SUBGRAPH_DEPTH; sparse tensors and training_info
  (onnx-ir would silently drop them); every embedded tensor (initializers, node attributes, in every
  graph and function) must have non-negative dims, a known data type and exactly the data its shape
  needs, so an initializer declaring dims like 2**40 without the bytes to match is refused here.
- `validate_model` runs on the onnx-ir model: an ir_version outside what the installed onnx knows, a
  missing or out-of-range default-domain opset, a node of a domain the model (or its function) does not
  import, values that are used but never defined (in any scope), cycles, and initializers whose stored
  bytes do not match their declared shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from normfold.errors import InputError

MIN_IR_VERSION = 3
MIN_OPSET = 7
"""BatchNormalization took its modern form (no `spatial`/`is_test` semantics to emulate) at opset 7."""

MAX_SUBGRAPH_DEPTH = 16
"""Deepest nesting of subgraphs (If/Loop/Scan bodies) accepted; real models use a handful of levels."""

_DATA_TYPES = frozenset(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
_COMPLEX = frozenset({onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128})
_AttrType = onnx.AttributeProto.AttributeType


def max_opset() -> int:
    """The newest default-domain opset the installed onnx package knows."""
    return onnx.defs.onnx_opset_version()


def default_opset(model: ir.Model) -> int | None:
    """The model's ai.onnx opset version, or None if it imports none."""
    for domain in ("", "ai.onnx"):
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


# ---------------------------------------------------------------------------------------------------
# Protobuf level


def iter_tensor_protos(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(description, tensor) for every TensorProto of the model: initializers and node attributes of
    the main graph, every subgraph and every model-local function. Iterative, so depth cannot overflow."""
    for where, graph, _depth in _iter_graph_protos(proto):
        for tensor in graph.initializer:
            yield f"initializer {tensor.name!r}{where}", tensor
    for node, where in _iter_node_protos(proto):
        for attr in node.attribute:
            label = f"attribute {attr.name!r} of node {node.name or node.op_type!r}{where}"
            if attr.HasField("t"):
                yield label, attr.t
            for tensor in attr.tensors:
                yield label, tensor


def validate_proto(proto: onnx.ModelProto, *, name: str) -> None:
    """Raises InputError if the protobuf holds something normfold cannot keep or must not allocate."""
    if len(proto.training_info):
        raise InputError(f"{name}: the model has training_info, which normfold cannot preserve; not supported")
    for where, graph, depth in _iter_graph_protos(proto):
        if depth > MAX_SUBGRAPH_DEPTH:
            raise InputError(
                f"{name}: subgraphs are nested {depth} deep{where}, more than the {MAX_SUBGRAPH_DEPTH} supported"
            )
        if len(graph.sparse_initializer):
            raise InputError(f"{name}: sparse initializers{where} are not supported")
    for node, where in _iter_node_protos(proto):
        for attr in node.attribute:
            if attr.HasField("sparse_tensor") or len(attr.sparse_tensors):
                raise InputError(
                    f"{name}: node {node.name or node.op_type!r}{where} has a sparse tensor attribute; not supported"
                )
    for label, tensor in iter_tensor_protos(proto):
        _check_tensor_proto(tensor, f"{name}: {label}")


def _iter_graph_protos(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.GraphProto, int]]:
    """(where, graph, depth) for the main graph and every subgraph, functions' included."""
    stack: list[tuple[str, onnx.GraphProto, int]] = [("", proto.graph, 0)]
    for function in proto.functions:
        where = f" in function {function.domain}::{function.name}"
        stack.extend((where, g, 1) for g in _subgraphs_of(function.node))
    while stack:
        where, graph, depth = stack.pop()
        yield where, graph, depth
        if depth > MAX_SUBGRAPH_DEPTH:
            continue  # the caller refuses it; do not walk further down
        inner = f" in subgraph {graph.name!r}" if depth else where
        stack.extend((inner, g, depth + 1) for g in _subgraphs_of(graph.node))


def _subgraphs_of(nodes) -> Iterator[onnx.GraphProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield attr.g
            yield from attr.graphs


def _iter_node_protos(proto: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, str]]:
    for where, graph, depth in _iter_graph_protos(proto):
        if depth <= MAX_SUBGRAPH_DEPTH:
            for node in graph.node:
                yield node, where
    for function in proto.functions:
        for node in function.node:
            yield node, f" in function {function.domain}::{function.name}"


def _check_tensor_proto(tensor: onnx.TensorProto, label: str) -> None:
    if any(d < 0 for d in tensor.dims):
        raise InputError(f"{label} has negative dims {list(tensor.dims)}")
    if tensor.data_type not in _DATA_TYPES:
        raise InputError(f"{label} has an unknown data type ({tensor.data_type})")
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        _check_external_entries(tensor, label)
        return  # the file itself is checked by normfold.io before anything reads it
    count = math.prod(tensor.dims)
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        raise InputError(f"{label} has a data type this onnx-ir does not know ({tensor.data_type})") from None
    dtype_name = onnx.TensorProto.DataType.Name(tensor.data_type)
    if tensor.HasField("raw_data"):
        if dtype == ir.DataType.STRING:
            raise InputError(f"{label} is a string tensor stored as raw bytes, which ONNX does not allow")
        expected = (count * dtype.bitwidth + 7) // 8
        have = len(tensor.raw_data)
        if have != expected:
            raise InputError(
                f"{label} holds {have} bytes but its shape {list(tensor.dims)} of {dtype_name} needs {expected}"
            )
        return
    try:
        field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    except (KeyError, ValueError):  # a type newer than this check: leave it to onnx-ir
        return
    have = len(getattr(tensor, field))
    if dtype != ir.DataType.STRING and dtype.bitwidth < 8:
        # Sub-byte types pack several values per stored element; only an empty store is surely wrong.
        if count and not have:
            raise InputError(f"{label} holds no data but its shape {list(tensor.dims)} needs {count} values")
        return
    expected = 2 * count if tensor.data_type in _COMPLEX else count
    if have != expected:
        raise InputError(
            f"{label} holds {have} values but its shape {list(tensor.dims)} of {dtype_name} needs {expected}"
        )


def _check_external_entries(tensor: onnx.TensorProto, label: str) -> None:
    """An external tensor needs a location; offset and length, when given, are non-negative integers."""
    entries = {e.key: e.value for e in tensor.external_data}
    if not entries.get("location"):
        raise InputError(f"{label} is stored externally but has no location")
    for key in ("offset", "length"):
        if key in entries and not (entries[key].isascii() and entries[key].isdigit()):
            raise InputError(f"{label} has external data {key} {entries[key]!r}; expected a non-negative integer")


# ---------------------------------------------------------------------------------------------------
# onnx-ir level


def validate_model(model: ir.Model, *, name: str, check_tensors: bool = True) -> None:
    """Raises InputError with one clear line if `model` is structurally unusable.

    `check_tensors=False` skips the initializer size check, for a model whose protobuf already passed
    `validate_proto` (it would read every tensor's bytes a second time).
    """
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
        _check_domains(graph, model.opset_imports, name)
        if check_tensors:
            _check_initializer_sizes(graph, name)
    for function in model.functions.values():
        _check_domains(function, function.opset_imports or model.opset_imports, name)
    _check_acyclic(model.graph, name)


def _check_domains(nodes, imports, name: str) -> None:
    """Every node's domain is imported (onnxruntime and onnx's checker refuse the model otherwise)."""
    imported = {"" if d == "ai.onnx" else d for d in imports}
    for node in nodes:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain not in imported:
            raise InputError(f"{name}: node {node.name or node.op_type!r} is of domain {node.domain!r}, "
                             "which the model does not import (no opset_import entry)")


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
        if not proto.HasField("raw_data") or tensor.dtype == ir.DataType.STRING:
            continue
        expected = (tensor.size * tensor.dtype.bitwidth + 7) // 8
        if len(proto.raw_data) != expected:
            raise InputError(
                f"{name}: initializer {value.name!r} holds {len(proto.raw_data)} bytes but its shape "
                f"{list(tensor.shape)} of {tensor.dtype.name} needs {expected}"
            )
