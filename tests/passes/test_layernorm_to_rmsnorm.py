"""layernorm-to-rmsnorm on random transformers (transformer_graphs): Pre-LN -> Pre-RMSNorm.

Positive cases: every LayerNorm spelling and opset, both emission targets, the architecture knobs
(SwiGLU, fused QKV, GPT-2 style Gemm projections, no bias, position tables, depth and width, Phi and
NeoX parallel blocks, dynamic axes, BLOOM's embedding LayerNorm), tied embeddings, fp16. Each must
leave no LayerNorm (fused or decomposed, per normfold.detect), apply once per LayerNorm, and pass
normfold's own verification (REFERENCE.md: fp32 rtol 1e-4, atol 1e-4 * max(1, rms(ref)); fp16 1e-2 /
1e-2 * scale); the token and position tables carry +100 on every entry, which recentring must remove.

A second, independent oracle: the converted model's output against the original evaluated exactly
(float64, onnx's reference evaluator), under the same tolerances. It matters where the float32
original is itself ill-conditioned: with tied embeddings and a +100 table the logits are
x . (e_v + 100 1), and the original's LayerNorm rounding error on values near 100-200 is multiplied
by the table's mean; at a tiny width (d = 6) the same rounding is large against the tokens' spread.
The float32 original is then off the exact logits by more than the tolerance (the converted model,
whose stream is zero-mean, is not), so tied + offset cases are checked against the exact logits only
and the tiny-width case uses +10.

Negative cases: Post-LN (refused, model unchanged), a stream value that is a graph output, a stream
value also read by a MatMul, LayerNorms on a flattened view of such a value, no final LayerNorm.
Bugs found here were strict xfails (reason "BUG: ..."); when one XPASSes, drop its marker.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import normfold
import transformer_graphs as tg
from normfold.detect import find_sites, inspect
from normfold.io import from_proto
from normfold.passes import LayerNormToRMSNorm
from normfold.verification import compare

pytest.importorskip("onnxruntime")

TARGETS = ("onnx", "ort")
OFFSET = 100.0
SPELLING_OPSETS = [("fused", 17), ("fused", 18), ("fused", 23), ("decomposed", 13), ("decomposed", 18),
                   ("decomposed_mul", 13), ("decomposed_mul", 18), ("reciprocal", 13), ("reciprocal", 18)]


# -- helpers ------------------------------------------------------------------------------------------
def convert(case: tg.TransformerCase, target: str = "onnx", *, verify: bool = True, ids=None):
    """(converted ir.Model, report, converted ModelProto); verification (if on) feeds `ids`."""
    ids = tg.random_ids(case) if ids is None else ids
    options = {"inputs": {"ids": ids}} if verify else {}
    before = case.model.SerializeToString()
    model, report = normfold.convert(case.model, passes=[LayerNormToRMSNorm(target=target)], verify=verify,
                                     target=target, **options)
    assert case.model.SerializeToString() == before  # the caller's ModelProto is never modified
    return model, report, ir.serde.serialize_model(model)


def layernorm_sites(model: ir.Model) -> list:
    """LayerNorm sites, found on a copy annotated with inferred shapes (the pass strips the shapes it
    inferred, and decomposed norms over positive axes need the rank to be recognised)."""
    proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model), data_prop=True)
    return [s for s in find_sites(from_proto(proto)) if s.kind == "LayerNorm"]


def remaining_layernorms(model: ir.Model) -> set[str]:
    """Names (as tg.Config names them: 'blk0.ln1', 'ln_f', ...) of the LayerNorms still in the model."""
    return {site.name.split("/")[0] for site in layernorm_sites(model)}


def assert_all_converted(case: tg.TransformerCase, model: ir.Model, report) -> None:
    entry = report.passes[0]
    assert layernorm_sites(model) == [], [s.name for s in layernorm_sites(model)]
    assert report.ops_after.get("LayerNormalization", 0) == 0
    assert entry.applied == case.config.layernorms == len(case.ln_names), entry.skipped
    assert entry.skipped == []


def assert_exact(case: tg.TransformerCase, converted: onnx.ModelProto, ids=None, *, optimize: bool = True) -> None:
    """The converted model against the original evaluated in float64, under REFERENCE.md's tolerance."""
    ids = tg.random_ids(case, seed=7) if ids is None else ids
    rtol, atol = case.tolerance
    exact = tg.exact_outputs(case.model, ids)
    got = tg.run(converted, ids, optimize=optimize)
    for reference, candidate in zip(exact, got):
        check = compare("out", reference, candidate, rtol=rtol, atol=atol)
        assert check.passed, check.message


def signature(proto: onnx.ModelProto):
    """Nodes (op, name, inputs, outputs, attributes) and initializers (name, dtype, dims, bytes) of a model."""
    nodes = [(n.op_type, n.domain, n.name, list(n.input), list(n.output),
              sorted(a.SerializeToString() for a in n.attribute)) for n in proto.graph.node]
    inits = sorted((t.name, t.data_type, list(t.dims), onnx.numpy_helper.to_array(t).tobytes())
                   for t in proto.graph.initializer)
    return nodes, inits, [o.name for o in proto.graph.output], [i.name for i in proto.graph.input]


def initializer(model: ir.Model, node_name: str, index: int) -> np.ndarray:
    node = next(n for n in model.graph if n.name == node_name)
    return node.inputs[index].const_value.numpy()


def token_table(model: ir.Model) -> np.ndarray:
    node = next(n for n in model.graph
                if n.op_type == "Gather" and n.inputs[1] is not None and n.inputs[1].name == "ids")
    return node.inputs[0].const_value.numpy()


def head_weight(model: ir.Model, case: tg.TransformerCase) -> np.ndarray:
    """The weight the lm_head reads (the table under its Transpose, Gemm's B, or MatMul's B)."""
    names = {n.name for n in model.graph}
    if case.config.tied == "transpose":
        return initializer(model, "lm_head/transpose", 0)
    return initializer(model, "lm_head/gemm" if "lm_head/gemm" in names else "lm_head/matmul", 1)


# -- the builder itself ------------------------------------------------------------------------------
BUILDER_CONFIGS = [
    tg.Config(),
    *[tg.Config(ln_spelling=s, opset=o) for s, o in SPELLING_OPSETS],
    *[tg.Config(tied=t) for t in tg.TIED],
    *[tg.Config(parallel=p) for p in tg.PARALLEL],
    tg.Config(mlp="swiglu", fused_qkv=True, proj="gemm", bias=False, pos="none"),
    tg.Config(pos="const", depth=3, d=48, heads=6, vocab=50, seq=7),
    tg.Config(d=4, heads=4, depth=1, seq=1, batch=1, vocab=2),
    tg.Config(embedding_ln=True),
    tg.Config(post_ln=True),
    tg.Config(post_ln=True, embedding_ln=True, ln_spelling="decomposed"),
    tg.Config(stream_output=0),
    tg.Config(raw_reader=1),
    tg.Config(final_ln=False),
    tg.Config(dynamic=True, proj="gemm", pos="const"),
    tg.Config(dynamic=True, opset=18, ln_spelling="decomposed"),
    tg.Config(dynamic=True, opset=13, ln_spelling="decomposed", proj="gemm", flat_ln=True, positive_axes=True),
    tg.Config(dropout=True, flat_ln=True, positive_axes=True, ln_spelling="reciprocal"),
    *[tg.Config(dtype="float16", ln_spelling=s, opset=o) for s, o in SPELLING_OPSETS],
    tg.Config(dtype="float16", ln_spelling="decomposed", fp16_affine="inside"),
]


@pytest.mark.parametrize("config", BUILDER_CONFIGS, ids=lambda c: c.label())
def test_builder_writes_valid_runnable_models(config):
    start = time.perf_counter()
    case = tg.build(config)
    assert time.perf_counter() - start < 0.25  # milliseconds in practice
    ids = tg.random_ids(case)
    outputs = tg.validate(case, ids)  # onnx.checker (full) and onnxruntime
    c = config
    # the model computes what its float64 twin computes (the builder is numerically sane)
    rtol, atol = case.tolerance
    for exact, got in zip(tg.exact_outputs(case.model, ids), outputs):
        check = compare("out", exact, got, rtol=rtol, atol=atol)
        assert check.passed, check.message
    # normfold.detect sees exactly the LayerNorms the builder wrote, in the spelling asked for
    sites = layernorm_sites(from_proto(case.model))
    assert sorted(s.name.split("/")[0] for s in sites) == sorted(case.ln_names)
    assert len(sites) == c.layernorms
    assert all(s.fused == (c.ln_spelling == "fused") for s in sites)
    if c.dynamic:
        assert tg.run(case.model, ids[:, :2])[0].shape == (c.batch, 2, c.vocab)


def test_builder_is_seeded():
    a, b = tg.build(seed=3), tg.build(seed=3)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.model.SerializeToString() != tg.build(seed=4).model.SerializeToString()
    table = tg.build(embedding_offset=OFFSET).arrays["wte"]
    assert abs(float(table.mean()) - OFFSET) < 1.0


# -- positive cases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spelling,opset", SPELLING_OPSETS)
def test_every_spelling_converts(spelling, opset, target):
    case = tg.build(ln_spelling=spelling, opset=opset, embedding_offset=OFFSET, bias_offset=3.0, seed=opset)
    model, report, proto = convert(case, target)
    assert_all_converted(case, model, report)
    assert report.verification["passed"]
    assert_exact(case, proto)


KNOBS = {
    "swiglu": dict(mlp="swiglu"),
    "fused_qkv": dict(fused_qkv=True),
    "gemm_projections": dict(proj="gemm"),
    "gpt2_like": dict(proj="gemm", fused_qkv=True, ln_spelling="decomposed"),
    "llama_like": dict(mlp="swiglu", bias=False, pos="none", ln_spelling="decomposed_mul", opset=18),
    "no_bias": dict(bias=False),
    "pos_const": dict(pos="const"),
    "pos_none": dict(pos="none"),
    "deep_wide": dict(depth=3, d=48, heads=6, vocab=64, seq=8),
    "one_head": dict(heads=1, d=8),
    "narrow": dict(d=6, heads=3, depth=3, embedding_offset=10.0),  # +100 at d=6: the fp32 original is too coarse
    "single_token": dict(seq=1, batch=1),
    "phi_parallel": dict(parallel="phi"),
    "phi_parallel_deep": dict(parallel="phi", depth=3, mlp="swiglu", ln_spelling="reciprocal"),
    "eps_1e-6": dict(eps=1e-6),
    "dropout": dict(dropout=True, ln_spelling="decomposed"),
    "positive_axes": dict(positive_axes=True, ln_spelling="decomposed"),
    "positive_axes_opset18": dict(positive_axes=True, ln_spelling="reciprocal", opset=18),
    "flat_ln": dict(flat_ln=True),
    "flat_ln_decomposed": dict(flat_ln=True, ln_spelling="decomposed_mul", positive_axes=True),
    "neox_parallel": dict(parallel="neox"),
    "bloom_like": dict(embedding_ln=True, pos="none", mlp="gelu", ln_spelling="fused"),
    "opset23_decomposed": dict(ln_spelling="decomposed", opset=23, mlp="swiglu"),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
def test_architecture_knobs_convert(knobs, target):
    case = tg.build(**{"embedding_offset": OFFSET, "seed": 11, **knobs})
    model, report, proto = convert(case, target)
    assert_all_converted(case, model, report)
    assert_exact(case, proto)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("knobs", [dict(), dict(proj="gemm"), dict(pos="const", ln_spelling="decomposed", opset=18),
                                   dict(tied="gemm", proj="gemm", fused_qkv=True)],
                         ids=["matmul", "gemm", "decomposed18", "gpt2_tied"])
def test_dynamic_axes_convert(knobs, target):
    """Exporters' dynamic (batch, seq): Shape/Range/Slice around the stream; a shorter sequence too."""
    case = tg.build(dynamic=True, embedding_offset=OFFSET if knobs.get("tied", "none") == "none" else 0.0, **knobs)
    ids = tg.random_ids(case)
    model, report, proto = convert(case, target, ids=ids)
    assert_all_converted(case, model, report)
    assert_exact(case, proto, ids)
    assert_exact(case, proto, ids[:, :3])


@pytest.mark.parametrize("knobs", [dict(proj="gemm"), dict(proj="gemm", fused_qkv=True, tied="transpose")],
                         ids=["gemm", "gpt2_optimum_opset13"])
def test_opset13_dynamic_axes_with_computed_reshapes_convert(knobs):
    """What torch.onnx (TorchScript) / optimum write for GPT-2 at opset 13 with dynamic axes: onnx's shape
    inference leaves Reshape(x, Concat(Shape(..), [d])) without a shape at opset 13; the width is the
    constant last element of the target."""
    case = tg.build(dynamic=True, ln_spelling="decomposed", opset=13, **knobs)
    model, report, proto = convert(case, "ort")
    assert_all_converted(case, model, report)
    assert_exact(case, proto)


@pytest.mark.parametrize("target", TARGETS)
def test_positive_reduce_axes_on_inferred_rank_convert(target):
    """A decomposed LayerNorm over axes=[2] whose input has no inferred shape (opset 13, dynamic axes,
    Gemm projections: Reshape to Concat(Shape(ids), [d])): the rank comes from the Concat's length
    (normfold.shapes), and the projection's Reshape is recentred through its computed target."""
    case = tg.build(dynamic=True, ln_spelling="decomposed", opset=13, proj="gemm", positive_axes=True)
    model, report, proto = convert(case, target)
    assert report.passes[0].applied + len(report.passes[0].skipped) == case.config.layernorms  # none unreported
    assert_all_converted(case, model, report)
    assert_exact(case, proto)


@pytest.mark.parametrize("knobs", [dict(proj="gemm"), dict(flat_ln=True)], ids=["gemm", "flat_ln"])
def test_opset13_dynamic_axes_refusal_is_not_called_post_ln(knobs):
    """Whatever is decided for a Pre-LN model whose widths are not inferred, the report must not call it
    Post-LN. (LNs on a flattened view whose input shape is unknown are left as LayerNorms: centring them
    explicitly would only re-spell them.)"""
    case = tg.build(dynamic=True, ln_spelling="decomposed", opset=13, **knobs)
    _, report, proto = convert(case, "ort")
    assert not [s for s in report.passes[0].skipped if "Post-LN" in s.reason]
    assert report.passes[0].applied + len(report.passes[0].skipped) == case.config.layernorms
    assert_exact(case, proto)


@pytest.mark.parametrize("spelling,opset", [("fused", 17), ("fused", 23), ("decomposed", 13), ("reciprocal", 18)])
def test_emitted_ops_per_target(spelling, opset):
    """onnx target: RMSNormalization at opset 23, else the standard decomposed RMS spelling (passes
    onnx.checker); ort target: SimplifiedLayerNormalization. Same epsilon, gamma and beta."""
    case = tg.build(ln_spelling=spelling, opset=opset, eps=1e-6, embedding_offset=OFFSET)
    n = case.config.layernorms
    model, report, proto = convert(case, "onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert report.ops_after.get("SimplifiedLayerNormalization", 0) == 0
    assert report.ops_after.get("RMSNormalization", 0) == (n if opset >= 23 else 0)
    rms_sites = [s for s in find_sites(model) if s.kind == "RMSNorm"]
    assert len(rms_sites) == n
    assert all(abs(s.epsilon - 1e-6) < 1e-12 for s in rms_sites)
    gammas = {name: case.arrays[f"{name}.weight"] for name in case.ln_names}
    for site in rms_sites:
        assert any(np.array_equal(site.gamma.const_value.numpy(), g) for g in gammas.values())

    model, report, proto = convert(case, "ort")
    assert report.ops_after.get("SimplifiedLayerNormalization", 0) == n
    assert report.ops_after.get("RMSNormalization", 0) == 0
    for node in model.graph:
        if node.op_type == "SimplifiedLayerNormalization":
            assert abs(node.attributes.get_float("epsilon") - 1e-6) < 1e-12
    assert_exact(case, proto)


def test_auto_target_is_ort_with_onnxruntime_installed():
    case = tg.build(embedding_offset=OFFSET)
    _, report, _ = convert(case, "auto")
    assert report.ops_after.get("SimplifiedLayerNormalization", 0) == case.config.layernorms


@pytest.mark.parametrize("target", TARGETS)
def test_pass_by_name_gets_the_target(target):
    case = tg.build(embedding_offset=OFFSET, opset=23)
    model, report = normfold.convert(case.model, passes=["layernorm-to-rmsnorm"], target=target,
                                     inputs={"ids": tg.random_ids(case)})
    assert report.passes[0].name == "layernorm-to-rmsnorm"
    assert report.passes[0].applied == case.config.layernorms
    emitted = "SimplifiedLayerNormalization" if target == "ort" else "RMSNormalization"
    assert report.ops_after.get(emitted, 0) == case.config.layernorms
    assert report.verification["passed"]


@pytest.mark.parametrize("knobs", [dict(), dict(proj="gemm", mlp="swiglu"), dict(pos="const", bias=False)],
                         ids=["matmul", "gemm_swiglu", "const_pos_nobias"])
def test_writers_are_recentred(knobs):
    """Tables' rows, output projections' rows (mean over output columns) and their biases become zero-mean;
    the branch-internal projections (q, k, v, fc, gate, up) are untouched."""
    case = tg.build(embedding_offset=OFFSET, bias_offset=5.0, **knobs)
    model, _, proto = convert(case, "ort")
    table = token_table(model)
    assert np.abs(table.astype(np.float64).mean(axis=-1)).max() < 1e-4
    np.testing.assert_allclose(table - table.mean(axis=-1, keepdims=True),
                               case.arrays["wte"] - case.arrays["wte"].mean(axis=-1, keepdims=True), atol=1e-4)
    by_name = {}
    for node in model.graph:
        for value in node.inputs:
            if value is not None and value.const_value is not None:
                by_name[value.name] = value.const_value.numpy()
    for block in range(case.config.depth):
        for proj in (f"blk{block}.attn.out", f"blk{block}.mlp.proj"):
            weight = by_name[f"{proj}.weight_recentred"]
            assert np.abs(weight.astype(np.float64).mean(axis=-1)).max() < 1e-6
            if case.config.bias:
                assert abs(float(by_name[f"{proj}.bias_recentred"].astype(np.float64).mean())) < 1e-5
        for inner in ("attn.q", "attn.k", "attn.v", "mlp.fc", "mlp.gate", "mlp.up"):
            name = f"blk{block}.{inner}.weight"
            if name in case.arrays:
                assert np.array_equal(by_name[name], case.arrays[name])
    if case.config.pos == "const":
        pos = by_name["wpe_recentred"]
        assert np.abs(pos.astype(np.float64).mean(axis=-1)).max() < 1e-4
    assert_exact(case, proto)


# -- tied embeddings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("tied", ["transpose", "gemm", "copy"])
def test_tied_embeddings_head_keeps_the_original_table(tied, target):
    """The head reads the original table values; the token lookup is recentred (a recentred copy, or,
    for a table the head shares, the lookup minus its gathered row means).

    With +100 on the table the float32 original is too ill-conditioned to serve as the reference
    (module docstring), so equivalence is checked against the exact logits; without the offset,
    normfold's own verification against the original must pass too."""
    case = tg.build(tied=tied, embedding_offset=OFFSET, proj="gemm" if tied == "copy" else "matmul")
    model, report, proto = convert(case, target, verify=False)
    assert_all_converted(case, model, report)
    assert np.array_equal(head_weight(model, case), case.arrays[case.head_weight])
    table = token_table(model)
    row_means = [v.const_value.numpy() for v in model.graph.initializers.values() if v.name.endswith("_row_mean")]
    if row_means:  # a table shared with the head is not copied: the lookup subtracts its row means
        np.testing.assert_allclose(row_means[0][:, 0], table.astype(np.float64).mean(axis=-1), rtol=1e-6)
    else:
        assert np.abs(table.astype(np.float64).mean(axis=-1)).max() < 1e-4
    if tied != "copy":  # the original table is still in the model, read by the head alone
        assert "wte" in {v.name for v in model.graph.initializers.values()}
    assert_exact(case, proto)

    plain = tg.build(tied=tied, embedding_offset=0.0, seed=1)
    model, report, proto = convert(plain, target)
    assert_all_converted(plain, model, report)
    assert np.array_equal(head_weight(model, plain), plain.arrays[plain.head_weight])
    assert_exact(plain, proto)


def test_tied_embeddings_offset_original_is_the_inaccurate_one():
    """Documents why tied + offset cases use the exact oracle: the float32 original is off the exact
    logits by more than the tolerance, while the converted model is within it."""
    case = tg.build(tied="transpose", embedding_offset=OFFSET, d=48, heads=6)
    _, _, proto = convert(case, "onnx", verify=False)
    ids = tg.random_ids(case, seed=7)
    exact = tg.exact_outputs(case.model, ids)[0]
    original = compare("logits", exact, tg.run(case.model, ids)[0], rtol=1e-4, atol=1e-4)
    converted = compare("logits", exact, tg.run(proto, ids)[0], rtol=1e-4, atol=1e-4)
    assert converted.passed
    assert converted.max_abs_error < original.max_abs_error


# -- parallel blocks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_phi_parallel_block_with_one_shared_layernorm(target):
    case = tg.build(parallel="phi", depth=3, embedding_offset=OFFSET, proj="gemm")
    model, report, proto = convert(case, target)
    assert_all_converted(case, model, report)
    assert report.passes[0].applied == 3 + 1
    assert_exact(case, proto)


@pytest.mark.parametrize("target", TARGETS)
def test_neox_parallel_block_with_two_layernorms(target):
    case = tg.build(parallel="neox", depth=2, embedding_offset=OFFSET)
    model, report, proto = convert(case, target)
    assert_all_converted(case, model, report)
    assert_exact(case, proto)


def test_neox_parallel_block_verifies():
    """GPT-NeoX adds the branches first, (attn + mlp) + h: both output projections are recentred."""
    case = tg.build(parallel="neox", depth=2, embedding_offset=OFFSET)
    model, report, proto = convert(case, "ort")
    assert report.verification["passed"]
    assert_exact(case, proto)


# -- embedding LayerNorm (BLOOM) -------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spelling", ["fused", "decomposed"])
def test_embedding_layernorm_gets_an_explicit_centre(spelling, target):
    case = tg.build(embedding_ln=True, ln_spelling=spelling, embedding_offset=OFFSET, depth=2)
    model, report, proto = convert(case, target)
    assert_all_converted(case, model, report)
    centres = [n for n in model.graph if n.op_type == "Sub" and "recentre" in n.name]
    assert len(centres) == 1
    mean = centres[0].inputs[1].producer()
    assert mean.op_type == "ReduceMean" and mean.inputs[0] is centres[0].inputs[0]
    assert_exact(case, proto)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spelling", ["fused", "decomposed"])
def test_embedding_layernorm_converted_before_the_main_stream(spelling, target):
    case = tg.build(embedding_ln=True, depth=1, bias=False, ln_spelling=spelling)
    model, report, proto = convert(case, target)
    assert_all_converted(case, model, report)
    assert_exact(case, proto)


# -- fp16 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spelling,opset", [("fused", 17), ("fused", 23), ("decomposed", 13), ("decomposed_mul", 18),
                                            ("reciprocal", 13)])
@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_fp16(spelling, opset, target, offset):
    """Float16 weights and activations; decomposed LNs cast to float32 around their statistics (affine
    in float16 after the Cast back, as torch's exporter writes it). Tolerance 1e-2 / 1e-2 * scale."""
    case = tg.build(dtype="float16", ln_spelling=spelling, opset=opset, embedding_offset=offset, seed=5)
    model, report, proto = convert(case, target)
    assert_all_converted(case, model, report)
    assert report.verification["outputs"][0]["dtype"] == "float16"
    assert report.verification["outputs"][0]["rtol"] == 1e-2
    assert_exact(case, proto)


@pytest.mark.parametrize("seed", [239, 240, 241])
def test_fp16_tied_head_with_a_large_mean_table_never_passes_silently(seed):
    """Numerical limit of the rewrite, not a logic error: in fp16 the recentred weights leave the stream
    zero-mean only to ~1e-4 of its rms; RMSNorm keeps that mean and a tied head whose table has +100 on
    every entry multiplies it by ~100 d. normfold must then refuse at verification, never hand back a
    model outside the fp16 tolerance."""
    case = tg.build(d=41, depth=1, heads=1, vocab=2, seq=1, batch=1, mlp_ratio=1, bias=False, tied="transpose",
                    parallel="neox", fused_qkv=True, dtype="float16", embedding_offset=OFFSET, seed=seed)
    ids = tg.random_ids(case)
    try:
        _, report, proto = convert(case, "onnx", ids=ids)
    except normfold.VerificationError as exc:
        assert not exc.report.verification["passed"]
        return
    assert report.verification["passed"]
    assert_exact(case, proto, ids)


@pytest.mark.parametrize("target", TARGETS)
def test_fp16_affine_inside_the_casts(target):
    case = tg.build(dtype="float16", ln_spelling="decomposed", fp16_affine="inside")
    model, report, proto = convert(case, target)
    assert_all_converted(case, model, report)
    assert_exact(case, proto)


# -- idempotence ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("knobs", [dict(), dict(ln_spelling="decomposed"), dict(opset=23), dict(raw_reader=1),
                                   dict(dtype="float16", ln_spelling="reciprocal")],
                         ids=["fused", "decomposed", "opset23", "partial", "fp16"])
def test_converting_twice_applies_nothing(knobs, target):
    case = tg.build(**knobs)
    _, first, proto = convert(case, target)
    assert first.passes[0].applied > 0
    again, second = normfold.convert(proto, passes=[LayerNormToRMSNorm(target=target)], target=target,
                                     inputs={"ids": tg.random_ids(case)})
    assert second.passes[0].applied == 0
    assert second.ops_after == second.ops_before == first.ops_after
    assert [s.node for s in second.passes[0].skipped] == [s.node for s in first.passes[0].skipped]
    assert signature(ir.serde.serialize_model(again)) == signature(proto)


# -- negative cases ------------------------------------------------------------------------------------
POST_LN = {
    "bert": dict(post_ln=True, embedding_ln=True),
    "bert_decomposed": dict(post_ln=True, embedding_ln=True, ln_spelling="decomposed"),
    "post_ln_no_embedding_ln": dict(post_ln=True, depth=3, mlp="swiglu"),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("knobs", POST_LN.values(), ids=POST_LN.keys())
def test_post_ln_is_refused_and_unchanged(knobs, target):
    case = tg.build(embedding_offset=OFFSET, **knobs)
    model, report, proto = convert(case, target)
    entry = report.passes[0]
    assert entry.applied == 0
    assert signature(proto) == signature(case.model)
    assert len(layernorm_sites(model)) == case.config.layernorms
    assert sorted(s.node.split("/")[0] for s in entry.skipped) == sorted(case.ln_names)
    assert all("Post-LN" in s.reason for s in entry.skipped), entry.skipped


@pytest.mark.parametrize("knobs", [dict(depth=1, bias=False), dict(depth=2, bias=False),
                                   dict(depth=1, bias=False, embedding_ln=True),
                                   dict(depth=2, bias=False, embedding_ln=True, ln_spelling="decomposed"),
                                   dict(depth=2, proj="gemm"), dict(depth=2, proj="gemm", embedding_ln=True),
                                   dict(depth=1, flat_ln=True), dict(depth=2, flat_ln=True, embedding_ln=True)],
                         ids=["nobias_d1", "nobias_d2", "nobias_d1_embedding_ln", "nobias_d2_embedding_ln_decomposed",
                              "gemm", "gemm_embedding_ln", "flat_d1", "flat_d2_embedding_ln"])
def test_post_ln_refusal_is_labelled_post_ln(knobs):
    case = tg.build(post_ln=True, **knobs)
    model, report, proto = convert(case, "ort")
    entry = report.passes[0]
    assert entry.applied == 0
    assert signature(proto) == signature(case.model)
    assert all("Post-LN" in s.reason for s in entry.skipped), entry.skipped


@pytest.mark.parametrize("knobs", POST_LN.values(), ids=POST_LN.keys())
def test_post_ln_result_is_exact(knobs):
    case = tg.build(embedding_offset=OFFSET, **knobs)
    _, report, proto = convert(case, "ort")
    assert report.verification is None or report.verification["passed"]
    assert_exact(case, proto)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("knobs", [dict(depth=2, stream_output=0),
                                   dict(depth=3, stream_output=1, ln_spelling="decomposed"),
                                   dict(depth=2, stream_output=0, parallel="phi")],
                         ids=["pre_ln", "pre_ln_decomposed", "phi"])
def test_stream_value_that_is_a_graph_output(knobs, target):
    """h{i} (a residual sum) is also a graph output: its mean is observable. The LayerNorm reading it and
    every LayerNorm upstream stay, h{i} is bit-identical, and whatever is converted downstream is exact."""
    case = tg.build(embedding_offset=OFFSET, **knobs)
    i = case.config.stream_output
    model, report, proto = convert(case, target)
    entry = report.passes[0]
    reader = f"blk{i + 1}.ln1"
    upstream = {n for n in case.ln_names if n.startswith(tuple(f"blk{j}." for j in range(i + 1)))}
    kept = remaining_layernorms(model)
    assert {reader} | upstream <= kept
    assert entry.applied == case.config.layernorms - len(kept)
    reasons = {s.node.split("/")[0]: s.reason for s in entry.skipped}
    assert set(reasons) == kept
    assert "graph output" in reasons[reader] and f"h{i}" in reasons[reader]
    ids = tg.random_ids(case, seed=3)
    before, after = tg.run(case.model, ids), tg.run(proto, ids)
    assert np.array_equal(before[1], after[1])  # h{i} is untouched
    assert report.verification["passed"]
    assert_exact(case, proto, ids)


@pytest.mark.parametrize("knobs", [dict(depth=2, raw_reader=1), dict(depth=3, raw_reader=0, ln_spelling="reciprocal"),
                                   dict(depth=2, raw_reader=1, proj="gemm"),
                                   dict(depth=2, raw_reader=1, parallel="phi", proj="gemm")],
                         ids=["pre_ln", "first_block_decomposed", "gemm", "phi_gemm"])
@pytest.mark.parametrize("target", TARGETS)
def test_stream_value_read_by_a_matmul(knobs, target):
    """Block i's value projection reads the raw stream: that stream value's mean is observable, so the
    LayerNorm reading it stays, with a reason naming the MatMul."""
    case = tg.build(embedding_offset=OFFSET, **knobs)
    i = case.config.raw_reader
    model, report, proto = convert(case, target)
    entry = report.passes[0]
    reader = f"blk{i}.ln1"
    kept = remaining_layernorms(model)
    assert reader in kept
    reasons = {s.node.split("/")[0]: s.reason for s in entry.skipped}
    assert set(reasons) == kept
    assert "recentre" not in reasons[reader]  # names the model's reader, not a node normfold inserted
    assert f"blk{i}.attn.v" in reasons[reader] and "mean" in reasons[reader]
    assert entry.applied == case.config.layernorms - len(kept)
    assert report.verification is None or report.verification["passed"]
    assert_exact(case, proto)


@pytest.mark.parametrize("knobs", [dict(stream_output=0, depth=1), dict(stream_output=0, depth=2),
                                   dict(raw_reader=0, depth=1), dict(raw_reader=1, depth=2, parallel="phi")],
                         ids=["graph_output_d1", "graph_output_d2", "matmul_reader_d1", "matmul_reader_phi"])
def test_pre_ln_refusals_are_not_called_post_ln(knobs):
    case = tg.build(flat_ln=True, **knobs)
    model, report, proto = convert(case, "ort")
    assert not [s for s in report.passes[0].skipped if "Post-LN" in s.reason], report.passes[0].skipped
    assert_exact(case, proto)


@pytest.mark.parametrize("knobs", [dict(stream_output=0, depth=1), dict(raw_reader=1, depth=2, parallel="phi")],
                         ids=["graph_output", "matmul_reader"])
def test_flattened_layernorms_of_observable_values_are_kept(knobs):
    case = tg.build(flat_ln=True, embedding_offset=OFFSET, **knobs)
    model, report, proto = convert(case, "ort")
    i = knobs.get("stream_output", knobs.get("raw_reader"))
    kept = remaining_layernorms(model)
    reader = f"blk{i}.ln1" if "raw_reader" in knobs else (f"blk{i + 1}.ln1" if i + 1 < case.config.depth else "ln_f")
    assert reader in kept
    assert report.passes[0].applied == case.config.layernorms - len(kept)
    assert report.verification is None or report.verification["passed"]
    assert_exact(case, proto)


@pytest.mark.parametrize("target", TARGETS)
def test_no_final_layernorm_means_nothing_to_convert(target):
    """The head reads the raw stream: no stream value's mean is hidden; the model is left unchanged."""
    case = tg.build(final_ln=False, embedding_offset=OFFSET, depth=2)
    model, report, proto = convert(case, target)
    entry = report.passes[0]
    assert entry.applied == 0
    assert signature(proto) == signature(case.model)
    assert sorted(s.node.split("/")[0] for s in entry.skipped) == sorted(case.ln_names)
    assert all("mean" in s.reason for s in entry.skipped)


@pytest.mark.parametrize("bias", [True, False])
def test_post_ln_on_a_flattened_view_of_unknown_shape_is_refused_as_post_ln(bias):
    """Found by the long mode: the LayerNorms read a flattened view of a residual sum of unknown shape
    (decomposed, opset 13, dynamic axes), so the stream analysis stops at the Reshape and never sees the
    previous LayerNorm's output writing the sum. Post-LN is recognised from the readers back through sums
    and views, before any writer is planned: the model comes out unchanged, every reason says Post-LN
    (with biases, the first LayerNorm was converted, exactly, by an explicit centring of the embeddings)."""
    case = tg.build(d=4, depth=1, heads=1, vocab=2, seq=1, batch=1, mlp_ratio=1, bias=bias, post_ln=True,
                    ln_spelling="decomposed", opset=13, dynamic=True, flat_ln=True, seed=0)
    _, report, proto = convert(case, "onnx")
    assert_exact(case, proto)
    entry = report.passes[0]
    assert entry.applied == 0 and all("Post-LN" in s.reason for s in entry.skipped), entry.skipped
    assert sorted(s.node.split("/")[0] for s in entry.skipped) == sorted(case.ln_names)
    assert signature(proto) == signature(case.model)
    placements = {s["name"].split("/")[0]: s["placement"] for s in inspect(from_proto(case.model))}
    assert placements == dict.fromkeys(case.ln_names, "Post-LN")  # what normfold inspect reports


@pytest.mark.parametrize("depth", [1, 2])
def test_post_ln_reciprocal_layernorms_on_values_of_no_inferred_rank_are_refused_as_post_ln(depth):
    case = tg.build(d=4, depth=depth, heads=1, vocab=2, seq=1, batch=1, mlp_ratio=1, bias=False, proj="gemm",
                    post_ln=True, ln_spelling="reciprocal", opset=13, dynamic=True, positive_axes=True, seed=0)
    model, report, proto = convert(case, "onnx")
    assert_exact(case, proto)
    entry = report.passes[0]
    assert remaining_layernorms(model) == set(case.ln_names)
    assert sorted(s.node.split("/")[0] for s in entry.skipped) == sorted(case.ln_names)
    assert entry.applied == 0 and all("Post-LN" in s.reason for s in entry.skipped), entry.skipped
    assert signature(proto) == signature(case.model)
