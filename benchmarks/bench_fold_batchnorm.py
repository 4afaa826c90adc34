#!/usr/bin/env python3
"""Benchmark of the fold-batchnorm pass on a ResNet-50-size model (25.5M parameters, ~103 MB).

    python benchmarks/bench_fold_batchnorm.py [--exporter dynamo|torchscript] [--repeats N]
                                              [--out benchmarks/results/fold_batchnorm.md]

What it measures (see benchmarks/README.md for the details and how to read the table):

1. Builds ResNet-50 with all 53 BatchNormalization nodes kept in the ONNX (in a child process, so
   torch never enters this process; cached in --work-dir), converts it in this process with
   fold-batchnorm and no verification, then verifies the result once, separately, and times that.
2. onnxruntime CPU latency of the folded model relative to the original: normfold.bench.benchmark
   with both models in one process and interleaved repetitions, once with graph optimizations
   disabled (ORT_DISABLE_ALL) and once fully enabled (ORT_ENABLE_ALL).
3. Conversion cost: wall time and peak RSS of child processes (the `normfold convert --no-verify`
   CLI; a Python child doing load + convert + save), against a child doing plain onnx.load +
   onnx.save of the same model, and against "import only" children (the interpreter + library
   floor). Peak RSS is the child's own ru_maxrss, read with os.wait4 on that one child by a tiny
   launcher process (the figure /usr/bin/time -v reports; see _LAUNCHER for why not from this
   process), cross-checked against the VmHWM that Python children report themselves; nothing is
   subtracted. Each child kind runs --child-repeats times, interleaved, after one discarded
   warm-up round; medians are reported.

Every ratio compares figures measured in the same run; no absolute timing is meant to be compared
across machines or runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "fold_batchnorm.md"
MODEL_NAME = "resnet50"
SEED = 0
OPSET = 18

# --- child programs -------------------------------------------------------------------------------
# The Python children end by printing one JSON line with their own VmHWM (the peak resident set of
# their address space since execve, from /proc/self/status; Linux only, else null), a cross-check
# of the ru_maxrss the launcher reads.

_HWM = '''
def _hwm_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
'''
_REPORT_HWM = '\nimport json as _json\nprint(_json.dumps({"vmhwm_mib": _hwm_mib()}))\n'

_BUILD_CHILD = """
import os, sys
from normfold.models.export import build_onnx
name, seed, opset, exporter, dest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
tmp = dest + ".partial"
build_onnx(name, seed=seed, path=tmp, opset=opset, exporter=exporter)
os.replace(tmp, dest)
"""

# Imports exactly what `normfold convert` imports on its way to converting (cli.main imports
# io and pipeline lazily; pipeline imports the passes).
_IMPORT_NORMFOLD_CHILD = _HWM + "from normfold import cli, io, pipeline, passes" + _REPORT_HWM

_IMPORT_ONNX_CHILD = _HWM + "import onnx" + _REPORT_HWM

_ONNX_ROUNDTRIP_CHILD = _HWM + """
import sys, onnx
onnx.save(onnx.load(sys.argv[1]), sys.argv[2])
""" + _REPORT_HWM

# load + convert (no verification) + save through the Python API, with each phase's time and the
# process's peak RSS so far after each phase.
_API_CHILD = _HWM + """
import json, resource, sys, time
import normfold
def peak_mib():
    hwm = _hwm_mib()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
phases = {"import": [0.0, peak_mib()]}
t = time.perf_counter(); model = normfold.load(sys.argv[1]); phases["load"] = [time.perf_counter() - t, peak_mib()]
t = time.perf_counter()
model, report = normfold.convert(model, passes=["fold-batchnorm"], verify=False)
phases["convert"] = [time.perf_counter() - t, peak_mib()]
t = time.perf_counter(); normfold.save(model, sys.argv[2], force=True); phases["save"] = [time.perf_counter() - t, peak_mib()]
print(json.dumps({"phases": phases, "applied": report.applied, "vmhwm_mib": _hwm_mib()}))
"""


def _cli_command(src: Path, dst: Path) -> list[str]:
    """The installed `normfold` console script beside this interpreter, else the same entry point."""
    script = Path(sys.executable).parent / "normfold"
    args = ["convert", str(src), "-o", str(dst), "--passes", "fold-batchnorm", "--force", "--no-verify"]
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), *args]
    return [sys.executable, "-c", "import sys; from normfold.cli import main; sys.exit(main())", *args]


# A tiny launcher between this (large) process and each measured child. On Linux a process's
# ru_maxrss survives execve and a forked child starts from its parent's resident set, so a child
# spawned straight from this process reports at least this process's peak (hundreds of MiB once
# onnxruntime sessions have run), whether read by os.wait4 here or by the child's own
# getrusage(RUSAGE_SELF). The launcher (python -S, ~10 MiB) forks and execs the child, so the
# child starts from the launcher's few MiB; it then reads the child's rusage with os.wait4 (what
# /usr/bin/time -v does) and times fork-to-exit.
_LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": wall, "maxrss": usage.ru_maxrss, "status": os.waitstatus_to_exitcode(status)}, f)
"""


def run_child(argv: list[str], *, cwd: Path) -> dict:
    """Runs one child through the launcher; returns its wall time, its own peak RSS (MiB), its stdout."""
    exe = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0])
    if exe is None:
        raise RuntimeError(f"cannot find {argv[0]!r}")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "rusage.json"
        proc = subprocess.run(
            [sys.executable, "-S", "-E", "-c", _LAUNCHER, str(result_file), exe, *argv[1:]],
            capture_output=True, text=True, errors="replace", cwd=cwd, env=_child_env(),
        )
        if proc.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"launcher for {argv[:4]}... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        usage = json.loads(result_file.read_text())
    if usage["status"] != 0:
        raise RuntimeError(f"child {argv[:4]}... exited {usage['status']}:\n{proc.stderr[-2000:]}")
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    rss_mib = usage["maxrss"] / (2**20 if sys.platform == "darwin" else 1024)
    return {"wall_s": usage["wall_s"], "rss_mib": rss_mib, "stdout": proc.stdout, "stderr": proc.stderr}


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    env.pop("PYTHONTRACEMALLOC", None)
    return env


# --- steps ----------------------------------------------------------------------------------------


def build_model(work: Path, exporter: str, rebuild: bool) -> tuple[Path, float | None]:
    """The cached ResNet-50 with its BatchNorms; builds it in a child process when missing."""
    path = work / f"{MODEL_NAME}_{exporter}_seed{SEED}_opset{OPSET}.onnx"
    if path.is_file() and not rebuild:
        return path, None
    log(f"building {MODEL_NAME} ({exporter} exporter) into {path} ...")
    result = run_child(
        [sys.executable, "-c", _BUILD_CHILD, MODEL_NAME, str(SEED), str(OPSET), exporter, str(path)], cwd=work
    )
    return path, result["wall_s"]


def convert_in_process(src: Path, dst: Path) -> dict:
    import normfold

    start = time.perf_counter()
    model = normfold.load(src)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    model, report = normfold.convert(model, passes=["fold-batchnorm"], verify=False)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    normfold.save(model, dst, force=True)
    save_s = time.perf_counter() - start
    entry = next(p for p in report.passes if p.name == "fold-batchnorm")
    return {
        "load_s": load_s,
        "convert_s": convert_s,
        "save_s": save_s,
        "applied": entry.applied,
        "skipped": len(entry.skipped),
        "ops_before": dict(report.ops_before),
        "ops_after": dict(report.ops_after),
    }


def verify_once(reference: Path, candidate: Path) -> dict:
    import normfold

    start = time.perf_counter()
    result = normfold.verify(reference, candidate)
    return {
        "seconds": time.perf_counter() - start,
        "passed": result.passed,
        "max_abs_error": result.max_abs_error,
        "max_rel_error": result.max_rel_error,
        "summary": result.summary_lines(),
    }


def ort_leftover_batchnorms(model_path: Path, scratch: Path) -> dict:
    """BatchNormalization nodes left after onnxruntime's own ORT_ENABLE_ALL optimization (it fuses
    Conv+BatchNormalization itself when it can), so the ENABLE_ALL latency ratio can be read."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    optimized = scratch / f"ort_optimized_{model_path.stem}.onnx"
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node]
    optimized.unlink(missing_ok=True)
    return {"batchnorm": ops.count("BatchNormalization"), "nodes": len(ops)}


def latency(original: Path, folded: Path, repeats: int) -> dict:
    from normfold import bench

    levels = {}
    for label, optimize in (("ORT_DISABLE_ALL", False), ("ORT_ENABLE_ALL", True)):
        log(f"latency, {label}, {repeats} interleaved repetitions ...")
        orig, fold = bench.benchmark([original, folded], provider="cpu", repeats=repeats, optimize=optimize)
        levels[label] = {"original": orig.to_dict(), "folded": fold.to_dict()}
    return levels


def conversion_cost(src: Path, work: Path, child_repeats: int) -> dict:
    kinds = {
        "import only: python + onnx": [sys.executable, "-c", _IMPORT_ONNX_CHILD],
        "import only: python + normfold": [sys.executable, "-c", _IMPORT_NORMFOLD_CHILD],
        "onnx.load + onnx.save (baseline)": [sys.executable, "-c", _ONNX_ROUNDTRIP_CHILD, str(src),
                                             str(work / "roundtrip.onnx")],
        "normfold convert --no-verify (CLI)": _cli_command(src, work / "cli_folded.onnx"),
        "normfold.load + convert + save (API)": [sys.executable, "-c", _API_CHILD, str(src),
                                                 str(work / "api_folded.onnx")],
    }
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for round_ in range(child_repeats + 1):  # round 0 warms the page cache and is discarded
        for kind, argv in kinds.items():
            result = run_child(argv, cwd=work)
            if round_:
                runs[kind].append(result)
        log(f"conversion cost: round {round_}/{child_repeats} done" + (" (warm-up)" if round_ == 0 else ""))
    summary = {}
    for kind, results in runs.items():
        hwm = [_self_reported_hwm(r["stdout"]) for r in results]
        summary[kind] = {
            "vmhwm_mib": statistics.median(hwm) if None not in hwm else None,
            "wall_s": statistics.median(r["wall_s"] for r in results),
            "wall_s_all": [r["wall_s"] for r in results],
            "rss_mib": statistics.median(r["rss_mib"] for r in results),
            "rss_mib_all": [r["rss_mib"] for r in results],
        }
    api = [json.loads(r["stdout"].strip().splitlines()[-1]) for r in runs["normfold.load + convert + save (API)"]]
    summary["api_phases"] = {
        phase: {
            "seconds": statistics.median(a["phases"][phase][0] for a in api),
            "peak_mib": statistics.median(a["phases"][phase][1] for a in api),
        }
        for phase in ("import", "load", "convert", "save")
    }
    return summary


def _self_reported_hwm(stdout: str) -> float | None:
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])["vmhwm_mib"] if lines else None
    except (ValueError, KeyError, TypeError):
        return None  # the CLI prints its own summary, not our JSON


# --- report ---------------------------------------------------------------------------------------


def machine_info() -> dict:
    import numpy
    import onnx
    import onnx_ir
    import onnxruntime

    import normfold

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    commit = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += " (uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu or "unknown",
        "cpu_count": os.cpu_count(),
        "usable_cpus": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "onnx_ir": onnx_ir.__version__,
        "numpy": numpy.__version__,
        "normfold": normfold.__version__ + (f", commit {commit}" if commit else ""),
    }


def machine_table(info: dict) -> list[str]:
    """The markdown rows describing the machine and library versions (shared by every benchmark)."""
    return [
        "| machine | |",
        "|---|---|",
        f"| date | {info['date']} |",
        f"| CPU | {info['cpu']} |",
        f"| cpu count (os.cpu_count / usable) | {info['cpu_count']} / {info['usable_cpus']} |",
        f"| platform | {info['platform']} |",
        f"| python | {info['python']} |",
        f"| onnxruntime | {info['onnxruntime']} |",
        f"| onnx / onnx-ir / numpy | {info['onnx']} / {info['onnx_ir']} / {info['numpy']} |",
        f"| normfold | {info['normfold']} |",
    ]


def render(info: dict, args, model: dict, conv: dict, verify: dict, lat: dict, cost: dict, leftover: dict) -> str:
    mb = lambda p: p.stat().st_size / 1e6  # noqa: E731
    L = []
    L.append("# fold-batchnorm benchmark: ResNet-50 on onnxruntime CPU")
    L.append("")
    L.append(f"Command: `{args.command_line}`")
    L.append("")
    L += machine_table(info)
    L.append("")
    before = conv["ops_before"]
    after = conv["ops_after"]
    L.append("## Model and conversion")
    L.append("")
    L.append(
        f"ResNet-50 (seed {SEED}, opset {OPSET}, `{args.exporter}` exporter, input 1x3x224x224): "
        f"{mb(model['original']):.1f} MB, {sum(before.values())} nodes "
        f"({before.get('BatchNormalization', 0)} BatchNormalization, {before.get('Conv', 0)} Conv). "
        f"Folded: {mb(model['folded']):.1f} MB, {sum(after.values())} nodes "
        f"({after.get('BatchNormalization', 0)} BatchNormalization, {after.get('Conv', 0)} Conv)."
    )
    L.append("")
    L.append(
        f"- fold-batchnorm applied {conv['applied']} times, skipped {conv['skipped']}; in this process: "
        f"load {conv['load_s']:.2f} s, passes {conv['convert_s']:.2f} s, save {conv['save_s']:.2f} s "
        "(single run, no verification)."
    )
    status = "**passed**" if verify["passed"] else "**FAILED**"
    L.append(
        f"- Verification (`normfold.verify(original, folded)`, run once, separately): {status}, "
        f"max abs error {verify['max_abs_error']:.3g}, max rel error {verify['max_rel_error']:.3g}, "
        f"{verify['seconds']:.2f} s."
    )
    if model.get("build_s") is not None:
        L.append(f"- Model built in a child process in {model['build_s']:.1f} s (cached for later runs).")
    L.append("")
    L.append(f"## Latency (onnxruntime CPU, batch 1, {args.repeats} interleaved repetitions after 3 warm-ups)")
    L.append("")
    L.append("| ORT graph optimization | model | session s | median ms | p90 ms | median ratio folded/original "
             "| p90 ratio folded/original |")
    L.append("|---|---|--:|--:|--:|--:|--:|")
    for level, pair in lat.items():
        o, f = pair["original"], pair["folded"]
        L.append(f"| {level} | original | {o['session_seconds']:.2f} | {o['median_ms']:.1f} | {o['p90_ms']:.1f} | | |")
        L.append(
            f"| {level} | folded | {f['session_seconds']:.2f} | {f['median_ms']:.1f} | {f['p90_ms']:.1f} "
            f"| **{f['median_ms'] / o['median_ms']:.3f}** | {f['p90_ms'] / o['p90_ms']:.3f} |"
        )
    L.append("")
    lo, lf = leftover["original"], leftover["folded"]
    L.append(
        f"After onnxruntime's own ORT_ENABLE_ALL graph optimization, the original keeps {lo['batchnorm']} of "
        f"{before.get('BatchNormalization', 0)} BatchNormalization nodes ({lo['nodes']} nodes in all) and the "
        f"folded model {lf['batchnorm']} ({lf['nodes']} nodes in all): where onnxruntime fuses Conv+BatchNorm "
        "itself, the ORT_ENABLE_ALL ratio is expected to be about 1."
    )
    L.append("")
    L.append(
        f"## Conversion cost (child processes, median of {args.child_repeats} interleaved runs after a "
        "discarded warm-up round)"
    )
    L.append("")
    base = cost["onnx.load + onnx.save (baseline)"]
    L.append("| child process | wall s | peak RSS MiB | wall / baseline | peak RSS / baseline | all wall s "
             "| all RSS MiB | VmHWM MiB (self-reported) |")
    L.append("|---|--:|--:|--:|--:|---|---|--:|")
    for kind, c in cost.items():
        if kind == "api_phases":
            continue
        L.append(
            f"| {kind} | {c['wall_s']:.2f} | {c['rss_mib']:.0f} | {c['wall_s'] / base['wall_s']:.2f} "
            f"| {c['rss_mib'] / base['rss_mib']:.2f} | {', '.join(f'{x:.2f}' for x in c['wall_s_all'])} "
            f"| {', '.join(f'{x:.0f}' for x in c['rss_mib_all'])} "
            f"| {'-' if c['vmhwm_mib'] is None else format(c['vmhwm_mib'], '.0f')} |"
        )
    L.append("")
    L.append("Phases of the API child (median; peak RSS of the process after each phase):")
    L.append("")
    L.append("| phase | seconds | peak RSS MiB so far |")
    L.append("|---|--:|--:|")
    for phase, p in cost["api_phases"].items():
        secs = "-" if phase == "import" else f"{p['seconds']:.2f}"
        L.append(f"| {phase} | {secs} | {p['peak_mib']:.0f} |")
    L.append("")
    L.append(" ".join("""
        Notes: wall time runs from fork to exit of each child, interpreter start-up included; peak
        RSS is each child's own ru_maxrss, read with os.wait4 on that child by a small launcher
        process (never inherited from this benchmark's own, much larger, process), nothing
        subtracted; Python children also report their own VmHWM as a cross-check. The "import only"
        rows are the floor every child pays. normfold's save writes atomically and
        fsyncs; onnx.save does neither. Ratios compare figures from this one run; the machine may be
        noisy, so read small latency ratios (within a few percent of 1) as "no difference"; session
        creation times are single measurements.""".split()))
    L.append("")
    return "\n".join(L)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved latency repetitions per level")
    parser.add_argument("--child-repeats", type=int, default=3, help="runs of each conversion-cost child")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown results file")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "normfold-bench",
                        help="where the built model is cached and scratch outputs go")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached model")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.child_repeats < 1:
        parser.error("--repeats and --child-repeats must be at least 1")
    args.command_line = " ".join(["python", os.path.relpath(__file__, Path.cwd()) if argv is None else "bench",
                                  *(sys.argv[1:] if argv is None else argv)])

    started = time.perf_counter()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    try:
        original, build_s = build_model(work, args.exporter, args.rebuild)
        folded = scratch / "folded.onnx"
        log("converting in process (fold-batchnorm, no verification) ...")
        conv = convert_in_process(original, folded)
        log("verifying once ...")
        verify = verify_once(original, folded)
        leftover = {"original": ort_leftover_batchnorms(original, scratch),
                    "folded": ort_leftover_batchnorms(folded, scratch)}
        lat = latency(original, folded, args.repeats)
        cost = conversion_cost(original, scratch, args.child_repeats)
        info = machine_info()
        text = render(info, args, {"original": original, "folded": folded, "build_s": build_s},
                      conv, verify, lat, cost, leftover)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text += f"\nTotal benchmark time: {time.perf_counter() - started:.0f} s.\n"
    print(text)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log(f"wrote {out}")
    return 0 if verify["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
