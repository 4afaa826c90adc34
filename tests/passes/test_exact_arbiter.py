"""Verification's float64 arbiter (normfold.exact) on a model whose float32 original is ill-conditioned.

A Pre-LN GPT with tied embeddings and +100 on every table entry: the original's logits x . (e_v + 100 1)
multiply its LayerNorm rounding by the table's mean, so the float32 original is off the exact logits by
about the renorm tolerance, and the converted model (zero-mean stream, closer to exact) then differs
from it by more than the tolerance. Verification must accept the conversion by judging against the
float64 evaluation, and must still reject a wrong candidate on the same model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import normfold
import transformer_graphs as tg
from normfold import exact
from normfold.passes import LayerNormToRMSNorm
from normfold.verification import compare

pytest.importorskip("onnxruntime")


def ill_conditioned_case():
    """Seed and width where the float32 comparison alone rejects the (exact) conversion."""
    return tg.build(tied="transpose", embedding_offset=100.0, d=64, heads=4, seed=2)


def test_ill_conditioned_original_is_arbitrated_by_float64():
    case = ill_conditioned_case()
    ids = tg.random_ids(case, seed=7)
    model, report = normfold.convert(case.model, passes=[LayerNormToRMSNorm(target="onnx")], verify=True,
                                     target="onnx", inputs={"ids": ids})
    logits = report.verification["outputs"][0]
    assert report.verification["passed"]
    assert logits["judged_against"] == "float64"
    assert "ill-conditioned" in logits["message"]
    # The float32 comparison alone rejects it: the arbiter was needed; and the candidate is the accurate side.
    converted = tg.run(ir.serde.serialize_model(model), ids)[0]
    original = tg.run(case.model, ids, optimize=False)[0]
    assert not compare("logits", original, converted, tolerance_class="renorm").passed
    truth = tg.exact_outputs(case.model, ids)[0]
    assert np.abs(converted - truth).max() < np.abs(original - truth).max()


def test_wrong_candidate_is_still_rejected_on_an_ill_conditioned_model():
    case = ill_conditioned_case()
    ids = tg.random_ids(case, seed=7)
    model, _ = normfold.convert(case.model, passes=[LayerNormToRMSNorm(target="onnx")], verify=False, target="onnx")
    head = next(v for v in model.graph.initializers.values() if v.name == case.head_weight)
    broken = head.const_value.numpy().copy()
    broken[0, 0] += 1.0
    head.const_value = ir.tensor(broken, name=head.name)
    result = normfold.verify(ir.from_proto(case.model), model, inputs={"ids": ids}, tolerance_class="renorm")
    assert not result.passed
    assert result.outputs[0].judged_against == "reference"


def test_a_passing_output_is_never_re_judged():
    case = tg.build(embedding_offset=0.0, seed=1)
    ids = tg.random_ids(case, seed=7)
    result = normfold.verify(ir.from_proto(case.model), ir.from_proto(case.model), inputs={"ids": ids})
    assert result.passed and all(o.judged_against == "reference" for o in result.outputs)


def _graph_with_constant_and_cast(domain: str = "") -> onnx.ModelProto:
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.FLOAT, [1], [1e-8])),
        helper.make_node("Add", ["x", "c"], ["y"]),
        helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["z", "x"], ["out"], domain=domain),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def test_float64_evaluation_widens_constants_casts_inputs_and_outputs():
    """(x + 1e-8) - x at x = 1: 0 in float32, 1e-8 in float64."""
    proto = _graph_with_constant_and_cast()
    wide = exact.float64_proto(proto)
    assert wide.graph.output[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # the original is untouched
    out = exact.exact_outputs(ir.from_proto(proto), {"x": np.ones(2, np.float32)})["out"]
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, 1e-8, rtol=1e-6)


def test_models_with_custom_ops_are_not_arbitrated():
    proto = _graph_with_constant_and_cast(domain="com.example")
    assert exact.exact_outputs(ir.from_proto(proto), {"x": np.ones(2, np.float32)}) is None
