"""emit-rmsnorm: decomposed RMSNorms re-emitted in the target's fast form, same function."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

import normfold
from normfold.detect import find_sites
from toy_models_path import decomposed_norm  # noqa: F401  (re-exported test builder)


@pytest.mark.parametrize("divide", ["div", "reciprocal", "one_div"])
@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_decomposed_rmsnorm_becomes_the_target_form(divide, target):
    model, report = normfold.convert(decomposed_norm("rmsnorm", divide=divide), ["emit-rmsnorm"], target=target)
    if target == "onnx" and divide == "div":
        assert report.passes[0].applied == 0 and report.verification is None  # already the fusable form
        return
    assert report.passes[0].applied == 1 and report.verification["passed"]
    (site,) = find_sites(model)
    expected = "SimplifiedLayerNormalization" if target == "ort" else "decomposed: Pow ReduceMean Add Sqrt Div Mul"
    assert site.kind == "RMSNorm" and site.spelling == expected


def test_the_onnx_form_is_the_one_onnxruntime_fuses(tmp_path):
    model, _ = normfold.convert(decomposed_norm("rmsnorm", divide="reciprocal"), ["emit-rmsnorm"], target="onnx")
    path = tmp_path / "m.onnx"
    normfold.save(model, path)
    optimized = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert "SimplifiedLayerNormalization" in {n.op_type for n in onnx.load(optimized).graph.node}


def test_layernorms_are_not_touched():
    _, report = normfold.convert(decomposed_norm("layernorm"), ["emit-rmsnorm"], target="ort")
    assert report.passes[0].applied == 0 and report.ops_after == report.ops_before


pytest.importorskip("transformers")

from normfold.models.export import build_onnx  # noqa: E402


@pytest.mark.parametrize("exporter,opset", [("dynamo", 18), ("torchscript", 14)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_llama_rmsnorms_become_simplified_layernorm(exporter, opset, dtype, tmp_path):
    path = tmp_path / "llama.onnx"
    build_onnx("llama", seed=2, path=path, exporter=exporter, opset=opset, dtype=dtype)
    model, report = normfold.convert(path, ["emit-rmsnorm"], target="ort")
    assert report.passes[0].applied == 5 and report.verification["passed"], report.summary_lines()
    assert report.ops_after["SimplifiedLayerNormalization"] == 5
    assert all(s.fused for s in find_sites(model) if s.kind == "RMSNorm")
