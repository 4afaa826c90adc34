"""onnxruntime latency and memory of one or more models, measured fairly.

Latency: sessions are created first (timed); then, after warm-up runs, repetitions are interleaved
across the models, the order rotated each round (A B C, B C A, C A B, ...), so drift of the machine and
the cost of running first or after a given model fall on each model alike. By default the
sessions' idle threads sleep (session.intra_op.allow_spinning=0): with onnxruntime's default spinning,
the threads of the session that just ran keep spinning while the next one runs and take its cores
(on 2 cores a DeiT-Tiny run went from about 132 to 160-186 ms, benchmarks/results/kernel_profile_deit_tiny.md);
`spin=True` (`--spin`) keeps onnxruntime's default. Reported per
model: session creation time, median, p90 and min latency, throughput (1 / median, runs per second)
and the ratio of its median to the first model's (the baseline).

Memory (`memory=True`): each model in its own fresh child process (so no memory of another model
or of the parent is shared; it imports only onnxruntime and numpy), which receives the inputs,
records its resident set size (RSS), creates the session and runs it (warm-up + 1 times), then
reports its peak RSS. `memory_mb` is peak minus the
RSS before session creation: what the session and its runs cost the host. The peak is the kernel's
high-water mark of the process (Linux: VmHWM in /proc/self/status; elsewhere `resource.getrusage`'s
ru_maxrss, which on Linux would also count the parent's RSS at fork). The RSS before is psutil's when
psutil (the bench extra) is installed, else VmRSS, else the high-water mark so far (slightly high, so
the delta is slightly low). GPU memory is not in it.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from normfold import io, runtime
from normfold.atomic import write_atomic
from normfold.errors import InputError
from normfold.verification import make_inputs

SCHEMA = "normfold.bench/1"
WARMUP_RUNS = 3
MEMORY_METHOD = ("fresh child process per model: peak RSS (VmHWM, else getrusage ru_maxrss) minus RSS before "
                 "session creation (psutil, else VmRSS, else ru_maxrss so far); host memory only")
PLOT_FORMATS = ("png", "svg", "pdf")


@dataclass
class BenchResult:
    """Latency (and memory) figures of one model."""

    model: str
    provider: str
    session_seconds: float
    median_ms: float
    p90_ms: float
    runs_per_second: float
    repeats: int
    min_ms: float = 0.0
    warmup: int = WARMUP_RUNS
    ratio: float = 1.0
    """median_ms over the first model's median_ms."""
    memory_mb: float | None = None
    """Peak RSS during session creation and runs, minus the RSS before (see module docstring)."""
    peak_rss_mb: float | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark(
    paths: Sequence[str | Path],
    *,
    provider: str | runtime.ProviderChoice = "cpu",
    provider_options: Mapping[str, object] | None = None,
    allow_fallback: bool = False,
    repeats: int = 20,
    warmup: int | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    batch: int | None = None,
    seed: int = 0,
    optimize: bool = True,
    memory: bool = False,
    spin: bool = False,
) -> list[BenchResult]:
    """Times every model in `paths` on the same seeded inputs (see module docstring).

    `warmup` defaults to WARMUP_RUNS; `batch` sets the dynamic first dimension of every input whose
    other dims are known (`shapes` wins for the inputs it names).
    """
    warmup = WARMUP_RUNS if warmup is None else warmup
    if repeats < 1:
        raise InputError("--repeats must be at least 1")
    if warmup < 0:
        raise InputError("--warmup must be at least 0")
    if batch is not None and batch < 1:
        raise InputError("--batch must be at least 1")
    if not paths:
        raise InputError("give at least one model to benchmark")
    choice = runtime.select_provider(provider, provider_options, allow_fallback=allow_fallback)
    sessions, feeds, created, used = [], [], [], []
    for path in map(Path, paths):
        model = io.load(path)
        start = time.perf_counter()
        session, model_choice = runtime.open_session(path, provider=choice, optimize=optimize,
                                                     allow_fallback=allow_fallback, spin=spin)
        created.append(time.perf_counter() - start)
        sessions.append(session)
        used.append(model_choice)
        choice = model_choice  # after a fallback the other models run where this one does, for a fair comparison
        feeds.append(make_inputs(session, model, shapes=batch_shapes(session, model, shapes, batch), seed=seed))
    for session, feed in zip(sessions, feeds):
        for _ in range(warmup):
            session.run(None, feed)
    times = [[] for _ in sessions]
    for round_ in range(repeats):
        for i in rotated(len(sessions), round_):
            start = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append(time.perf_counter() - start)
    del sessions
    base = float(np.median(times[0]))
    results = []
    for i, path in enumerate(paths):
        median = float(np.median(times[i]))
        results.append(BenchResult(
            model=str(path),
            provider=used[i].used,
            session_seconds=created[i],
            median_ms=median * 1e3,
            p90_ms=float(np.percentile(times[i], 90) * 1e3),
            runs_per_second=1.0 / median,
            repeats=repeats,
            min_ms=float(np.min(times[i]) * 1e3),
            warmup=warmup,
            ratio=median / base,
            input_shapes={k: list(v.shape) for k, v in feeds[i].items()},
        ))
        if memory:
            results[-1].memory_mb, results[-1].peak_rss_mb = measure_memory(
                path, used[i], feeds[i], optimize=optimize, runs=warmup + 1, spin=spin)
    return results


def rotated(count: int, round_: int) -> list[int]:
    """The order of the models in one round: the interleaving rotated by one model per round, so each
    model runs in every position (first, after each other model) equally often over `count` rounds."""
    return [(round_ + i) % count for i in range(count)]


def batch_shapes(session, model, shapes: Mapping[str, list[int]] | None, batch: int | None) -> dict[str, list[int]]:
    """`shapes`, plus `batch` as the first dim of each other input whose first dim is dynamic.

    An input whose other dims are dynamic too is left to make_inputs (which asks for --shape); one with
    a fixed first dim other than `batch` is an error.
    """
    result = {k: list(v) for k, v in (shapes or {}).items()}
    if batch is None:
        return result
    initializers = {v.name for v in model.graph.inputs if v.is_initializer()}
    for meta in session.get_inputs():
        if meta.name in result or meta.name in initializers or not meta.shape:
            continue
        first, rest = meta.shape[0], meta.shape[1:]
        if isinstance(first, int) and first >= 0:
            if first != batch:
                raise InputError(f"input {meta.name!r} has a fixed first dimension {first}; --batch {batch} "
                                 f"cannot change it (export the model with a dynamic batch)")
            continue
        if all(isinstance(d, int) and d >= 0 for d in rest):
            result[meta.name] = [batch, *rest]
    return result


def measure_memory(path, choice: runtime.ProviderChoice, feeds, *, optimize: bool, runs: int,
                   spin: bool = False):
    """(memory_mb, peak_rss_mb) of one model's session, measured in a fresh child process.

    The child imports only onnxruntime and numpy (not normfold), reads its job from stdin and prints
    RSS before session creation and peak RSS, in bytes, as JSON (see module docstring).
    """
    job = {"path": str(path), "providers": choice.session_providers(), "optimize": optimize,
           "runs": max(1, runs), "feeds": feeds, "spin": spin}
    try:
        done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], input=pickle.dumps(job), capture_output=True,
                              check=False)
    except OSError as exc:
        raise InputError(f"{path}: cannot measure memory: cannot start {sys.executable} ({exc})") from None
    try:
        figures = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise InputError(f"{path}: cannot measure memory: the child process failed ({last[:300]})") from None
    baseline, peak = figures["baseline"], figures["peak"]
    return round(max(0, peak - baseline) / 2**20, 3), round(peak / 2**20, 3)


_MEMORY_CHILD = """
import json, pickle, sys
job = pickle.load(sys.stdin.buffer)
import onnxruntime as ort

def proc_status(field):
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024

def peak():
    value = proc_status("VmHWM")
    if value is not None:
        return value
    import resource
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)

def current():
    try:
        import psutil
    except ImportError:
        value = proc_status("VmRSS")
        return peak() if value is None else value
    return int(psutil.Process().memory_info().rss)

baseline = current()
options = ort.SessionOptions()
level = ort.GraphOptimizationLevel
options.graph_optimization_level = level.ORT_ENABLE_ALL if job["optimize"] else level.ORT_DISABLE_ALL
options.log_severity_level = 3
if not job["spin"]:
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(job["path"], sess_options=options, providers=job["providers"], enable_fallback=0)
for _ in range(job["runs"]):
    session.run(None, job["feeds"])
print(json.dumps({"baseline": baseline, "peak": peak()}))
"""


def table(results: list[BenchResult]) -> list[str]:
    """A text table, with each model's median relative to the first model's (the baseline)."""
    base = results[0].median_ms if results else 1.0
    labels = _labels([r.model for r in results])
    width = max([40, *map(len, labels)]) if any(len(label) > 40 for label in labels) else 40
    lines = [f"{'model':{width}} {'session s':>9} {'median ms':>10} {'p90 ms':>9} {'runs/s':>8} {'ratio':>6} "
             f"{'mem MB':>8} {'provider':>8}"]
    for label, r in zip(labels, results):
        memory = f"{r.memory_mb:8.1f}" if r.memory_mb is not None else f"{'-':>8}"
        lines.append(f"{label:{width}} {r.session_seconds:9.3f} {r.median_ms:10.3f} {r.p90_ms:9.3f} "
                     f"{r.runs_per_second:8.1f} {r.median_ms / base:6.3f} {memory} {r.provider:>8}")
    return lines


def document(results: list[BenchResult], choice: runtime.ProviderChoice, *, seed: int, memory: bool,
             spin: bool = False) -> dict:
    """The `--json` document (schema normfold.bench/1, see README)."""
    return {
        "schema": SCHEMA,
        "onnxruntime_version": runtime.onnxruntime().__version__,
        "provider": choice.to_dict(),
        "seed": seed,
        "intra_op_spinning": spin,
        "baseline": results[0].model if results else None,
        "memory_method": MEMORY_METHOD if memory else None,
        "models": [r.to_dict() for r in results],
    }


def check_plot_path(path: Path) -> str:
    """The plot's format from its suffix; a clear error when matplotlib is missing or the path is unusable."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise InputError(f"--plot {path}: give a .png, .svg or .pdf file name")
    if not path.parent.is_dir():
        raise InputError(f"--plot {path}: directory {path.parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'normfold[bench]'") from None
    return fmt


def plot(results: list[BenchResult], path: str | Path, *, title: str = "") -> Path:
    """Median latency bars with whiskers up to p90 and each ratio to the baseline, written atomically."""
    path = Path(path)
    fmt = check_plot_path(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = _labels([r.model for r in results])
    medians = [r.median_ms for r in results]
    whiskers = [[0.0] * len(results), [max(0.0, r.p90_ms - r.median_ms) for r in results]]
    figure = Figure(figsize=(max(4.0, 1.1 * len(results) + 2.0), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bars = axes.bar(range(len(results)), medians, yerr=whiskers, capsize=4, color="#4c72b0")
    for bar, r in zip(bars, results):
        axes.annotate(f"{r.ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, max(r.p90_ms, r.median_ms)),
                      xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    axes.margins(y=0.12)
    axes.set_xticks(range(len(results)), labels, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("latency, ms (bar: median, whisker: p90)")
    if not title and results:
        title = (f"onnxruntime {runtime.PROVIDERS[results[0].provider]}, {results[0].repeats} interleaved runs\n"
                 f"ratio: median / the first model's median")
    axes.set_title(title, fontsize=9)
    return write_atomic(path, lambda f: figure.savefig(f, format=fmt, dpi=120), what="plot")


def _labels(models: list[str]) -> list[str]:
    """File names, or whole paths where two different files share a name."""
    names = [Path(m).name for m in models]
    clash = {n for n in names if len({m for m, other in zip(models, names) if other == n}) > 1}
    return [m if n in clash else n for m, n in zip(models, names)]
