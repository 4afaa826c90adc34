"""fold-batchnorm: folds inference-mode BatchNormalization into an adjacent linear op.

BN(y) = s * y + t per channel, s = gamma / sqrt(var + eps), t = beta - s * mean (normfold.foldmath).

After a producer (the BN reads its only output):
  Conv          W'[o] = s_o W[o],  b' = s b + t                      (weight axis 0 is C_out)
  ConvTranspose W'[i, j] = W[i, j] s[g(i) C_out/G + j],  b' = s b + t  (weight (C_in, C_out/G, k...))
  Gemm          columns of op(B) scaled by s,  C' = s (beta C) + t, beta' = 1 (alpha unchanged)
  MatMul(+Add)  W' = W diag(s),  b' = s b + t; only for a 2-D (N, C) activation, where BN's channel
                axis 1 is the MatMul's output axis
Before a consumer (the BN output's only reader):
  Conv          W'[o, j] = W[o, j] s_c,  b'_o = b_o + sum_{j,k} W[o, j, k] t_c   (c = g(o) C_in/G + j),
                exact only with zero padding
  Gemm          rows of op(B) scaled by s,  C' = alpha t op(B) + beta C, beta' = 1   (transA = 0)

Refused, with the reason in the report: training mode or a used running-statistics output; a
parameter, weight or bias that is not a constant or can be overridden by a caller; an intermediate
read by another node or exposed as a graph output; channel counts that disagree; padding (before a
Conv). Folded weights are new initializers, so a weight shared with another node is never changed
under it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normfold import foldmath
from normfold.constants import constant
from normfold.shapes import rank
from normfold.rewrite import NormPass, add_initializer, bypass, cast_finite, only_consumer, set_input, unique_node_name


class Refused(Exception):
    """A fold does not apply here; the message says why."""


@dataclass(frozen=True)
class BatchNorm:
    """A BN node read as the per-channel affine map (scale, shift), in float64."""

    node: ir.Node
    scale: np.ndarray
    shift: np.ndarray


class FoldBatchNorm(NormPass):
    """Replaces BatchNormalization next to a Conv, ConvTranspose, Gemm or MatMul with folded weights."""

    name = "fold-batchnorm"
    handles = ("BatchNorm",)
    summary = "fold inference-mode BatchNormalization into the adjacent Conv/ConvTranspose/Gemm/MatMul"

    def rewrite(self, model: ir.Model) -> None:
        for graph in model.graphs():
            for node in list(graph):
                if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                    self._fold(node, model)

    def _fold(self, node: ir.Node, model: ir.Model) -> None:
        try:
            bn = read_batchnorm(node, model)
        except Refused as exc:
            self.skip(node, str(exc))
            return
        try:
            fold_into_producer(bn, model)
        except Refused as after:
            try:
                fold_into_consumer(bn, model)
            except Refused as before:
                self.skip(node, f"{after}; {before}")
                return
        self.applied()


def read_batchnorm(node: ir.Node, model: ir.Model) -> BatchNorm:
    """Reads an inference-mode BN's constants, or raises Refused."""
    if _int_attr(node, "training_mode", 0) != 0:
        raise Refused("BatchNormalization is in training mode")
    if _int_attr(node, "spatial", 1) != 1:
        raise Refused("BatchNormalization with spatial=0 (per-element statistics) is not supported")
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        raise Refused("a running-statistics output of BatchNormalization is used")
    params = []
    for role, value in zip(("scale", "bias", "mean", "variance"), node.inputs[1:5]):
        const = constant(value, model)
        if const.array is None:
            raise Refused(f"BN {role} is not constant: {const.reason}")
        params.append(const.array)
    eps = node.attributes.get_float("epsilon", 1e-5)
    if not np.all(np.asarray(params[3], dtype=np.float64) + eps > 0):
        raise Refused("variance + epsilon is not positive for some channel (BN outputs NaN there)")
    scale, shift = foldmath.bn_scale_shift(*params, eps)
    return BatchNorm(node, scale, shift)


def fold_into_producer(bn: BatchNorm, model: ir.Model) -> None:
    """Folds BN into the Conv/ConvTranspose/Gemm/MatMul(+Add) whose only output it reads."""
    x = bn.node.inputs[0]
    producer = x.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        raise Refused("no Conv, ConvTranspose, Gemm or MatMul produces its input")
    if not only_consumer(x, bn.node):
        what = "is a graph output" if x.is_graph_output() else "has other consumers"
        raise Refused(f"the output of {producer.op_type} {x.name!r} {what}")
    if producer.op_type in ("Conv", "ConvTranspose"):
        _fold_after_conv(bn, producer, model)
    elif producer.op_type == "Gemm":
        _fold_after_gemm(bn, producer, model)
    elif producer.op_type in ("MatMul", "Add"):
        _fold_after_matmul(bn, producer, model)
    else:
        raise Refused(f"its input comes from {producer.op_type}, which is not a linear op")


def fold_into_consumer(bn: BatchNorm, model: ir.Model) -> None:
    """Folds BN into the single Conv (zero padding) or Gemm (transA=0) that reads its output."""
    y = bn.node.outputs[0]
    uses = list(y.uses())
    if y.is_graph_output() or len(uses) != 1:
        raise Refused("its output is not read by exactly one Conv or Gemm")
    consumer, index = uses[0]
    if index != 0 or consumer.domain not in ("", "ai.onnx") or consumer.op_type not in ("Conv", "Gemm"):
        raise Refused(f"its output feeds {consumer.op_type}, not the data input of a Conv or Gemm")
    if consumer.op_type == "Conv":
        _fold_before_conv(bn, consumer, model)
    else:
        _fold_before_gemm(bn, consumer, model)


def _fold_after_conv(bn: BatchNorm, conv: ir.Node, model: ir.Model) -> None:
    weight = _constant_input(conv, 1, "weight", model)
    bias = _optional_constant_input(conv, 2, "bias", model)
    groups = _int_attr(conv, "group", 1)
    if conv.op_type == "Conv":
        _check_channels(bn, weight.shape[0], conv)
        new_weight = foldmath.scale_channels(weight, bn.scale, axis=0)
    else:
        _check_channels(bn, weight.shape[1] * groups, conv)
        new_weight = foldmath.scale_channels(weight, bn.scale, axis=1, groups=groups)
    new_bias = foldmath.affine_after_bias(bias, bn.scale, bn.shift)
    _set_weights(conv, model, weight_index=1, weight=new_weight, bias_index=2, bias=new_bias, dtype=weight.dtype)
    bypass(bn.node, conv.outputs[0])


def _fold_after_gemm(bn: BatchNorm, gemm: ir.Node, model: ir.Model) -> None:
    weight = _constant_input(gemm, 1, "B", model)
    c = _optional_constant_input(gemm, 2, "C", model)
    trans_b = _int_attr(gemm, "transB", 0)
    out_axis = 0 if trans_b else 1
    _check_channels(bn, weight.shape[out_axis], gemm)
    beta = gemm.attributes.get_float("beta", 1.0)
    new_weight = foldmath.scale_channels(weight, bn.scale, axis=out_axis)
    scaled_c = None if c is None else beta * np.asarray(c, dtype=np.float64)
    new_c = foldmath.affine_after_bias(scaled_c, bn.scale, bn.shift)
    _set_weights(gemm, model, weight_index=1, weight=new_weight, bias_index=2, bias=new_c, dtype=weight.dtype)
    gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    bypass(bn.node, gemm.outputs[0])


def _fold_after_matmul(bn: BatchNorm, producer: ir.Node, model: ir.Model) -> None:
    add, matmul = None, producer
    if producer.op_type == "Add":
        add, matmul, bias_index = _split_bias_add(producer, model)
    if matmul.op_type != "MatMul":
        raise Refused(f"its input comes from {producer.op_type}, which is not a linear op")
    activation = matmul.inputs[0]
    activation_rank = rank(activation, model)
    if activation_rank != 2:
        raise Refused(
            f"MatMul input {activation.name!r} has rank {activation_rank or 'unknown'}; only a 2-D (N, C) "
            "input puts BN's channel axis on the MatMul's output axis"
        )
    weight = _constant_input(matmul, 1, "weight", model)
    if weight.ndim != 2:
        raise Refused(f"MatMul weight has rank {weight.ndim}, expected 2")
    _check_channels(bn, weight.shape[1], matmul)
    bias = None if add is None else _bias_vector(add, bias_index, model, weight.shape[1])
    new_weight = _cast(foldmath.scale_channels(weight, bn.scale, axis=1), weight.dtype, "weight")
    new_bias = _cast(foldmath.affine_after_bias(bias, bn.scale, bn.shift), weight.dtype, "bias")
    set_input(matmul, 1, new_weight, model, "weight", "folded")
    if add is None:
        shift = add_initializer(bn.node.graph, f"{bn.node.outputs[0].name}_shift", new_bias, model)
        add_node = ir.node("Add", [matmul.outputs[0], shift],
                           name=unique_node_name(bn.node.graph, f"{bn.node.name or 'bn'}_folded_shift"))
        bn.node.graph.insert_after(matmul, add_node)
        bypass(bn.node, add_node.outputs[0])
    else:
        set_input(add, bias_index, new_bias, model, "bias", "folded")
        bypass(bn.node, add.outputs[0])


def _fold_before_conv(bn: BatchNorm, conv: ir.Node, model: ir.Model) -> None:
    pads = conv.attributes.get_ints("pads", None) or []
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    if any(pads) or auto_pad not in ("NOTSET", "VALID"):
        raise Refused("the following Conv pads its input, and padded taps would not see the BN shift")
    weight = _constant_input(conv, 1, "weight", model)
    bias = _optional_constant_input(conv, 2, "bias", model)
    groups = _int_attr(conv, "group", 1)
    _check_channels(bn, weight.shape[1] * groups, conv)
    new_weight = foldmath.scale_input_channels(weight, bn.scale, groups=groups)
    delta = foldmath.input_shift_bias(weight, bn.shift, groups=groups)
    new_bias = delta if bias is None else np.asarray(bias, dtype=np.float64) + delta
    _set_weights(conv, model, weight_index=1, weight=new_weight, bias_index=2, bias=new_bias, dtype=weight.dtype)
    bypass(bn.node, bn.node.inputs[0])


def _fold_before_gemm(bn: BatchNorm, gemm: ir.Node, model: ir.Model) -> None:
    if _int_attr(gemm, "transA", 0) != 0:
        raise Refused("the following Gemm has transA=1, so BN's channels are not its input features")
    weight = _constant_input(gemm, 1, "B", model)
    c = _optional_constant_input(gemm, 2, "C", model)
    in_axis = 1 if _int_attr(gemm, "transB", 0) else 0
    _check_channels(bn, weight.shape[in_axis], gemm)
    alpha = gemm.attributes.get_float("alpha", 1.0)
    beta = gemm.attributes.get_float("beta", 1.0)
    op_b = np.asarray(weight, dtype=np.float64)
    op_b = op_b.T if in_axis == 1 else op_b
    new_c = alpha * (bn.shift @ op_b)
    if c is not None:
        new_c = new_c + beta * np.asarray(c, dtype=np.float64)
    new_weight = foldmath.scale_channels(weight, bn.scale, axis=in_axis)
    _set_weights(gemm, model, weight_index=1, weight=new_weight, bias_index=2, bias=new_c, dtype=weight.dtype)
    gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    bypass(bn.node, bn.node.inputs[0])


def _split_bias_add(add: ir.Node, model: ir.Model) -> tuple[ir.Node, ir.Node, int]:
    """For Add(MatMul(x, W), b) returns (add, matmul, index of b); refuses any other Add."""
    for matmul_index, bias_index in ((0, 1), (1, 0)):
        operand = add.inputs[matmul_index]
        producer = operand.producer() if operand is not None else None
        if producer is not None and producer.op_type == "MatMul" and producer.domain in ("", "ai.onnx"):
            if not only_consumer(operand, add):
                raise Refused(f"the MatMul output {operand.name!r} has other consumers")
            return add, producer, bias_index
    raise Refused("its input comes from an Add that does not add a bias to a MatMul")


def _bias_vector(add: ir.Node, index: int, model: ir.Model, channels: int) -> np.ndarray:
    bias = _constant_input(add, index, "bias", model)
    if bias.ndim not in (1, 2) or bias.size != channels or bias.shape[-1] != channels:
        raise Refused(
            f"the bias added to the MatMul has shape {list(bias.shape)}, not ({channels},) or (1, {channels})"
        )
    return bias.reshape(-1)


def _set_weights(node, model, *, weight_index, weight, bias_index, bias, dtype) -> None:
    """Points the node at new initializers holding `weight` and `bias`, cast once to `dtype`."""
    weight, bias = _cast(weight, dtype, "weight"), _cast(bias, dtype, "bias")
    set_input(node, weight_index, weight, model, "weight", "folded")
    set_input(node, bias_index, bias, model, "bias", "folded")


def _cast(array: np.ndarray, dtype: np.dtype, role: str) -> np.ndarray:
    """The float64 result cast to the model's dtype; refuses values the dtype cannot hold."""
    cast = cast_finite(array, dtype)
    if cast is None:
        raise Refused(f"the folded {role} overflows {np.dtype(dtype).name}")
    return cast


def _constant_input(node: ir.Node, index: int, role: str, model: ir.Model) -> np.ndarray:
    value = node.inputs[index] if index < len(node.inputs) else None
    const = constant(value, model)
    if const.array is None:
        raise Refused(f"{node.op_type} {role} is not constant: {const.reason}")
    return const.array


def _optional_constant_input(node: ir.Node, index: int, role: str, model: ir.Model) -> np.ndarray | None:
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    return _constant_input(node, index, role, model)


def _check_channels(bn: BatchNorm, channels: int, node: ir.Node) -> None:
    if bn.scale.size != channels:
        raise Refused(f"BN has {bn.scale.size} channels but the {node.op_type} has {channels}")


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    return node.attributes.get_int(name, default)
