"""normfold.fx end to end on the issue's model list: convert with the default passes, export the original
and the converted module with normfold.fx.export, and verify the pair on onnxruntime (REFERENCE.md
tolerances) with the rewritten norm ops gone from the converted export. GPT-2 and ViT are covered in
test_layernorm_to_rmsnorm.py / test_layernorm_to_crmsnorm.py, the project's CNNs in test_export.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import normfold  # noqa: E402
import normfold.fx as nfx  # noqa: E402
from normfold.models import build, example_inputs  # noqa: E402
from normfold.models.cnn import batchnorms, randomize_batchnorm  # noqa: E402
from normfold.models.export import _cached_torchlib_registry  # noqa: E402
from normfold.report import op_counts  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _registry():
    with _cached_torchlib_registry():
        yield


def _hf_mobilenet_v2():
    torch.manual_seed(0)
    config = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_channels=3)
    module = transformers.MobileNetV2Model(config).eval()
    generator = torch.Generator().manual_seed(0)
    for bn in batchnorms(module):
        randomize_batchnorm(bn, generator)
    return module, (torch.randn(1, 3, 32, 32, generator=generator),)


def _zoo(name):
    return build(name), tuple(torch.from_numpy(a) for a in example_inputs(name))


CASES = {
    # name: (module and inputs, norm op the original export has and the converted one must not, tolerances)
    "MobileNetV2Model": (_hf_mobilenet_v2, "BatchNormalization", "fold"),
    "opt": (lambda: _zoo("opt"), "LayerNormalization", "renorm"),
    "llama": (lambda: _zoo("llama"), None, "fold"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_default_conversion_exports_and_verifies_on_onnxruntime(name, tmp_path):
    make, norm_op, tolerance_class = CASES[name]
    module, inputs = make()
    gm, report = nfx.convert(module, inputs)
    assert report.applied > 0 and report.verification["passed"], report.summary_lines()
    original = nfx.export(module, inputs, tmp_path / "original.onnx")
    converted = nfx.export(gm, inputs, tmp_path / "converted.onnx")
    before, after = op_counts(normfold.load(original)), op_counts(normfold.load(converted))
    if norm_op is not None:
        assert before.get(norm_op, 0) > 0 and after.get(norm_op, 0) == 0, (before, after)
    names = [v.name for v in normfold.load(original).graph.inputs]
    feeds = {name: t.numpy() for name, t in zip(names, inputs, strict=True)}
    result = normfold.verify(original, converted, inputs=feeds, tolerance_class=tolerance_class)
    assert result.passed, "\n".join(result.summary_lines())
