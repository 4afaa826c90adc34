"""Ranks of values the exporter left without shape information, inferred without changing the model.

rank(v) is v's declared rank if known, else derived from its producer: unchanged by elementwise and
normalization ops, Transpose and reductions with keepdims=1, 2 for Gemm and Flatten, 1 for Range, rank(data) + rank(indices) - 1
for Gather, the length of the Reshape target, and for MatMul
max(rank(a), rank(b)) (both >= 2). The length of a 1-D shape tensor is its declared length, its size if
constant, rank(x) for Shape(x), and the sum of the parts' lengths for a Concat (what exporters write for
dynamic axes: Reshape(x, Concat(Shape(ids), [d])). Unknown stays None: callers must then refuse, not guess.
"""

from __future__ import annotations

import onnx_ir as ir

from normfold.constants import constant

_RANK_PRESERVING = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Erf", "Clip", "Elu", "Selu", "HardSigmoid", "HardSwish",
    "Softplus", "Mish", "Identity", "Cast", "CastLike", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
    "BatchNormalization", "LayerNormalization", "Softmax", "LogSoftmax", "Transpose",
}
_REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceSumSquare", "ReduceL2"}
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"}
MAX_DEPTH = 64


def rank(value: ir.Value | None, model: ir.Model, _depth: int = 0) -> int | None:
    """The rank of `value` (see module docstring), or None when it cannot be proven."""
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if producer is None or _depth >= MAX_DEPTH or producer.domain not in ("", "ai.onnx"):
        return None
    op = producer.op_type
    if op in _RANK_PRESERVING:
        return rank(producer.inputs[0], model, _depth + 1)
    if op in ("Gemm", "Flatten"):
        return 2
    if op in _REDUCTIONS and producer.attributes.get_int("keepdims", 1) == 1:
        return rank(producer.inputs[0], model, _depth + 1)
    if op == "Range":
        return 1
    if op == "Gather":
        data, indices = (rank(v, model, _depth + 1) for v in producer.inputs[:2])
        return None if data is None or indices is None else data + indices - 1
    if op in _BROADCASTING:
        ranks = [rank(v, model, _depth + 1) for v in producer.inputs if v is not None]
        return None if None in ranks else max(ranks)
    if op == "MatMul":
        a, b = (rank(v, model, _depth + 1) for v in producer.inputs[:2])
        return max(a, b) if a is not None and b is not None and min(a, b) >= 2 else None
    if op == "Reshape":
        return _length(producer.inputs[1], model, _depth + 1)
    return None


def _length(shape_tensor: ir.Value | None, model: ir.Model, depth: int) -> int | None:
    """The number of elements of a 1-D shape tensor (see module docstring), or None."""
    if shape_tensor is None or depth >= MAX_DEPTH:
        return None
    if shape_tensor.shape is not None and len(shape_tensor.shape) == 1 and isinstance(shape_tensor.shape[0], int):
        return shape_tensor.shape[0]
    target = constant(shape_tensor, model).array
    if target is not None:
        return int(target.size)
    producer = shape_tensor.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    if producer.op_type == "Shape" and "start" not in producer.attributes and "end" not in producer.attributes:
        return rank(producer.inputs[0], model, depth + 1)
    if producer.op_type == "Concat":
        lengths = [_length(v, model, depth + 1) for v in producer.inputs]
        return None if None in lengths else sum(lengths)
    return None
