"""benchmarks/kernel_profile.py on tiny inputs, so it does not rot: the profile parser, the Add-fusion
experiment (equivalent, and every residual Add gone), the emission-form models against their float64
reference, and the report."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
ort = pytest.importorskip("onnxruntime")
import big_models  # noqa: E402
import kernel_profile  # noqa: E402


def _event(name, ts, dur, op=None, shapes=None):
    args = {"op_name": op} if op else {}
    if shapes:
        args["input_type_shape"] = [{"float": s} for s in shapes]
    return {"cat": "Node" if op else "Session", "name": name, "ts": ts, "dur": dur, "args": args}


def test_trace_is_split_per_run_and_op_type_with_adds_by_shape():
    events = [
        _event("model_run", 0, 100), _event("warm_kernel_time", 10, 50, "Gemm"),  # warm-up run: left out
        _event("model_run", 200, 100),
        _event("a_kernel_time", 210, 30, "Gemm"), _event("b_kernel_time", 250, 10, "Add", [[2, 3], [2, 3]]),
        _event("c_kernel_time", 262, 4, "Add", [[2, 3], [3]]), _event("a_fence_before", 205, 1, "Gemm"),
        _event("model_run", 400, 50), _event("a_kernel_time", 410, 20, "Gemm"),
        _event("late_kernel_time", 470, 5, "Gemm"),  # outside every run window
    ]
    runs = kernel_profile.parse_trace(events)
    assert [r["run_ms"] for r in runs] == [0.1, 0.05]
    assert runs[0]["ops"] == {"Gemm": 0.03, "Add 2x3 + 2x3": 0.01, "Add 2x3 + 3": 0.004}
    assert runs[1]["ops"] == {"Gemm": 0.02} and runs[1]["kernel_ms"] == pytest.approx(0.02)
    s = kernel_profile.summarize(runs)
    assert s["runs"] == 2 and s["ops"]["Gemm"] == pytest.approx(0.025) and s["count"]["Add 2x3 + 2x3"] == 1
    assert s["outside_ms"] == pytest.approx(np.median([0.1 - 0.044, 0.05 - 0.02]))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Pre-LN transformer (5 LayerNorms) and its normfold default conversion for target ort."""
    import normfold

    tmp = tmp_path_factory.mktemp("kernel_profile")
    src = big_models.build_pre_ln(tmp / "tiny.onnx", width=32, depth=2, vocab=100, seq=4, external=False)
    model, _ = normfold.convert(src, target="ort", verify=False)
    dst = tmp / "tiny_ort.onnx"
    normfold.save(model, dst)
    return src, dst


def test_the_add_fusion_experiment_is_equivalent_and_fuses_every_residual_add(converted, tmp_path):
    import onnx

    import normfold

    src, ort_model = converted
    fused = tmp_path / "fused.onnx"
    count = kernel_profile.fuse_residual_adds(ort_model, fused)
    ops = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert count == ops.count("SkipSimplifiedLayerNormalization") >= 4  # every norm after a residual sum
    before = [n.op_type for n in onnx.load(str(ort_model)).graph.node]
    assert ops.count("Add") == before.count("Add") - count
    result = normfold.verify(src, fused, tolerance_class="renorm")
    assert result.passed, result.summary_lines()


def test_normfold_keeps_the_unit_gamma_so_the_experiment_has_nothing_left_to_do(converted, tmp_path):
    """fold-norm-affine now keeps each decomposed norm's Mul, by ones: onnxruntime fuses all five norms of
    normfold's target-onnx output, and the experiment (restore_unit_gamma) finds no Div without its Mul."""
    import normfold

    src, _ = converted
    model, _ = normfold.convert(src, target="onnx", verify=False)
    onnx_model = tmp_path / "tiny_onnx.onnx"
    normfold.save(model, onnx_model)
    fused = kernel_profile.optimized_ops(onnx_model, tmp_path, 1)
    assert fused["SimplifiedLayerNormalization"] == 5 and fused["Pow"] == 0
    assert kernel_profile.restore_unit_gamma(onnx_model, tmp_path / "restored.onnx") == 0
    result = normfold.verify(src, onnx_model, tolerance_class="renorm")
    assert result.passed, result.summary_lines()


@pytest.mark.parametrize("kind", sorted(set(kernel_profile.FORMS.values())))
def test_every_emission_form_computes_its_reference(kind):
    import onnx

    shape = (2, 3, 16)
    proto = kernel_profile.form_model(kind, shape)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load_from_string(proto).graph.initializer}
    try:
        session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    except Exception as exc:  # pragma: no cover - an onnxruntime without opset 23
        pytest.skip(f"this onnxruntime cannot run {kind}: {exc}")
    rng = np.random.default_rng(0)
    x, d = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    got = session.run(None, {"x": x, "d": d})[0]
    ref = kernel_profile.form_reference(kind, x, d, init["gamma"], init["beta"])
    scale = max(1.0, float(np.sqrt(np.mean(ref * ref))))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)
    # a wrong reference would not pass: the LayerNorm and RMSNorm references differ on these inputs
    other = "ln" if kind not in ("ln", "skip_ln") else "sln"
    assert not np.allclose(kernel_profile.form_reference(other, x, d, init["gamma"], init["beta"]), ref, rtol=1e-3)


def test_time_forms_and_report_on_a_tiny_shape(converted, monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_profile, "FORM_BLOCKS", 2)
    forms = kernel_profile.time_forms((2, 3, 16), threads=1, repeats=1)
    assert set(forms) == set(kernel_profile.FORMS)
    runnable = {label: f for label, f in forms.items() if "error" not in f}
    assert all(f["within"] and f["block_us"] > 0 for f in runnable.values())
    sln = runnable["Add + SimplifiedLayerNormalization (normfold, target ort)"]
    assert sln["ops"] == {"Add": 1, "SimplifiedLayerNormalization": 1}
    src, ort_model = converted
    paths = {"original": src, "normfold default, target ort": ort_model}
    per_run = kernel_profile.profile(paths, runs=2, threads=1, scratch=tmp_path)
    summaries = {label: kernel_profile.summarize(r) for label, r in per_run.items()}
    assert all(s["runs"] == 2 and s["kernel_ms"] > 0 for s in summaries.values())
    counts = summaries["original"]["count"]  # onnxruntime fuses the last norm with its Add (one reader)
    assert counts["LayerNormalization"] + counts.get("SkipLayerNormalization", 0) == 5
    graphs = {label: kernel_profile.optimized_ops(p, tmp_path, 1) for label, p in paths.items()}
    assert graphs["normfold default, target ort"]["SimplifiedLayerNormalization"] == 5

    class Args:
        command_line, load_start, threads, form_repeats = "python benchmarks/kernel_profile.py", "0", 1, 1

    info = {k: "x" for k in ("date", "cpu", "cpu_count", "usable_cpus", "platform", "python", "onnxruntime",
                             "onnx", "onnx_ir", "numpy", "normfold")}
    checks = kernel_profile.check(src, paths)
    assert checks["normfold default, target ort"].startswith("yes")
    text = kernel_profile.render(info, Args, summaries, graphs, None, forms, checks)
    assert "| LayerNormalization | " in text and "| SimplifiedLayerNormalization |" in text
    assert "| Add + LayerNormalization (the original) |" in text


def test_every_model_profiles_its_own_variants():
    import bench_peers

    for model, keys in kernel_profile.MODEL_VARIANTS.items():
        assert model in bench_peers.MODELS
        assert keys[0] == "original" and set(keys) <= set(kernel_profile.VARIANTS)
    assert set(kernel_profile.FORM_SHAPES) == {m for m, s in bench_peers.MODELS.items() if "LayerNormalization" in s["norm_ops"]}
