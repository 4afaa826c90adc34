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

from normfold.constants import constant, is_constant
from normfold.report import node_label
from normfold.rewrite import add_initializer, cast_finite, insert_after_value, set_input, unique_node_name
from normfold.residual import keeps_width

MAX_VIEW_DEPTH = 8


@dataclass(frozen=True)
class LinearReader:
    """A MatMul/Gemm reading the norm output as its data input; `weight_axis` indexes input features.
    `weight` is the initializer's tensor itself (not read yet) or a computed constant's values."""

    node: ir.Node
    weight: ir.TensorProtocol
    weight_axis: int

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype.numpy()


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
            readers.append(linear_reader(node, model))
        elif _depth < MAX_VIEW_DEPTH and keeps_width(node, index, model) and len(node.outputs) >= 1:
            readers += linear_readers(node.outputs[0], model, _depth + 1)
        else:
            raise NotLinear(f"it is read by {node.op_type} {node_label(node)}, which is not a linear map")
    return readers


def linear_reader(node: ir.Node, model: ir.Model) -> LinearReader:
    """The MatMul/Gemm `node` as a reader of its data input, or NotLinear (weight not constant, transA,
    a MatMul weight not 2-D)."""
    weight = weight_tensor(node.inputs[1], model)
    if isinstance(weight, str):
        raise NotLinear(f"the weight of {node.op_type} {node_label(node)} is not constant: {weight}")
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            raise NotLinear(f"Gemm {node_label(node)} has transA=1")
        return LinearReader(node, weight, 1 if node.attributes.get_int("transB", 0) else 0)
    if len(weight.shape) != 2:
        raise NotLinear(f"the weight of MatMul {node_label(node)} has rank {len(weight.shape)}, expected 2")
    return LinearReader(node, weight, 0)


def weight_tensor(value: ir.Value, model: ir.Model) -> ir.TensorProtocol | str:
    """The constant weight as a tensor, an initializer's without reading it; else why it is not constant."""
    if value.is_initializer() and is_constant(value, model):
        return value.const_value
    const = constant(value, model)
    return const.reason if const.array is None else ir.tensor(const.array)


def linear_edit(node: ir.Node, new_weight: np.ndarray | ir.TensorProtocol, delta: np.ndarray | None,
                model: ir.Model):
    """Checks and returns the edit giving a MatMul/Gemm reader `new_weight` (an array or a tensor) and
    adding `delta` to its output (into a following bias Add, Gemm's C, or a new Add)."""
    dtype = new_weight.dtype.numpy() if isinstance(new_weight, ir.TensorProtocol) else new_weight.dtype
    if node.op_type == "Gemm":
        return _gemm_edit(node, new_weight, dtype, delta, model)
    return _matmul_edit(node, new_weight, dtype, delta, model)


def _gemm_edit(node: ir.Node, new_weight, dtype, delta, model):
    c = constant(node.inputs[2], model).array if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 2 and node.inputs[2] is not None and c is None:
        raise NotLinear(f"the C input of Gemm {node.name!r} is not constant")
    alpha = node.attributes.get_float("alpha", 1.0)
    beta_g = node.attributes.get_float("beta", 1.0)
    new_c = None
    if delta is not None or c is not None:
        new_c = (0.0 if c is None else beta_g * np.asarray(c, np.float64)) + (0.0 if delta is None else alpha * delta)
        new_c = cast_checked(np.asarray(new_c), dtype, "bias")

    def apply() -> None:
        set_input(node, 1, new_weight, model, "weight", "folded")
        if new_c is not None:
            set_input(node, 2, new_c, model, "bias", "folded")
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)

    return apply


def _matmul_edit(node: ir.Node, new_weight, dtype, delta, model):
    delta = None if delta is None else cast_checked(delta, dtype, "bias")
    bias_add, bias_index, bias = _following_bias(node, model, new_weight.shape[-1])
    if delta is not None and bias_add is not None:
        new_bias = cast_checked(np.asarray(bias, np.float64) + delta, dtype, "bias")

    def apply() -> None:
        set_input(node, 1, new_weight, model, "weight", "folded")
        if delta is None:
            return
        if bias_add is not None:
            set_input(bias_add, bias_index, new_bias, model, "bias", "folded")
            return
        out = node.outputs[0]
        shift = add_initializer(node.graph, f"{out.name}_norm_beta", delta, model)
        name = unique_node_name(node.graph, f"{node.name or 'matmul'}_norm_beta")
        insert_after_value(out, ir.node("Add", [out, shift], name=name))

    return apply


def wide_new_bias(readers: list[LinearReader], width: int, model: ir.Model) -> str | None:
    """Why folding a norm's beta into one of `readers` would cost more than it saves, or None: a MatMul
    with no bias to take beta W needs a new Add over its output features, and one wider than the norm (an
    LM head: 50257 logits a token against a beta Add over 768) makes the model slower (GPT-2-small +2.5%,
    benchmarks/results/peers_runtime.md; onnxruntime then runs the head as a Gemm with a broadcast C)."""
    for reader in readers:
        features = reader.weight.shape[1 - reader.weight_axis]
        if reader.node.op_type == "MatMul" and features > width and not has_bias_slot(reader.node, features, model):
            return (f"folding beta into MatMul {node_label(reader.node)}, which has no bias, would add an Add over "
                    f"its {features} outputs, more work than the norm's own beta over {width}")
    return None


def has_bias_slot(node: ir.Node, features: int, model: ir.Model) -> bool:
    """Whether a constant added to the MatMul/Gemm's output can go into a bias it already has (Gemm's C,
    present or not, or a constant bias Add after a MatMul) rather than a new Add."""
    return node.op_type == "Gemm" or _following_bias(node, model, features)[0] is not None


def _following_bias(node: ir.Node, model: ir.Model, features: int):
    """(Add, index, bias) when the MatMul's only reader adds a constant bias over its output features."""
    out = node.outputs[0]
    uses = out.uses()
    if out.is_graph_output() or len(uses) != 1 or uses[0][0].op_type != "Add":
        return None, None, None
    add = uses[0][0]
    index = 1 - uses[0][1]
    bias = constant(add.inputs[index], model).array
    if bias is None or bias.ndim != 1 or bias.size != features:
        return None, None, None
    return add, index, bias


def cast_checked(array: np.ndarray, dtype, role: str) -> np.ndarray:
    """`array` cast to the model's dtype; NotLinear if the dtype cannot hold a value (fp16 overflow)."""
    cast = cast_finite(array, dtype)
    if cast is None:
        raise NotLinear(f"the folded {role} overflows {np.dtype(dtype).name}")
    return cast
