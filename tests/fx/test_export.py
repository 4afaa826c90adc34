"""normfold.fx.export: the converted module's ONNX, verified on onnxruntime against the original's."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import normfold  # noqa: E402
import normfold.fx as nfx  # noqa: E402
from normfold.errors import InputError  # noqa: E402
from normfold.models import build, example_inputs  # noqa: E402
from normfold.models.export import _cached_torchlib_registry, to_onnx  # noqa: E402
from normfold.report import op_counts  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _registry():
    """Builds the dynamo exporter's operator registry once for this module (it takes seconds)."""
    with _cached_torchlib_registry():
        yield


@pytest.mark.parametrize(("name", "capture", "folded_op"), [
    ("mobilenet_like", "symbolic_trace", "Conv"),
    ("convtranspose_decoder", "export", "ConvTranspose"),
])
def test_exported_conversion_verifies_against_the_original_export(name, capture, folded_op, tmp_path):
    module = build(name)
    inputs = tuple(torch.from_numpy(x) for x in example_inputs(name))
    gm, report = nfx.convert(module, inputs, ["fold-batchnorm"], capture=capture)
    assert report.capture == ("torch.export" if capture == "export" else "symbolic_trace")
    original = tmp_path / "original.onnx"
    to_onnx(module, inputs, original)
    path = nfx.export(gm, inputs, tmp_path / "folded.onnx")
    assert path == tmp_path / "folded.onnx"
    before, after = op_counts(normfold.load(original)), op_counts(normfold.load(path))
    assert before["BatchNormalization"] == report.passes[0].applied > 0
    assert "BatchNormalization" not in after and after[folded_op] == before[folded_op]
    result = normfold.verify(original, path, tolerance_class="fold")
    assert result.passed, "\n".join(result.summary_lines())


def test_export_refuses_an_existing_file_unless_forced(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    inputs = (torch.randn(2, 3),)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(InputError, match="exists"):
        nfx.export(module, inputs, target)
    assert target.read_bytes() == b"keep me"
    nfx.export(module, inputs, target, force=True)
    result = normfold.verify(target, target)
    assert result.passed and [o.name for o in result.outputs] == ["output"]


class Unexportable(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigh(x @ x.T)[0]


def test_export_failure_is_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(InputError) as info:
        nfx.export(Unexportable(), (torch.randn(3, 3),), tmp_path / "m.onnx")
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot export Unexportable to ONNX") and "eigh" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_transformers_resnet_export_verifies(tmp_path):
    transformers = pytest.importorskip("transformers")
    from normfold.models.cnn import batchnorms, randomize_batchnorm

    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       layer_type="bottleneck")
    module = transformers.ResNetModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    for bn in batchnorms(module):
        randomize_batchnorm(bn, generator)
    inputs = (torch.randn(1, 3, 32, 32, generator=generator),)
    gm, report = nfx.convert(module, inputs, ["fold-batchnorm"])
    original = nfx.export(module, inputs, tmp_path / "original.onnx")
    folded = nfx.export(gm, inputs, tmp_path / "folded.onnx")
    assert "BatchNormalization" not in op_counts(normfold.load(folded))
    assert op_counts(normfold.load(original))["BatchNormalization"] == report.passes[0].applied == 8
    result = normfold.verify(original, folded)
    assert result.passed and len(result.outputs) == 2, "\n".join(result.summary_lines())


def _hf_mobilenet_v2():
    transformers = pytest.importorskip("transformers")
    from normfold.models.cnn import batchnorms, randomize_batchnorm

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
    """The issue's model list end to end: default passes, both exports verified on onnxruntime, the rewritten
    norm ops gone (GPT-2 and ViT: test_layernorm_to_*.py; the project's CNNs: above)."""
    pytest.importorskip("transformers")
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
