"""Which values of a graph are compile-time constants, and their contents.

A value is constant when it is an initializer that a caller cannot override, the output of a
`Constant` node, or the output of `ConstantOfShape` on a constant shape (the onnx model-zoo "light"
graphs store their weights that way). An initializer that is also a graph input is overridable at
IR version >= 4; below 4, every initializer was listed as an input by rule, so it counts as constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

LEGACY_INPUT_INITIALIZERS_IR = 4
"""Below this ir_version initializers are listed among the graph inputs by rule."""


@dataclass(frozen=True)
class Constant:
    """A constant's contents, or why the value is not a constant."""

    array: np.ndarray | None
    reason: str = ""


def constant(value: ir.Value | None, model: ir.Model) -> Constant:
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
    if producer.domain in ("", "ai.onnx"):
        if producer.op_type == "Constant":
            tensor = ir.convenience.get_const_tensor(value)
            if tensor is not None:
                return Constant(tensor.numpy())
        if producer.op_type == "ConstantOfShape":
            return _constant_of_shape(producer, model)
    return Constant(None, f"{value.name!r} is computed by a {producer.op_type} node, not a constant")


def _constant_of_shape(node: ir.Node, model: ir.Model) -> Constant:
    shape = constant(node.inputs[0], model)
    if shape.array is None:
        return Constant(None, f"the shape of {node.outputs[0].name!r} is not constant")
    fill = node.attributes.get("value")
    fill_array = fill.as_tensor().numpy().reshape(-1) if fill is not None else np.zeros(1, np.float32)
    dims = [int(d) for d in shape.array.reshape(-1)]
    return Constant(np.full(dims, fill_array[0], dtype=fill_array.dtype))


def is_overridable(value: ir.Value, model: ir.Model) -> bool:
    """True when a caller can replace the value at run time (a graph input at IR >= 4)."""
    return value.is_graph_input() and (
        not value.is_initializer() or model.ir_version >= LEGACY_INPUT_INITIALIZERS_IR
    )
