"""Who reads a norm's output: linear maps on the width axis, possibly behind width-preserving views.

`linear_readers(value)` follows the value through views that keep its last (width) axis intact
(Identity, Reshape with the same last dim, Slice/Gather/Squeeze/Unsqueeze off the last axis, a
Transpose that keeps the last axis last) and returns every MatMul or Gemm that multiplies it, on the
width axis, by a constant weight. Any other reader (an Add into the residual stream, an activation,
a graph output) makes the result a refusal with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normfold.constants import constant
from normfold.report import node_label
from normfold.residual import keeps_width

MAX_VIEW_DEPTH = 8


@dataclass(frozen=True)
class LinearReader:
    """A MatMul/Gemm reading the norm output as its data input; `weight_axis` indexes input features."""

    node: ir.Node
    weight: np.ndarray
    weight_axis: int


class NotLinear(Exception):
    """A reader of the value is not a linear map with a constant weight; the message says which."""


def linear_readers(value: ir.Value, model: ir.Model, _depth: int = 0) -> list[LinearReader]:
    """Every linear reader of `value` (see module docstring), or NotLinear."""
    if value.is_graph_output():
        raise NotLinear(f"{value.name!r} is a graph output")
    if not value.uses():
        raise NotLinear(f"{value.name!r} has no readers")
    readers = []
    for node, index in value.uses():
        if node.domain not in ("", "ai.onnx"):
            raise NotLinear(f"it is read by {node.domain}.{node.op_type} {node_label(node)}")
        if node.op_type in ("MatMul", "Gemm") and index == 0:
            readers.append(_linear(node, model))
        elif _depth < MAX_VIEW_DEPTH and keeps_width(node, index, model) and len(node.outputs) >= 1:
            readers += linear_readers(node.outputs[0], model, _depth + 1)
        else:
            raise NotLinear(f"it is read by {node.op_type} {node_label(node)}, which is not a linear map")
    return readers


def _linear(node: ir.Node, model: ir.Model) -> LinearReader:
    weight = constant(node.inputs[1], model)
    if weight.array is None:
        raise NotLinear(f"the weight of {node.op_type} {node_label(node)} is not constant: {weight.reason}")
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            raise NotLinear(f"Gemm {node_label(node)} has transA=1")
        return LinearReader(node, weight.array, 1 if node.attributes.get_int("transB", 0) else 0)
    if weight.array.ndim != 2:
        raise NotLinear(f"the weight of MatMul {node_label(node)} has rank {weight.array.ndim}, expected 2")
    return LinearReader(node, weight.array, 0)
