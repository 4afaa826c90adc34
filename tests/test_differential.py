"""Differential check on real architectures: onnxruntime and onnx's reference evaluator agree on the
converted models of normfold.models.

Each factory (but resnet50, whose 224x224 convolutions take minutes in the pure-numpy reference evaluator)
is exported (TorchScript, opset 18, and 14 for the transformers), converted with the default passes for target "onnx"
(standard ops only, which the reference evaluator implements), and run on seeded inputs by onnxruntime
with graph optimizations off and by onnx.reference.ReferenceEvaluator: the outputs must agree within
REFERENCE.md's fp32 LN -> RMSNorm row (rtol 1e-4, atol 1e-4 * max(1, rms)), the loosest a default
conversion is verified at. The same comparison on the original model is the control: the evaluators must
agree there too, so a disagreement on the converted model is the rewrite's doing (an op or a spelling the
converted model uses that the two implement differently), not the evaluators'.

The random property models get the same check in tests/passes/test_metamorphic.py (every exact pass,
and the default pipeline).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

import normfold  # noqa: E402
from normfold import models  # noqa: E402
from normfold.io import from_proto  # noqa: E402
from normfold.verification import TOLERANCES, compare  # noqa: E402

NAMES = [n for n in models.FACTORIES if n != "resnet50"]
OPSETS = [18, 14]
"""Transformers at both (opset 18: fused LayerNormalization, 14: decomposed); CNNs, which export alike, at 18."""
GROUPED_CONV_TRANSPOSE = pytest.mark.xfail(
    strict=True, raises=ValueError, reason="onnx bug (not normfold): onnx.reference's ConvTranspose fails on group > 1 "
    "(tests/passes/test_metamorphic.py::test_onnx_reference_evaluator_grouped_conv_transpose); here on the "
    "original already")
CASES = [pytest.param(n, o, marks=GROUPED_CONV_TRANSPOSE) if n == "convtranspose_decoder" else (n, o)
         for n in NAMES for o in (OPSETS if n in models.TRANSFORMER_FACTORIES else OPSETS[:1])]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, int], onnx.ModelProto]:
    import torch

    from normfold.models.export import build_onnx

    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("differential")
    return {(name, opset): build_onnx(name, seed=2, path=directory / f"{name}-{opset}.onnx", exporter="torchscript",
                                      opset=opset)
            for name, opset in (c.values if hasattr(c, "values") else c for c in CASES)}


def feeds_for(name: str, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    return dict(zip(names, models.example_inputs(name, seed=7), strict=True))


def run_ort(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def run_reference(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return dict(zip([o.name for o in model.graph.output], ReferenceEvaluator(model).run(None, feeds)))


def disagreements(model: onnx.ModelProto, feeds) -> list[str]:
    rtol, atol = TOLERANCES["renorm"]["float32"]
    got, expected = run_ort(model, feeds), run_reference(model, feeds)
    assert list(got) == list(expected)
    checks = [compare(n, expected[n], got[n], rtol=rtol, atol=atol, tolerance_class="renorm") for n in expected]
    return [f"{c.name}: max abs {c.max_abs_error:.3g} (atol {c.atol:.3g})" for c in checks if not c.passed]


@pytest.mark.parametrize("name,opset", CASES)
def test_onnxruntime_and_the_reference_evaluator_agree_on_the_converted_model(name, opset, exports):
    original = exports[name, opset]
    feeds = feeds_for(name, original)
    assert disagreements(original, feeds) == [], "the evaluators disagree on the original (control)"
    model, report = normfold.convert(from_proto(original), target="onnx", inputs=feeds)
    assert report.applied > 0 and report.verification["passed"], report.summary_lines()
    converted = ir.serde.serialize_model(model)
    onnx.checker.check_model(converted)
    assert disagreements(converted, feeds) == []
