"""fold-norm-affine: gamma/beta of LayerNorm and RMSNorm folded into every linear reader.

Positive cases on the transformer zoo (fused and decomposed spellings, Llama's RMSNorm, tied heads,
fused QKV behind GPT-2's Conv1D reshapes, ViT's CLS gather), negative cases on small graphs (a
non-linear reader, a graph output, a non-constant gamma: model unchanged, reason reported), and
numerical equivalence on onnxruntime at the fp32 fold tolerance (rtol 1e-4, atol 1e-5 * scale).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir
import pytest
from onnx import helper, numpy_helper

import normfold
from normfold.detect import find_sites

FLOAT = onnx.TensorProto.FLOAT


def ln_then(readers: str, *, gamma_as_input: bool = False, beta: bool = True) -> onnx.ModelProto:
    """x(2,3,8) -> LayerNormalization -> readers: "matmul", "matmul+bias", "gemm", "relu", "output"."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")]
    if beta:
        inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "beta"))
    inputs = [helper.make_tensor_value_info("x", FLOAT, [2, 3, 8])]
    if gamma_as_input:
        inputs.append(helper.make_tensor_value_info("gamma", FLOAT, [8]))
        inits = inits[1:]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma"] + (["beta"] if beta else []), ["n"], name="ln")]
    outputs = []
    for i, kind in enumerate(readers.split(",")):
        out = f"y{i}"
        if kind == "matmul":
            nodes.append(helper.make_node("MatMul", ["n", "W"], [out], name=f"mm{i}"))
        elif kind == "matmul+bias":
            nodes.append(helper.make_node("MatMul", ["n", "W"], [f"h{i}"], name=f"mm{i}"))
            nodes.append(helper.make_node("Add", [f"h{i}", "b"], [out], name=f"bias{i}"))
        elif kind == "gemm":
            nodes.append(helper.make_node("Reshape", ["n", "flat"], [f"f{i}"], name=f"flatten{i}"))
            nodes.append(helper.make_node("Gemm", [f"f{i}", "W", "b"], [out], name=f"gemm{i}", alpha=0.5, beta=2.0))
            inits.append(numpy_helper.from_array(np.array([-1, 8], np.int64), "flat"))
        elif kind == "relu":
            nodes.append(helper.make_node("Relu", ["n"], [out], name=f"relu{i}"))
        elif kind == "output":
            out = "n"
        outputs.append(helper.make_tensor_value_info(out, FLOAT, None))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("readers", ["matmul", "matmul+bias", "gemm", "matmul,matmul+bias,gemm"])
@pytest.mark.parametrize("beta", [True, False])
def test_affine_moves_into_every_linear_reader(readers, beta):
    model, report = normfold.convert(ln_then(readers, beta=beta), ["fold-norm-affine"])
    assert report.passes[0].applied == 1 and report.verification["passed"]
    (site,) = find_sites(model)
    gamma = site.gamma.const_value.numpy()
    assert np.all(gamma == 1.0) and site.beta is None


@pytest.mark.parametrize("readers,reason", [
    ("matmul,relu", "read by Relu relu1, which is not a linear map"),
    ("matmul,output", "'n' is a graph output"),
])
def test_a_non_linear_reader_leaves_the_model_unchanged(readers, reason):
    proto = ln_then(readers)
    model, report = normfold.convert(proto, ["fold-norm-affine"])
    assert report.passes[0].applied == 0 and reason in report.passes[0].skipped[0].reason
    assert graph_summary(onnx_ir.serde.serialize_model(model)) == graph_summary(proto)


def graph_summary(proto: onnx.ModelProto):
    """Nodes (op, inputs, outputs) and initializers (name, bytes): what must not change on a refusal."""
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in proto.graph.node]
    inits = sorted((i.name, numpy_helper.to_array(i).tobytes()) for i in proto.graph.initializer)
    return nodes, inits


def test_a_gamma_that_is_a_graph_input_is_refused():
    _, report = normfold.convert(ln_then("matmul", gamma_as_input=True), ["fold-norm-affine"])
    assert report.passes[0].applied == 0
    assert "gamma is not constant" in report.passes[0].skipped[0].reason


def test_converting_twice_changes_nothing_more():
    model, _ = normfold.convert(ln_then("matmul+bias"), ["fold-norm-affine"])
    _, again = normfold.convert(model, ["fold-norm-affine"])
    assert again.passes[0].applied == 0 and again.passes[0].skipped == []


transformers = pytest.importorskip("transformers")

from normfold.models.export import build_onnx  # noqa: E402


@pytest.mark.parametrize("name,exporter,opset", [
    ("gpt2_tied", "dynamo", 18), ("gpt2_tied", "torchscript", 14), ("vit", "dynamo", 18),
    ("llama", "dynamo", 18), ("llama", "torchscript", 14), ("opt", "torchscript", 14),
])
def test_zoo_models_fold_every_norm_affine(name, exporter, opset, tmp_path):
    """Every norm's affine is folded, except a beta whose only place would be a new Add after a bias-less
    LM head wider than the norm (GPT-2's and OPT's final LayerNorm): that norm keeps its affine, with the
    reason, and a tied head stays tied."""
    path = tmp_path / f"{name}.onnx"
    build_onnx(name, seed=4, path=path, exporter=exporter, opset=opset)
    model, report = normfold.convert(path, ["fold-norm-affine"])
    entry = report.passes[0]
    norms = [s for s in find_sites(model) if s.kind in ("LayerNorm", "RMSNorm")]
    assert entry.applied + len(entry.skipped) == len(norms) == 5, report.summary_lines()
    assert all("the affine stays on the norm" in s.reason for s in entry.skipped), entry.skipped
    assert len(entry.skipped) == (1 if name in ("gpt2_tied", "opt") else 0)
    assert report.verification["passed"]
    folded = [s for s in norms if s.beta is None and (s.gamma is None or np.all(s.gamma.const_value.numpy() == 1.0))]
    assert len(folded) == entry.applied


def test_beta_is_not_folded_into_a_new_add_wider_than_the_norm():
    """A bias-less MatMul reading the norm with more outputs than the norm's width: folding beta would add
    an Add over those outputs (more work than the norm's own beta Add), so the model is left unchanged."""
    wide = ln_then("matmul")
    wide.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones((8, 50), np.float32), "W"))
    model, report = normfold.convert(wide, ["fold-norm-affine"])
    assert report.passes[0].applied == 0
    assert "more work than the norm's own beta over 8" in report.passes[0].skipped[0].reason
    for readers in ("matmul", "matmul+bias"):  # 5 outputs, fewer than the norm's 8; or a bias to take beta W
        assert normfold.convert(ln_then(readers), ["fold-norm-affine"])[1].passes[0].applied == 1


def test_post_ln_residual_norms_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "bert.onnx"
    build_onnx("bert_post_ln", seed=4, path=path)
    _, report = normfold.convert(path, ["fold-norm-affine"])
    reasons = [s.reason for s in report.passes[0].skipped]
    assert len(reasons) == 4 and all("Add" in r and "not a linear map" in r for r in reasons)
    assert report.verification["passed"]


def test_a_decomposed_norm_keeps_a_mul_by_ones_so_onnxruntime_fuses_it(tmp_path):
    """Target onnx emits decomposed RMSNorms (opset 18); once their gamma is folded each keeps a Mul by
    ones, the pattern onnxruntime's optimizer fuses into SimplifiedLayerNormalization (without the Mul it
    leaves five loose ops, about 2.7x slower: benchmarks/results/kernel_profile_deit_tiny.md)."""
    import onnxruntime as ort

    path = tmp_path / "vit.onnx"
    build_onnx("vit", seed=4, path=path, exporter="dynamo", opset=18)
    model, report = normfold.convert(path, target="onnx")
    assert report.verification["passed"]
    norms = [s for s in find_sites(model) if s.kind == "RMSNorm"]
    assert norms and all(not s.fused and np.all(s.gamma.const_value.numpy() == 1.0) for s in norms)
    converted, optimized = tmp_path / "converted.onnx", tmp_path / "optimized.onnx"
    normfold.io.save(model, converted)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(converted), options, providers=["CPUExecutionProvider"])
    fused = [n for n in onnx.load(str(optimized)).graph.node if n.op_type == "SimplifiedLayerNormalization"]
    assert len(fused) == len(norms)
