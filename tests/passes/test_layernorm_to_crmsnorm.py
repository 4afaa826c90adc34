"""layernorm-to-crmsnorm end to end: every Pre-LN architecture of normfold.models, both exporters,
fp32 and fp16, converted with no LayerNorm left, the stream stored in d-1 dimensions, verified at
REFERENCE.md's tolerances; Post-LN BERT unchanged with the reason."""

from __future__ import annotations

import onnx
import pytest

pytest.importorskip("transformers")

import normfold  # noqa: E402
from normfold import models  # noqa: E402
from normfold.detect import find_sites  # noqa: E402
from normfold.models.export import build_onnx  # noqa: E402

LN_COUNT = {"gpt2_tied": 5, "vit": 5, "opt": 5, "bloom": 6, "gpt_neox": 5, "tiny_gpt": 5}
CASES = [(name, exporter, opset, dtype) for name in LN_COUNT for exporter, opset in (("dynamo", 18), ("torchscript", 14))
         for dtype in ("float32", "float16")]


@pytest.mark.parametrize("name,exporter,opset,dtype", CASES)
def test_pre_ln_models_convert_to_crmsnorm(name, exporter, opset, dtype, tmp_path):
    path = tmp_path / f"{name}.onnx"
    build_onnx(name, seed=3, path=path, exporter=exporter, opset=opset, dtype=dtype)
    model, report = normfold.convert(path, ["layernorm-to-crmsnorm"], target="onnx")
    assert report.passes[0].applied == LN_COUNT[name], report.summary_lines()
    assert [s for s in find_sites(model) if s.kind == "LayerNorm"] == []
    assert report.verification["passed"]
    assert report.ops_after.get("ReduceSum", 0) >= 2 * (LN_COUNT[name] - (name == "bloom"))
    notes = report.passes[0].notes  # only BLOOM's embedding norm, read by an explicit centring, keeps width d
    assert [n.reason.startswith("RMSNorm instead of CRMSNorm") for n in notes] == [True] * (name == "bloom")


def test_the_stream_is_stored_in_d_minus_1_dims(tmp_path):
    path = tmp_path / "gpt.onnx"
    build_onnx("tiny_gpt", seed=3, path=path, width=32)
    model, _ = normfold.convert(path, ["layernorm-to-crmsnorm"])
    tables = [v.const_value.shape for v in model.graph.initializers.values() if v.const_value.shape[:1] == (101,)]
    assert (101, 31) in tables  # the token embedding lost its last column


def test_vit_with_shifted_images_stays_equivalent(tmp_path):
    path = tmp_path / "vit.onnx"
    build_onnx("vit", seed=3, path=path)
    images = models.example_inputs("vit", seed=6)[0] + 100.0
    _, report = normfold.convert(path, ["layernorm-to-crmsnorm"], inputs={"input": images})
    assert report.passes[0].applied == 5 and report.verification["passed"]


def test_post_ln_bert_is_refused(tmp_path):
    path = tmp_path / "bert.onnx"
    build_onnx("bert_post_ln", seed=3, path=path)
    before = [n.op_type for n in onnx.load(path).graph.node]
    model, report = normfold.convert(path, ["layernorm-to-crmsnorm"])
    assert report.passes[0].applied == 0
    assert sum("Post-LN" in s.reason for s in report.passes[0].skipped) == 5, report.summary_lines()
    assert [n.op_type for n in model.graph] == before
