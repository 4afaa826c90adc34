"""onnxruntime latency of one or more models, measured fairly in one process.

Sessions are created first (timed); then, after warm-up, repetitions are interleaved across the
models (A B C A B C ...) so drift of the machine affects each model alike. Reported per model:
session creation time, median and p90 latency, and throughput in runs per second.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from normfold import io, runtime
from normfold.errors import InputError
from normfold.verification import make_inputs

WARMUP_RUNS = 3


@dataclass
class BenchResult:
    """Latency figures of one model."""

    model: str
    provider: str
    session_seconds: float
    median_ms: float
    p90_ms: float
    runs_per_second: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark(paths, *, provider="cpu", repeats=20, shapes=None, seed=0, optimize=True) -> list[BenchResult]:
    """Times every model in `paths` on the same inputs (see module docstring)."""
    if repeats < 1:
        raise InputError("--repeats must be at least 1")
    sessions, feeds, created = [], [], []
    for path in map(Path, paths):
        model = io.load(path)
        start = time.perf_counter()
        session = runtime.make_session(path, provider=provider, optimize=optimize)
        created.append(time.perf_counter() - start)
        sessions.append(session)
        feeds.append(make_inputs(session, model, shapes=shapes, seed=seed))
    for session, feed in zip(sessions, feeds):
        for _ in range(WARMUP_RUNS):
            session.run(None, feed)
    times = [[] for _ in sessions]
    for _ in range(repeats):
        for i, (session, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            session.run(None, feed)
            times[i].append(time.perf_counter() - start)
    return [
        BenchResult(
            model=str(path),
            provider=provider,
            session_seconds=created[i],
            median_ms=float(np.median(times[i]) * 1e3),
            p90_ms=float(np.percentile(times[i], 90) * 1e3),
            runs_per_second=float(1.0 / np.median(times[i])),
            repeats=repeats,
        )
        for i, path in enumerate(paths)
    ]


def table(results: list[BenchResult]) -> list[str]:
    """A text table, with each model's median relative to the first model's."""
    base = results[0].median_ms if results else 1.0
    lines = [f"{'model':40} {'session s':>9} {'median ms':>10} {'p90 ms':>9} {'runs/s':>8} {'ratio':>6}"]
    for r in results:
        lines.append(f"{Path(r.model).name[:40]:40} {r.session_seconds:9.3f} {r.median_ms:10.3f} {r.p90_ms:9.3f} "
                     f"{r.runs_per_second:8.1f} {r.median_ms / base:6.3f}")
    return lines
