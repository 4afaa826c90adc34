#!/usr/bin/env python3
"""Where a model's norms cost time on onnxruntime CPU: a per-op-type kernel profile of the original, the
no-norm bound, normfold's conversions and onnxruntime's own offline optimizer, for the runtime suite's
models (bench_peers: deit_tiny, gpt2_small, resnet50).

    python benchmarks/kernel_profile.py [--model deit_tiny] [--no-spin] [--runs 20] [--threads 2]
                                        [--latency-repeats N] [--form-repeats 40] [--variants original,...]
                                        [--extra LABEL=MODEL.onnx] [--out benchmarks/results/kernel_profile_MODEL.md]

1. Builds (or reuses, cached in --work-dir) the model of bench_peers (--model) and makes the variants
   (MODEL_VARIANTS, or --variants): the no-norm bound (every norm's output rewired to its input, as
   bench_peers makes it), `normfold convert --no-verify` with the default passes (target ort and onnx),
   with layernorm-to-rmsnorm and layernorm-to-crmsnorm (target ort), the approximate remove-layernorm
   (calibrated on bench_peers' seeded batches), the peers as bench_peers runs them (ort-offline by
   default; ort-transformers, onnxsim, onnxslim, onnxoptimizer on request), onnxslim run on normfold's
   output (the two compose: normfold rewrites the norms, onnxslim folds what is constant), and, for DeiT,
   two exact experiments on normfold's outputs
   (fuse_residual_adds, restore_unit_gamma); every variant but the bound is checked with
   normfold.verify (the model's tolerance class).
2. Saves onnxruntime's ORT_ENABLE_ALL graph of each (SessionOptions.optimized_model_filepath) and
   counts its op types: what onnxruntime fused (Gemm from MatMul+Add, Skip*Norm, Gelu, Attention,
   Conv+BatchNorm, ...); variants whose optimized graphs have the same op counts run the same kernels.
3. Profiles every variant with SessionOptions.enable_profiling, ORT_ENABLE_ALL, `--threads` intra-op
   threads, one session each, a warm-up round, then `--runs` interleaved rounds (A B C A B C ...).
   Per run: the kernel time of each op type (sum of the `*_kernel_time` events inside that
   `model_run`), their total, and the `model_run` duration; the table shows medians over runs.
   "Outside kernels" is model_run minus the kernel total: the executor's own time (allocation,
   scheduling, the profiler itself).
4. Optionally (--latency-repeats), interleaved end-to-end latency without the profiler (the same
   thread count, plus an A/A second session of the original): the ratio every other benchmark reports.
   Every session uses onnxruntime's default spinning thread pool unless --no-spin.
5. For the transformers, norm emission forms timed alone (--form-repeats): 24 residual blocks
   (s = x + d; y = norm(s)) at the model's stream shape in each spelling normfold could emit
   (LayerNormalization, SimplifiedLayerNormalization, Skip*LayerNormalization with the sum as output 3,
   opset-23 RMSNormalization, the decomposed forms), checked against float64 numpy and timed interleaved.

Every figure is from one run on a shared machine: compare rows of one table, not across runs. With
onnxruntime's default spinning threads, interleaved sessions on a small shared machine slow each other
(benchmarks/results/kernel_profile_deit_tiny.md); --no-spin gives the steadier figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_layernorm_to_rmsnorm as ln_bench  # noqa: E402
from normfold import bench, runtime  # noqa: E402
import bench_peers  # noqa: E402
from bench_fold_batchnorm import log, machine_info, machine_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODEL = "deit_tiny"
"""The bench_peers model being profiled (set by --model)."""
NORM_OPS = bench_peers.NORM_OPS
SHAPED_OPS = ("Add",)
"""Op types whose profile rows are split by input shapes (residual, bias and mask Adds differ)."""

# key -> (row label, maker, passes or peer, target); maker "original", "no-norm" (bench_peers' no-norm
# bound: strip_layernorms), "convert" (the normfold CLI), "peer" (benchmarks/peers.py) or an experiment.
VARIANTS = {
    "original": ("original", "original", None, None),
    "no-norm": ("no-norm bound", "no-norm", None, None),
    "default-ort": ("normfold default, target ort", "convert", None, "ort"),
    "rmsnorm-ort": ("layernorm-to-rmsnorm, target ort", "convert", "layernorm-to-rmsnorm", "ort"),
    "default-onnx": ("normfold default, target onnx", "convert", None, "onnx"),
    "crmsnorm-ort": ("layernorm-to-crmsnorm, target ort", "convert", "layernorm-to-crmsnorm", "ort"),
    "ort-offline": ("peer: ort-offline", "peer", "ort-offline", None),
    "ort-transformers": ("peer: ort-transformers", "peer", "ort-transformers", None),
    "onnxsim": ("peer: onnxsim", "peer", "onnxsim", None),
    "onnxslim": ("peer: onnxslim", "peer", "onnxslim", None),
    "onnxoptimizer": ("peer: onnxoptimizer", "peer", "onnxoptimizer", None),
    "default-ort+onnxslim": ("normfold default, target ort, then onnxslim", "then-peer", "onnxslim", None),
    "remove-ln": ("remove-layernorm (approximate, calibrated)", "remove-ln", None, None),
    "onnx-ones": ("experiment: default onnx + Mul by ones after each decomposed norm", "ones", None, "onnx"),
    "skip-ort": ("experiment: default ort + Add fused (SkipSimplifiedLayerNormalization)", "skip", None, "ort"),
}
MODEL_VARIANTS = {
    "deit_tiny": ["original", "no-norm", "default-ort", "rmsnorm-ort", "default-onnx", "onnx-ones", "skip-ort"],
    "gpt2_small": ["original", "no-norm", "default-ort", "default-onnx", "rmsnorm-ort", "crmsnorm-ort",
                   "remove-ln", "ort-offline"],
    "resnet50": ["original", "no-norm", "default-ort", "default-onnx", "ort-offline"],
}
"""The default --variants of each model."""


# --- variants --------------------------------------------------------------------------------------


def make_variants(original: Path, scratch: Path, keys: list[str], remake: bool) -> dict[str, Path]:
    """row label -> model file; conversions run as `normfold convert` children (cached unless `remake`)."""
    paths = {}
    for key in keys:
        label, maker, passes, target = VARIANTS[key]
        if maker == "original":
            paths[label] = original
            continue
        dst = scratch / f"{MODEL}_{key}.onnx"
        if remake or not dst.is_file():
            log(f"making {label} ...")
            if maker == "no-norm":
                ln_bench.strip_layernorms(original, dst, op_types=bench_peers.MODELS[MODEL]["norm_ops"])
            elif maker == "ones":
                base = make_variants(original, scratch, ["default-onnx"], remake)["normfold default, target onnx"]
                log(f"{label}: {restore_unit_gamma(base, dst)} norms given a Mul by ones")
            elif maker == "remove-ln":
                argv = bench_peers.cli("convert", str(original), "-o", str(dst), "--passes", "remove-layernorm",
                                       "--approximate", "--calibration",
                                       str(bench_peers.calibration_file(original, scratch)), "--no-verify", "--force")
                made = bench_peers.make_variant(argv, dst, scratch)
                if "error" in made:
                    raise SystemExit(f"{label}: {made['error']}")
            elif maker in ("peer", "then-peer"):  # a peer on the original, or on normfold's default (ort)
                source = original if maker == "peer" else make_variants(
                    original, scratch, ["default-ort"], remake)["normfold default, target ort"]
                spec = bench_peers.MODELS[MODEL]["transformers"]
                argv = [sys.executable, str(Path(bench_peers.peer_tools.__file__).resolve()), passes, str(source),
                        str(dst), "--model-type", spec["model_type"], "--heads", str(spec["heads"]),
                        "--hidden", str(spec["hidden"])]
                made = bench_peers.make_variant(argv, dst, scratch)
                if "error" in made:
                    raise SystemExit(f"{label}: {made['error']}")
            elif maker == "skip":
                base = make_variants(original, scratch, ["default-ort"], remake)["normfold default, target ort"]
                log(f"{label}: fused {fuse_residual_adds(base, dst)} residual Adds")
            else:
                argv = bench_peers.cli("convert", str(original), "-o", str(dst), "--target", target, "--no-verify",
                                       "--force", *(["--passes", passes] if passes else []))
                made = bench_peers.make_variant(argv, dst, scratch)
                if "error" in made:
                    raise SystemExit(f"{label}: {made['error']}")
        paths[label] = dst
    return paths


def shapes_of(model) -> dict[str, list]:
    """Value name -> dims (int or symbol): onnxruntime's symbolic shape inference (it knows its own
    ops, SimplifiedLayerNormalization included), else onnx's (standard ops only)."""
    from onnx import shape_inference
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        graph = SymbolicShapeInference.infer_shapes(model, auto_merge=True).graph
    except Exception:  # it fails on some exports' Constant nodes; onnx's inference does those
        graph = shape_inference.infer_shapes(model).graph
    return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in [*graph.value_info, *graph.input] if v.type.tensor_type.HasField("shape")}


def fuse_residual_adds(src: Path, dst: Path) -> int:
    """The experiment: every SimplifiedLayerNormalization that reads an Add of two same-shape activations
    becomes SkipSimplifiedLayerNormalization(a, b, gamma), its output 3 the sum for the Add's other
    readers (exact: the same float32 sum, then the same norm). Returns how many were fused."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    shapes = shapes_of(model)
    constants = {t.name for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    dropped, fused = set(), {}  # by id(node): names may be empty
    for norm in model.graph.node:
        add = producer.get(norm.input[0]) if norm.op_type == "SimplifiedLayerNormalization" else None
        if add is None or add.op_type != "Add" or id(add) in dropped or set(add.input) & constants:
            continue  # not a residual sum, or one already fused into another norm
        if shapes.get(add.input[0]) is None or shapes.get(add.input[0]) != shapes.get(add.input[1]):
            continue  # a broadcasting Add: Skip*Norm needs equal shapes
        epsilon = next(a.f for a in norm.attribute if a.name == "epsilon")
        fused[id(norm)] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]], name=norm.name, domain="com.microsoft", epsilon=epsilon)
        dropped.add(id(add))
    nodes = [fused.get(id(n), n) for n in model.graph.node if id(n) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(topological(nodes, {i.name for i in model.graph.input} | constants))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return len(fused)


def restore_unit_gamma(src: Path, dst: Path) -> int:
    """The experiment: each float32 decomposed RMSNorm left without its gamma Mul (Pow, ReduceMean,
    Add, Sqrt, Div(x, rms), the Div read by no Mul) gets a Mul by ones after its Div, the pattern
    onnxruntime fuses into SimplifiedLayerNormalization (exact: x * 1 == x). Returns how many."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    width = {name: dims[-1] for name, dims in shapes_of(model).items() if dims and isinstance(dims[-1], int)}
    producer = {out: n for n in model.graph.node for out in n.output}
    multiplied = {i for n in model.graph.node if n.op_type == "Mul" for i in n.input}
    chain = ("Sqrt", "Add", "ReduceMean", "Pow")

    def is_rms(div) -> bool:
        node = div
        for op in chain:
            node = producer.get(node.input[0] if node is not div else node.input[1])
            if node is None or node.op_type != op:
                return False
        return node.input[0] == div.input[0]

    nodes, count = [], 0
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != "Div" or node.output[0] in multiplied or not width.get(node.output[0]):
            continue
        if not is_rms(node):
            continue
        out, count = node.output[0], count + 1
        ones = f"{out}/unit_gamma"
        model.graph.initializer.append(numpy_helper.from_array(np.ones(width[out], np.float32), ones))
        node.output[0] = f"{out}/normalized"
        nodes.append(helper.make_node("Mul", [node.output[0], ones], [out], name=f"{node.name}/unit_gamma"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return count


def topological(nodes: list, known: set[str]) -> list:
    """`nodes` in a stable order where every input is produced before it is read (a sum now comes out
    of the fused norm, which may sit after a reader of the Add it replaces)."""
    known, ordered, pending = known | {""}, [], list(nodes)
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise RuntimeError("the graph has a cycle or an undefined input")
        for n in ready:
            known.update(n.output)
        ordered += ready
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    return ordered


SPINNING = True
"""onnxruntime's default: idle intra-op threads spin before they sleep. --no-spin turns it off
(session.intra_op.allow_spinning = 0): on a shared machine, spinning threads that lose their core
to another process make every multi-threaded kernel wait, and the interleaved sessions' spinning
pools compete with the one that runs."""


def session_options(threads: int, *, profile_prefix: Path | None = None, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not SPINNING:
        options.add_session_config_entry(runtime.SPINNING_KEY, "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return options


def optimized_ops(path: Path, scratch: Path, threads: int) -> collections.Counter:
    """Op types (domain-qualified when not ai.onnx) of onnxruntime's ORT_ENABLE_ALL graph on CPU."""
    import onnx
    import onnxruntime as ort

    dst = scratch / f"{path.stem}.ort_optimized.onnx"
    ort.InferenceSession(str(path), sess_options=session_options(threads, optimized=dst),
                         providers=["CPUExecutionProvider"])
    graph = onnx.load(str(dst), load_external_data=False).graph
    return collections.Counter(op_name(n.domain, n.op_type) for n in graph.node)


def op_name(domain: str, op_type: str) -> str:
    return op_type if domain in ("", "ai.onnx") else f"{op_type} ({domain.removeprefix('com.microsoft') or 'ms'})"


# --- profile ---------------------------------------------------------------------------------------


def parse_trace(events: list[dict], skip: int = 1) -> list[dict]:
    """Per model_run after the first `skip`: {"run_ms", "kernel_ms", "ops": {op: ms}, "count": {op: n}}."""
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[skip:]
    runs = [{"run_ms": (end - start) / 1e3, "kernel_ms": 0.0, "ops": collections.Counter(),
             "count": collections.Counter()} for start, end in windows]
    starts = [start for start, _ in windows]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = _bisect(starts, e["ts"])
        if i < 0 or e["ts"] > windows[i][1]:
            continue
        op = e.get("args", {}).get("op_name", "?")
        if op in SHAPED_OPS:
            op = f"{op} {shape_signature(e['args'])}"
        ms = e["dur"] / 1e3
        runs[i]["ops"][op] += ms
        runs[i]["count"][op] += 1
        runs[i]["kernel_ms"] += ms
    return runs


def shape_signature(args: dict) -> str:
    """'8x197x192 + 192'-style input shapes of a profiled node (its args' input_type_shape)."""
    shapes = []
    for item in args.get("input_type_shape", []):
        for dims in item.values():
            shapes.append("x".join(map(str, dims)) or "scalar")
    return " + ".join(shapes)


def _bisect(starts: list[int], ts: int) -> int:
    import bisect

    return bisect.bisect_right(starts, ts) - 1


def profile(paths: dict[str, Path], runs: int, threads: int, scratch: Path) -> dict[str, list[dict]]:
    """Interleaved profiled runs of every variant (module docstring, step 3): label -> per-run figures."""
    import onnxruntime as ort

    from normfold import io
    from normfold.verification import make_inputs

    sessions = {}
    for i, (label, path) in enumerate(paths.items()):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                       sess_options=session_options(threads, profile_prefix=scratch / f"trace{i}"))
        sessions[label] = (session, make_inputs(session, io.load(path), seed=0))
    log(f"profiling {len(sessions)} variants: 1 warm-up + {runs} interleaved rounds, {threads} threads ...")
    for r in range(runs + 1):
        for session, feed in rotated(list(sessions.values()), r):
            session.run(None, feed)
    out = {}
    for label, (session, _) in sessions.items():
        trace = Path(session.end_profiling())
        out[label] = parse_trace(json.loads(trace.read_text()))
        trace.unlink(missing_ok=True)
    return out


def check(original: Path, paths: dict[str, Path]) -> dict[str, str]:
    """normfold.verify of every variant but the bound against the original (the model's fp32 tolerances)."""
    import normfold

    out = {}
    for label, path in paths.items():
        if path == original or "no-norm" in label or "approximate" in label:
            continue  # a different function
        r = normfold.verify(original, path, tolerance_class=bench_peers.MODELS[MODEL]["tolerance_class"])
        out[label] = f"{'yes' if r.passed else '**NO**'} ({r.max_abs_error:.1g})"
    return out


def rotated(items: list, r: int) -> list:
    """Round r's order of `items`, as normfold.bench interleaves: no item always runs right after the
    same other one (whose idle thread pool may still be spinning on the cores)."""
    return [items[i] for i in bench.rotated(len(items), r)]


def summarize(per_run: list[dict]) -> dict:
    """Medians over runs: run, kernel total, outside kernels, each op type's kernel ms; op counts per run."""
    ops = sorted({op for r in per_run for op in r["ops"]})
    return {
        "runs": len(per_run),
        "run_ms": statistics.median(r["run_ms"] for r in per_run),
        "kernel_ms": statistics.median(r["kernel_ms"] for r in per_run),
        "outside_ms": statistics.median(r["run_ms"] - r["kernel_ms"] for r in per_run),
        "ops": {op: statistics.median(r["ops"].get(op, 0.0) for r in per_run) for op in ops},
        "count": {op: per_run[0]["count"].get(op, 0) for op in ops},
    }


def latency(paths: dict[str, Path], repeats: int, threads: int) -> dict[str, dict]:
    """normfold.bench-style interleaved latency without the profiler; plus an A/A second session."""
    import numpy as np
    import onnxruntime as ort

    from normfold import io
    from normfold.verification import make_inputs

    labels = ["original (A/A)", *paths]
    files = {"original (A/A)": paths["original"], **paths}
    sessions = {}
    for label in labels:
        s = ort.InferenceSession(str(files[label]), sess_options=session_options(threads),
                                 providers=["CPUExecutionProvider"])
        sessions[label] = (s, make_inputs(s, io.load(files[label]), seed=0))
    log(f"latency: {len(labels)} sessions, 1 warm-up + {repeats} interleaved repetitions ...")
    times = {label: [] for label in labels}
    for rep in range(repeats + 1):
        for label in rotated(labels, rep):
            s, feed = sessions[label]
            start = time.perf_counter()
            s.run(None, feed)
            if rep:
                times[label].append(time.perf_counter() - start)
    base = float(np.median(times["original"]))
    return {label: {"median_ms": float(np.median(t)) * 1e3, "ratio": float(np.median(t)) / base,
                    "p90_ratio": float(np.percentile(t, 90)) / float(np.percentile(times["original"], 90))}
            for label, t in times.items()}


# --- emission forms, timed alone ------------------------------------------------------------------

FORM_SHAPES = {"deit_tiny": (8, 197, 192), "gpt2_small": (1, 512, 768)}
"""Each transformer's residual stream: DeiT-Tiny at batch 8, 197 tokens of width 192; GPT-2-small, one
sequence of 512 tokens of width 768."""
FORM_BLOCKS = 24
"""Residual blocks per form model: s = x + d; y = norm(s); the next block's (x, d) is (s, y)."""

FORMS = {
    "Add + LayerNormalization (the original)": "ln",
    "Add + SimplifiedLayerNormalization (normfold, target ort)": "sln",
    "SkipSimplifiedLayerNormalization (Add fused, sum as output 3)": "skip_sln",
    "SkipLayerNormalization (Add fused, sum as output 3)": "skip_ln",
    "Add + RMSNormalization (opset 23)": "rms23",
    "Add + Pow/ReduceMean/Add/Sqrt/Div (normfold, target onnx, affine folded)": "decomposed",
    "Add + Pow/ReduceMean/Add/Sqrt/Div/Mul gamma (target onnx, affine kept)": "decomposed_gamma",
    "Add alone (the floor: no norm; the next block reads the same d)": "add",
}


def form_model(kind: str, shape: tuple[int, ...], epsilon: float = 1e-6) -> bytes:
    """FORM_BLOCKS residual blocks of one emission form (FORMS), gamma and beta seeded, as a model."""
    import numpy as np
    from onnx import helper, numpy_helper

    width = shape[-1]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, width).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, width).astype(np.float32), "beta"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(epsilon, np.float32), "eps"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes, x = [], "x"
    for i in range(FORM_BLOCKS):
        d, s, y = ("d" if i == 0 else f"y{i - 1}"), f"s{i}", f"y{i}"
        n = lambda op, ins, outs, **kw: nodes.append(helper.make_node(op, ins, outs, **kw))  # noqa: E731
        if kind in ("skip_sln", "skip_ln"):
            op = "SkipSimplifiedLayerNormalization" if kind == "skip_sln" else "SkipLayerNormalization"
            n(op, [x, d, "gamma"] + (["beta"] if kind == "skip_ln" else []), [y, "", "", s],
              domain="com.microsoft", epsilon=epsilon)
        else:
            n("Add", [x, d], [s])
            if kind == "ln":
                n("LayerNormalization", [s, "gamma", "beta"], [y], axis=-1, epsilon=epsilon)
            elif kind == "sln":
                n("SimplifiedLayerNormalization", [s, "gamma"], [y], axis=-1, epsilon=epsilon, stash_type=1)
            elif kind == "rms23":
                n("RMSNormalization", [s, "gamma"], [y], axis=-1, epsilon=epsilon)
            elif kind.startswith("decomposed"):
                n("Pow", [s, "two"], [f"sq{i}"])
                n("ReduceMean", [f"sq{i}", "axes"], [f"ms{i}"], keepdims=1)
                n("Add", [f"ms{i}", "eps"], [f"mse{i}"])
                n("Sqrt", [f"mse{i}"], [f"rms{i}"])
                n("Div", [s, f"rms{i}"], [f"n{i}" if kind == "decomposed_gamma" else y])
                if kind == "decomposed_gamma":
                    n("Mul", [f"n{i}", "gamma"], [y])
            elif kind == "add":
                n("Identity", [d], [y])
        x = s
    nodes.append(helper.make_node("Add", [x, f"y{FORM_BLOCKS - 1}"], ["out"]))
    info = lambda name: helper.make_tensor_value_info(name, 1, list(shape))  # noqa: E731
    graph = helper.make_graph(nodes, "forms", [info("x"), info("d")], [info("out")], inits)
    opset = 23 if kind == "rms23" else 18
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return model.SerializeToString()


def form_reference(kind: str, x, d, gamma, beta, epsilon: float = 1e-6):
    """The forms' function in float64 (numpy): what each form model must compute."""
    import numpy as np

    x, d = x.astype(np.float64), d.astype(np.float64)
    for _ in range(FORM_BLOCKS):
        s = x + d
        if kind in ("ln", "skip_ln"):
            c = s - s.mean(-1, keepdims=True)
            y = c / np.sqrt((c * c).mean(-1, keepdims=True) + epsilon) * gamma + beta
        elif kind == "add":
            y = d
        else:
            y = s / np.sqrt((s * s).mean(-1, keepdims=True) + epsilon)
            y = y if kind == "decomposed" else y * gamma
        x, d = s, y
    return x + d


def time_forms(shape: tuple[int, ...], threads: int, repeats: int) -> dict[str, dict]:
    """Every emission form (FORMS) on onnxruntime CPU, ORT_ENABLE_ALL, interleaved: its median ms per
    block, the op types onnxruntime runs, and its error against form_reference (fp32 renorm tolerance)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal(shape, dtype=np.float32), "d": rng.standard_normal(shape, dtype=np.float32)}
    sessions, out = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kind in FORMS.items():
            proto = form_model(kind, shape)
            inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load_from_string(proto).graph.initializer}
            optimized = Path(tmp) / f"{kind}.onnx"
            try:
                session = ort.InferenceSession(proto, sess_options=session_options(threads, optimized=optimized),
                                               providers=["CPUExecutionProvider"])
            except Exception as exc:  # an op this onnxruntime lacks (RMSNormalization before opset 23 support)
                out[label] = {"error": str(exc).splitlines()[0][-200:]}
                continue
            ref = form_reference(kind, feed["x"], feed["d"], inits["gamma"], inits["beta"])
            got = session.run(None, feed)[0]
            scale = max(1.0, float(np.sqrt(np.mean(ref * ref))))
            err = np.abs(got - ref)
            ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
            out[label] = {"kind": kind, "max_abs": float(err.max()),
                          "within": bool(np.all(err <= 1e-4 * scale + 1e-4 * np.abs(ref))),
                          "ops": {op: n // FORM_BLOCKS for op, n in ops.items() if n >= FORM_BLOCKS}}
            sessions[label] = session
        log(f"emission forms: {len(sessions)} models of {FORM_BLOCKS} blocks at {shape}, "
            f"{repeats} interleaved runs ...")
        times = {label: [] for label in sessions}
        for rep in range(repeats + 1):
            for label in rotated(list(sessions), rep):
                start = time.perf_counter()
                sessions[label].run(None, feed)
                if rep:
                    times[label].append(time.perf_counter() - start)
    for label, t in times.items():
        out[label]["block_us"] = statistics.median(t) / FORM_BLOCKS * 1e6
    return out


# --- report ----------------------------------------------------------------------------------------


def implied(summaries: dict[str, dict]) -> dict[str, dict]:
    """Per variant: the op types (Adds by shape) whose node count differs from the original's (what
    the rewrite and onnxruntime's fusions changed), their kernel-time delta, and the latency ratio it
    implies, 1 + delta / original kernel time. Op types run as often in both are left out: their
    delta is the same work timed twice, i.e. noise."""
    base = summaries["original"]
    out = {}
    for label, s in summaries.items():
        changed = sorted(op for op in set(s["count"]) | set(base["count"])
                         if s["count"].get(op, 0) != base["count"].get(op, 0))
        delta = sum(s["ops"].get(op, 0.0) - base["ops"].get(op, 0.0) for op in changed)
        out[label] = {"changed": changed, "delta_ms": delta, "ratio": 1 + delta / base["kernel_ms"]}
    return out


def render_implied(summaries: dict[str, dict], lat: dict | None) -> list[str]:
    base = summaries["original"]
    norm = sum(ms for op, ms in base["ops"].items() if op.split(" ")[0] in NORM_OPS)
    L = ["## What the rewrites change, from the profile", "",
         f"The original's norm kernels take {norm:.1f} ms of {base['kernel_ms']:.1f} ms of kernel time per run "
         f"({100 * norm / base['kernel_ms']:.1f}%): removing every norm and nothing else can at best reach "
         f"{1 - norm / base['kernel_ms']:.3f}. \"Implied ratio\" is 1 + (kernel-time delta of the op types "
         "whose node count changed) / (original kernel time): the rewrite's own effect, without the noise of "
         "the op types it left alone.", "",
         "| variant | op types whose count changed | their delta ms | implied ratio | kernel ratio |"
         + (" latency ratio |" if lat else ""), "|---|---|--:|--:|--:|" + ("--:|" if lat else "")]
    for label, v in implied(summaries).items():
        if label == "original":
            continue
        ratio = summaries[label]["kernel_ms"] / base["kernel_ms"]
        line = (f"| {label} | {', '.join(v['changed'])} | {v['delta_ms']:+.1f} | **{v['ratio']:.3f}** "
                f"| {ratio:.3f} |")
        L.append(line + (f" {lat[label]['ratio']:.3f} |" if lat else ""))
    L.append("")
    return L


def render_forms(forms: dict[str, dict], shape: tuple[int, ...], threads: int, repeats: int) -> list[str]:
    floor = forms.get(next(label for label, kind in FORMS.items() if kind == "add"), {}).get("block_us")
    L = [f"## Norm emission forms timed alone ({FORM_BLOCKS} residual blocks at {'x'.join(map(str, shape))}, "
         f"{threads} threads, ORT_ENABLE_ALL, {repeats} interleaved runs)", "",
         "Each model chains the Pre-LN residual pattern: s = x + d; y = norm(s); the next block reads (s, y). "
         "\"us per block\" is the median run time over the blocks; \"norm us\" subtracts the Add-alone "
         "floor: what the norm itself costs, Add fusion included. \"runs as\" is onnxruntime's optimized "
         "graph per block; \"equivalent\" checks the output against float64 numpy at the fp32 renorm "
         "tolerance.", "",
         "| form | runs as (per block) | equivalent (max abs) | us per block | norm us |", "|---|---|---|--:|--:|"]
    for label, f in forms.items():
        if "error" in f:
            L.append(f"| {label} | **onnxruntime cannot run it**: {f['error']} | | | |")
            continue
        ops = ", ".join(f"{op}" + (f" x{n}" if n > 1 else "") for op, n in f["ops"].items())
        norm = "" if floor is None or f["kind"] == "add" else f"{f['block_us'] - floor:.0f}"
        L.append(f"| {label} | {ops} | {'yes' if f['within'] else '**no**'} ({f['max_abs']:.1g}) "
                 f"| {f['block_us']:.0f} | {norm} |")
    L.append("")
    return L


def render(info: dict, args, summaries: dict[str, dict], graphs: dict[str, collections.Counter],
           lat: dict | None, forms: dict | None, checks: dict[str, str]) -> str:
    labels = list(summaries)
    base = summaries["original"]
    L = [f"# {bench_peers.MODELS[MODEL]['title']} on onnxruntime CPU: where the norms' time goes (kernel profile)",
         "",
         f"Command: `{args.command_line}`", ""]
    L += machine_table(info)
    L.append(f"| load average (1 min) at start / end | {args.load_start} / {ln_bench._load()} |")
    idle = "spin (onnxruntime default)" if SPINNING else "sleep (--no-spin)"
    L.append(f"| intra-op threads | {args.threads}, idle threads {idle} |")
    L.append("")
    spec = bench_peers.MODELS[MODEL]
    L.append(f"Model: {spec.get('describe', spec['title'])}. ORT_ENABLE_ALL, CPU provider, "
             f"{base['runs']} profiled interleaved runs per variant after a warm-up round; every figure is a "
             "median over runs, in ms per run.")
    L.append("")
    L.append("## Totals")
    L.append("")
    L.append("| variant | equivalent (max abs) | run ms (profiled) | kernel ms | outside kernels ms | norm kernels ms "
             "| kernel ratio | run ratio |"
             + (" latency ms (no profiler) | latency ratio | p90 ratio |" if lat else ""))
    L.append("|---|---|--:|--:|--:|--:|--:|--:|" + ("--:|--:|--:|" if lat else ""))
    rows = (["original (A/A)"] if lat else []) + labels
    for label in rows:
        s = summaries.get(label)
        lt = lat.get(label) if lat else None
        if s is None:
            L.append(f"| {label} | | | | | | | | {lt['median_ms']:.1f} | {lt['ratio']:.3f} | {lt['p90_ratio']:.3f} |")
            continue
        norm = sum(ms for op, ms in s["ops"].items() if op.split(" ")[0] in NORM_OPS)
        equivalent = "reference" if label == "original" else checks.get(label, "a different function")
        line = (f"| {label} | {equivalent} | {s['run_ms']:.1f} | {s['kernel_ms']:.1f} | {s['outside_ms']:.1f} "
                f"| {norm:.1f} "
                f"| {s['kernel_ms'] / base['kernel_ms']:.3f} | {s['run_ms'] / base['run_ms']:.3f} |")
        if lt:
            line += f" {lt['median_ms']:.1f} | {lt['ratio']:.3f} | {lt['p90_ratio']:.3f} |"
        L.append(line)
    L.append("")
    L += render_implied(summaries, lat)
    L.append("## Kernel time per op type (ms per run, count per run; delta against the original)")
    L.append("")
    ops = sorted({op for s in summaries.values() for op in s["ops"]}, key=lambda op: -base["ops"].get(op, 0.0))
    L.append("| op type | " + " | ".join(labels) + " |")
    L.append("|---|" + "--:|" * len(labels))
    for op in ops:
        cells = []
        for label in labels:
            s = summaries[label]
            ms, n = s["ops"].get(op, 0.0), s["count"].get(op, 0)
            cell = f"{ms:.1f} ({n})" if n else "-"
            if label != "original":
                delta = ms - base["ops"].get(op, 0.0)
                cell += f" [{delta:+.1f}]"
            cells.append(cell)
        L.append(f"| {op} | " + " | ".join(cells) + " |")
    totals = [f"{summaries[label]['kernel_ms']:.1f}" + ("" if label == "original" else
              f" [{summaries[label]['kernel_ms'] - base['kernel_ms']:+.1f}]") for label in labels]
    L.append("| **all kernels** | " + " | ".join(totals) + " |")
    L.append("")
    L.append("## onnxruntime's optimized graph (ORT_ENABLE_ALL, SessionOptions.optimized_model_filepath)")
    L.append("")
    L.append("Op counts; only the op types whose count differs between variants, then the node total.")
    L.append("")
    all_ops = sorted({op for g in graphs.values() for op in g})
    differing = [op for op in all_ops if len({graphs[label].get(op, 0) for label in labels}) > 1]
    L.append("| op type | " + " | ".join(labels) + " |")
    L.append("|---|" + "--:|" * len(labels))
    for op in differing:
        L.append(f"| {op} | " + " | ".join(str(graphs[label].get(op, 0)) for label in labels) + " |")
    L.append("| **nodes** | " + " | ".join(str(sum(graphs[label].values())) for label in labels) + " |")
    L.append("")
    if forms:
        L += render_forms(forms, FORM_SHAPES[MODEL], args.threads, args.form_repeats)
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_tiny", choices=sorted(MODEL_VARIANTS), help="bench_peers' model")
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)} (default: the "
                        "model's MODEL_VARIANTS)")
    parser.add_argument("--runs", type=int, default=20, help="profiled interleaved runs per variant")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--latency-repeats", type=int, default=0,
                        help="interleaved unprofiled latency repetitions (0: none)")
    parser.add_argument("--no-spin", action="store_true",
                        help="idle onnxruntime threads sleep instead of spinning (steadier on a shared machine)")
    parser.add_argument("--form-repeats", type=int, default=40,
                        help="interleaved runs of the emission-form models (0: skip that section)")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=MODEL.onnx",
                        help="also profile this model file under this row label (repeatable)")
    parser.add_argument("--out", type=Path, help="markdown results file (default: "
                        "benchmarks/results/kernel_profile_MODEL.md)")
    parser.add_argument("--json", type=Path, help="also write the per-run figures here")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "normfold-bench",
                        help="model cache (shared with bench_peers) and variants")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached model and remake the variants")
    args = parser.parse_args(argv)
    global MODEL, SPINNING
    MODEL = args.model
    args.out = args.out or RESULTS / f"kernel_profile_{MODEL}.md"
    keys = [v for v in (args.variants or ",".join(MODEL_VARIANTS[MODEL])).split(",") if v]
    if "original" not in keys or set(keys) - set(VARIANTS):
        parser.error(f"--variants: a subset of {', '.join(VARIANTS)} that includes 'original'")
    if args.runs < 1 or args.threads < 1 or args.latency_repeats < 0 or args.form_repeats < 0:
        parser.error("--runs and --threads must be at least 1, --latency-repeats at least 0")
    SPINNING = not args.no_spin
    args.command_line = " ".join(["python", "benchmarks/kernel_profile.py", *(sys.argv[1:] if argv is None else argv)])
    args.load_start = ln_bench._load()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / "kernel_profile"
    scratch.mkdir(exist_ok=True)
    original = bench_peers.build(MODEL, work, args.rebuild)
    paths = make_variants(original, scratch, keys, args.rebuild)
    for extra in args.extra:
        label, _, path = extra.partition("=")
        if not path or not Path(path).is_file():
            parser.error(f"--extra {extra!r}: give LABEL=MODEL.onnx with an existing file")
        paths[label] = Path(path)
    checks = check(original, paths)
    graphs = {label: optimized_ops(path, scratch, args.threads) for label, path in paths.items()}
    per_run = profile(paths, args.runs, args.threads, scratch)
    summaries = {label: summarize(r) for label, r in per_run.items()}
    lat = latency(paths, args.latency_repeats, args.threads) if args.latency_repeats else None
    forms = (time_forms(FORM_SHAPES[MODEL], args.threads, args.form_repeats)
             if args.form_repeats and MODEL in FORM_SHAPES else None)
    text = render(machine_info(), args, summaries, graphs, lat, forms, checks)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"per_run": per_run, "latency": lat, "graphs": graphs}, default=dict))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
