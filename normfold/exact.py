"""Float64 evaluation of a reference model: the arbiter when the float32 reference is itself off.

Verification compares the candidate with the original run in float32. Where the original is
ill-conditioned in float32 (a LayerNorm of values near 100 whose output meets a table of mean 100:
the logits x . (e_v + 100 1) multiply the norm's rounding error by 100 d), the original misses the
exact function by more than the tolerance while a rewrite that removed the offset does not. A failing
output is then judged again against the original evaluated in float64 (every float initializer,
Constant, Cast target, input and output widened; run by onnx's reference evaluator):

    passed  <=>  cand within tolerance of exact  and  max|cand - exact| <= max|ref32 - exact|,

so a candidate only ever passes by being within the tolerance of the exact function, and only when it
is at least as accurate as the original's own float32 run: the disagreement is the reference's rounding. Models the evaluator cannot run in
float64 (custom domains, too large) are not arbitrated: the float32 verdict stands.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, numpy_helper

MAX_EVALUATED_BYTES = 256 * 2**20
"""Initializer bytes (in float64) above which the reference evaluator is too slow to serve as arbiter."""

_WIDENED = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_STANDARD_DOMAINS = ("", "ai.onnx")


def float64_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in float64: float tensors, Constants, Cast targets, inputs and outputs."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type in _WIDENED:
            graph.initializer[i].CopyFrom(_widened(tensor))
    for node in _all_nodes(graph):
        for attr in node.attribute:
            if attr.name == "to" and attr.i in _WIDENED:
                attr.i = TensorProto.DOUBLE
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _WIDENED:
                attr.t.CopyFrom(_widened(attr.t))
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type in _WIDENED:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    return wide


def exact_outputs(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The model's outputs evaluated in float64, or None when it cannot be (see module docstring)."""
    if not _evaluable(model):
        return None
    from onnx.reference import ReferenceEvaluator

    wide_feeds = {k: (v.astype(np.float64) if np.asarray(v).dtype.kind == "f" else v) for k, v in feeds.items()}
    try:
        evaluator = ReferenceEvaluator(float64_proto(ir.serde.serialize_model(model)))
        outputs = evaluator.run(None, wide_feeds)
    except Exception:  # an op, dtype or tensor the evaluator cannot take: no arbitration, the float32 verdict stands
        return None
    return dict(zip(evaluator.output_names, (np.asarray(o) for o in outputs)))


def _evaluable(model: ir.Model) -> bool:
    local = {(domain, name) for domain, name, _ in model.functions}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in _STANDARD_DOMAINS and (node.domain, node.op_type) not in local:
            return False
    size = sum(8 * int(np.prod(v.shape.numpy(), dtype=np.int64))
               for v in model.graph.initializers.values() if v.shape is not None and v.shape.is_static())
    return size <= MAX_EVALUATED_BYTES


def _widened(tensor: TensorProto) -> TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)
