"""Seeded CNN factories: determinism, BN-preserving ONNX export, ORT parity."""

import functools

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from normfold.models import CNN_FACTORIES, build, example_inputs  # noqa: E402
from normfold.models.cnn import batchnorms  # noqa: E402
from normfold.models.export import build_onnx, to_onnx  # noqa: E402

ALL = list(CNN_FACTORIES)
SMALL = [name for name in ALL if name != "resnet50"]
EXPORTERS = ["dynamo", "torchscript"]


def torch_forward(module, inputs):
    with torch.no_grad():
        return module(*(torch.from_numpy(x) for x in inputs)).numpy()


def ort_forward(model, inputs):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {arg.name: x for arg, x in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)[0]


def assert_close(actual, reference):
    rms = float(np.sqrt(np.mean(np.square(reference, dtype=np.float64))))
    np.testing.assert_allclose(actual, reference, rtol=1e-4, atol=1e-5 * max(1.0, rms))


def count_ops(model, op_type):
    return sum(node.op_type == op_type for node in model.graph.node)


@functools.cache
def exported(name, exporter, dynamic_batch=False):
    """(module, ONNX model) for ``name``, exported once per test session."""
    module = build(name)
    model = to_onnx(module, example_inputs(name), exporter=exporter, dynamic_batch=dynamic_batch)
    return module, model


@pytest.mark.parametrize("name", ALL)
def test_registry_shapes_match_factory(name):
    assert CNN_FACTORIES[name].input_shapes == CNN_FACTORIES[name].load().input_shapes


@pytest.mark.parametrize("name", ALL)
def test_same_seed_gives_identical_state(name):
    a, b = build(name, seed=3).state_dict(), build(name, seed=3).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("name", ALL)
def test_different_seed_changes_weights_and_stats(name):
    a, b = build(name, seed=0).state_dict(), build(name, seed=1).state_dict()
    changed = {key for key in a if a[key].is_floating_point() and not torch.equal(a[key], b[key])}
    assert changed == {key for key in a if a[key].is_floating_point()}


def test_build_leaves_global_rng_alone():
    state = torch.get_rng_state()
    build("resnet_like", seed=5)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", ALL)
def test_factory_returns_eval_module(name):
    module = build(name)
    assert not any(m.training for m in module.modules())


@pytest.mark.parametrize("name", ALL)
def test_batchnorm_stats_are_nontrivial(name):
    for bn in batchnorms(build(name)):
        gamma, var = bn.weight.detach(), bn.running_var
        assert (gamma < 0).any() and (gamma == 0).any()
        assert var.min() < 0.05 and var.max() > 10
        assert bn.running_mean.abs().max() > 0 and bn.bias.abs().max() > 0


@pytest.mark.parametrize("name", ALL)
def test_outputs_stay_order_one(name):
    out = torch_forward(build(name), example_inputs(name))
    rms = np.sqrt(np.mean(np.square(out)))
    assert np.isfinite(out).all() and 0.1 < rms < 100


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", SMALL)
def test_export_keeps_every_batchnorm(name, exporter):
    module, model = exported(name, exporter)
    assert len(batchnorms(module)) > 0
    assert count_ops(model, "BatchNormalization") == len(batchnorms(module))
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", SMALL)
def test_onnxruntime_matches_torch(name, exporter):
    module, model = exported(name, exporter)
    inputs = example_inputs(name, seed=7)
    assert_close(ort_forward(model, inputs), torch_forward(module, inputs))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["resnet_like", "mlp_bn", "conv3d_bn"])
def test_dynamic_batch_runs_other_batch_sizes(name, exporter):
    module, model = exported(name, exporter, dynamic_batch=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    inputs = example_inputs(name, seed=2, batch=3)
    assert_close(ort_forward(model, inputs), torch_forward(module, inputs))


@pytest.mark.parametrize("name", SMALL)
def test_dynamo_conv_biases_are_1d(name):
    """Regression for onnxscript#2931 (rank-2 zero bias on bias-less Conv3d)."""
    _, model = exported(name, "dynamo")
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
    ranks.update({init.name: len(init.dims) for init in model.graph.initializer})
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 2]
    assert all(ranks[conv.input[2]] == 1 for conv in convs)


def test_static_export_has_fixed_shapes():
    _, model = exported("mlp_bn", "dynamo")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == list(CNN_FACTORIES["mlp_bn"].input_shapes[0])


def test_build_onnx_saves_to_path(tmp_path):
    path = tmp_path / "conv1d.onnx"
    model = build_onnx("conv1d_bn", seed=4, path=path, exporter="torchscript")
    assert onnx.load(path) == model
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]


def test_unknown_exporter_is_rejected():
    with pytest.raises(ValueError, match="exporter"):
        to_onnx(build("mlp_bn"), example_inputs("mlp_bn"), exporter="jit")


@pytest.mark.slow
def test_resnet50_export_keeps_batchnorms_and_matches_torch():
    module = build("resnet50")
    inputs = example_inputs("resnet50")
    model = to_onnx(module, inputs)
    assert count_ops(model, "BatchNormalization") == len(batchnorms(module)) == 53
    assert sum(p.numel() for p in module.parameters()) == 25_557_032
    assert_close(ort_forward(model, inputs), torch_forward(module, inputs))
