"""layernorm-to-rmsnorm end to end on the transformer architectures of normfold.models.

Each Pre-LN model, exported by torch's dynamo exporter (opset 18, fused LayerNormalization) and its
TorchScript exporter (opset 14, decomposed LayerNorm), in float32 and float16, must come out with no
LayerNorm at all and verify at REFERENCE.md's tolerances (fp32 LN -> RMSNorm: rtol 1e-4, atol 1e-4 *
scale; fp16: 1e-2); the Post-LN BERT must come out unchanged, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")

import normfold  # noqa: E402
from normfold import models  # noqa: E402
from normfold.detect import find_sites  # noqa: E402
from normfold.models.export import build_onnx  # noqa: E402

PRE_LN = ["gpt2_tied", "vit", "opt", "bloom", "gpt_neox", "tiny_gpt"]
EXPORTS = [("dynamo", 18), ("torchscript", 14)]
LN_COUNT = {"gpt2_tied": 5, "vit": 5, "opt": 5, "bloom": 6, "gpt_neox": 5, "tiny_gpt": 5}


def layernorms(model) -> list:
    return [s for s in find_sites(model) if s.kind == "LayerNorm"]


CASES = [(name, exporter, opset, dtype, "onnx") for name in PRE_LN for exporter, opset in EXPORTS
         for dtype in ("float32", "float16")]
CASES += [(name, "dynamo", 18, "float32", "ort") for name in PRE_LN]  # same rewrite, onnxruntime's emission


@pytest.mark.parametrize("name,exporter,opset,dtype,target", CASES)
def test_pre_ln_models_convert_completely(name, exporter, opset, dtype, target, tmp_path):
    path = tmp_path / f"{name}.onnx"
    build_onnx(name, seed=1, path=path, exporter=exporter, opset=opset, dtype=dtype)
    assert len(layernorms(normfold.load(path))) == LN_COUNT[name]

    model, report = normfold.convert(path, ["layernorm-to-rmsnorm"], target=target)

    assert report.passes[0].applied == LN_COUNT[name], report.summary_lines()
    assert layernorms(model) == []
    assert report.verification["passed"]
    rms_ops = {"onnx": "Sqrt", "ort": "SimplifiedLayerNormalization"}[target]
    assert report.ops_after.get(rms_ops, 0) >= LN_COUNT[name]


def test_vit_with_inputs_shifted_by_100_stays_equivalent(tmp_path):
    path = tmp_path / "vit.onnx"
    build_onnx("vit", seed=2, path=path)
    images = models.example_inputs("vit", seed=5)[0] + 100.0
    model, report = normfold.convert(path, ["layernorm-to-rmsnorm"], inputs={"input": images})
    assert report.passes[0].applied == LN_COUNT["vit"] and report.verification["passed"]


@pytest.mark.parametrize("exporter,opset", EXPORTS)
def test_post_ln_bert_comes_out_unchanged_with_the_reason(exporter, opset, tmp_path):
    path = tmp_path / "bert.onnx"
    build_onnx("bert_post_ln", seed=1, path=path, exporter=exporter, opset=opset)
    original = onnx.load(path)
    model, report = normfold.convert(path, ["layernorm-to-rmsnorm"])
    assert report.passes[0].applied == 0 and report.verification is None
    assert len(report.passes[0].skipped) == 6
    reasons = [s.reason for s in report.passes[0].skipped]
    # the encoder's five norms are Post-LN; the MLM head's transform norm reads a GELU, not a stream
    assert sum("Post-LN" in r for r in reasons) == 5, report.summary_lines()
    assert sum("can only be centred by an explicit op" in r for r in reasons) == 1, report.summary_lines()
    assert report.ops_after == report.ops_before
    assert [n.op_type for n in normfold.io.from_proto(original).graph] == [n.op_type for n in model.graph]


def test_tied_gpt2_keeps_one_table_and_subtracts_gathered_row_means(tmp_path):
    """The tied table is not copied (GPT-2-small would grow by 31%): the lookup subtracts row means."""
    path = tmp_path / "gpt2.onnx"
    build_onnx("gpt2_tied", seed=1, path=path, exporter="torchscript", opset=14)
    original = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    model, report = normfold.convert(path, ["layernorm-to-rmsnorm"])
    tables = [v for v in model.graph.initializers.values() if v.const_value.shape == (101, 32)]
    assert len(tables) == 1 and np.array_equal(tables[0].const_value.numpy(), original[tables[0].name])
    (row_means,) = [v for v in model.graph.initializers.values() if v.const_value.shape == (101, 1)]
    expected = original[tables[0].name].astype(np.float64).mean(axis=1).astype(np.float32)
    np.testing.assert_array_equal(row_means.const_value.numpy()[:, 0], expected)  # float64 mean, cast once
    assert report.verification["passed"]


@pytest.mark.parametrize("name", PRE_LN)
@pytest.mark.parametrize("exporter,opset", EXPORTS)
def test_default_convert_leaves_no_layernorm(name, exporter, opset, tmp_path):
    """`normfold convert` with its default passes (LN -> RMSNorm, RMSNorm emission, affine folding)."""
    path = tmp_path / f"{name}.onnx"
    build_onnx(name, seed=5, path=path, exporter=exporter, opset=opset)
    model, report = normfold.convert(path)
    assert layernorms(model) == [], report.summary_lines()
    assert report.verification["passed"] and report.verification["tolerance_class"] == "renorm"
