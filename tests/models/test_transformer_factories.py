"""Seeded transformer factories: determinism, LayerNorm-preserving ONNX export, ORT parity.

Every factory but ``tiny_gpt`` needs the transformers package; those tests skip without it.
Exports use the dynamo exporter at opset 18 (fused LayerNormalization) and the TorchScript
exporter at opset 14 (decomposed ReduceMean/Sub/Pow/... LayerNorm).
"""

import collections
import copy
import functools
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from normfold.models import (  # noqa: E402
    CNN_FACTORIES,
    FACTORIES,
    TRANSFORMER_FACTORIES,
    build,
    example_inputs,
)
from normfold.models import transformer_zoo as zoo  # noqa: E402
from normfold.models.export import build_onnx, to_onnx  # noqa: E402

ALL = list(TRANSFORMER_FACTORIES)
EXPORTS = [("dynamo", 18), ("torchscript", 14)]
# (kind of norm module, how many) for the default sizes
NORMS = {
    "gpt2_tied": ("LayerNorm", 5),
    "vit": ("LayerNorm", 5),
    "opt": ("LayerNorm", 5),
    "bloom": ("LayerNorm", 6),
    "gpt_neox": ("LayerNorm", 5),
    "bert_post_ln": ("LayerNorm", 6),
    "llama": ("RMSNorm", 5),
    "tiny_gpt": ("LayerNorm", 5),
}
FP16_DEFAULT = {"tiny_gpt", "llama"}
TIED = {"gpt2_tied": True, "opt": True, "bloom": True, "bert_post_ln": True, "gpt_neox": False, "llama": False}


def needs(name):
    if name != "tiny_gpt":
        pytest.importorskip("transformers")


def make(name, seed=0, **size):
    needs(name)
    return build(name, seed, **size)


def torch_forward(module, inputs, dtype=torch.float32):
    args = [torch.from_numpy(x) for x in inputs]
    args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    with torch.no_grad():
        return module(*args).float().numpy()


def ort_forward(model, inputs):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for arg, x in zip(session.get_inputs(), inputs, strict=True):
        feeds[arg.name] = x.astype(np.float16) if arg.type == "tensor(float16)" else x
    return session.run(None, feeds)[0].astype(np.float32)


def assert_close(actual, reference, tol=1e-4):
    rms = float(np.sqrt(np.mean(np.square(reference, dtype=np.float64))))
    np.testing.assert_allclose(actual, reference, rtol=tol, atol=tol * max(1.0, rms))


def norm_counts(model):
    """Fused LayerNormalization, decomposed LayerNorm and decomposed RMSNorm sites, by pattern.

    Decomposed LN: a ReduceMean m(x) with a consumer Sub(x, m). Decomposed RMS: a ReduceMean of
    Pow(y, 2) where y (looking through Casts) is not such a Sub.
    """
    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    consumers = collections.defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)

    def centred(value):
        node = producer.get(value)
        while node is not None and node.op_type == "Cast":
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "Sub" and _is_mean_sub(node)

    def _is_mean_sub(sub):
        mean = producer.get(sub.input[1])
        return mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == sub.input[0]

    counts = collections.Counter(LayerNormalization=sum(n.op_type == "LayerNormalization" for n in nodes))
    for node in nodes:
        if node.op_type != "ReduceMean":
            continue
        if any(c.op_type == "Sub" and _is_mean_sub(c) for c in consumers[node.output[0]]):
            counts["decomposed_ln"] += 1
        square = producer.get(node.input[0])
        if square is not None and square.op_type == "Pow" and not centred(square.input[0]):
            counts["decomposed_rms"] += 1
    return +counts  # drop zero counts


@functools.cache
def exported(name, exporter, opset, dtype="float32", dynamic_batch=False):
    """(module, ONNX model) for ``name``, exported once per test session."""
    module = make(name)
    model = to_onnx(
        module, example_inputs(name), exporter=exporter, opset=opset, dtype=dtype, dynamic_batch=dynamic_batch
    )
    return module, model


def _fp16_params():
    return [
        pytest.param(name, exporter, opset, marks=() if name in FP16_DEFAULT else pytest.mark.slow)
        for name in ALL
        for exporter, opset in EXPORTS
    ]


# --------------------------------------------------------------------------- registry and inputs


def test_registry_lists_every_transformer_factory():
    assert set(TRANSFORMER_FACTORIES) == {
        "gpt2_tied", "vit", "opt", "bloom", "gpt_neox", "bert_post_ln", "llama", "tiny_gpt"
    }  # fmt: skip
    assert dict(FACTORIES) == {**CNN_FACTORIES, **TRANSFORMER_FACTORIES}
    with pytest.raises(TypeError):
        FACTORIES["x"] = FACTORIES["vit"]


@pytest.mark.parametrize("name", ALL)
def test_registry_matches_factory(name):
    spec, factory = TRANSFORMER_FACTORIES[name], TRANSFORMER_FACTORIES[name].load()
    assert (spec.input_shapes, spec.kinds, spec.vocab) == (factory.input_shapes, factory.input_kinds, factory.vocab)


def test_zoo_imports_transformers_lazily():
    code = "import sys, normfold.models.transformer_zoo as z; z.tiny_gpt(0); assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ALL)
def test_example_inputs_follow_the_spec(name):
    a, b, c = example_inputs(name, 0), example_inputs(name, 0), example_inputs(name, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    spec = TRANSFORMER_FACTORIES[name]
    for x, y, shape, kind in zip(a, c, spec.input_shapes, spec.kinds, strict=True):
        assert x.shape == shape
        if kind == "tokens":
            assert x.dtype == np.int64 and 0 <= x.min() and x.max() < spec.vocab
            assert not np.array_equal(x, y)
        elif kind == "ones":
            assert x.dtype == np.int64 and (x == 1).all()
        else:
            assert x.dtype == np.float32 and not np.array_equal(x, y)


def test_example_inputs_overrides():
    ids, mask = example_inputs("bert_post_ln", 3, batch=5, seq=6, vocab=7)
    assert ids.shape == mask.shape == (5, 6) and ids.max() < 7 and ids.dtype == mask.dtype == np.int64
    (image,) = example_inputs("vit", batch=1, seq=99)
    assert image.shape == (1, 3, 32, 32)


# --------------------------------------------------------------------------- factories


@pytest.mark.parametrize("name", ALL)
def test_same_seed_gives_identical_state(name):
    a, b = make(name, seed=3).state_dict(), make(name, seed=3).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("name", ALL)
def test_different_seed_changes_every_parameter(name):
    a, b = dict(make(name, seed=0).named_parameters()), dict(make(name, seed=1).named_parameters())
    assert [key for key in a if torch.equal(a[key], b[key])] == []


def test_build_leaves_global_rng_alone():
    state = torch.get_rng_state()
    make("tiny_gpt", seed=5)
    make("llama", seed=5)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", ALL)
def test_factory_returns_eval_module_without_dropout(name):
    module = make(name)
    assert not any(m.training for m in module.modules())
    assert all(m.p == 0 for m in module.modules() if isinstance(m, torch.nn.Dropout))
    config = getattr(getattr(module, "model", None), "config", None)
    if config is not None:
        assert config._attn_implementation == "eager"


@pytest.mark.parametrize("name", ALL)
def test_norm_affines_are_randomized(name):
    kind, count = NORMS[name]
    found = zoo.norms(make(name))
    assert len(found) == count
    assert all(zoo.is_rmsnorm(m) == (kind == "RMSNorm") for m in found)
    for norm in found:
        gamma = norm.weight.detach()
        assert 0.5 <= gamma.min() and gamma.max() <= 1.5 and gamma.std() > 0.1
        if getattr(norm, "bias", None) is not None:
            assert 0.02 < norm.bias.detach().std() < 0.3


@pytest.mark.parametrize("name", ALL)
def test_outputs_are_single_order_one_logits(name):
    out = torch_forward(make(name), example_inputs(name))
    expected = (2, 10) if name == "vit" else (2, 8, TRANSFORMER_FACTORIES[name].vocab)
    rms = np.sqrt(np.mean(np.square(out)))
    assert out.shape == expected and np.isfinite(out).all() and 0.1 < rms < 100


@pytest.mark.parametrize("name", sorted(TIED))
def test_hf_architecture_features(name):
    hf = make(name).model
    config = hf.config
    assert (hf.get_output_embeddings().weight is hf.get_input_embeddings().weight) == TIED[name]
    if name == "opt":
        assert config.do_layer_norm_before and hf.model.decoder.embed_positions.weight.shape[0] == 8 + 2
    if name == "gpt_neox":
        assert config.use_parallel_residual
    if name == "bloom":
        assert not config.apply_residual_connection_post_layernorm
    if name == "llama":
        assert not any(n.endswith("bias") for n, _ in hf.named_parameters())


def test_gpt2_is_tied_with_conv1d_projections():
    hf = make("gpt2_tied").model
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert type(hf.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_tiny_gpt_knobs():
    plain = make("tiny_gpt")
    assert plain.lm_head.weight is plain.wte.weight
    untied = make("tiny_gpt", tied=False, bias=False, mlp="swiglu", width=16, depth=3, heads=2)
    assert untied.lm_head.weight is not untied.wte.weight
    assert not any(n.endswith("bias") for n, _ in untied.named_parameters())
    assert len(untied.blocks) == 3 and hasattr(untied.blocks[0].mlp, "gate")
    assert len(zoo.norms(make("tiny_gpt", parallel=True, shared_ln=True))) == 3
    with pytest.raises(ValueError, match="shared_ln"):
        make("tiny_gpt", shared_ln=True)
    with pytest.raises(ValueError, match="mlp"):
        make("tiny_gpt", mlp="relu")


def test_tiny_gpt_parallel_block_is_parallel():
    module = make("tiny_gpt", parallel=True, depth=1)
    block = module.blocks[0]
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = x + block.attn(block.ln1(x)) + block.mlp(block.ln2(x))
        torch.testing.assert_close(block(x), expected)


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize(("exporter", "opset"), EXPORTS)
@pytest.mark.parametrize("name", ALL)
def test_export_matches_torch_and_keeps_norms(name, exporter, opset):
    module, model = exported(name, exporter, opset)
    inputs = example_inputs(name, seed=7)
    assert_close(ort_forward(model, inputs), torch_forward(module, inputs))

    spec = TRANSFORMER_FACTORIES[name]
    elem = {"tokens": onnx.TensorProto.INT64, "ones": onnx.TensorProto.INT64, "normal": onnx.TensorProto.FLOAT}
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [elem[k] for k in spec.kinds]
    dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [list(s) for s in spec.input_shapes]

    kind, count = NORMS[name]
    counts = norm_counts(model)
    if kind == "RMSNorm":
        assert counts == {"decomposed_rms": count}
    elif exporter == "dynamo":
        assert counts == {"LayerNormalization": count}
    else:
        assert counts == {"decomposed_ln": count}
    onnx.checker.check_model(model)


@pytest.mark.parametrize(("name", "exporter", "opset"), _fp16_params())
def test_fp16_export_runs_on_onnxruntime(name, exporter, opset):
    module, model = exported(name, exporter, opset, "float16")
    inputs = example_inputs(name, seed=7)
    reference = torch_forward(copy.deepcopy(module).half(), inputs, torch.float16)
    assert_close(ort_forward(model, inputs), reference, tol=1e-2)
    kinds = TRANSFORMER_FACTORIES[name].kinds
    elem = [i.type.tensor_type.elem_type for i in model.graph.input]
    assert elem == [onnx.TensorProto.FLOAT16 if k == "normal" else onnx.TensorProto.INT64 for k in kinds]
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_fp16_export_leaves_module_alone():
    module = make("tiny_gpt")
    to_onnx(module, example_inputs("tiny_gpt"), exporter="torchscript", opset=14, dtype="float16")
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype"):
        to_onnx(make("tiny_gpt"), example_inputs("tiny_gpt"), dtype="bfloat16")


def _dynamic_params():
    fast = {"tiny_gpt", "bert_post_ln"}
    return [
        pytest.param(name, exporter, opset, marks=() if name in fast else pytest.mark.slow)
        for name in ALL
        for exporter, opset in EXPORTS
    ]


@pytest.mark.parametrize(("name", "exporter", "opset"), _dynamic_params())
def test_dynamic_batch_runs_other_batch_sizes(name, exporter, opset):
    module, model = exported(name, exporter, opset, dynamic_batch=True)
    assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in model.graph.input)
    for batch in (1, 3):
        inputs = example_inputs(name, seed=2, batch=batch)
        assert_close(ort_forward(model, inputs), torch_forward(module, inputs))


TINY_VARIANTS = [
    {"bias": False},
    {"tied": False},
    {"parallel": True},
    {"parallel": True, "shared_ln": True, "bias": False},
    {"mlp": "swiglu", "tied": False},
    {"width": 48, "depth": 3, "heads": 6, "vocab": 37, "seq": 5, "mlp_ratio": 2},
]


def _variant_params():
    return [
        pytest.param(variant, exporter, opset, marks=() if exporter == "torchscript" or i == 3 else pytest.mark.slow)
        for i, variant in enumerate(TINY_VARIANTS)
        for exporter, opset in EXPORTS
    ]


@pytest.mark.parametrize(("variant", "exporter", "opset"), _variant_params())
def test_tiny_gpt_variants_export(variant, exporter, opset):
    module = make("tiny_gpt", seed=2, **variant)
    size = {k: variant[k] for k in ("seq", "vocab") if k in variant}
    model = to_onnx(module, example_inputs("tiny_gpt", 2, **size), exporter=exporter, opset=opset)
    inputs = example_inputs("tiny_gpt", 9, **size)
    assert_close(ort_forward(model, inputs), torch_forward(module, inputs))
    key = "LayerNormalization" if exporter == "dynamo" else "decomposed_ln"
    assert norm_counts(model) == {key: len(zoo.norms(module))}


def test_build_onnx_sizes_dtype_and_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    model = build_onnx(
        "tiny_gpt", seed=4, path=path, exporter="torchscript", opset=14, dtype="float16", width=16, seq=6, vocab=13
    )
    assert onnx.load(path) == model
    (graph_input,) = model.graph.input
    assert graph_input.name == "input" and [o.name for o in model.graph.output] == ["output"]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [2, 6]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
    inputs = example_inputs("tiny_gpt", 4, seq=6, vocab=13)
    reference = torch_forward(build("tiny_gpt", 4, width=16, seq=6, vocab=13).half(), inputs, torch.float16)
    assert_close(ort_forward(model, inputs), reference, tol=1e-2)


def test_two_input_model_names_its_inputs():
    _, model = exported("bert_post_ln", "torchscript", 14)
    assert [i.name for i in model.graph.input] == ["input_0", "input_1"]
