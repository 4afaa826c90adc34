"""Emission of normalization ops in the form the target runtime runs best.

RMSNorm(x) = x / sqrt(mean(x^2) + eps) * gamma (+ beta), over the last axis, statistics in float32:

  target "onnx", opset >= 23   RMSNormalization(x, gamma, axis=-1, epsilon, stash_type=1) [+ Add beta]
  target "onnx", opset < 23    Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(x, .) [-> Mul gamma]
                               [-> Add beta]: standard ONNX, and the spelling onnxruntime 1.2x-1.31 fuses
                               into SimplifiedLayerNormalization, only with the Mul gamma (with Mul(x, x),
                               or without the Mul, it runs the five ops: about 3x the fused kernel's time)
  target "ort"                 SimplifiedLayerNormalization(x, gamma, axis=-1, epsilon) [+ Add beta]:
                               onnxruntime's own kernel (fails onnx.checker: not standard ONNX). Its CPU
                               optimizer fuses neither this nor LayerNormalization with the residual Add
                               of a Pre-LN model (the sum has a second reader, the next Add); emitting
                               the fused SkipSimplifiedLayerNormalization (sum as output 3) would be
                               slower on CPU: its kernel is a scalar loop that divides per element,
                               about 2x SimplifiedLayerNormalization plus the Add
                               (benchmarks/results/kernel_profile_deit_tiny.md)

Float16/bfloat16 inputs are cast to float32 around the statistics in the decomposed form, as
LayerNormalization's stash_type=1 does. `centre` emits x - mean(x), the explicit recentring used
where a writer cannot be folded.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx_ir as ir

from normfold.detect import NormSite
from normfold.rewrite import add_initializer, replace_value
from normfold.validate import default_opset

TARGETS = ("auto", "onnx", "ort")
RMS_OPSET = 23


def resolve_target(target: str) -> str:
    """'auto' means 'ort' when onnxruntime is installed (it runs the result), else 'onnx'."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    if target != "auto":
        return target
    return "ort" if importlib.util.find_spec("onnxruntime") is not None else "onnx"


class Emitter:
    """Builds replacement nodes into `graph` just before `anchor`, so every input is already defined."""

    def __init__(self, model: ir.Model, anchor: ir.Node, target: str = "onnx") -> None:
        self.model = model
        self.graph = anchor.graph
        self.anchor = anchor
        self.target = resolve_target(target)
        self.opset = default_opset(model)
        self._taken = {n.name for n in self.graph}

    def node(self, op_type: str, inputs, attributes=None, domain: str = "", name: str = "") -> ir.Value:
        node = ir.node(op_type, inputs, attributes or {}, domain=domain, name=self._name(name or op_type))
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, name, array, self.model)

    def rmsnorm(self, x: ir.Value, *, epsilon: float, gamma: ir.Value | None, beta: ir.Value | None,
                dtype: ir.DataType, name: str, out_dtype: ir.DataType | None = None) -> ir.Value:
        """RMSNorm of x over its last axis (see module docstring).

        When gamma's dtype differs from x's (fp16 exports that apply a float32 affine inside their Cast
        wrappers), x is cast to gamma's dtype first and the result cast to `out_dtype` at the end."""
        out_dtype = out_dtype or dtype
        if gamma is not None and gamma.dtype is not None and gamma.dtype != dtype:
            x = self.node("Cast", [x], {"to": gamma.dtype}, name=f"{name}/to_affine_type")
            y = self.rmsnorm(x, epsilon=epsilon, gamma=gamma, beta=beta, dtype=gamma.dtype, name=name)
            return self.node("Cast", [y], {"to": out_dtype}, name=f"{name}/to_output_type") if out_dtype != gamma.dtype else y
        if self.target == "ort":
            scale = gamma if gamma is not None else self._ones(x, dtype, name)
            y = self.node("SimplifiedLayerNormalization", [x, scale], {"axis": -1, "epsilon": float(epsilon),
                          "stash_type": 1}, name=f"{name}/rmsnorm")
            return self.node("Add", [y, beta], name=f"{name}/beta") if beta is not None else y
        if self.opset >= RMS_OPSET:
            scale = gamma if gamma is not None else self._ones(x, dtype, name)
            y = self.node("RMSNormalization", [x, scale], {"axis": -1, "epsilon": float(epsilon), "stash_type": 1},
                          name=f"{name}/rmsnorm")
            return self.node("Add", [y, beta], name=f"{name}/beta") if beta is not None else y
        low_precision = dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
        h = self.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{name}/to_float") if low_precision else x
        two = self.constant(f"{name}/two", np.array(2.0, dtype=np.float32 if low_precision else dtype.numpy()))
        square = self.node("Pow", [h, two], name=f"{name}/square")
        mean = self.reduce_mean(square, name=f"{name}/mean_square")
        eps = self.constant(f"{name}/epsilon", np.array(epsilon, dtype=np.float32 if low_precision else dtype.numpy()))
        rms = self.node("Sqrt", [self.node("Add", [mean, eps], name=f"{name}/add_eps")], name=f"{name}/rms")
        y = self.node("Div", [h, rms], name=f"{name}/normalize")
        if low_precision:
            y = self.node("Cast", [y], {"to": dtype}, name=f"{name}/to_input_type")
        if gamma is not None:
            y = self.node("Mul", [y, gamma], name=f"{name}/gamma")
        if beta is not None:
            y = self.node("Add", [y, beta], name=f"{name}/beta")
        return y

    def crmsnorm(self, x: ir.Value, *, epsilon: float, width: int, dtype: ir.DataType, name: str) -> ir.Value:
        """CRMSNorm of x, a zero-mean vector of `width` elements stored as its first width - 1:
        x / sqrt((sum x^2 + (sum x)^2) / width + eps), statistics in float32 (no affine)."""
        low_precision = dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
        h = self.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{name}/to_float") if low_precision else x
        stat_type = np.float32 if low_precision else dtype.numpy()
        sum_squares = self.reduce("ReduceSum", self.node("Mul", [h, h], name=f"{name}/square"), f"{name}/sum_squares")
        total = self.reduce("ReduceSum", h, f"{name}/sum")
        implied = self.node("Mul", [total, total], name=f"{name}/implied_square")
        mean = self.node("Mul", [self.node("Add", [sum_squares, implied], name=f"{name}/all_squares"),
                                 self.constant(f"{name}/inv_width", np.array(1.0 / width, dtype=stat_type))],
                         name=f"{name}/mean_square")
        eps = self.constant(f"{name}/epsilon", np.array(epsilon, dtype=stat_type))
        rms = self.node("Sqrt", [self.node("Add", [mean, eps], name=f"{name}/add_eps")], name=f"{name}/rms")
        y = self.node("Div", [h, rms], name=f"{name}/normalize")
        if low_precision:
            y = self.node("Cast", [y], {"to": dtype}, name=f"{name}/to_input_type")
        return y

    def reduce(self, op_type: str, x: ir.Value, name: str) -> ir.Value:
        """A reduction over the last axis, keepdims=1, axes as attribute or input as the opset wants."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            axes = self.constant(f"{name}/axes", np.array([-1], dtype=np.int64))
            return self.node(op_type, [x, axes], {"keepdims": 1}, name=name)
        return self.node(op_type, [x], {"axes": [-1], "keepdims": 1}, name=name)

    def keep_first(self, x: ir.Value, count: int, name: str) -> ir.Value:
        """x[..., :count]: the first `count` elements along the last axis (Slice)."""
        ints = lambda v: self.constant(f"{name}/{v[0]}", np.array([v[1]], dtype=np.int64))  # noqa: E731
        return self.node("Slice", [x, ints(("start", 0)), ints(("end", count)), ints(("axis", -1))], name=name)

    def centre(self, x: ir.Value, name: str) -> ir.Value:
        """x - mean(x) over the last axis."""
        return self.node("Sub", [x, self.reduce_mean(x, name=f"{name}/mean")], name=f"{name}/centre")

    def reduce_mean(self, x: ir.Value, name: str) -> ir.Value:
        return self.reduce("ReduceMean", x, name)

    def _ones(self, x: ir.Value, dtype: ir.DataType, name: str) -> ir.Value:
        width = x.shape[-1] if x.shape is not None else None
        if not isinstance(width, int):
            raise ValueError(f"the width of {x.name!r} is unknown")
        return self.constant(f"{name}/ones", np.ones(width, dtype=dtype.numpy()))

    def _name(self, base: str) -> str:
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name


def replace_with_rmsnorm(site: NormSite, model: ir.Model, target: str) -> ir.Value:
    """Emits an RMSNorm with the site's epsilon and affine in place of the site's nodes; returns its output."""
    site.refresh_input()
    dtype = site.x.dtype or (site.gamma.dtype if site.gamma is not None else ir.DataType.FLOAT)
    y = Emitter(model, site.nodes[-1], target).rmsnorm(
        site.x, epsilon=site.epsilon, gamma=site.gamma, beta=site.beta, dtype=dtype,
        out_dtype=site.y.dtype or dtype, name=site.name)
    y.shape, y.type = site.y.shape, site.y.type
    replace_value(site.y, y)
    graph = site.nodes[0].graph
    for node in reversed(site.nodes):
        graph.remove(node, safe=True)
    return y
