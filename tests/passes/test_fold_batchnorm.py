"""fold-batchnorm: positive cases, parameterized variants, negative cases (model unchanged, reason
reported), shared weights, graph outputs, and numerical equivalence on onnxruntime.

Equivalence: the original model runs on onnxruntime with every graph optimization disabled, the
folded one both with optimizations disabled and enabled, on the same N(0, 1) inputs; the tolerance
is REFERENCE.md's for BN folds: fp32 rtol 1e-4, atol 1e-5 * max(1, rms(reference)); fp16 1e-2 /
1e-2 * scale (bn_graphs.assert_close). The models come from bn_graphs (onnx.helper, seeded numpy).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import bn_graphs as bg
import normfold
from bn_graphs import GraphBuilder
from normfold.io import from_proto
from normfold.passes import FoldBatchNorm
from normfold.pipeline import run_passes

pytest.importorskip("onnxruntime")

F16 = np.float16
F32 = np.float32


def fold(proto: onnx.ModelProto):
    """(folded ModelProto, report) after running fold-batchnorm alone through the pipeline."""
    model = from_proto(proto)
    report = run_passes(model, [FoldBatchNorm()])
    return ir.serde.serialize_model(model), report


def count(proto: onnx.ModelProto, op: str = "BatchNormalization") -> int:
    return sum(node.op_type == op for node in proto.graph.node)


def reasons(report) -> str:
    return " | ".join(f"{s.node}: {s.reason}" for s in report.passes[0].skipped)


def initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def assert_folds(case: bg.Case):
    """The case's BNs all fold, the report says how many, and the outputs are equivalent."""
    folded, report = fold(case.model)
    entry = report.passes[0]
    assert entry.applied == case.folds, reasons(report)
    assert report.ops_before.get("BatchNormalization", 0) == count(case.model) == case.folds
    assert report.ops_after.get("BatchNormalization", 0) == 0
    assert count(folded) == 0
    assert [o.name for o in folded.graph.output] == [o.name for o in case.model.graph.output]
    assert [i.name for i in folded.graph.input if i.name not in initializers(folded)] == [
        i.name for i in case.model.graph.input if i.name not in initializers(case.model)
    ]
    bg.assert_equivalent(case.model, folded, case.dtype)
    return folded, report


def assert_unchanged(proto: onnx.ModelProto, *reason_parts: str, skipped: int | None = None):
    """The pass changes nothing, byte for byte, and its skip reasons mention every part given."""
    model = from_proto(proto)
    before = ir.serde.serialize_model(model).SerializeToString()
    report = run_passes(model, [FoldBatchNorm()])
    after = ir.serde.serialize_model(model)
    assert report.passes[0].applied == 0, reasons(report)
    assert after.SerializeToString() == before
    # and against the original proto itself, part by part
    assert [n.SerializeToString() for n in after.graph.node] == [n.SerializeToString() for n in proto.graph.node]
    assert [t.SerializeToString() for t in after.graph.initializer] == [
        t.SerializeToString() for t in proto.graph.initializer
    ]
    assert [v.name for v in after.graph.input] == [v.name for v in proto.graph.input]
    assert [v.name for v in after.graph.output] == [v.name for v in proto.graph.output]
    assert report.ops_before == report.ops_after
    text = reasons(report)
    expected_skips = count(proto) if skipped is None else skipped
    assert len(report.passes[0].skipped) == expected_skips, text
    for part in reason_parts:
        assert part.lower() in text.lower(), f"{part!r} not in skip reasons: {text}"
    return report


def ids(cases):
    return [c.name for c in cases]


# ---------------------------------------------------------------------------------------------------
# positive: one of each kind, then the variants

def test_conv_bn_folds_and_is_equivalent():
    folded, report = assert_folds(bg.conv_bn())
    assert count(folded, "Conv") == 1
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3  # the BN shift became the conv's bias
    assert report.passes[0].skipped == []


def test_conv_without_bias_gets_one():
    folded, _ = assert_folds(bg.conv_bn(bias=False))
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and conv.input[2]


def test_matmul_without_add_gets_a_bias_add():
    folded, _ = assert_folds(bg.matmul_bn())
    assert count(folded, "MatMul") == 1 and count(folded, "Add") == 1


def test_gemm_beta_becomes_one():
    folded, _ = assert_folds(bg.gemm_bn(alpha=0.5, beta=2.5, c_shape="N"))
    gemm = next(n for n in folded.graph.node if n.op_type == "Gemm")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("beta", 1.0) == 1.0
    assert attrs["alpha"] == pytest.approx(0.5)


CONV_CASES = [
    bg.conv_bn(dims=1, kernel=3, strides=2, pads=1),
    bg.conv_bn(dims=1, kernel=1, bias=False),
    bg.conv_bn(dims=1, cin=6, cout=6, groups=6, dilations=2, pads=[2, 0]),
    bg.conv_bn(dims=2),
    bg.conv_bn(dims=2, bias=False),
    bg.conv_bn(dims=2, groups=2),
    bg.conv_bn(dims=2, cin=4, cout=4, groups=4),  # depthwise
    bg.conv_bn(dims=2, cin=3, cout=6, groups=3, bias=False),  # depthwise, channel multiplier 2
    bg.conv_bn(dims=2, strides=2, dilations=2, pads=[0, 1, 2, 0], size=9),
    bg.conv_bn(dims=2, kernel=[1, 3], strides=[1, 2], dilations=[2, 1], pads=[1, 0, 0, 1]),
    bg.conv_bn(dims=2, cin=1, cout=1, kernel=1),
    bg.conv_bn(dims=3, cin=2, cout=4, groups=2, size=5),
    bg.conv_bn(dims=3, cin=4, cout=4, groups=4, kernel=[1, 3, 3], strides=2, pads=1, bias=False, size=5),
]
CONV_CASES += [bg.conv_bn(groups=2, opset=opset, seed=opset) for opset in (9, 13, 15, 18, 21)]

CONV_TRANSPOSE_CASES = [
    bg.conv_transpose_bn(dims=1, strides=2, output_padding=1),
    bg.conv_transpose_bn(dims=1, kernel=1, bias=False),
    bg.conv_transpose_bn(dims=2),
    bg.conv_transpose_bn(dims=2, groups=2, bias=False),
    bg.conv_transpose_bn(dims=2, groups=2, strides=2, output_padding=1, pads=1),
    bg.conv_transpose_bn(dims=2, cin=4, cout=4, groups=4),  # depthwise
    bg.conv_transpose_bn(dims=2, cin=2, cout=6, groups=2),  # C_in/G = 1, C_out/G = 3
    bg.conv_transpose_bn(dims=2, cin=6, cout=4, groups=2, strides=[2, 3], output_padding=[1, 2], dilations=[1, 2],
                         pads=[1, 0, 0, 2]),
    bg.conv_transpose_bn(dims=3, cin=4, cout=6, groups=2, strides=2, output_padding=1, size=3),
]
CONV_TRANSPOSE_CASES += [bg.conv_transpose_bn(groups=2, opset=opset, seed=opset) for opset in (9, 13, 18)]

GEMM_CASES = [bg.gemm_bn(trans_a=ta, trans_b=tb, c_shape="N") for ta in (0, 1) for tb in (0, 1)]
GEMM_CASES += [
    bg.gemm_bn(c_shape=None),
    bg.gemm_bn(c_shape=None, trans_b=1, alpha=-2.0, opset=11),
    bg.gemm_bn(c_shape="1N", alpha=0.5, beta=2.5),
    bg.gemm_bn(c_shape="MN", beta=-1.5, trans_b=1),
    bg.gemm_bn(c_shape="MN", trans_a=1, alpha=3.0, beta=0.25),
    bg.gemm_bn(c_shape="M1", alpha=2.0, beta=0.5),
    bg.gemm_bn(c_shape="scalar", beta=0.0),
    bg.gemm_bn(c_shape="N", beta=3.0, opset=9),
    bg.gemm_bn(c_shape="N", m=1, k=1, n=1),
]

MATMUL_CASES = [
    bg.matmul_bn(bias=None),
    bg.matmul_bn(bias="N"),
    bg.matmul_bn(bias="N", bias_first=True),
    bg.matmul_bn(bias="1N"),
    bg.matmul_bn(bias="1N", bias_first=True, m=1),
    bg.matmul_bn(bias="N", opset=9),
    bg.matmul_bn(bias=None, opset=13, k=1, n=3),
]

BEFORE_CASES = [
    bg.bn_conv(dims=1),
    bg.bn_conv(),
    bg.bn_conv(bias=False),
    bg.bn_conv(groups=2),
    bg.bn_conv(cin=4, cout=4, groups=4),  # depthwise
    bg.bn_conv(cin=3, cout=6, groups=3, bias=False),
    bg.bn_conv(strides=2, dilations=2, size=9),
    bg.bn_conv(pads=None),  # no pads attribute at all
    bg.bn_conv(pads=None, auto_pad="VALID"),
    bg.bn_conv(pads=0, auto_pad="NOTSET", opset=9),
    bg.bn_conv(dims=3, cin=2, cout=4, kernel=2, size=5),
    bg.bn_gemm(),
    bg.bn_gemm(trans_b=1, c_shape="N"),
    bg.bn_gemm(c_shape="1N", alpha=0.7, beta=0.3),
    bg.bn_gemm(trans_b=1, c_shape="MN", alpha=-1.5, beta=2.0),
    bg.bn_gemm(c_shape="M1", beta=0.0),
    bg.bn_gemm(c_shape="N", opset=9),
]

FP16_CASES = [
    bg.conv_bn(dtype=F16, opset=13),
    bg.conv_bn(dtype=F16, param_dtype=F32, opset=15),
    bg.conv_bn(dtype=F16, groups=2, bias=False, opset=17),
    bg.conv_bn(dtype=F16, cin=4, cout=4, groups=4, strides=2, pads=1, opset=18),
    bg.conv_transpose_bn(dtype=F16, groups=2, strides=2, output_padding=1, opset=17),
    bg.conv_transpose_bn(dtype=F16, param_dtype=F32, dims=1, opset=15),
    bg.gemm_bn(dtype=F16, trans_b=1, c_shape="N", alpha=0.5, beta=2.0),
    bg.gemm_bn(dtype=F16, c_shape=None, opset=13),
    bg.matmul_bn(dtype=F16, bias="N"),
    bg.matmul_bn(dtype=F16, bias=None, opset=13),
    bg.bn_conv(dtype=F16, groups=2),
    bg.bn_conv(dtype=F16, param_dtype=F32, opset=15),
    bg.bn_gemm(dtype=F16, c_shape="N", trans_b=1),
]

ALL_POSITIVE = CONV_CASES + CONV_TRANSPOSE_CASES + GEMM_CASES + MATMUL_CASES + BEFORE_CASES + FP16_CASES


@pytest.mark.parametrize("case", CONV_CASES, ids=ids(CONV_CASES))
def test_conv_variants(case):
    assert_folds(case)


@pytest.mark.parametrize("case", CONV_TRANSPOSE_CASES, ids=ids(CONV_TRANSPOSE_CASES))
def test_conv_transpose_variants(case):
    assert_folds(case)


@pytest.mark.parametrize("case", GEMM_CASES, ids=ids(GEMM_CASES))
def test_gemm_variants(case):
    assert_folds(case)


@pytest.mark.parametrize("case", MATMUL_CASES, ids=ids(MATMUL_CASES))
def test_matmul_variants(case):
    assert_folds(case)


@pytest.mark.parametrize("case", BEFORE_CASES, ids=ids(BEFORE_CASES))
def test_bn_before_conv_or_gemm_variants(case):
    assert case.folds == 1
    folded, _ = assert_folds(case)
    # the BN's input is now read by the Conv/Gemm directly
    consumer = folded.graph.node[-1]
    assert consumer.input[0] == case.model.graph.input[0].name


@pytest.mark.parametrize("case", FP16_CASES, ids=ids(FP16_CASES))
def test_fp16_variants(case):
    folded, _ = assert_folds(case)
    for name, array in initializers(folded).items():
        if name not in initializers(case.model):
            assert array.dtype == F16, f"new initializer {name} is {array.dtype}, the model computes in float16"


@pytest.mark.parametrize("case", [CONV_CASES[5], CONV_TRANSPOSE_CASES[4], GEMM_CASES[6], MATMUL_CASES[1],
                                  BEFORE_CASES[3], FP16_CASES[1]], ids=lambda c: c.name)
def test_convert_verifies_on_onnxruntime(case):
    """The public API: convert() folds, verifies against the unoptimized original, reports it."""
    model, report = normfold.convert(from_proto(case.model), passes=["fold-batchnorm"], seed=3)
    assert report.applied == case.folds
    assert report.verification["passed"] is True
    assert report.verification["max_abs_error"] <= max(o["atol"] for o in report.verification["outputs"])
    assert "BatchNormalization" not in report.ops_after
    independent = normfold.verify(from_proto(case.model), model, seed=11)
    assert independent.passed, independent.summary_lines()


def test_convert_from_a_file(tmp_path):
    case = bg.conv_bn(groups=2, bias=False)
    path = tmp_path / "m.onnx"
    onnx.save(case.model, path)
    model, report = normfold.convert(path, passes=["fold-batchnorm"])
    assert report.applied == 1 and report.verification["passed"]
    bg.assert_equivalent(case.model, ir.serde.serialize_model(model), F32)


def test_folded_weights_match_the_formula():
    """W' = s W (axis 0), b' = s (b - mean) + beta, checked elementwise in float64."""
    case = bg.conv_bn(groups=2)
    folded, _ = fold(case.model)
    before, after = initializers(case.model), initializers(folded)
    gamma, beta, mean, var = (before[f"bn1_{r}"].astype(np.float64) for r in ("scale", "bias", "mean", "var"))
    eps = onnx.helper.get_attribute_value(case.model.graph.node[1].attribute[0])
    s = gamma / np.sqrt(var + eps)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    w, b = after[conv.input[1]].astype(np.float64), after[conv.input[2]].astype(np.float64)
    np.testing.assert_allclose(w, before["W"] * s[:, None, None, None], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(b, s * (before["B"] - mean) + beta, rtol=1e-6, atol=1e-6)
    assert np.all(w[0] == 0)  # gamma[0] == 0 zeroes the channel


def test_conv_transpose_grouped_scales_axis_one_per_group():
    """W'[c, j] = W[c, j] s[g(c) C_out/G + j] (pytorch's fuse_conv_bn_weights gets this wrong for G > 1)."""
    case = bg.conv_transpose_bn(cin=4, cout=6, groups=2)
    folded, _ = fold(case.model)
    before, after = initializers(case.model), initializers(folded)
    gamma, var = before["bn1_scale"].astype(np.float64), before["bn1_var"].astype(np.float64)
    eps = onnx.helper.get_attribute_value(case.model.graph.node[1].attribute[0])
    s = gamma / np.sqrt(var + eps)
    node = next(n for n in folded.graph.node if n.op_type == "ConvTranspose")
    w = after[node.input[1]].astype(np.float64)
    expected = before["W"].astype(np.float64).copy()
    for c in range(4):
        for j in range(3):
            expected[c, j] *= s[(c // 2) * 3 + j]
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------------------------------------------------
# more positive graphs: chains, constants as nodes, IR 3, training_mode=0, subgraphs


def test_two_bns_after_one_conv_both_fold():
    g = GraphBuilder(seed=5)
    h = g.node("Conv", [g.input("x", [2, 4, 7, 7]), g.init("W", g.random([6, 4, 3, 3]))])
    g.output(g.bn(g.bn(h, 6), 6, output="y"))
    assert_folds(bg.Case("conv-bn-bn", g.build(), 2))


def test_bn_chain_before_conv_folds_over_pipeline_iterations():
    """Relu -> BN1 -> BN2 -> Conv: BN2 folds first (into the Conv), then BN1 on the next iteration."""
    g = GraphBuilder(seed=6)
    h = g.bn(g.bn(g.node("Relu", [g.input("x", [2, 4, 7, 7])]), 4), 4)
    g.output(g.node("Conv", [h, g.init("W", g.random([6, 4, 3, 3])), g.init("B", g.random([6]))], outputs=["y"]))
    _, report = assert_folds(bg.Case("relu-bn-bn-conv", g.build(), 2))
    assert report.passes[0].iterations >= 2
    assert report.ops_after == {"Conv": 1, "Relu": 1}


def test_bn_between_two_convs_folds_into_the_first():
    g = GraphBuilder(seed=7)
    h = g.node("Conv", [g.input("x", [1, 3, 8, 8]), g.init("W1", g.random([4, 3, 3, 3]))], pads=[1, 1, 1, 1])
    h = g.bn(h, 4)
    g.output(g.node("Conv", [h, g.init("W2", g.random([5, 4, 3, 3]))], outputs=["y"], pads=[1, 1, 1, 1]))
    folded, _ = assert_folds(bg.Case("conv-bn-conv(padded)", g.build(), 1))
    assert "W2" in [n.input[1] for n in folded.graph.node]  # the padded second conv is untouched


def test_constants_given_by_constant_nodes_fold():
    """BN params and the conv weight produced by Constant nodes (no epsilon attribute: default 1e-5)."""
    g = GraphBuilder(seed=8)
    h = g.node("Conv", [g.input("x", [2, 4, 7, 7]), g.const_node("W", g.random([6, 4, 3, 3]))])
    params = bg.bn_params(g.rng, 6)
    names = [g.const_node(f"p_{i}", a) for i, a in enumerate(params.arrays())]
    g.nodes.append(onnx.helper.make_node("BatchNormalization", [h, *names], ["y"], name="bn"))
    g.output("y")
    folded, _ = assert_folds(bg.Case("constant-nodes", g.build(), 1))
    assert count(folded, "Constant") == 0  # the orphaned constants are cleaned up


def test_matmul_after_relu_without_shape_info_folds():
    """The MatMul activation has no value_info; its rank is derived through the Relu."""
    g = GraphBuilder(seed=38)
    h = g.node("MatMul", [g.node("Relu", [g.input("x", [5, 7])]), g.init("W", g.random([7, 6]))])
    h = g.node("Add", [h, g.init("b", g.random([6]))])
    g.output(g.bn(h, 6, output="y"))
    assert_folds(bg.Case("relu-matmul-add-bn", g.build(), 1))


def test_training_mode_zero_folds():
    g = GraphBuilder(seed=9)
    h = g.node("Conv", [g.input("x", [2, 4, 7, 7]), g.init("W", g.random([6, 4, 3, 3]))])
    g.output(g.bn(h, 6, training_mode=0, output="y"))
    assert_folds(bg.Case("training_mode=0", g.build(opset=15), 1))


def test_bn_params_shared_by_two_bns_fold_both():
    g = GraphBuilder(seed=10)
    x = g.input("x", [2, 4, 7, 7])
    params = bg.bn_params(g.rng, 6)
    names = [g.init(f"p{i}", a) for i, a in enumerate(params.arrays())]
    for k in (1, 2):
        h = g.node("Conv", [x, g.init(f"W{k}", g.random([6, 4, 3, 3]))])
        g.nodes.append(onnx.helper.make_node("BatchNormalization", [h, *names], [f"y{k}"], epsilon=params.eps))
        g.output(f"y{k}")
    assert_folds(bg.Case("shared-bn-params", g.build(), 2))


def _legacy_conv_bn(opset: int, seed: int = 11) -> onnx.ModelProto:
    g = GraphBuilder(seed=seed)
    h = g.node("Conv", [g.input("x", [2, 4, 7, 7]), g.init("W", g.random([6, 4, 3, 3]))], name="conv")
    g.output(g.bn(h, 6, output="y", name="bn"))
    return g.build(opset=opset, value_info=True)


def test_ir3_initializers_listed_as_inputs_count_as_constants():
    """At IR 3 every initializer is a graph input by rule: not overridable, so the BN folds."""
    proto = _legacy_conv_bn(opset=8)
    assert proto.ir_version == 3
    assert {t.name for t in proto.graph.initializer} <= {i.name for i in proto.graph.input}
    assert_folds(bg.Case("ir3-conv-bn", proto, 1))


def test_bn_inside_an_if_branch_folds():
    """A Conv -> BN in a subgraph reading outer-scope initializers folds; both branches still agree."""
    g = GraphBuilder(seed=12)
    x, cond = g.input("x", [1, 3, 6, 6]), g.input("c", [], np.bool_)
    w = g.init("W", g.random([5, 3, 3, 3]))
    params = bg.bn_params(g.rng, 5)
    names = [g.init(f"p{i}", a) for i, a in enumerate(params.arrays())]
    then_g = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", [x, w], ["t0"], name="tconv"),
         onnx.helper.make_node("BatchNormalization", ["t0", *names], ["t1"], name="tbn", epsilon=params.eps)],
        "then", [], [onnx.helper.make_tensor_value_info("t1", onnx.TensorProto.FLOAT, None)])
    else_g = onnx.helper.make_graph([onnx.helper.make_node("Conv", [x, w], ["e0"], name="econv")], "else", [],
                                    [onnx.helper.make_tensor_value_info("e0", onnx.TensorProto.FLOAT, None)])
    g.node("If", [cond], outputs=["y"], name="if", then_branch=then_g, else_branch=else_g)
    g.output("y")
    proto = g.build()
    model = from_proto(proto)
    report = run_passes(model, [FoldBatchNorm()])
    assert report.passes[0].applied == 1, reasons(report)
    assert "BatchNormalization" not in report.ops_after
    folded = ir.serde.serialize_model(model)
    rng = np.random.default_rng(0)
    for branch in (True, False):
        feeds = {"x": rng.standard_normal((1, 3, 6, 6)).astype(F32), "c": np.array(branch)}
        bg.assert_close(bg.run(folded, feeds)["y"], bg.run(proto, feeds)["y"], F32, what=f"branch {branch}")


# ---------------------------------------------------------------------------------------------------
# shared weight, graph outputs


def test_shared_conv_weight_is_not_changed_under_the_other_conv():
    """Two Convs share W; only the first is followed by BN. The second must keep W as it was."""
    g = GraphBuilder(seed=13)
    x = g.input("x", [2, 4, 7, 7])
    w, b = g.init("W", g.random([6, 4, 3, 3])), g.init("B", g.random([6]))
    g.output(g.bn(g.node("Conv", [x, w, b], name="conv1"), 6, output="y1"))
    g.output(g.node("Conv", [x, w, b], outputs=["y2"], name="conv2"))
    proto = g.build()
    folded, _ = assert_folds(bg.Case("shared-weight", proto, 1))
    nodes = {n.name: n for n in folded.graph.node}
    assert list(nodes["conv2"].input) == ["x", "W", "B"]
    assert nodes["conv1"].input[1] != "W" and nodes["conv1"].input[2] != "B"
    before, after = initializers(proto), initializers(folded)
    np.testing.assert_array_equal(after["W"], before["W"])
    np.testing.assert_array_equal(after["B"], before["B"])


def test_shared_conv_weight_with_a_bn_after_each_conv_gets_two_folded_copies():
    g = GraphBuilder(seed=19)
    x = g.input("x", [2, 4, 7, 7])
    w = g.init("W", g.random([6, 4, 3, 3]))
    g.output(g.bn(g.node("Conv", [x, w], name="conv1"), 6, output="y1"))
    g.output(g.bn(g.node("Conv", [x, w], name="conv2"), 6, output="y2"))
    folded, _ = assert_folds(bg.Case("shared-weight-two-bns", g.build(), 2))
    nodes = {n.name: n for n in folded.graph.node}
    assert len({nodes["conv1"].input[1], nodes["conv2"].input[1], "W"}) == 3
    assert "W" not in initializers(folded)  # orphaned and removed


def test_bn_falls_back_to_folding_into_its_consumer():
    """Conv1 -> BN -> Conv2 (unpadded), Conv1's output also read by a Relu: BN cannot fold into Conv1,
    so it folds forward into Conv2."""
    g = GraphBuilder(seed=39)
    h = g.node("Conv", [g.input("x", [2, 3, 9, 9]), g.init("W1", g.random([4, 3, 3, 3]))], outputs=["c1"],
               name="conv1")
    g.output(g.node("Relu", [h], outputs=["r"]))
    g.output(g.node("Conv", [g.bn(h, 4), g.init("W2", g.random([5, 4, 3, 3]))], outputs=["y"], name="conv2",
                    strides=[2, 2]))
    folded, _ = assert_folds(bg.Case("fallback-to-consumer", g.build(), 1))
    nodes = {n.name: n for n in folded.graph.node}
    assert nodes["conv1"].input[1] == "W1" and nodes["conv2"].input[0] == "c1"


def test_shared_gemm_weight_is_not_changed_under_the_other_gemm():
    g = GraphBuilder(seed=14)
    a = g.input("A", [5, 7])
    w = g.init("B", g.random([7, 6]))
    g.output(g.bn(g.node("Gemm", [a, w], name="gemm1"), 6, output="y1"))
    g.output(g.node("Gemm", [a, w], outputs=["y2"], name="gemm2", alpha=2.0))
    proto = g.build()
    folded, _ = assert_folds(bg.Case("shared-gemm-weight", proto, 1))
    assert {n.name: n for n in folded.graph.node}["gemm2"].input[1] == "B"
    np.testing.assert_array_equal(initializers(folded)["B"], initializers(proto)["B"])


def test_shared_weight_with_bn_before_one_conv():
    g = GraphBuilder(seed=15)
    x = g.input("x", [2, 4, 7, 7])
    w = g.init("W", g.random([6, 4, 3, 3]))
    g.output(g.node("Conv", [g.bn(x, 4), w], outputs=["y1"], name="conv1"))
    g.output(g.node("Conv", [x, w], outputs=["y2"], name="conv2"))
    proto = g.build()
    folded, _ = assert_folds(bg.Case("shared-weight-bn-before", proto, 1))
    assert {n.name: n for n in folded.graph.node}["conv2"].input[1] == "W"
    np.testing.assert_array_equal(initializers(folded)["W"], initializers(proto)["W"])


def test_weight_initializer_that_is_also_a_graph_output_is_kept():
    """The conv weight is exported as a graph output too: it must stay, unchanged, under its name."""
    g = GraphBuilder(seed=17)
    w = g.init("W", g.random([6, 4, 3, 3]))
    g.output(g.bn(g.node("Conv", [g.input("x", [2, 4, 7, 7]), w], name="conv"), 6, output="y"))
    g.output("W")
    proto = g.build()
    folded, _ = assert_folds(bg.Case("weight-is-graph-output", proto, 1))
    assert [o.name for o in folded.graph.output] == ["y", "W"]
    np.testing.assert_array_equal(initializers(folded)["W"], initializers(proto)["W"])


@pytest.mark.parametrize("builder", [bg.conv_bn, bg.matmul_bn, bg.gemm_bn, bg.bn_conv], ids=lambda b: b.__name__)
def test_dynamic_batch_dimension_folds(builder):
    """A symbolic batch dim: the fold needs no shapes, verification is given them explicitly."""
    case = builder()
    proto = onnx.ModelProto()
    proto.CopyFrom(case.model)
    x = proto.graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    x.type.tensor_type.shape.dim[0].dim_param = "N"
    for out in proto.graph.output:
        out.type.tensor_type.shape.dim[0].dim_param = "N"
    model, report = normfold.convert(from_proto(proto), passes=["fold-batchnorm"], shapes={x.name: [3, *shape[1:]]})
    assert report.applied == 1 and report.verification["passed"]
    assert report.verification["input_shapes"][x.name][0] == 3


def test_fp16_fold_that_would_overflow_is_refused():
    """s = gamma / sqrt(var + eps) = 60 / 1e-3 = 6e4 and |W| = 2: the folded fp16 weight 1.2e5 would be
    inf, although the original is finite wherever |x| < 0.5 (e.g. 150 at x = 1e-3). Regression: the
    pass wrote the inf weight; it must refuse and say why."""
    g = GraphBuilder(dtype=F16, seed=18)
    w = np.array([[[[2.0]], [[0.5]]], [[[0.25]], [[-1.0]]]], F16)  # (2, 2, 1, 1)
    h = g.node("Conv", [g.input("x", [1, 2, 3, 3]), g.init("W", w)], name="conv")
    params = bg.BNParams(np.array([60, 1], F16), np.array([0.5, 0], F16), np.zeros(2, F16), np.zeros(2, F16), 1e-6)
    g.output(g.bn(h, 2, params=params, output="y", name="bn"))
    proto = g.build()
    small = {"x": np.full([1, 2, 3, 3], 1e-3, F16)}
    assert np.all(np.isfinite(bg.run(proto, small)["y"]))
    with np.errstate(over="ignore"):
        assert_unchanged(proto, "overflows float16")


def test_fp16_fold_rounding_beyond_tolerance_is_caught_by_verification():
    """fp16 folding stores t = s (b - mean) + beta = 42.88 and s W = [-18.86, -44.84] in fp16; at this input
    the output (-0.516) is their near-total cancellation, so the folded model is off by 0.02 (the
    original, which subtracts the mean first, is exact to 1e-4). With a one-element output the fp16
    tolerance is 1e-2 + 1e-2 * 0.516: convert() must not hand back that model as verified."""
    g = GraphBuilder(dtype=F16, seed=0)
    h = g.node("Conv", [g.input("x", [1, 1, 2]), g.init("W", np.array([[[0.2444, 0.581]]], F16)),
                        g.init("B", np.array([0.3303], F16))], name="conv")
    params = bg.BNParams(*(np.array([v], F16) for v in (-1.955, -0.537, 0.8926, 0.0006404)), eps=1e-6)
    g.output(g.bn(h, 1, params=params, output="y", name="bn"))
    proto = g.build()
    x = np.array([[[0.3457, 0.822]]], F16)
    w, b = np.array([0.2444, 0.581], F16).astype(np.float64), float(F16(0.3303))
    y = float(w @ x.ravel().astype(np.float64)) + b
    gamma, beta, mean, var = (float(a[0]) for a in params.arrays())
    truth = np.array([[[(y - mean) / np.sqrt(var + params.eps) * gamma + beta]]])
    bg.assert_close(bg.run(proto, {"x": x})["y"], truth, F16, what="the fp16 original")
    try:
        model, report = normfold.convert(from_proto(proto), passes=["fold-batchnorm"], inputs={"x": x})
    except normfold.VerificationError as exc:
        assert exc.report.passes[0].applied == 1
        assert exc.report.verification["passed"] is False
        return
    bg.assert_close(bg.run(ir.serde.serialize_model(model), {"x": x})["y"], truth, F16, what="converted model")


GRAPH_OUTPUT_CASES = [bg.conv_bn(), bg.conv_transpose_bn(groups=2), bg.gemm_bn(c_shape="N"), bg.matmul_bn(),
                      bg.matmul_bn(bias="N")]


@pytest.mark.parametrize("case", GRAPH_OUTPUT_CASES, ids=ids(GRAPH_OUTPUT_CASES))
def test_bn_output_that_is_a_graph_output_keeps_its_name(case):
    folded, _ = assert_folds(case)
    assert [o.name for o in folded.graph.output] == ["y"]
    producer = {out: n for n in folded.graph.node for out in n.output}["y"]
    assert producer.op_type in ("Conv", "ConvTranspose", "Gemm", "Add")


@pytest.mark.parametrize("case", GRAPH_OUTPUT_CASES, ids=ids(GRAPH_OUTPUT_CASES))
def test_bn_output_that_is_a_graph_output_keeps_its_type(case):
    """The renamed graph output must keep its declared elem type and shape (onnx.checker needs the type).

    Regression: bypass() once gave the replacement value the output's name but not its type, so when
    the producer's output had no value_info the folded graph output had no type at all.
    """
    folded, _ = fold(case.model)
    assert folded.graph.output[0].type == case.model.graph.output[0].type, folded.graph.output[0]
    onnx.checker.check_model(folded, full_check=True)


def test_bn_output_read_by_a_node_and_the_graph():
    """BN output is a graph output and also feeds a Relu: both readers move to the conv output."""
    g = GraphBuilder(seed=16)
    h = g.node("Conv", [g.input("x", [2, 4, 7, 7]), g.init("W", g.random([6, 4, 3, 3]))])
    y = g.bn(h, 6, output="y")
    g.output(y)
    g.output(g.node("Relu", [y], outputs=["z"]))
    folded, _ = assert_folds(bg.Case("bn-output-twice", g.build(), 1))
    assert [o.name for o in folded.graph.output] == ["y", "z"]


@pytest.mark.parametrize("case", [bg.conv_bn(), bg.conv_transpose_bn(), bg.gemm_bn(c_shape="1N"),
                                  bg.matmul_bn(bias="N"), bg.bn_conv(), bg.bn_gemm()], ids=lambda c: c.name)
def test_folded_model_passes_onnx_checker(case):
    """With value_info for every intermediate (so the graph-output-type bug above cannot show)."""
    g_model = onnx.shape_inference.infer_shapes(case.model)
    folded, _ = fold(g_model)
    onnx.checker.check_model(folded, full_check=True)


def test_ir3_folded_model_lists_its_new_initializers_as_inputs():
    """At IR 3 every initializer must also be a graph input. Regression: the folded weights were not
    listed, so onnx.checker rejected the result ("W_folded in initializer but not in graph input")."""
    folded, report = fold(_legacy_conv_bn(opset=8))
    assert report.passes[0].applied == 1
    assert {t.name for t in folded.graph.initializer} <= {i.name for i in folded.graph.input}
    onnx.checker.check_model(folded, full_check=True)


# ---------------------------------------------------------------------------------------------------
# negative cases: nothing changes, the reason is reported


def _conv_then(bn_kwargs=None, *, opset=17, conv_output_extra=None, weight_as_input=False, bias_as_input=False):
    """x -> Conv -> BN -> y, with knobs for the negative cases."""
    g = GraphBuilder(seed=20)
    x = g.input("x", [2, 4, 7, 7])
    inputs = [x, g.init("W", g.random([6, 4, 3, 3]), as_input=weight_as_input),
              g.init("B", g.random([6]), as_input=bias_as_input)]
    h = g.node("Conv", inputs, outputs=["conv_out"], name="conv")
    if conv_output_extra == "consumer":
        g.output(g.node("Relu", [h], outputs=["r"]))
    elif conv_output_extra == "graph_output":
        g.output(h)
    g.output(g.bn(h, 6, output="y", name="bn", **(bn_kwargs or {})))
    return g.build(opset=opset)


def test_training_mode_is_not_folded():
    assert_unchanged(_conv_then({"training_mode": 1}, opset=15), "training mode")


def test_training_mode_with_running_stats_outputs_is_not_folded():
    proto = _conv_then({"training_mode": 1, "extra_outputs": ("run_mean", "run_var")}, opset=15)
    assert_unchanged(proto, "training mode")


@pytest.mark.parametrize("opset", [9, 13])
def test_running_stats_output_used_is_not_folded(opset):
    g = GraphBuilder(seed=21)
    h = g.node("Conv", [g.input("x", [2, 4, 7, 7]), g.init("W", g.random([6, 4, 3, 3]))], name="conv")
    g.output(g.bn(h, 6, output="y", name="bn", extra_outputs=("run_mean", "run_var")))
    g.output("run_mean")
    assert_unchanged(g.build(opset=opset), "running-statistics")


@pytest.mark.parametrize("role", ["scale", "bias", "mean", "var"])
def test_bn_param_that_is_a_plain_graph_input_is_not_folded(role):
    assert_unchanged(_conv_then({"graph_inputs": (role,)}), f"BN {role.replace('var', 'variance')} is not constant",
                     "graph input")


@pytest.mark.parametrize("opset", [9, 17])
@pytest.mark.parametrize("role", ["scale", "bias", "mean", "var"])
def test_bn_param_initializer_that_is_also_an_input_is_overridable(role, opset):
    proto = _conv_then({"as_input": (role,)}, opset=opset)
    assert proto.ir_version >= 4
    assert_unchanged(proto, "graph input", "overrid")


def test_overridable_param_at_ir3_is_a_constant_and_folds():
    """The same model as above with IR 3, where listing initializers as inputs was the rule."""
    proto = _conv_then({"as_input": ("scale", "var")}, opset=8)
    assert proto.ir_version == 3
    assert_folds(bg.Case("ir3-overridable", proto, 1))


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_overridable_conv_weight_or_bias_is_not_folded(which):
    proto = _conv_then(weight_as_input=which == "weight", bias_as_input=which == "bias")
    assert_unchanged(proto, f"Conv {which} is not constant", "overrid")


def test_conv_weight_that_is_a_graph_input_is_not_folded():
    g = GraphBuilder(seed=22)
    h = g.node("Conv", [g.input("x", [2, 4, 7, 7]), g.input("W", [6, 4, 3, 3])], name="conv")
    g.output(g.bn(h, 6, output="y", name="bn"))
    assert_unchanged(g.build(), "Conv weight is not constant")


def test_conv_output_with_a_second_consumer_is_not_folded():
    assert_unchanged(_conv_then(conv_output_extra="consumer"), "conv_out", "other consumers")


def test_conv_output_that_is_a_graph_output_is_not_folded():
    assert_unchanged(_conv_then(conv_output_extra="graph_output"), "conv_out", "graph output")


def test_bn_after_relu_feeding_nothing_foldable():
    g = GraphBuilder(seed=23)
    g.output(g.bn(g.node("Relu", [g.input("x", [2, 4, 7, 7])]), 4, output="y", name="bn"))
    assert_unchanged(g.build(), "Relu", "not a linear op")


def test_bn_after_relu_feeding_a_relu():
    g = GraphBuilder(seed=24)
    h = g.bn(g.node("Relu", [g.input("x", [2, 4, 7, 7])]), 4, name="bn")
    g.output(g.node("Relu", [h], outputs=["y"]))
    assert_unchanged(g.build(), "Relu")


@pytest.mark.parametrize("pads, auto_pad", [(1, None), ([0, 0, 1, 0], None), ([0, 1, 0, 0], "NOTSET"),
                                            (None, "SAME_UPPER"), (None, "SAME_LOWER")])
def test_bn_before_padded_conv_is_not_folded(pads, auto_pad):
    case = bg.bn_conv(pads=pads, auto_pad=auto_pad)
    assert case.folds == 0
    assert_unchanged(case.model, "pads")


def test_bn_before_conv_transpose_is_not_folded():
    g = GraphBuilder(seed=25)
    h = g.bn(g.input("x", [2, 4, 5, 5]), 4, name="bn")
    g.output(g.node("ConvTranspose", [h, g.init("W", g.random([4, 6, 3, 3]))], outputs=["y"], name="convT"))
    assert_unchanged(g.build(), "ConvTranspose")


def test_bn_before_gemm_with_trans_a_is_not_folded():
    case = bg.bn_gemm(trans_a=1, c_shape="N")
    assert case.folds == 0
    assert_unchanged(case.model, "transA")


def test_bn_before_conv_weight_input_is_not_folded():
    """BN output feeds a Conv's weight input, not its data input."""
    g = GraphBuilder(seed=26)
    w = g.bn(g.input("w", [6, 4, 3, 3]), 6, name="bn")
    g.output(g.node("Conv", [g.input("x", [2, 4, 7, 7]), w], outputs=["y"], name="conv"))
    assert_unchanged(g.build(), "not the data input")


def test_bn_before_two_convs_is_not_folded():
    g = GraphBuilder(seed=27)
    h = g.bn(g.input("x", [2, 4, 7, 7]), 4, name="bn")
    w = g.init("W", g.random([6, 4, 3, 3]))
    g.output(g.node("Conv", [h, w], outputs=["y1"]))
    g.output(g.node("Conv", [h, w], outputs=["y2"]))
    assert_unchanged(g.build(), "exactly one")


def test_bn_output_that_is_a_graph_output_before_a_conv_is_not_folded():
    """BN output is a graph output (and feeds a Conv) and nothing produces it: refused both ways."""
    g = GraphBuilder(seed=28)
    h = g.bn(g.input("x", [2, 4, 7, 7]), 4, name="bn", output="y")
    g.output(h)
    g.output(g.node("Conv", [h, g.init("W", g.random([6, 4, 3, 3]))], outputs=["z"]))
    assert_unchanged(g.build(), "exactly one")


@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_on_3d_input_is_not_folded(with_bias):
    """x (N, L, C) @ W (C, D) with L == D: the sizes match but BN's axis 1 is L, not the output axis."""
    g = GraphBuilder(seed=29)
    h = g.node("MatMul", [g.input("x", [2, 6, 5]), g.init("W", g.random([5, 6]))], name="matmul")
    if with_bias:
        h = g.node("Add", [h, g.init("b", g.random([6]))], name="add")
    g.output(g.bn(h, 6, output="y", name="bn"))
    assert_unchanged(g.build(), "rank 3")


def test_matmul_add_bias_that_raises_the_rank_is_not_folded():
    """x (4, 3) @ W (3, 4) + b (1, 1, 4) is 3-D (1, 4, 4); BN's channel axis 1 is then the MatMul's
    row axis, which happens to have 4 entries too. Regression: the pass checked only that x is 2-D and
    that b has 4 entries, folded along the wrong axis and dropped the broadcast rank (result (4, 4)
    instead of (1, 4, 4), wrong values).
    """
    g = GraphBuilder(seed=3)
    h = g.node("MatMul", [g.input("x", [4, 3]), g.init("W", g.random([3, 4]))], name="matmul")
    h = g.node("Add", [h, g.init("b", g.random([1, 1, 4], scale=1.0))], name="add")
    g.output(g.bn(h, 4, output="y", name="bn"))
    proto = g.build()
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 1  # (1, 4, 4)
    assert_unchanged(proto, "[1, 1, 4]")


def test_matmul_on_reshaped_3d_input_is_not_folded():
    """The activation has no declared shape; its rank (3) comes from the constant Reshape target."""
    g = GraphBuilder(seed=35)
    h = g.node("Reshape", [g.input("x", [12, 5]), g.init("shape", np.array([2, 6, 5], np.int64))])
    h = g.node("MatMul", [h, g.init("W", g.random([5, 6]))], name="matmul")
    g.output(g.bn(h, 6, output="y", name="bn"))
    assert_unchanged(g.build(), "rank 3")


def test_matmul_on_an_input_of_unknown_rank_is_not_folded():
    g = GraphBuilder(seed=36)
    h = g.node("MatMul", [g.input("x", None), g.init("W", g.random([5, 6]))], name="matmul")
    g.output(g.bn(h, 6, output="y", name="bn"))
    assert_unchanged(g.build(), "rank unknown")


def test_negative_variance_plus_epsilon_is_not_folded():
    g = GraphBuilder(seed=37)
    params = bg.bn_params(g.rng, 6)
    params.var[3] = -1.0
    h = g.node("Conv", [g.input("x", [2, 4, 7, 7]), g.init("W", g.random([6, 4, 3, 3]))], name="conv")
    g.output(g.bn(h, 6, params=params, output="y", name="bn"))
    assert_unchanged(g.build(), "not positive")


def test_matmul_with_shared_output_is_not_folded():
    g = GraphBuilder(seed=30)
    h = g.node("MatMul", [g.input("x", [5, 7]), g.init("W", g.random([7, 6]))], outputs=["mm"], name="matmul")
    g.output(g.node("Relu", [h], outputs=["r"]))
    g.output(g.bn(g.node("Add", [h, g.init("b", g.random([6]))], name="add"), 6, output="y", name="bn"))
    assert_unchanged(g.build(), "other consumers")


def test_add_that_is_not_a_matmul_bias_is_not_folded():
    g = GraphBuilder(seed=31)
    g.output(g.bn(g.node("Add", [g.input("x", [5, 6]), g.init("b", g.random([6]))], name="add"), 6, output="y",
                  name="bn"))
    assert_unchanged(g.build(), "Add")


def test_gemm_with_non_constant_c_is_not_folded():
    g = GraphBuilder(seed=32)
    h = g.node("Gemm", [g.input("A", [5, 7]), g.init("B", g.random([7, 6])), g.input("C", [6])], name="gemm")
    g.output(g.bn(h, 6, output="y", name="bn"))
    assert_unchanged(g.build(), "Gemm C is not constant")


def test_spatial_zero_is_not_folded():
    g = GraphBuilder(seed=33)
    h = g.node("Conv", [g.input("x", [2, 4, 7, 7]), g.init("W", g.random([6, 4, 3, 3]))], name="conv")
    g.output(g.bn(h, 6, output="y", name="bn", spatial=0))
    assert_unchanged(g.build(opset=8), "spatial=0")


def test_two_bns_reading_one_conv_are_not_folded():
    g = GraphBuilder(seed=34)
    h = g.node("Conv", [g.input("x", [2, 4, 7, 7]), g.init("W", g.random([6, 4, 3, 3]))], outputs=["c"])
    g.output(g.bn(h, 6, output="y1"))
    g.output(g.bn(h, 6, output="y2"))
    assert_unchanged(g.build(), "other consumers", skipped=2)


def test_negative_report_reaches_convert():
    """convert() with nothing to fold: nothing verified, nothing changed, the reason in the report."""
    proto = _conv_then(conv_output_extra="graph_output")
    model, report = normfold.convert(from_proto(proto), passes=["fold-batchnorm"])
    assert report.applied == 0 and report.verification is None
    assert "graph output" in report.passes[0].skipped[0].reason
    assert ir.serde.serialize_model(model).graph.node[1].op_type == "BatchNormalization"
