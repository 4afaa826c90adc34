"""normfold.detect: fused and decomposed normalization sites, look-alikes rejected, BN verdicts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from normfold import detect, io
from toy_models import conv_bn, decomposed_norm


def sites_of(proto: onnx.ModelProto) -> list[detect.Site]:
    return [site.describe() for site in detect.find_sites(io.from_proto(proto))]


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("divide", ["div", "reciprocal", "one_div"])
@pytest.mark.parametrize("axes_as_input", [True, False])
@pytest.mark.parametrize("cast", [False, True])
def test_decomposed_spellings_are_found(kind, square, divide, axes_as_input, cast):
    proto = decomposed_norm(kind, square=square, divide=divide, axes_as_input=axes_as_input, cast=cast,
                            opset=18 if axes_as_input else 13)
    (site,) = sites_of(proto)
    assert site.kind == ("LayerNorm" if kind == "layernorm" else "RMSNorm")
    assert site.axis == -1
    assert site.epsilon == pytest.approx(1e-5)
    assert site.input == "x"
    assert site.output == "y" if cast else site.output in ("shifted", "scaled")
    expected_nodes = {"square", "variance", "add_eps", "sqrt", "normalize", "gamma_mul"}
    expected_nodes |= {"mean", "centre", "beta_add"} if kind == "layernorm" else set()
    expected_nodes |= {"reciprocal"} if divide != "div" else set()
    expected_nodes |= {"cast_in", "cast_out"} if cast else set()
    assert set(site.nodes) == expected_nodes
    assert site.spelling.startswith("decomposed: ")


@pytest.mark.parametrize(
    "variant",
    [dict(keepdims=0), dict(axis=1), dict(axis=0)],
    ids=["keepdims0", "middle-axis", "batch-axis"],
)
def test_look_alikes_are_not_norms(variant):
    assert sites_of(decomposed_norm("layernorm", **variant)) == []


def test_fused_ops_are_found_with_their_attributes():
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["y1"], name="ln", epsilon=1e-6),
        helper.make_node("InstanceNormalization", ["x", "g3", "b3"], ["y2"], name="in"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y1", "y2")],
        [onnx.numpy_helper.from_array(np.ones(8, np.float32), "g"),
         onnx.numpy_helper.from_array(np.zeros(8, np.float32), "b"),
         onnx.numpy_helper.from_array(np.ones(3, np.float32), "g3"),
         onnx.numpy_helper.from_array(np.zeros(3, np.float32), "b3")],
    )
    sites = sites_of(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert [(s.kind, s.name, s.axis, s.epsilon, s.dtype) for s in sites] == [
        ("LayerNorm", "ln", -1, 1e-6, "float32"),
        ("InstanceNorm", "in", 1, 1e-5, "float32"),
    ]


def test_inspect_says_whether_fold_batchnorm_applies():
    model = io.from_proto(conv_bn())
    (site,) = detect.inspect(model)
    assert site["kind"] == "BatchNorm" and site["passes"] == {"fold-batchnorm": "applies"}
    assert [n.op_type for n in model.graph] == ["Conv", "BatchNormalization", "Relu"], "inspect changed the model"


def test_inspect_gives_the_reason_a_batchnorm_stays():
    proto = conv_bn()
    proto.graph.output.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    (site,) = detect.inspect(io.from_proto(proto))
    verdict = site["passes"]["fold-batchnorm"]
    assert verdict.startswith("does not apply:") and "'c' is a graph output" in verdict


def test_fp16_torchscript_layernorm_with_a_cast_after_centring_is_a_layernorm():
    (site,) = sites_of(decomposed_norm("layernorm", mid_cast=True))
    assert site.kind == "LayerNorm"
    assert {"cast_mid", "cast_back", "mean", "centre", "gamma_mul", "beta_add"} <= set(site.nodes)


def test_a_per_position_gamma_is_not_absorbed_as_the_affine():
    proto = decomposed_norm("layernorm")
    gamma = next(i for i in proto.graph.initializer if i.name == "gamma")
    gamma.CopyFrom(onnx.numpy_helper.from_array(np.ones((3, 8), np.float32), "gamma"))
    (site,) = sites_of(proto)
    assert site.kind == "LayerNorm" and "gamma_mul" not in site.nodes and site.output == "normed"
