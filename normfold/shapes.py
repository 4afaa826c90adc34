"""Ranks of values the exporter left without shape information, inferred without changing the model.

rank(v) is v's declared rank if known, else derived from its producer: unchanged by elementwise and
normalization ops, 2 for Gemm and Flatten, the length of a constant Reshape target, and for MatMul
max(rank(a), rank(b)) (both >= 2). Unknown stays None: callers must then refuse, not guess.
"""

from __future__ import annotations

import onnx_ir as ir

from normfold.constants import constant

_RANK_PRESERVING = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Erf", "Clip", "Elu", "Selu", "HardSigmoid", "HardSwish",
    "Softplus", "Mish", "Identity", "Cast", "CastLike", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt",
    "BatchNormalization", "LayerNormalization", "Softmax", "LogSoftmax",
}
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
    if op in _BROADCASTING:
        ranks = [rank(v, model, _depth + 1) for v in producer.inputs if v is not None]
        return None if None in ranks else max(ranks)
    if op == "MatMul":
        a, b = (rank(v, model, _depth + 1) for v in producer.inputs[:2])
        return max(a, b) if a is not None and b is not None and min(a, b) >= 2 else None
    if op == "Reshape":
        target = constant(producer.inputs[1], model).array
        return None if target is None else int(target.size)
    return None
