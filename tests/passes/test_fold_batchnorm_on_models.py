"""fold-batchnorm end to end on the architectures of normfold.models, from both torch exporters.

Every BatchNorm of these CNNs sits after a Conv, ConvTranspose or Linear whose output it alone reads,
so every one must fold; the result must match the original on onnxruntime and the torch module.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

import normfold  # noqa: E402
from normfold import models, runtime  # noqa: E402
from normfold.models.export import build_onnx  # noqa: E402

ARCHITECTURES = ["resnet_like", "mobilenet_like", "convtranspose_decoder", "mlp_bn", "conv1d_bn", "conv3d_bn"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_batchnorm_folds_and_outputs_match(name, exporter, tmp_path):
    path = tmp_path / f"{name}.onnx"
    build_onnx(name, seed=3, path=path, exporter=exporter)
    bn_count = sum(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)

    model, report = normfold.convert(path, passes=["fold-batchnorm"])

    assert bn_count > 0 and report.passes[0].applied == bn_count, report.summary_lines()
    assert report.ops_after.get("BatchNormalization", 0) == 0
    assert sum(report.ops_after.values()) < sum(report.ops_before.values())
    assert report.verification["passed"]

    # Against the torch module itself, on fresh inputs.
    out = tmp_path / "folded.onnx"
    normfold.save(model, out)
    module = models.build(name, seed=3)
    inputs = models.example_inputs(name, seed=11)
    import torch

    with torch.no_grad():
        expected = module(*(torch.from_numpy(x) for x in inputs)).numpy()
    session = runtime.make_session(out, optimize=False)
    (actual,) = session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})
    scale = max(1.0, float(np.sqrt(np.mean(expected.astype(np.float64) ** 2))))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)
