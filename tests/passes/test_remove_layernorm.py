"""remove-layernorm: LayerNorm -> calibrated FakeLN, folded away; no normalization op left.

Exactness: when every token's std equals the calibrated one (inputs built so), FakeLN equals the
LayerNorm, so the converted model must match the original at REFERENCE.md's fp32 LN tolerances
(rtol 1e-4, atol 1e-4 * scale). On exported transformers (tiny_gpt, GPT-2 tied) the folded model
must equal the same model with each LayerNorm replaced by its explicit FakeLN (the unfolded form), and
the report's drift must be what onnxruntime and numpy say it is.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfold
import transformer_graphs as tg
from normfold.calibration import calibrate, run_model
from normfold.cli import main
from normfold.detect import find_sites, inspect
from normfold.errors import InputError
from normfold.passes import RemoveLayerNorm
from normfold.passes.remove_layernorm import OWN_SCALE_RATIO
from normfold.pipeline import convert
from normfold.report import op_counts
from normfold.verification import compare, verify

D, SEQ, BATCH, EPS = 8, 4, 2, 1e-5
SIGMA, SIGMA_FIRST = 1.5, 4.0
NORM_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
            "com.microsoft.SimplifiedLayerNormalization", "com.microsoft.SkipLayerNormalization"}
STD_MATH = ("Sqrt", "Div", "Reciprocal", "Pow")
"""Ops a decomposed norm computes its std with; the model keeps only those it had outside its norms."""


def layer_graph(*, writer: str = "matmul", reader: str = "matmul", spelling: str = "fused", leak: bool = False,
                gamma_input: bool = False, eps: float = EPS) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x (BATCH, SEQ, D) -> h (x W0 + b0, or x itself) -> LN(h) -> y W1 + b1 (or Relu(y)).

    `leak`: the decomposed LN's centred value is also a graph output; `gamma_input`: gamma is computed
    from x. Returns (model, W0, b0); W0 is orthogonal, so inputs for any h can be solved for."""
    rng = np.random.default_rng(0)
    w0 = np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32)
    b0 = rng.standard_normal(D).astype(np.float32)
    arrays = {"W0": w0, "b0": b0, "W1": rng.standard_normal((D, 3)).astype(np.float32),
              "b1": rng.standard_normal(3).astype(np.float32), "gamma": rng.uniform(0.5, 1.5, D).astype(np.float32),
              "beta": rng.standard_normal(D).astype(np.float32), "two": np.array(2.0, np.float32),
              "eps": np.array(eps, np.float32)}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, SEQ, D])]
    nodes = []
    if gamma_input:
        nodes.append(helper.make_node("ReduceMean", ["x"], ["gamma"], axes=[0, 1], keepdims=0))
        del arrays["gamma"]
    if writer == "matmul":
        nodes += [helper.make_node("MatMul", ["x", "W0"], ["xw"]), helper.make_node("Add", ["xw", "b0"], ["h"])]
    h = "h" if writer == "matmul" else "x"
    if spelling == "fused":
        nodes.append(helper.make_node("LayerNormalization", [h, "gamma", "beta"], ["y"], axis=-1, epsilon=eps))
    else:
        nodes += [helper.make_node("ReduceMean", [h], ["mu"], axes=[-1]), helper.make_node("Sub", [h, "mu"], ["dev"]),
                  helper.make_node("Pow", ["dev", "two"], ["sq"]),
                  helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
                  helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
                  helper.make_node("Div", ["dev", "std"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["g"]),
                  helper.make_node("Add", ["g", "beta"], ["y"])]
    if reader == "matmul":
        nodes += [helper.make_node("MatMul", ["y", "W1"], ["yw"]), helper.make_node("Add", ["yw", "b1"], ["out"])]
    else:
        nodes.append(helper.make_node("Relu", ["y"], ["out"]))
    width = 3 if reader == "matmul" else D
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [BATCH, SEQ, width])]
    if leak:
        outputs.append(helper.make_tensor_value_info("dev", TensorProto.FLOAT, [BATCH, SEQ, D]))
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w0, b0


def inputs_with_std(samples: int, seed: int, w0: np.ndarray | None, b0: np.ndarray | None) -> np.ndarray:
    """x whose h tokens have std exactly SIGMA (SIGMA_FIRST at position 0) and random means (+-3)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((samples, SEQ, D))
    z = (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True)
    target = np.full((1, SEQ, 1), SIGMA)
    target[0, 0, 0] = SIGMA_FIRST
    h = z * np.sqrt(target**2 - EPS) + 3.0 * rng.standard_normal((samples, SEQ, 1))
    x = h if w0 is None else (h - b0) @ w0.astype(np.float64).T  # W0 orthogonal: inverse = transpose
    return x.astype(np.float32)


def remove(proto, calibration, **options):
    return convert(proto, [RemoveLayerNorm(calibration=calibration, **options)], approximate=True)


def norm_ops(model, original=None) -> dict[str, int]:
    """Fused norm ops left in `model`, and std arithmetic beyond what `original` has outside its norms."""
    left = {op: n for op, n in op_counts(model).items() if op in NORM_OPS}
    if original is not None:
        outside = op_counts(original)
        for site in find_sites(original):
            for node in site.nodes:
                outside[node.op_type] -= 1
        left |= {op: n for op in STD_MATH if (n := op_counts(model).get(op, 0)) > outside.get(op, 0)}
    return left


CASES = [("matmul", "matmul", "fused"), ("matmul", "matmul", "decomposed"), ("input", "matmul", "fused"),
         ("matmul", "relu", "fused"), ("input", "relu", "decomposed")]


@pytest.mark.parametrize("writer,reader,spelling", CASES)
def test_removal_is_exact_when_every_token_has_the_calibrated_std(writer, reader, spelling):
    proto, w0, b0 = layer_graph(writer=writer, reader=reader, spelling=spelling)
    solve = (w0, b0) if writer == "matmul" else (None, None)
    original = normfold.io.from_proto(proto)
    model, report = remove(proto, {"x": inputs_with_std(6, 1, *solve)})

    assert report.passes[0].applied == 1 and report.verification["approximate"] is True
    assert find_sites(model) == [] and norm_ops(model, original) == {}
    if reader == "matmul" and writer == "matmul":
        assert "ReduceMean" not in op_counts(model)  # centring folded into the writer, scale into the reader
    (stats,) = report.verification["calibration"]
    assert stats["sigma"] == pytest.approx(SIGMA, rel=1e-5)
    assert stats["sigma_first"] == pytest.approx(SIGMA_FIRST, rel=1e-5)
    assert stats["relative_spread"] < 1e-5
    result = verify(original, model, inputs={"x": inputs_with_std(BATCH, 2, *solve)}, tolerance_class="renorm")
    assert result.passed, result.summary_lines()
    assert report.verification["drift"]["max_abs_error"] < 1e-4


def test_position_zero_gets_its_own_scale_as_a_per_position_mul():
    proto, w0, b0 = layer_graph()
    model, report = remove(proto, {"x": inputs_with_std(4, 1, w0, b0)})
    (mul,) = [n for n in model.graph if n.op_type == "Mul"]
    factor = mul.inputs[1].const_value.numpy()
    assert factor.shape == (SEQ, 1)
    np.testing.assert_allclose(factor[:, 0], [SIGMA / SIGMA_FIRST, 1, 1, 1], rtol=1e-5)


def test_shared_sigma_is_exact_after_position_zero_only():
    proto, w0, b0 = layer_graph()
    original = normfold.io.from_proto(proto)
    model, _ = remove(proto, {"x": inputs_with_std(4, 1, w0, b0)}, position0="shared")
    assert "Mul" not in op_counts(model) and norm_ops(model) == {}
    x = inputs_with_std(2, 3, w0, b0)
    (_, want), = run_model(original, {"x": x})
    (_, got), = run_model(model, {"x": x})
    assert compare("out", want["out"][:, 1:], got["out"][:, 1:], tolerance_class="renorm").passed
    assert not compare("out", want["out"][:, :1], got["out"][:, :1], tolerance_class="renorm").passed


def test_refusals_leave_the_model_unchanged_with_reasons():
    for kwargs, words in (({"spelling": "decomposed", "leak": True}, "intermediate value 'dev' is used outside"),
                          ({"gamma_input": True}, "its gamma is not constant")):
        proto, w0, b0 = layer_graph(**kwargs)
        model, report = remove(proto, {"x": inputs_with_std(2, 1, w0, b0)})
        assert report.passes[0].applied == 0 and report.verification is None
        assert report.ops_after == report.ops_before
        assert words in report.passes[0].skipped[0].reason


def test_fp16_constants_that_overflow_are_refused():
    """gamma 6e4 over a sigma of 0.25: neither the folded weights nor a Mul constant fit in float16."""
    proto, w0, b0 = layer_graph(reader="relu")
    half = onnx.ModelProto()
    half.CopyFrom(proto)
    for init in half.graph.initializer:
        array = numpy_helper.to_array(init)
        scaled = np.full_like(array, 6e4) if init.name == "gamma" else array
        init.CopyFrom(numpy_helper.from_array(scaled.astype(np.float16), init.name))
    for value in [*half.graph.input, *half.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    x = inputs_with_std(2, 1, w0, b0) / 6.0
    model, report = remove(half, {"x": x.astype(np.float16)})
    assert report.passes[0].applied == 0 and report.ops_after == report.ops_before
    assert report.passes[0].skipped[0].reason == "its FakeLN constants overflow float16"


def test_zero_std_on_the_calibration_data_is_refused():
    proto, _, _ = layer_graph(writer="input", eps=0.0)
    constant_tokens = np.broadcast_to(np.arange(SEQ, dtype=np.float32)[None, :, None], (2, SEQ, D))
    model, report = remove(proto, {"x": constant_tokens})
    assert report.passes[0].applied == 0 and report.ops_after == report.ops_before
    assert report.passes[0].skipped[0].reason == "its input has std 0 on the calibration data"


def test_post_ln_model_is_refused_with_the_reason():
    case = tg.build(post_ln=True)
    ids = np.random.default_rng(0).integers(0, case.config.vocab, (4, case.config.seq)).astype(np.int64)
    model, report = remove(case.model, {"ids": ids})
    skipped = report.passes[0].skipped
    assert report.passes[0].applied == 0 and len(skipped) == case.config.layernorms
    assert all(s.reason.startswith("Post-LN model: LayerNorm removal needs a Pre-LN transformer (") for s in skipped)
    assert report.ops_after == report.ops_before


@pytest.mark.parametrize("knobs", [dict(ln_spelling="decomposed", tied="transpose", embedding_offset=50.0),
                                   dict(parallel="neox", proj="gemm"), dict(embedding_ln=True, dtype="float16"),
                                   dict(dynamic=True, flat_ln=True), dict(raw_reader=0, stream_output=1)])
def test_transformer_variants_lose_every_norm(knobs):
    case = tg.build(**knobs)
    ids = np.random.default_rng(0).integers(0, case.config.vocab, (2 * case.config.batch, case.config.seq))
    assert len(calibrate(normfold.io.from_proto(case.model), {"ids": ids})) == case.config.layernorms
    model, report = remove(case.model, {"ids": ids})
    assert report.passes[0].applied == case.config.layernorms, report.summary_lines()
    assert find_sites(model) == [] and norm_ops(model, normfold.io.from_proto(case.model)) == {}
    logits = next(o for o in report.verification["drift"]["outputs"] if o["name"] == "logits")
    assert 0 <= logits["kl_divergence"] < 0.5 and logits["top1_agreement"] > 0.5


def test_inspect_says_where_it_applies_without_calibration():
    pre = inspect(normfold.io.from_proto(tg.build().model))
    assert all(site["passes"]["remove-layernorm"] == "applies" for site in pre)
    post = inspect(normfold.io.from_proto(tg.build(post_ln=True).model))
    assert all(site["passes"]["remove-layernorm"].startswith("does not apply: Post-LN model") for site in post)


def test_convert_needs_approximate_and_calibration():
    proto, w0, b0 = layer_graph()
    with pytest.raises(InputError, match="approximate"):
        convert(proto, ["remove-layernorm"], calibration={"x": inputs_with_std(2, 1, w0, b0)})
    with pytest.raises(InputError, match="needs calibration data"):
        convert(proto, ["remove-layernorm"], approximate=True)


# --------------------------------------------------------------------------- exported transformers


def fake_ln_reference(path, stats, position0: str) -> onnx.ModelProto:
    """The exported model with each LayerNormalization replaced by its explicit FakeLN:
    (x - ReduceMean(x)) * (1 / sigma) * gamma + beta, the unfolded form of what the pass folds; with
    position0="separate", 1 / sigma is a (seq, 1) column [1 / sigma_0, 1 / sigma, ...] where they differ."""
    proto = onnx.load(path)
    sigma = {}
    for st in stats:
        sigma[st.name] = np.array(1 / st.sigma, np.float32)
        if position0 == "separate" and abs(st.sigma / st.sigma_first - 1) > OWN_SCALE_RATIO:
            sigma[st.name] = np.full((8, 1), 1 / st.sigma, np.float32)
            sigma[st.name][0] = 1 / st.sigma_first
    axes_input = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    nodes = []
    for node in proto.graph.node:
        if node.op_type != "LayerNormalization":
            nodes.append(node)
            continue
        x, scale, *bias = node.input
        name, y = node.name, node.output[0]
        consts = {f"{name}_axes": np.array([-1], np.int64), f"{name}_inv": sigma[name]}
        proto.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in consts.items())
        mean = (helper.make_node("ReduceMean", [x, f"{name}_axes"], [f"{name}_mu"]) if axes_input
                else helper.make_node("ReduceMean", [x], [f"{name}_mu"], axes=[-1]))
        nodes += [mean,
                  helper.make_node("Sub", [x, f"{name}_mu"], [f"{name}_c"]),
                  helper.make_node("Mul", [f"{name}_c", f"{name}_inv"], [f"{name}_s"]),
                  helper.make_node("Mul", [f"{name}_s", scale], [f"{name}_g" if bias else y])]
        if bias:
            nodes.append(helper.make_node("Add", [f"{name}_g", bias[0]], [y]))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from normfold.models.export import build_onnx

    directory = tmp_path_factory.mktemp("exports")
    paths = {}
    for name, opset in (("tiny_gpt", 17), ("gpt2_tied", 17), ("gpt2_tied", 14)):  # 17: fused LN, 14: decomposed
        paths[name, opset] = directory / f"{name}_{opset}.onnx"
        build_onnx(name, seed=1, path=paths[name, opset], exporter="torchscript", opset=opset)
    return paths


def token_ids(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).integers(0, 101, (samples, 8)).astype(np.int64)}


@pytest.mark.parametrize("position0", ["shared", "separate"])
@pytest.mark.parametrize("name", ["tiny_gpt", "gpt2_tied"])
def test_folded_model_equals_the_explicit_fake_ln_model(exported, name, position0):
    path = exported[name, 17]
    removal = RemoveLayerNorm(calibration=token_ids(8, 0), position0=position0)
    model, report = convert(path, [removal], approximate=True)
    assert report.passes[0].applied == 5 and find_sites(model) == [] and norm_ops(model, normfold.load(path)) == {}
    per_position = [n for n in model.graph if n.name.endswith("/position_scale")]
    # the final LayerNorm, before a bias-less head, stays a Mul (by a (seq, d) factor with its own sigma_0)
    kept = [n.inputs[1].const_value.shape for n in model.graph if n.name.endswith("/fake_ln_scale")]
    assert len(kept) == 1
    assert len(per_position) + (len(kept[0]) == 2) == (0 if position0 == "shared" else 5)  # sigma_0 differs everywhere
    reference = normfold.io.from_proto(fake_ln_reference(path, removal.stats, position0))
    result = verify(reference, model, inputs=token_ids(2, 7), tolerance_class="renorm")
    assert result.passed, result.summary_lines()


def test_reported_drift_is_what_onnxruntime_says(exported, tmp_path):
    import onnxruntime as ort

    path = exported["gpt2_tied", 14]
    data = token_ids(6, 3)
    model, report = convert(path, ["remove-layernorm"], approximate=True, calibration=data)
    assert report.passes[0].applied == 5 and find_sites(model) == [] and norm_ops(model, normfold.load(path)) == {}
    out = tmp_path / "removed.onnx"
    normfold.save(model, out)
    ref = np.concatenate([ort.InferenceSession(str(path)).run(None, {"input": data["input"][i:i + 2]})[0]
                          for i in range(0, 6, 2)]).astype(np.float64)
    got = np.concatenate([ort.InferenceSession(str(out)).run(None, {"input": data["input"][i:i + 2]})[0]
                          for i in range(0, 6, 2)]).astype(np.float64)
    log_p = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    log_q = got - np.log(np.exp(got - got.max(-1, keepdims=True)).sum(-1, keepdims=True)) - got.max(-1, keepdims=True)
    (drift,) = report.verification["drift"]["outputs"]
    assert drift["kl_divergence"] == pytest.approx((np.exp(log_p) * (log_p - log_q)).sum(-1).mean(), rel=1e-4)
    assert drift["top1_agreement"] == pytest.approx(np.mean(ref.argmax(-1) == got.argmax(-1)))
    assert drift["max_abs_error"] == pytest.approx(np.abs(ref - got).max(), rel=1e-4)
    assert report.verification["drift"]["samples"] == 6 and 0 < drift["kl_divergence"] < 0.5


def test_cli_end_to_end(exported, tmp_path, capsys):
    path = exported["tiny_gpt", 17]
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, **token_ids(4, 0))
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    base = ["convert", str(path), "-o", str(out), "--passes", "remove-layernorm"]

    assert main(base + ["--calibration", str(calibration)]) == 2
    assert "--approximate" in capsys.readouterr().err and not out.exists()
    assert main(base + ["--approximate"]) == 2
    err = capsys.readouterr().err
    assert "needs calibration data: give --calibration FILE.npz" in err and len(err.strip().splitlines()) == 1
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, ids=token_ids(4, 0)["input"])
    assert main(base + ["--approximate", "--calibration", str(wrong)]) == 2
    assert "missing 'input'" in capsys.readouterr().err and not out.exists()

    assert main(base + ["--approximate", "--calibration", str(calibration), "--report", str(report_path)]) == 0
    stdout = capsys.readouterr().out
    assert "remove-layernorm: applied 5" in stdout and "drift on 4 calibration samples" in stdout
    assert "KL" in stdout and "top-1 agreement" in stdout
    report = json.loads(report_path.read_text())
    assert report["verification"]["approximate"] is True and report["verification"]["passed"] is None
    assert len(report["verification"]["calibration"]) == 5
    assert report["verification"]["drift"]["outputs"][0]["top1_agreement"] > 0.5
    assert "LayerNormalization" not in report["ops_after"]
    assert norm_ops(normfold.load(out), normfold.load(path)) == {} and find_sites(normfold.load(out)) == []
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_a_bias_less_lm_head_keeps_its_weight_and_the_final_fake_ln_stays_a_mul_and_an_add(exported):
    """GPT-2's tied head has no bias: folding the final LayerNorm's beta into it would add an Add over every
    logit (and untie the table). That LayerNorm becomes Mul(x, s) + beta over its width instead, with the
    reason, and the head reads it with its own weight."""
    path = exported["gpt2_tied", 17]
    original = onnx.load(path)
    removal = RemoveLayerNorm(calibration=token_ids(8, 0), position0="separate")
    model, report = convert(path, [removal], approximate=True)
    assert report.passes[0].applied == 5 and find_sites(model) == []
    [note] = [n for n in report.passes[0].notes if n.reason.startswith("kept as a Mul by a constant")]
    head_name = re.search(r"folding beta into MatMul (\S+), which has no bias, would add an Add over its 101 "
                          r"outputs", note.reason).group(1)
    head = next(n for n in model.graph if n.name == head_name)
    assert head.inputs[1].name == next(n for n in original.graph.node if n.name == head_name).input[1]
    read = head.inputs[0]
    while read.producer().op_type in ("Reshape", "Flatten", "Identity"):  # views the exporter put between
        read = read.producer().inputs[0]
    assert read.producer().name.endswith("/fake_ln_beta")  # ... * s + beta
    assert [use.op_type for use, _ in head.outputs[0].uses()] != ["Add"] or head.outputs[0].is_graph_output()
    reference = normfold.io.from_proto(fake_ln_reference(path, removal.stats, "separate"))
    result = verify(reference, model, inputs=token_ids(2, 7), tolerance_class="renorm")
    assert result.passed, result.summary_lines()
