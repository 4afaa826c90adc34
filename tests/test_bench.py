"""normfold.bench and `normfold bench`: interleaved timing, ratios, batch, memory, JSON, plot."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from normfold import bench, runtime
from normfold.cli import main
from normfold.errors import InputError

CUDA = runtime.PROVIDERS["cuda"]


def matmul_model(rows: int, cols: int, *, batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """x[batch, rows] @ W[rows, cols] -> y: a weight of rows*cols*4 bytes."""
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cols])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.fixture
def small(tmp_path):
    paths = []
    for i, cols in enumerate((8, 16)):
        paths.append(tmp_path / f"small{i}.onnx")
        onnx.save(matmul_model(16, cols, seed=i), paths[-1])
    return paths


def test_results_and_ratios_to_the_first_model(small):
    results = bench.benchmark(small, repeats=5, warmup=1, batch=3)
    assert [r.model for r in results] == [str(p) for p in small]
    for r in results:
        assert r.provider == "cpu" and r.repeats == 5 and r.warmup == 1 and r.memory_mb is None
        assert 0 < r.min_ms <= r.median_ms <= r.p90_ms and r.runs_per_second == pytest.approx(1e3 / r.median_ms)
        assert r.input_shapes == {"x": [3, 16]}
    assert results[0].ratio == 1.0 and results[1].ratio == pytest.approx(results[1].median_ms / results[0].median_ms)
    lines = bench.table(results)
    assert lines[0].split()[:2] == ["model", "session"] and "ratio" in lines[0] and "mem" in lines[0]
    assert lines[1].split()[0] == "small0.onnx" and lines[1].split()[5] == "1.000"


def test_rotation_puts_every_model_in_every_position():
    rounds = [bench.rotated(3, r) for r in range(3)]
    assert rounds == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert all(sorted(r[k] for r in rounds) == [0, 1, 2] for k in range(3))


def test_warmup_then_repetitions_interleaved_across_models(small, monkeypatch):
    calls = []
    real_open = runtime.open_session

    class Recording:
        def __init__(self, session, name):
            self.session, self.name = session, name

        def run(self, outputs, feeds):
            calls.append(self.name)
            return self.session.run(outputs, feeds)

        def __getattr__(self, attribute):
            return getattr(self.session, attribute)

    def recording_open(path, **kwargs):
        session, choice = real_open(path, **kwargs)
        return Recording(session, path.name), choice

    monkeypatch.setattr(runtime, "open_session", recording_open)
    bench.benchmark(small, repeats=3, warmup=2, batch=1)
    a, b = (p.name for p in small)
    assert calls == [a, a, b, b] + [a, b] + [b, a] + [a, b]  # warm-up, then rounds in rotated order


def test_batch_fills_dynamic_first_dims_and_shape_wins(small, tmp_path):
    (result,) = bench.benchmark(small[:1], repeats=1, batch=4, shapes={"x": [2, 16]})
    assert result.input_shapes == {"x": [2, 16]}
    fixed = tmp_path / "fixed.onnx"
    onnx.save(matmul_model(16, 8, batch=1), fixed)
    assert bench.benchmark([fixed], repeats=1, batch=1)[0].input_shapes == {"x": [1, 16]}
    with pytest.raises(InputError, match="fixed first dimension 1; --batch 4 cannot change it"):
        bench.benchmark([fixed], repeats=1, batch=4)
    with pytest.raises(InputError, match="dynamic dims.*--shape x=N,16"):
        bench.benchmark(small[:1], repeats=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(repeats=0), "--repeats must be at least 1"),
    (dict(warmup=-1), "--warmup must be at least 0"),
    (dict(batch=0), "--batch must be at least 1"),
])
def test_bad_counts_are_input_errors(small, kwargs, message):
    with pytest.raises(InputError, match=message):
        bench.benchmark(small, **kwargs)


def test_memory_grows_with_the_weights_the_session_holds(tmp_path, small):
    big = tmp_path / "big.onnx"
    onnx.save(matmul_model(1024, 8192), big)  # a 32 MiB weight
    tiny, large = bench.benchmark([small[0], big], repeats=2, warmup=1, batch=1, memory=True)
    assert large.memory_mb > 30 and tiny.memory_mb < large.memory_mb - 25
    assert large.peak_rss_mb > large.memory_mb


def test_memory_without_psutil_falls_back_to_the_kernels_figures(tmp_path, small, monkeypatch):
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "psutil.py").write_text("raise ImportError('psutil hidden by the test')\n")
    monkeypatch.setenv("PYTHONPATH", str(hidden))
    choice = runtime.select_provider("cpu")
    feeds = {"x": np.ones((1, 16), np.float32)}
    memory, peak = bench.measure_memory(small[0], choice, feeds, optimize=True, runs=2)
    assert 0 <= memory < 200 and peak > 10


def test_a_failing_memory_child_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="cannot measure memory: the child process failed") as error:
        bench.measure_memory(tmp_path / "missing.onnx", runtime.select_provider("cpu"), {}, optimize=True, runs=1)
    assert "\n" not in str(error.value)


def test_plot_writes_an_image_and_needs_matplotlib(small, tmp_path, monkeypatch):
    results = bench.benchmark(small, repeats=2, warmup=0, batch=1)
    path = bench.plot(results, tmp_path / "latency.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.plot(results, tmp_path / "latency.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(InputError, match="give a .png, .svg or .pdf"):
        bench.check_plot_path(tmp_path / "latency.jpeg")
    with pytest.raises(InputError, match="directory .* does not exist"):
        bench.check_plot_path(tmp_path / "nowhere" / "latency.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(InputError, match=r"--plot needs matplotlib: pip install 'normfold\[bench\]'"):
        bench.check_plot_path(tmp_path / "latency.png")


def test_cli_json_schema(small, capsys):
    assert main(["bench", *map(str, small), "--repeats", "3", "--warmup", "1", "--batch", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "normfold.bench/1" and data["baseline"] == str(small[0])
    assert data["provider"] == {"requested": "cpu", "used": "cpu", "onnxruntime": "CPUExecutionProvider",
                                "options": {}, "fallback": None}
    assert data["onnxruntime_version"] == ort.__version__ and "child process" in data["memory_method"]
    assert data["intra_op_spinning"] is False
    first, second = data["models"]
    assert first["ratio"] == 1.0 and first["repeats"] == 3 and first["warmup"] == 1
    assert second["ratio"] == pytest.approx(second["median_ms"] / first["median_ms"])
    assert first["memory_mb"] >= 0 and first["peak_rss_mb"] > first["memory_mb"]
    assert set(first) == {"model", "provider", "session_seconds", "median_ms", "p90_ms", "runs_per_second", "repeats",
                          "min_ms", "warmup", "ratio", "memory_mb", "peak_rss_mb", "input_shapes"}


@pytest.mark.parametrize("argv,spinning", [([], "0"), (["--spin"], None)])
def test_idle_threads_sleep_unless_spin_is_asked(small, monkeypatch, argv, spinning, capsys):
    """Interleaved sessions must not take each other's cores: by default their idle threads sleep
    (session.intra_op.allow_spinning=0); --spin keeps onnxruntime's default (the entry is not set)."""
    seen = []
    real_open = runtime.open_session

    def recording_open(path, **kwargs):
        session, choice = real_open(path, **kwargs)
        try:
            seen.append(session.get_session_options().get_session_config_entry(runtime.SPINNING_KEY))
        except RuntimeError:  # onnxruntime: "does not have configuration with key"
            seen.append(None)
        return session, choice

    monkeypatch.setattr(runtime, "open_session", recording_open)
    assert main(["bench", *map(str, small), "--repeats", "1", "--warmup", "0", "--batch", "1", "--no-memory",
                 "--json", *argv]) == 0
    assert seen == [spinning, spinning]
    assert json.loads(capsys.readouterr().out)["intra_op_spinning"] is (spinning is None)


def test_cli_table_and_plot(small, tmp_path, capsys):
    plot = tmp_path / "bench.png"
    assert main(["bench", *map(str, small), "--repeats", "2", "--batch", "1", "--no-memory", "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[-1] == f"wrote {plot}" and lines[1].split()[-2:] == ["-", "cpu"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--plot", "{model}"], "would overwrite"),
    (["--plot", "out.gif"], "give a .png, .svg or .pdf"),
    (["--provider", "cpu", "--provider-option", "device_id=0"], "takes no provider options"),
])
def test_cli_bad_arguments_are_one_line_errors(small, argv, message, capsys):
    argv = [a.replace("{model}", str(small[0])) for a in argv]
    assert main(["bench", str(small[0]), "--batch", "1", "--no-memory", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_bench_provider_fallback(small, capsys):
    if CUDA in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    assert main(["bench", str(small[0]), "--batch", "1", "--no-memory", "--provider", "cuda"]) == 2
    assert "pip install 'normfold[gpu]'" in capsys.readouterr().err
    assert main(["bench", str(small[0]), "--batch", "1", "--no-memory", "--repeats", "1", "--provider", "cuda",
                 "--allow-fallback", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["provider"]["requested"] == "cuda" and data["provider"]["used"] == "cpu"
    assert data["provider"]["fallback"] and data["models"][0]["provider"] == "cpu"
    assert captured.err.count("normfold: warning:") == 1


def test_after_a_fallback_every_model_runs_where_the_first_does(small, monkeypatch):
    """CUDA listed by the Python API but absent in the runtime (as when its libraries are missing)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = bench.benchmark(small, provider="cuda", allow_fallback=True, repeats=1, warmup=0, batch=1)
    assert [r.provider for r in results] == ["cpu", "cpu"]
    assert sum(issubclass(w.category, runtime.ProviderFallbackWarning) for w in caught) == 1
