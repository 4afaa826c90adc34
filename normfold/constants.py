"""Which values of a graph are compile-time constants, and their contents.

A value is constant when it is
- an initializer a caller cannot override (a graph input at IR >= 4 can be; below IR 4 every
  initializer was listed as an input by rule, so it counts as constant);
- the output of a `Constant` node;
- `Shape` of a value whose shape is fully static;
- the output of any other deterministic, subgraph-free ai.onnx node whose inputs are all constant,
  evaluated with onnx's reference evaluator. This sees through what exporters emit around weights:
  the zero bias of a bias-less Conv built by Shape/CastLike/Expand (torch's dynamo exporter; CastLike
  needs only the dtype of its second operand),
  Identity copies of deduplicated weights (TorchScript), ConstantOfShape weights (the model zoo).
Evaluation is bounded in depth, and in the number of elements an op may produce beyond what its
inputs already hold, so it never blows up memory (a Transpose of a large tied table is fine; a
ConstantOfShape of 2**40 elements is not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

LEGACY_INPUT_INITIALIZERS_IR = 4
"""Below this ir_version initializers are listed among the graph inputs by rule."""

MAX_DEPTH = 16
MAX_ELEMENTS = 1 << 24
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}


@dataclass(frozen=True)
class Constant:
    """A constant's contents, or why the value is not a constant."""

    array: np.ndarray | None
    reason: str = ""


def is_constant(value: ir.Value | None, model: ir.Model) -> bool:
    """Whether `constant(value, model)` has contents, without reading an initializer's data."""
    if value is not None and value.is_initializer():
        overridable = value.is_graph_input() and model.ir_version >= LEGACY_INPUT_INITIALIZERS_IR
        return value.const_value is not None and not overridable
    return _may_be_constant(value, model) and constant(value, model).array is not None


def _may_be_constant(value: ir.Value | None, model: ir.Model, depth: int = 0) -> bool:
    """False when `value` certainly is not a constant: it depends on a graph input, or on a node
    `constant` never evaluates. Reads no tensor data, so `constant` checks it before reading any."""
    if value is None or value.is_initializer():
        return value is None or is_constant(value, model)
    producer = value.producer()
    if producer is None or depth >= MAX_DEPTH:
        return False
    if producer.op_type in ("Constant", "Shape"):
        return True
    if producer.domain not in ("", "ai.onnx") or producer.op_type in _NONDETERMINISTIC or _has_subgraph(producer):
        return False
    return all(_may_be_constant(operand, model, depth + 1)
               for index, operand in enumerate(producer.inputs) if not (producer.op_type == "CastLike" and index))


def constant(value: ir.Value | None, model: ir.Model, _depth: int = 0) -> Constant:
    """Returns the value's contents if it is a compile-time constant, else the reason it is not."""
    if value is None:
        return Constant(None, "the input is absent")
    if value.is_initializer():
        if value.is_graph_input() and model.ir_version >= LEGACY_INPUT_INITIALIZERS_IR:
            return Constant(None, f"{value.name!r} is a graph input, so a caller can override it")
        if value.const_value is None:
            return Constant(None, f"{value.name!r} is an initializer without data")
        return Constant(value.const_value.numpy())
    producer = value.producer()
    if producer is None:
        return Constant(None, f"{value.name!r} is a graph input, not a constant")
    not_constant = Constant(None, f"{value.name!r} is computed by a {producer.op_type} node, not a constant")
    if producer.domain not in ("", "ai.onnx") or producer.op_type in _NONDETERMINISTIC or _has_subgraph(producer):
        return not_constant
    if producer.op_type == "Constant":
        tensor = ir.convenience.get_const_tensor(value)
        return Constant(tensor.numpy()) if tensor is not None else not_constant
    if producer.op_type == "Shape":
        return _static_shape(producer) or not_constant
    if _depth >= MAX_DEPTH or not _may_be_constant(value, model, _depth):
        return not_constant
    inputs = []
    for index, operand in enumerate(producer.inputs):
        if producer.op_type == "CastLike" and index == 1 and operand is not None and operand.dtype is not None:
            inputs.append(np.empty(0, dtype=operand.dtype.numpy()))  # only its dtype matters
            continue
        const = None if operand is None else constant(operand, model, _depth + 1)
        if const is not None and const.array is None:
            return not_constant
        inputs.append(None if const is None else const.array)
    return _evaluate(producer, list(producer.outputs).index(value), inputs, model) or not_constant


def _evaluate(node: ir.Node, output_index: int, inputs: list[np.ndarray | None], model: ir.Model) -> Constant | None:
    """Runs one node on constant inputs with onnx's reference evaluator; None if it cannot or is too big."""
    present = [a for a in inputs if a is not None]
    bound = _output_size_bound(node.op_type, present)
    if bound is None or bound > max(MAX_ELEMENTS, sum(a.size for a in present)):
        return None  # an op that would grow the data past the limit (never a Transpose of a big weight)
    proto = ir.serde.serialize_node(node)
    feeds = {name: array for name, array in zip(proto.input, inputs) if name and array is not None}
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    try:
        results = ReferenceEvaluator(proto, opsets={"": opset}).run(None, feeds)
    except Exception:  # the reference evaluator lacks a kernel or rejects the node: not foldable
        return None
    return Constant(np.asarray(results[output_index]))


_SIZE_PRESERVING = {"Identity", "Cast", "CastLike", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Relu",
                    "Floor", "Ceil", "Sign", "Not", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Flatten",
                    "Slice", "Split", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"}
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Where", "Equal", "Less", "Greater",
                 "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Sum", "Mean"}


def _output_size_bound(op_type: str, inputs: list[np.ndarray]) -> int | None:
    """An upper bound on the elements a node produces from these inputs, or None if unknown (not folded)."""
    try:
        if op_type in _SIZE_PRESERVING:
            return inputs[0].size
        if op_type in _BROADCASTING:
            return int(np.prod(np.broadcast_shapes(*(a.shape for a in inputs)), dtype=object))
        if op_type == "Concat":
            return sum(a.size for a in inputs)
        if op_type == "Gather":
            return inputs[0].size * max(1, inputs[1].size)
        if op_type == "ConstantOfShape":
            return int(np.prod([int(d) for d in inputs[0].reshape(-1)], dtype=object))
        if op_type == "Expand":
            target = tuple(int(d) for d in inputs[1].reshape(-1))
            return int(np.prod(np.broadcast_shapes(inputs[0].shape, target), dtype=object))
        if op_type == "Tile":
            return inputs[0].size * int(np.prod([int(d) for d in inputs[1].reshape(-1)], dtype=object))
    except (ValueError, IndexError, OverflowError):
        return None
    return None


def _static_shape(node: ir.Node) -> Constant | None:
    """Shape(x)[start:end] when every dim of x is known."""
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    dims = np.array([int(d) for d in shape], dtype=np.int64)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    return Constant(dims[start:end])


def _has_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())
