"""Tiny ONNX graphs built with onnx.helper for tests that need no torch."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def conv_bn(seed: int = 0, *, channels: int = 4, opset: int = 18, ir_version: int = 8) -> onnx.ModelProto:
    """x(1,3,8,8) -> Conv(3x3, pad 1) -> BatchNormalization -> Relu -> y."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, channels).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "conv_bn",
        [helper.make_tensor_value_info("x", FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", FLOAT, [1, channels, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def decomposed_norm(
    kind: str = "layernorm",
    *,
    width: int = 8,
    square: str = "pow",
    divide: str = "div",
    axes_as_input: bool = True,
    keepdims: int = 1,
    axis: int = -1,
    affine: bool = True,
    cast: bool = False,
    mid_cast: bool = False,
    opset: int = 18,
) -> onnx.ModelProto:
    """A LayerNorm or RMSNorm spelled out of primitive ops, the way exporters write it.

    square: "pow" (Pow(d, 2)) or "mul" (Mul(d, d)); divide: "div" (d / s), "reciprocal" (d * Reciprocal(s))
    or "one_div" (d * (1 / s), TorchScript's RMSNorm); mid_cast: Cast d to float and the result back
    before the affine (TorchScript's fp16 LayerNorm).
    """
    nodes, inits = [], []

    def reduce_mean(src: str, dst: str, name: str) -> None:
        if axes_as_input:
            nodes.append(helper.make_node("ReduceMean", [src, "axes"], [dst], name=name, keepdims=keepdims))
        else:
            nodes.append(helper.make_node("ReduceMean", [src], [dst], name=name, axes=[axis], keepdims=keepdims))

    if axes_as_input:
        inits.append(numpy_helper.from_array(np.array([axis], np.int64), "axes"))
    x = "x"
    if cast:
        nodes.append(helper.make_node("Cast", ["x"], ["x32"], name="cast_in", to=FLOAT))
        x = "x32"
    d = x
    if kind == "layernorm":
        reduce_mean(x, "mu", "mean")
        nodes.append(helper.make_node("Sub", [x, "mu"], ["d"], name="centre"))
        d = "d"
    if mid_cast:
        nodes.append(helper.make_node("Cast", [d], ["d32"], name="cast_mid", to=FLOAT))
        d = "d32"
    if square == "pow":
        inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
        nodes.append(helper.make_node("Pow", [d, "two"], ["sq"], name="square"))
    else:
        nodes.append(helper.make_node("Mul", [d, d], ["sq"], name="square"))
    reduce_mean("sq", "var", "variance")
    inits.append(numpy_helper.from_array(np.array(1e-5, np.float32), "eps"))
    nodes.append(helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"))
    nodes.append(helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt"))
    if divide == "div":
        nodes.append(helper.make_node("Div", [d, "std"], ["normed"], name="normalize"))
    elif divide == "reciprocal":
        nodes.append(helper.make_node("Reciprocal", ["std"], ["inv"], name="reciprocal"))
        nodes.append(helper.make_node("Mul", [d, "inv"], ["normed"], name="normalize"))
    else:
        inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
        nodes.append(helper.make_node("Div", ["one", "std"], ["inv"], name="reciprocal"))
        nodes.append(helper.make_node("Mul", [d, "inv"], ["normed"], name="normalize"))
    out = "normed"
    if mid_cast:
        nodes.append(helper.make_node("Cast", ["normed"], ["normed_back"], name="cast_back", to=FLOAT))
        out = "normed_back"
    if affine:
        rng = np.random.default_rng(0)
        inits.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "gamma"))
        nodes.append(helper.make_node("Mul", [out, "gamma"], ["scaled"], name="gamma_mul"))
        out = "scaled"
        if kind == "layernorm":
            inits.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "beta"))
            nodes.append(helper.make_node("Add", ["scaled", "beta"], ["shifted"], name="beta_add"))
            out = "shifted"
    if cast:
        nodes.append(helper.make_node("Cast", [out], ["y"], name="cast_out", to=FLOAT))
    else:
        nodes.append(helper.make_node("Identity", [out], ["y"], name="identity"))
    graph = helper.make_graph(
        nodes, "norm",
        [helper.make_tensor_value_info("x", FLOAT, [2, 3, width])],
        [helper.make_tensor_value_info("y", FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
