"""Metamorphic, differential and equivalence properties over random CNNs and random Pre-LN transformers.

Models come from the shared builders: random Conv / ConvTranspose / BatchNormalization stacks
(`stacks` / `build_stack` of test_fold_batchnorm_properties, over bn_graphs) and random Pre-LN
transformers (transformer_graphs.build). A transformer can also be turned into a Pre-RMSNorm one
(`rmsnormify`: every decomposed LayerNorm loses its mean subtraction, leaving the Pow/Mul, ReduceMean,
Add, Sqrt, Div/Reciprocal spelling exporters write for RMSNorm), the input of emit-rmsnorm and a second
input of fold-norm-affine.

Properties:
1. Metamorphic (idempotence of convert): converting the converted model again applies nothing and
   leaves the graph unchanged (node op types, domains, inputs, outputs and attributes; initializer
   names and bytes), for the default pipeline (`normfold.convert(model)`, target auto/onnx/ort) and
   for each single pass (layernorm-to-rmsnorm, layernorm-to-crmsnorm, fold-norm-affine, emit-rmsnorm,
   fold-batchnorm) with
   target "onnx" and "ort".
2. Differential: a converted model in standard ONNX (target "onnx") gives the same outputs on
   onnxruntime (graph optimizations off) and on onnx's reference evaluator (onnx.reference), both in
   the model's dtype, within REFERENCE.md's fp32 LN -> RMSNorm row (rtol 1e-4, atol 1e-4 * max(1, rms)).
   Only small float32 models (the reference evaluator is slow).
3. Equivalence of the passes without a property test of their own (layernorm-to-crmsnorm,
   fold-norm-affine, emit-rmsnorm) and of layernorm-to-rmsnorm on scaled streams, at REFERENCE.md's tolerance for the pass (renorm: 1e-4 / 1e-4 * scale;
   affine fold: 1e-4 / 1e-5 * scale), never loosened. The models read token ids, so the "input scale"
   is the scale of what is written into the residual stream: the token (and position) tables, built
   with embedding_offset 0 or +100 (0 or +4 with a tied head, whose logits are ill-conditioned with
   +100, see test_layernorm_to_rmsnorm_properties), are multiplied by 1e-3, 1 or 1e3 (offset
   included, so the shift stays 100x the spread at every scale). The converted model (onnxruntime,
   optimizations on) must match the float32 original (onnxruntime, optimizations off: normfold.verify's
   rule); where it does not, the rewrite must be right in exact arithmetic (the converted model evaluated in
   float64 within the tolerance of the original evaluated in float64; target "onnx") and the converted
   float32 result within the tolerance of the exact one, unless the input is ill-conditioned: a float32
   evaluation of the original (onnxruntime with or without graph optimizations, or the reference evaluator) is
   itself off exact by more than ILL_CONDITIONED (1/4) of the tolerance. Such inputs exist (ILL_CONDITIONED_D4:
   d = 4, an embedding LayerNorm, each norm multiplying rounding error by gamma / rms(token);
   OPTIMIZED_LN_OFF_EXACT: a stream whose mean is 100x its spread, on onnxruntime's optimized LayerNorm); there
   float32 results of either model land wherever rounding puts them, and only the exact-arithmetic check judges
   the rewrite. The differential check applies the same ill-conditioning exemption.

A failure is a bug: file it as a strict xfail with the reproducer, do not loosen a tolerance; the
property steps around it (assume) only while it is open.

The differential check skips models with a grouped ConvTranspose: onnx's reference evaluator gets it
wrong (test_onnx_reference_evaluator_grouped_conv_transpose, a strict xfail that flags the onnx fix).

Example counts in CI: 200 examples per pass (each example of a pass test checks equivalence,
idempotence and, when small and target "onnx", the differential property), 120 for the default
pipeline on transformers and 80 on CNNs, plus the strict xfails (about 60-75 s of CPU on 2 cores). Long mode:
NORMFOLD_LONG=1 runs 10000 examples per property (NORMFOLD_LONG=1 pytest tests/passes/test_metamorphic.py,
hours: 3 to 6 minutes per 1000 examples of a pass test on a shared 2-core machine; NORMFOLD_LONG=N runs N,
see long_mode).
A failure prints the falsifying example (a transformer_graphs.Config or a Stack: copy it into
tg.build / build_stack) and a @reproduce_failure blob (print_blob) with the seed.
"""

from __future__ import annotations


import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import normfold
from long_mode import examples
import transformer_graphs as tg
from normfold.io import from_proto
from normfold.verification import TOLERANCES, compare
from test_fold_batchnorm_properties import build_stack, stacks

ort = pytest.importorskip("onnxruntime")

PASS_EXAMPLES = examples(200)
DEFAULT_TRANSFORMER_EXAMPLES = examples(120)
DEFAULT_CNN_EXAMPLES = examples(80)
COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SCALES = (1e-3, 1.0, 1e3)
SMALL_ELEMENTS = 20_000
"""Models with at most this many initializer elements get the differential check."""
RENORM = TOLERANCES["renorm"]["float32"]  # the differential tolerance (rtol, atol before scaling)
ILL_CONDITIONED = 0.25
"""An input is ill-conditioned for float32 when the float32 original misses the exact result by more than this
fraction of the tolerance (tiny widths, a stream whose per-token spread is small next to its mean)."""


# -- strategies ------------------------------------------------------------------------------------------
@st.composite
def configs(draw, *, dtype: str = "float32", spellings=tg.LN_SPELLINGS) -> tg.Config:
    """A small random Pre-LN transformer (every structural knob of transformer_graphs)."""
    d = draw(st.integers(4, 24))
    heads = draw(st.sampled_from([h for h in range(1, 5) if d % h == 0]))
    spelling = draw(st.sampled_from(spellings))
    opset = draw(st.sampled_from([17, 18, 23] if spelling == "fused" else [13, 14, 17, 18, 23]))
    tied = draw(st.sampled_from(("none",) * 3 + tg.TIED[1:]))  # half untied, so +100 comes up often
    offsets = [0.0, 4.0] if tied != "none" else [0.0, 100.0]
    return tg.Config(
        d=d, heads=heads, depth=draw(st.integers(1, 2)), ln_spelling=spelling, opset=opset,
        parallel=draw(st.sampled_from(tg.PARALLEL)), dtype=dtype, vocab=draw(st.integers(2, 16)),
        seq=draw(st.integers(1, 4)), batch=draw(st.integers(1, 2)), mlp_ratio=draw(st.sampled_from([1, 2])),
        bias=draw(st.booleans()), tied=tied, mlp=draw(st.sampled_from(["gelu", "swiglu"])),
        fused_qkv=draw(st.booleans()), proj=draw(st.sampled_from(["matmul", "gemm"])),
        pos=draw(st.sampled_from(["gather", "const", "none"])), embedding_ln=draw(st.booleans()),
        fp16_affine=draw(st.sampled_from(["outside", "inside"])) if dtype == "float16" else "outside",
        dynamic=draw(st.booleans()), dropout=draw(st.booleans()), positive_axes=draw(st.booleans()),
        flat_ln=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-6, 1e-12] if dtype == "float32" else [1e-5, 1e-3])),
        embedding_offset=draw(st.sampled_from(offsets)), bias_offset=draw(st.sampled_from([0.0, 3.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


DECOMPOSED = tuple(s for s in tg.LN_SPELLINGS if s != "fused")


# -- model helpers ---------------------------------------------------------------------------------------
def scaled(case: tg.TransformerCase, scale: float) -> onnx.ModelProto:
    """The model with its token/position tables (and a copied tied head) multiplied by `scale`."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    if scale == 1.0:
        return model
    names = {"wte", "wpe"} | ({"lm_head.weight"} if case.config.tied == "copy" else set())
    for tensor in model.graph.initializer:
        if tensor.name in names:
            array = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array((array.astype(np.float64) * scale).astype(array.dtype), tensor.name))
    return model


def rmsnormify(case: tg.TransformerCase, model: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The Pre-RMSNorm twin of a decomposed-LN transformer: each LN's `Sub(x, ReduceMean(x))` is dropped,
    its readers read x itself (x / sqrt(mean(x^2) + eps) * gamma + beta, in the LN's own spelling)."""
    assert case.config.ln_spelling != "fused"
    source = model if model is not None else case.model
    out = onnx.ModelProto()
    out.CopyFrom(source)
    nodes = {n.name: n for n in out.graph.node}
    drop = set()
    for name in case.ln_names:
        sub = nodes[f"{name}/sub"]
        x, centred = sub.input[0], sub.output[0]
        drop |= {f"{name}/sub", f"{name}/mean"}
        for node in out.graph.node:
            node.input[:] = [x if v == centred else v for v in node.input]
    kept = [n for n in out.graph.node if n.name not in drop]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    used = {v for n in out.graph.node for v in n.input}
    kept_inits = [t for t in out.graph.initializer if t.name in used]  # axes constants only the means read
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept_inits)
    onnx.checker.check_model(out)
    return out


def session(model: onnx.ModelProto, *, optimize: bool):
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_ort(model: onnx.ModelProto, feeds: dict, *, optimize: bool = False) -> dict[str, np.ndarray]:
    s = session(model, optimize=optimize)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def run_reference(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return dict(zip([o.name for o in model.graph.output], ReferenceEvaluator(model).run(None, feeds)))


def ids_feed(config: tg.Config, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, config.vocab, size=(config.batch, config.seq)).astype(np.int64)}


def signature(proto: onnx.ModelProto):
    """Nodes and initializers of a model, to check that a second conversion changed nothing."""
    nodes = [(n.op_type, n.domain, list(n.input), list(n.output), sorted(a.SerializeToString() for a in n.attribute))
             for n in proto.graph.node]
    inits = sorted((t.name, t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
                   for t in proto.graph.initializer)
    return nodes, inits


def convert(proto: onnx.ModelProto, passes, target: str):
    model, report = normfold.convert(from_proto(proto), passes, verify=False, target=target)
    return ir.serde.serialize_model(model), report


# -- checks ----------------------------------------------------------------------------------------------
def check_idempotent(converted: onnx.ModelProto, passes, target: str) -> None:
    """Property 1: a second conversion applies nothing and changes nothing."""
    again, report = convert(converted, passes, target)
    assert report.applied == 0, report.summary_lines()
    before, after = signature(converted), signature(again)
    assert after[0] == before[0], "second conversion changed the nodes"
    assert after[1] == before[1], "second conversion changed the initializers"


def check_differential(converted: onnx.ModelProto, feeds: dict, original: onnx.ModelProto | None = None) -> None:
    """Property 2: onnxruntime (optimizations off) and onnx's reference evaluator agree on the model.

    Where they do not, and `original` (a token-id transformer) is given, the disagreement is accepted only
    when the input is one where float32 cannot meet the tolerance at all: the float32 original itself is
    off the exact (float64) result by more than a quarter of the tolerance (ILL_CONDITIONED)."""
    if sum(int(np.prod(t.dims)) for t in converted.graph.initializer) > SMALL_ELEMENTS:
        event("differential: model too large, skipped")
        return
    if any(grouped_conv_transpose(n) for n in converted.graph.node):
        event("differential: grouped ConvTranspose (onnx reference evaluator bug), skipped")
        return
    rtol, atol = RENORM
    got, expected = run_ort(converted, feeds), run_reference(converted, feeds)
    assert list(got) == list(expected)
    problems = [compare(n, expected[n], got[n], rtol=rtol, atol=atol, tolerance_class="renorm") for n in expected]
    if all(c.passed for c in problems):
        event("differential: checked")
        return
    if original is not None and ill_conditioned(original, feeds, "renorm"):
        event("differential: ill-conditioned input (the float32 original is off exact), accepted")
        return
    raise AssertionError([c.message or c for c in problems if not c.passed])


def ill_conditioned(original: onnx.ModelProto, feeds: dict, tolerance_class: str, exact: dict | None = None) -> bool:
    """Whether float32 cannot meet the tolerance on this input: any float32 evaluation of the original
    (onnxruntime without or with graph optimizations, the latter being how the converted model runs, or onnx's
    reference evaluator) is off the exact result by more than ILL_CONDITIONED of the tolerance. (Which evaluator
    is off is luck: on one d = 4 model onnxruntime erred by 7e-4 at one embedding scale and 1e-5 at another, the
    reference evaluator by 2e-4 and 5e-4; see also OPTIMIZED_LN_OFF_EXACT.)"""
    rtol, atol = TOLERANCES[tolerance_class]["float32"]
    if exact is None:
        exact = dict(zip([o.name for o in original.graph.output], tg.exact_outputs(original, feeds["ids"])))
    for evaluate in (run_ort, lambda m, f: run_ort(m, f, optimize=True), run_reference):
        got = evaluate(original, feeds)
        for n in exact:
            if not compare(n, exact[n], got[n], rtol=rtol * ILL_CONDITIONED, atol=atol * ILL_CONDITIONED,
                           tolerance_class=tolerance_class).passed:
                return True
    return False


def grouped_conv_transpose(node: onnx.NodeProto) -> bool:
    """onnx.reference's ConvTranspose (onnx 1.23) is wrong for group > 1: with a bias it adds it per group
    incorrectly, and with C_in/G or C_out/G > 1 it fails to reshape the weight (see
    test_onnx_reference_evaluator_grouped_conv_transpose); onnxruntime matches bn_graphs.conv_transpose_ref."""
    return node.op_type == "ConvTranspose" and any(a.name == "group" and a.i > 1 for a in node.attribute)


def check_equivalent(original: onnx.ModelProto, converted: onnx.ModelProto, feeds: dict, tolerance_class: str) -> None:
    """Property 3. The converted model (onnxruntime, optimizations on) passes when it is within the pass's
    tolerance of the float32 original (onnxruntime, no optimizations: normfold.verify's rule). Otherwise both
    are measured against the original evaluated exactly (float64, onnx's reference evaluator):
    - the rewrite itself must be right: the converted model evaluated exactly (its stored float32 weights, float64
      arithmetic) within the tolerance of the exact original (skipped for target "ort": the reference evaluator
      has no SimplifiedLayerNormalization);
    - its float32 execution within the tolerance of exact, unless the float32 original is itself off exact by
      more than ILL_CONDITIONED of the tolerance (on onnxruntime or the reference evaluator: ill_conditioned),
      an ill-conditioned input (each norm multiplies its input's
      rounding error by gamma / rms(token), the blocks compound it; seen with d = 4 and an embedding LayerNorm,
      a gain of ~1000 from the first block to the logits), where the float32 error of either model is set by where
      rounding happens to fall, not by the rewrite (the converted model was seen 4x off exact where the original
      was 1.3x; the exact-arithmetic check above is what judges the rewrite there)."""
    reference = run_ort(original, feeds)
    got = run_ort(converted, feeds, optimize=True)
    assert list(got) == list(reference)
    checks = [compare(n, reference[n], got[n], tolerance_class=tolerance_class) for n in reference]
    if all(c.passed for c in checks):
        return
    exact = dict(zip(reference, tg.exact_outputs(original, feeds["ids"])))
    problems = [f"vs original: {c.name} max abs {c.max_abs_error:.3g} (atol {c.atol:.3g})" for c in checks if not c.passed]
    if not any(n.domain == "" and n.op_type == "SimplifiedLayerNormalization" for n in converted.graph.node):
        rewritten = dict(zip(reference, tg.exact_outputs(converted, feeds["ids"])))
        for n in reference:
            c = compare(n, exact[n], rewritten[n], tolerance_class=tolerance_class)
            assert c.passed, problems + [f"converted evaluated exactly vs exact: {n} max abs {c.max_abs_error:.3g} "
                                         f"(atol {c.atol:.3g}): the rewrite is wrong, not just rounded"]
        event("equivalence: rewrite exact in float64")
    for n in reference:
        e64 = np.asarray(exact[n], np.float64)
        own = float(np.abs(np.asarray(reference[n], np.float64) - e64).max())
        error = np.abs(np.asarray(got[n], np.float64) - e64)
        allowed = _allowed(e64, tolerance_class)
        if np.all(error <= allowed):
            event("equivalence: float32 original inaccurate, converted within tolerance of exact")
            continue
        assert ill_conditioned(original, feeds, tolerance_class, exact), problems + [f"vs exact: {n} max abs {error.max():.3g} (atol {allowed.min():.3g}) on a "
                                f"well-conditioned input (float32 original's error {own:.3g})"]
        event("equivalence: ill-conditioned input, only the exact-arithmetic check applies")


def _allowed(exact: np.ndarray, tolerance_class: str) -> np.ndarray:
    rtol, atol = TOLERANCES[tolerance_class]["float32"]
    return atol * max(1.0, float(np.sqrt(np.mean(np.square(exact))))) + rtol * np.abs(exact)


def check_pass(original: onnx.ModelProto, config: tg.Config, name: str, target: str, seed: int,
               tolerance_class: str) -> None:
    converted, report = convert(original, [name], target)
    entry = report.passes[0]
    event(f"{name} -> {target}: {'applied' if entry.applied else 'nothing applied'}")
    if target == "onnx":
        onnx.checker.check_model(converted)
    feeds = ids_feed(config, seed)
    if entry.applied:
        check_equivalent(original, converted, feeds, tolerance_class)
    else:
        assert signature(converted) == signature(ir.serde.serialize_model(from_proto(original)))
    check_idempotent(converted, [name], target)
    if target == "onnx" and config.dtype == "float32":
        check_differential(converted, feeds, original)


# -- single passes on transformers ------------------------------------------------------------------------
ILL_CONDITIONED_D4 = tg.Config(d=4, depth=2, heads=1, vocab=2, seq=3, batch=1, mlp_ratio=2, mlp="swiglu", fused_qkv=True,
                               pos="none", embedding_ln=True, ln_spelling="decomposed", opset=13, bias_offset=3.0,
                               seed=558882)
"""Found by the property: on ids [[0, 1, 0]] (seed 74) the float32 original is off exact by up to 7e-4 (atol
1.2e-4); the crmsnorm rewrite is right in exact arithmetic (1.4e-5), its float32 runs differ from exact and from
each other by 2e-4..6e-4. Kept as explicit examples so the ill-conditioned branches of the oracle always run."""


FALLBACK_AFTER_EMBEDDING_LN = tg.Config(d=5, depth=1, heads=1, vocab=2, seq=1, batch=1, mlp_ratio=1, bias=False,
                                        ln_spelling="decomposed", opset=13, proj="gemm", embedding_ln=True,
                                        dynamic=True, seed=0)
"""Found by the long mode (fixed): the embedding LayerNorm's stream became CRMSNorm, then the main stream, whose norm
outputs reach a Gemm through a computed Reshape (opset 13, dynamic axes), fell back to RMSNorm and was re-planned
on the rewritten graph, reaching the removed embedding LayerNorm's nodes (AttributeError on a None input); the
fallback plans are now made before any stream is rewritten."""


@settings(max_examples=PASS_EXAMPLES, **COMMON)
@given(config=configs(), target=st.sampled_from(["onnx", "ort"]), scale=st.sampled_from(SCALES),
       seed=st.integers(0, 2**16))
@example(config=ILL_CONDITIONED_D4, target="onnx", scale=1000.0, seed=74)
@example(config=tg.Config(**{**ILL_CONDITIONED_D4.__dict__, "ln_spelling": "fused", "opset": 17, "bias_offset": 0.0,
                             "eps": 1e-6}), target="onnx", scale=1000.0, seed=74)
@example(config=ILL_CONDITIONED_D4, target="ort", scale=1.0, seed=74)
@example(config=FALLBACK_AFTER_EMBEDDING_LN, target="onnx", scale=1e-3, seed=0)
def test_layernorm_to_crmsnorm(config, target, scale, seed):
    case = tg.build(config)
    event(f"scale {scale:g}, offset {config.embedding_offset:g}")
    check_pass(scaled(case, scale), config, "layernorm-to-crmsnorm", target, seed, "renorm")


@settings(max_examples=PASS_EXAMPLES, **COMMON)
@given(config=configs(), target=st.sampled_from(["onnx", "ort"]), scale=st.sampled_from(SCALES),
       seed=st.integers(0, 2**16))
def test_layernorm_to_rmsnorm(config, target, scale, seed):
    """The pass's own properties (test_layernorm_to_rmsnorm_properties) use unscaled tables; here the stream
    is scaled 1e-3..1e3, and the converted model must be idempotent and pass the differential check."""
    case = tg.build(config)
    event(f"scale {scale:g}, offset {config.embedding_offset:g}")
    check_pass(scaled(case, scale), config, "layernorm-to-rmsnorm", target, seed, "renorm")


OPTIMIZED_LN_OFF_EXACT = tg.Config(d=16, depth=1, heads=1, vocab=7, seq=2, batch=1, mlp_ratio=1, bias=False,
                                   ln_spelling="fused", opset=17, fused_qkv=True, embedding_offset=100.0, seed=16)
"""Found by the long mode, an oracle gap (not a normfold bug): with the tables x 1e3 (stream mean 1e5, spread 1e3)
on ids seed 1, the unchanged original run by onnxruntime with graph optimizations is off exact by 2.96e-5 (atol
1.43e-5), like the converted model, while the same original without optimizations is off by 1.41e-5 and the
converted model without them by 1.38e-5 (the fold itself is exact in float64: 4.7e-8). The optimized original now
counts among the float32 evaluations that make an input ill-conditioned."""


@settings(max_examples=PASS_EXAMPLES, **COMMON)
@given(config=configs(), target=st.sampled_from(["onnx", "ort"]), scale=st.sampled_from(SCALES),
       norm=st.sampled_from(["layernorm", "rmsnorm"]), seed=st.integers(0, 2**16))
@example(config=OPTIMIZED_LN_OFF_EXACT, target="onnx", scale=1000.0, norm="layernorm", seed=1)
def test_fold_norm_affine(config, target, scale, norm, seed):
    if norm == "rmsnorm" and config.ln_spelling == "fused":
        norm = "layernorm"
    case = tg.build(config)
    model = scaled(case, scale)
    if norm == "rmsnorm":
        model = rmsnormify(case, model)
    event(f"{norm}, scale {scale:g}, offset {config.embedding_offset:g}")
    check_pass(model, config, "fold-norm-affine", target, seed, "fold")


@settings(max_examples=PASS_EXAMPLES, **COMMON)
@given(config=configs(spellings=DECOMPOSED), target=st.sampled_from(["onnx", "ort"]), scale=st.sampled_from(SCALES),
       seed=st.integers(0, 2**16))
def test_emit_rmsnorm(config, target, scale, seed):
    case = tg.build(config)
    event(f"{config.ln_spelling}, scale {scale:g}, offset {config.embedding_offset:g}")
    check_pass(rmsnormify(case, scaled(case, scale)), config, "emit-rmsnorm", target, seed, "renorm")


@settings(max_examples=PASS_EXAMPLES, **COMMON)
@given(stack=stacks(), target=st.sampled_from(["onnx", "ort"]), scale=st.sampled_from(SCALES + (100.0,)))
def test_fold_batchnorm_idempotent_and_differential(stack, target, scale):
    proto, _ = build_stack(stack, np.float32)
    converted, report = convert(proto, ["fold-batchnorm"], target)
    check_idempotent(converted, ["fold-batchnorm"], target)
    if target == "onnx":
        x = np.random.default_rng(stack.seed % 1000).standard_normal([stack.batch, stack.cin, *stack.size])
        x = (x + 100.0 if scale == 100.0 else x * scale).astype(np.float32)  # 100.0 means "shifted by +100"
        check_differential(converted, {"x": x})


# -- the default pipeline ---------------------------------------------------------------------------------
@settings(max_examples=DEFAULT_TRANSFORMER_EXAMPLES, **COMMON)
@given(config=st.one_of(configs(), configs(dtype="float16")), target=st.sampled_from(["auto", "onnx", "ort"]),
       norm=st.sampled_from(["layernorm", "rmsnorm"]), seed=st.integers(0, 2**16))
def test_default_pipeline_on_transformers_is_idempotent(config, target, norm, seed):
    case = tg.build(config)
    model = rmsnormify(case) if norm == "rmsnorm" and config.ln_spelling != "fused" else case.model
    converted, report = convert(model, None, target)
    event(f"{config.dtype} -> {target}: {report.applied} rewrites")
    check_idempotent(converted, None, target)
    if target == "onnx" and config.dtype == "float32" and report.applied:
        check_differential(converted, ids_feed(config, seed), model)


@settings(max_examples=DEFAULT_CNN_EXAMPLES, **COMMON)
@given(stack_dtype=st.one_of(st.tuples(stacks(), st.just(np.float32)), st.tuples(stacks(fp16=True), st.just(np.float16))),
       target=st.sampled_from(["auto", "onnx", "ort"]))
def test_default_pipeline_on_cnns_is_idempotent(stack_dtype, target):
    stack, dtype = stack_dtype
    proto, _ = build_stack(stack, dtype)
    converted, report = convert(proto, None, target)
    event(f"{np.dtype(dtype).name} -> {target}: {report.applied} rewrites")
    check_idempotent(converted, None, target)


# -- bugs found ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("spelling", DECOMPOSED)
def test_crmsnorm_through_a_computed_reshape_at_opset_13(target, spelling):
    """Fixed: the stream written through Reshape(x, Concat(Shape(ids), [d])) (no inferred shape at opset 13)
    used to crash layernorm-to-crmsnorm; its Concat is now copied with a d-1 tail for that Reshape alone."""
    case = tg.build(d=4, heads=1, depth=1, vocab=2, seq=1, batch=1, mlp_ratio=1, bias=False, ln_spelling=spelling,
                    opset=13, proj="gemm", dynamic=True)
    converted, report = convert(case.model, ["layernorm-to-crmsnorm"], target)
    entry = report.passes[0]
    assert entry.applied == case.config.layernorms, report.summary_lines()
    check_equivalent(case.model, converted, ids_feed(case.config, 0), "renorm")


# -- a defect of the differential oracle itself -------------------------------------------------------------
@pytest.mark.xfail(strict=True, reason="onnx bug (not normfold): onnx.reference ConvTranspose with group > 1 "
                   "misapplies the bias and cannot reshape the weight when C_in/G or C_out/G > 1")
@pytest.mark.parametrize("cin,cout,groups,bias", [(2, 2, 2, True), (2, 4, 2, False), (4, 4, 2, False)])
def test_onnx_reference_evaluator_grouped_conv_transpose(cin, cout, groups, bias):
    import bn_graphs as bg
    from onnx import helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((cin, cout // groups, 1)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((1, cin, 2)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if bias else [])
    node = helper.make_node("ConvTranspose", ["x", "w"] + (["b"] if bias else []), ["y"], group=groups, kernel_shape=[1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, cin, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    exact = bg.conv_transpose_ref(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64) if bias else None,
                                  groups=groups)
    np.testing.assert_allclose(run_ort(model, {"x": x})["y"], exact, rtol=1e-4, atol=1e-5)  # onnxruntime is right
    np.testing.assert_allclose(run_reference(model, {"x": x})["y"], exact, rtol=1e-4, atol=1e-5)
