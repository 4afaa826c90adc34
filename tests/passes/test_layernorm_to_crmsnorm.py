"""layernorm-to-crmsnorm end to end: every Pre-LN architecture of normfold.models, both exporters,
fp32 and fp16, converted with no LayerNorm left, the stream stored in d-1 dimensions, verified at
REFERENCE.md's tolerances; Post-LN BERT unchanged with the reason."""

from __future__ import annotations

import re

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
    notes = [n.reason for n in report.passes[0].notes]
    # only BLOOM's embedding norm, read by an explicit centring, keeps width d
    assert sum(n.startswith("RMSNorm instead of CRMSNorm") for n in notes) == (name == "bloom")
    # the final norm of every language model feeds a bias-less LM head: it reads the norm restored
    assert sum("reads the CRMSNorm output restored" in n for n in notes) == (name != "vit"), notes
    assert len(notes) == (name == "bloom") + (name != "vit")


def test_a_bias_less_lm_head_reads_the_norm_restored_and_keeps_its_weight(tmp_path):
    """Folding the final norm's beta into GPT-2's tied head would add an Add over every logit (and
    onnxruntime then runs the head as a slower Gemm); the head reads [n, -sum n] * gamma + beta instead,
    with its own weight, and no Add follows it."""
    path = tmp_path / "gpt2.onnx"
    build_onnx("gpt2_tied", seed=3, path=path)
    model, report = normfold.convert(path, ["layernorm-to-crmsnorm"])
    assert report.verification["passed"]
    [note] = report.passes[0].notes
    head_name = re.match(r"folding beta into MatMul (\S+), which has no bias", note.reason).group(1)
    head = next(n for n in onnx.load(path).graph.node if n.name == head_name)
    converted = next(n for n in model.graph if n.name == head_name)
    assert converted.inputs[1].name == head.input[1]  # the same weight value, not a folded copy
    assert converted.inputs[0].producer().op_type == "Add"  # ... + beta
    assert converted.inputs[0].producer().inputs[0].producer().inputs[0].producer().op_type == "Concat"
    assert [use.op_type for use, _ in converted.outputs[0].uses()] != ["Add"]


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
