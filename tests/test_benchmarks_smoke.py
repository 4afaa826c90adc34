"""The benchmark suite's code on a tiny model, so it does not rot: the runtime suite against a peer
(benchmarks/bench_peers.py) and the conversion-cost runs (benchmarks/bench_conversion.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
pytest.importorskip("onnxruntime")
import bench_conversion  # noqa: E402
import bench_peers  # noqa: E402
import big_models  # noqa: E402

DEFAULT_ORT = "normfold default, target ort"


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A Pre-LN transformer with 5 LayerNorms (2 blocks), weights in the file."""
    return big_models.build_pre_ln(tmp_path / "tiny.onnx", width=32, depth=2, vocab=100, seq=4, external=False)


def test_runtime_suite_on_a_tiny_model(tiny, tmp_path):
    spec = {**bench_peers.MODELS["gpt2_small"], "title": "tiny", "variants": [(DEFAULT_ORT, None, "ort")]}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = bench_peers.run_model("tiny", spec, tiny, scratch, peers=["ort-offline"], repeats=1, approximate=False)
    variants = r["variants"]
    assert r["facts"]["norms"] == {"LayerNormalization": 5}
    normfold_row, peer, bound = variants[DEFAULT_ORT], variants["peer: ort-offline"], variants["no-norm bound"]
    assert normfold_row["check"]["passed"] and normfold_row["facts"]["rewritten"] == 5
    assert normfold_row["facts"]["norms"] == {"SimplifiedLayerNormalization": 5}
    assert peer["check"]["passed"] and peer["rss_mib"] > 0
    assert bound["facts"]["norms"] == {} and "check" not in bound
    timed = {"original", "original (A/A: 2nd session)", DEFAULT_ORT, "peer: ort-offline", "no-norm bound"}
    for level in bench_peers.LEVELS:
        assert set(r["latency"][level]) == timed
        assert all(x["median_ms"] > 0 for x in r["latency"][level].values())
    (target,) = bench_peers.targets(r)
    assert target["variant"] == DEFAULT_ORT and target["equivalent"]
    # the peer rewrote fewer of the original's norms, so it is a target one way or the other
    assert target["beaten"] + target["lost"] == (["ort-offline"] if peer["facts"]["rewritten"] < 5 else [])
    table = "\n".join(bench_peers.render_model(r))
    assert "| peer: ort-offline |" in table and "equivalent (max abs" in table


def test_a_failing_maker_is_recorded_not_dropped(tmp_path):
    dst = tmp_path / "never.onnx"
    failed = bench_peers.make_variant([sys.executable, "-c", "import sys; sys.exit('peer exploded')"], dst, tmp_path)
    assert failed == {"error": "peer exploded"}


def test_conversion_runs_on_a_tiny_model(tmp_path):
    src = big_models.build_pre_ln(tmp_path / "m.onnx", width=32, depth=2, vocab=100, seq=4)
    out = tmp_path / "out"
    out.mkdir()
    runs = bench_conversion.commands(src, out, ["onnxoptimizer"], verify=False, cap=20 * 2**20, timeout=60)
    results = {label: bench_conversion.measure(argv, out) for label, argv in runs.items()}
    for label in bench_conversion.SCALING_RUNS:
        assert results[label]["wall_s"] > 0 and results[label]["rss_mib"] > 0, label
    # 5 norms to RMSNorm, 4 affines folded: the final norm keeps its beta (its bias-less 100-logit head is
    # wider than the norm, so folding beta would add an Add over the logits)
    assert results["normfold convert --no-verify"]["rewritten"]["applied"] == 9
    assert "error" in results["peer: onnxoptimizer"]  # a 20 MiB memory cap: recorded as a failure
    assert list(out.iterdir()) == []  # every run's output removed
    r = {"mb": 1, "bytes": bench_conversion.model_bytes(src), "runs": results}
    assert bench_conversion.floor(r)[0].startswith("floor")
    assert "| normfold x floor |" in "\n".join(bench_conversion.render_scaling([r]))
    bench_conversion.plot([r], tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 1000
