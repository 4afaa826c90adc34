#!/usr/bin/env python3
"""Benchmark of the layernorm-to-rmsnorm pass on a DeiT-Tiny-size ViT and a GPT-2-small-size decoder.

    python benchmarks/bench_layernorm_to_rmsnorm.py [--repeats N] [--warmups N] [--profile-runs N]
                                                    [--models deit_tiny,gpt2_small]
                                                    [--out benchmarks/results/layernorm_to_rmsnorm.md]

What it measures (see benchmarks/README.md for the details and how to read the tables):

1. Builds both models with the dynamo exporter (opset 18, float32; in a child process, so torch never
   enters this process; cached in --work-dir): a DeiT-Tiny-size ViT (width 192, 12 layers, 3 heads,
   MLP 768, patch 16, 224x224 images, 1000 classes, batch 8) and a GPT-2-small-size decoder (width
   768, 12 layers, 12 heads, MLP 3072, vocab 50257, tied head, sequence 512, batch 1).
2. Makes the variants of each, in this process: layernorm-to-rmsnorm with target "ort"
   (SimplifiedLayerNormalization) and target "onnx" (decomposed standard ONNX, opset 18);
   layernorm-to-crmsnorm (target "ort") when normfold has that pass; and the "no-norm bound", every
   LayerNormalization replaced by its input (a different function: only a bound on what removing the
   norms could save).
3. Verifies each converted variant against the original once (normfold.verify, tolerance class
   "renorm"), and the original against itself (onnxruntime's own optimizations only: the error floor).
4. onnxruntime CPU latency: normfold.bench.benchmark with every variant of one model in one process
   and interleaved repetitions, plus a second session of the original (the A/A row: the noise floor
   of a ratio), once with ORT_ENABLE_ALL and once with ORT_DISABLE_ALL.
5. The norm ops onnxruntime's ORT_ENABLE_ALL optimizer leaves in each variant (from the graph it
   saves with SessionOptions.optimized_model_filepath): whether its Add+norm (Skip*) fusions fire.
6. onnxruntime's kernel profile (ORT_ENABLE_ALL) of every variant: the kernel time of the nodes the
   rewrite touched, in the original and in the variant, against the whole; far steadier than
   end-to-end latency, it says what the rewrite itself saves or costs.

Every ratio compares figures measured in the same run; no absolute timing is meant to be compared
across machines or runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fold_batchnorm import log, machine_info, machine_table, run_child  # noqa: E402  (shared benchmark helpers)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "layernorm_to_rmsnorm.md"
SEED = 0
OPSET = 18
EXPORTER = "dynamo"
PASS = "layernorm-to-rmsnorm"
CRMS_PASS = "layernorm-to-crmsnorm"

# name -> factory in normfold.models, its size knobs, the batch, and a description for the report.
MODELS = {
    "deit_tiny": {
        "factory": "vit",
        "size": {"width": 192, "depth": 12, "heads": 3, "patch": 16, "num_classes": 1000, "image_size": 224},
        "batch": 8,
        "repeats": 12,  # default interleaved latency repetitions (about 0.5 to 1 s a run on 2 cores)
        "profile_runs": 5,
        "title": "DeiT-Tiny-size ViT",
        "describe": "width 192, 12 layers, 3 heads, MLP 768, patch 16, 224x224 images, 1000 classes; input 8x3x224x224",
    },
    "gpt2_small": {
        "factory": "gpt2_tied",
        "size": {"width": 768, "depth": 12, "heads": 12, "vocab": 50257, "seq": 512},
        "batch": 1,
        "repeats": 5,  # about 2.5 s a run on 2 cores
        "profile_runs": 2,
        "title": "GPT-2-small-size decoder",
        "describe": "width 768, 12 layers, 12 heads, MLP 3072, vocab {vocab}, tied LM head; input ids 1x512",
    },
}

# The norm ops counted in onnxruntime's optimized graph (plus the ops a decomposed norm leaves).
NORM_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "RMSNormalization")
DECOMPOSED_OPS = ("ReduceMean", "Sqrt", "Pow")

# --- child program ---------------------------------------------------------------------------------

# Builds one model from normfold.models and exports it with normfold.models.export.to_onnx on the
# benchmark's own inputs (batch and image size differ from the factories' test-sized defaults).
_BUILD_CHILD = """
import json, os, sys
import numpy as np
from normfold.models import build, example_inputs
from normfold.models.export import to_onnx
spec, seed, opset, exporter, dest = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
size = spec["size"]
module = build(spec["factory"], seed, **size)
if spec["factory"] == "vit":
    shape = (spec["batch"], 3, size["image_size"], size["image_size"])
    inputs = [np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)]
else:
    inputs = example_inputs(spec["factory"], seed, batch=spec["batch"], seq=size["seq"], vocab=size["vocab"])
tmp = dest + ".partial"
to_onnx(module, inputs, tmp, opset=opset, exporter=exporter, dtype="float32")
os.replace(tmp, dest)
print(json.dumps({"parameters": sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())}))
"""

# --- steps -----------------------------------------------------------------------------------------


def model_path(work: Path, name: str, spec: dict) -> Path:
    size = "_".join(f"{k}{v}" for k, v in sorted(spec["size"].items()))
    return work / f"{name}_{spec['factory']}_{size}_b{spec['batch']}_{EXPORTER}_seed{SEED}_opset{OPSET}_fp32.onnx"


def build_model(work: Path, name: str, spec: dict, rebuild: bool) -> tuple[Path, dict | None]:
    """The cached model; builds it in a child process when missing (wall time and peak RSS reported)."""
    path = model_path(work, name, spec)
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and not rebuild:
        return path, None
    log(f"building {name} ({EXPORTER} exporter) into {path} ...")
    result = run_child(
        [sys.executable, "-c", _BUILD_CHILD, json.dumps(spec), str(SEED), str(OPSET), EXPORTER, str(path)], cwd=work
    )
    info = json.loads(result["stdout"].strip().splitlines()[-1])
    meta.write_text(json.dumps(info))
    return path, {"wall_s": result["wall_s"], "rss_mib": result["rss_mib"]}


def model_facts(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    info = json.loads(path.with_suffix(".json").read_text())
    return {"mb": path.stat().st_size / 1e6, "nodes": sum(ops.values()), "ops": dict(ops), **info}


def convert(src: Path, dst: Path, pass_name: str, target: str) -> dict:
    import normfold
    from normfold.passes import PASSES

    start = time.perf_counter()
    passes = None if pass_name is None else [pass_name]  # None: convert's default passes
    model, report = normfold.convert(src, passes, target=target, verify=False,
                                     approximate=pass_name is not None and not PASSES[pass_name].exact)
    convert_s = time.perf_counter() - start
    normfold.save(model, dst, force=True)
    entry = next(p for p in report.passes if p.name == (pass_name or PASS))
    return {
        "seconds": convert_s,
        "applied": entry.applied,
        "skipped": [str(s) for s in entry.skipped],
        "ops_after": dict(report.ops_after),
    }


def strip_layernorms(src: Path, dst: Path, op_types: tuple[str, ...] = ("LayerNormalization",)) -> dict:
    """The no-norm bound: every norm node (of `op_types`) has its output rewired to its input (an
    Identity where the output is a graph output); its parameters dropped when nothing else reads them."""
    import onnx

    start = time.perf_counter()
    model = onnx.load(str(src))
    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    kept, replaced = [], 0
    for node in graph.node:
        if node.op_type in op_types and node.domain in ("", "ai.onnx"):
            if any(node.output[1:]):
                raise RuntimeError(f"{node.name}: {node.op_type} with optional outputs in use")
            replaced += 1
            if node.output[0] in graph_outputs:
                kept.append(onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
            else:
                rename[node.output[0]] = node.input[0]
                continue
        else:
            kept.append(node)

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    def rewire(nodes) -> None:
        for node in nodes:
            node.input[:] = [resolve(i) for i in node.input]
            for attr in node.attribute:  # names captured by subgraphs
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    rewire(sub.node)

    rewire(kept)
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | graph_outputs
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    live_info = [v for v in graph.value_info if v.name not in rename]
    del graph.value_info[:]
    graph.value_info.extend(live_info)
    onnx.save(model, str(dst))
    return {"seconds": time.perf_counter() - start, "applied": replaced, "skipped": [],
            "ops_after": dict(collections.Counter(n.op_type for n in graph.node))}


def verify_once(reference: Path, candidate: Path) -> dict:
    import normfold

    start = time.perf_counter()
    result = normfold.verify(reference, candidate, tolerance_class="renorm")
    return {
        "seconds": time.perf_counter() - start,
        "passed": result.passed,
        "max_abs_error": result.max_abs_error,
        "max_rel_error": result.max_rel_error,
        "summary": result.summary_lines(),
    }


def ort_optimized_ops(model_path: Path, scratch: Path) -> dict:
    """Op counts of the graph onnxruntime's ORT_ENABLE_ALL optimization produces on the CPU provider."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    optimized = scratch / f"ort_optimized_{model_path.stem}.onnx"
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
    optimized.unlink(missing_ok=True)
    for data in scratch.glob(f"ort_optimized_{model_path.stem}*"):
        data.unlink(missing_ok=True)
    return {"ops": dict(ops), "nodes": sum(ops.values())}


def kernel_profile(paths: dict[str, Path], runs: int, scratch: Path, label: str) -> dict:
    """onnxruntime's own per-node kernel times (ORT_ENABLE_ALL, SessionOptions.enable_profiling): one
    session per variant, one warm-up run each (left out), then `runs` interleaved runs. Returns, per
    variant, the mean kernel milliseconds per run of every node of the optimized graph, and its op type."""
    import onnxruntime as ort

    from normfold import io
    from normfold.verification import make_inputs

    log(f"{label}: kernel profile, ORT_ENABLE_ALL, {len(paths)} sessions, {runs} interleaved runs ...")
    sessions = {}
    for i, (name, path) in enumerate(paths.items()):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(scratch / f"profile_{label}_{i}")
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        sessions[name] = (session, make_inputs(session, io.load(path), seed=0))
    for _ in range(runs + 1):  # the first round is the warm-up
        for session, feed in sessions.values():
            session.run(None, feed)
    profiles = {}
    for name, (session, _) in sessions.items():
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink(missing_ok=True)
        windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[1:]
        per_node: collections.Counter = collections.Counter()
        op_of = {}
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            if any(start <= e["ts"] <= end for start, end in windows):
                node = e["name"][: -len("_kernel_time")]
                per_node[node] += e["dur"] / 1e3 / len(windows)
                op_of[node] = e.get("args", {}).get("op_name", "?")
        profiles[name] = {"per_node_ms": dict(per_node), "op_of": op_of, "runs": len(windows)}
    sessions.clear()
    return profiles


def profile_summary(profiles: dict) -> dict:
    """Per variant against the original: total kernel time, time in norm ops, and the time of the nodes
    the rewrite touched (in one graph and not the other, by node name) against those it left alone."""
    base = profiles["original"]["per_node_ms"]
    summary = {}
    for name, p in profiles.items():
        nodes, op_of = p["per_node_ms"], p["op_of"]
        removed = sum(ms for node, ms in base.items() if node not in nodes)
        added = sum(ms for node, ms in nodes.items() if node not in base)
        common = [node for node in nodes if node in base]
        summary[name] = {
            "kernel_ms": sum(nodes.values()),
            "norm_ms": sum(ms for node, ms in nodes.items() if op_of[node] in NORM_OPS),
            "removed_ms": removed,
            "added_ms": added,
            "removed_nodes": sum(1 for node in base if node not in nodes),
            "added_nodes": sum(1 for node in nodes if node not in base),
            "common_ratio": sum(nodes[n] for n in common) / max(sum(base[n] for n in common), 1e-9),
        }
    return summary


def latency(paths: dict[str, Path], repeats: int, label: str) -> dict:
    """One interleaved normfold.bench.benchmark call per optimization level over every variant."""
    from normfold import bench

    levels = {}
    names = list(paths)
    for level, optimize in (("ORT_ENABLE_ALL", True), ("ORT_DISABLE_ALL", False)):
        log(f"{label}: latency, {level}, {len(names)} sessions, {bench.WARMUP_RUNS} warm-up(s), "
            f"{repeats} interleaved repetitions ...")
        start = time.perf_counter()
        results = bench.benchmark([paths[n] for n in names], provider="cpu", repeats=repeats, optimize=optimize)
        levels[level] = {n: r.to_dict() for n, r in zip(names, results)}
        log(f"{label}: {level} done in {time.perf_counter() - start:.0f} s")
    return levels


def run_model(name: str, spec: dict, work: Path, scratch: Path, args) -> dict:
    from normfold.passes import PASSES

    original, build = build_model(work, name, spec, args.rebuild)
    out = {"name": name, "spec": spec, "build": build, "facts": model_facts(original), "notes": [],
           "variants": {}, "verify": {}, "ort_ops": {}}
    variants: dict[str, Path] = {"original": original}
    conversions = {}
    plan = [("rmsnorm, target ort", PASS, "ort"), ("rmsnorm, target onnx", PASS, "onnx"),
            ("default passes (rmsnorm + affine folded), target ort", None, "ort")]
    if CRMS_PASS in PASSES:
        plan.append(("crmsnorm, target ort", CRMS_PASS, "ort"))
    else:
        note = f"`{CRMS_PASS}` is not in normfold.passes.PASSES in this normfold: variant skipped."
        out["notes"].append(note)
        log(note)
    for label, pass_name, target in plan:
        dst = scratch / f"{name}_{label.split(',')[0].split(' ')[0]}_{target}.onnx"
        log(f"{name}: converting ({pass_name}, target {target}, no verification) ...")
        try:
            conversions[label] = convert(original, dst, pass_name, target)
        except Exception as exc:  # a pass under development must not sink the rest of the run
            if pass_name == PASS:
                raise
            note = f"`{pass_name}` failed to convert {name}: {type(exc).__name__}: {str(exc)[:300]}"
            out["notes"].append(note)
            log(note)
            continue
        variants[label] = dst
    log(f"{name}: building the no-norm bound ...")
    bound = scratch / f"{name}_nonorm.onnx"
    conversions["no-norm bound"] = strip_layernorms(original, bound)
    variants["no-norm bound"] = bound
    out["conversions"] = conversions

    checks = [("original", original)] + [(k, p) for k, p in variants.items() if k not in ("original", "no-norm bound")]
    for label, path in checks:
        log(f"{name}: verifying {label} against the original ...")
        out["verify"][label] = verify_once(original, path)
    for label, path in variants.items():
        log(f"{name}: onnxruntime ORT_ENABLE_ALL graph of {label} ...")
        out["ort_ops"][label] = ort_optimized_ops(path, scratch)

    timed = {"original": original}
    if not args.no_aa:
        timed["original (A/A: 2nd session)"] = original
    timed.update((k, v) for k, v in variants.items() if k != "original")
    out["repeats"] = args.repeats or spec["repeats"]
    out["profile_runs"] = spec["profile_runs"] if args.profile_runs is None else args.profile_runs
    out["latency"] = latency(timed, out["repeats"], name)
    if out["profile_runs"]:
        out["profile"] = profile_summary(kernel_profile(variants, out["profile_runs"], scratch, name))
    out["variants"] = {k: {"mb": p.stat().st_size / 1e6} for k, p in variants.items()}
    return out


# --- report ----------------------------------------------------------------------------------------

RATIO_TARGET = {"deit_tiny": 0.97}


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.3f}"


def _load() -> str:
    """The 1-minute load average: other work on the machine, which widens every ratio's noise."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "unknown"


def render(info: dict, args, results: list[dict], total_s: float) -> str:
    L = []
    L.append("# layernorm-to-rmsnorm benchmark: Pre-LN transformers on onnxruntime CPU")
    L.append("")
    L.append(f"Command: `{args.command_line}`")
    L.append("")
    L += machine_table(info)
    L.append(f"| load average (1 min) at start / end | {args.load_start} / {_load()} |")
    L.append("")
    L.append("## Models and conversion")
    L.append("")
    for r in results:
        spec, facts = r["spec"], r["facts"]
        describe = spec["describe"].format(**spec["size"])
        L.append(
            f"**{r['name']}**: {spec['title']} ({describe}); `{EXPORTER}` exporter, opset {OPSET}, float32, seed "
            f"{SEED}: {facts['parameters'] / 1e6:.1f}M parameters, {facts['mb']:.1f} MB, {facts['nodes']} nodes "
            f"({facts['ops'].get('LayerNormalization', 0)} LayerNormalization, {facts['ops'].get('Add', 0)} Add)."
            + (f" Built in a child process in {r['build']['wall_s']:.0f} s, peak RSS {r['build']['rss_mib']:.0f} "
               "MiB (cached for later runs)." if r["build"] else " (Cached model.)")
        )
        L.append("")
        L.append("| variant | converted in s | norms rewritten | skipped | op counts changed in the file | MB |")
        L.append("|---|--:|--:|--:|---|--:|")
        for label, c in r["conversions"].items():
            before, after = facts["ops"], c["ops_after"]
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
            ops = ", ".join(f"{k} {v:+d}" for k, v in sorted(delta.items()) if v) or "none"
            L.append(f"| {label} | {c['seconds']:.2f} | {c['applied']} | {len(c['skipped'])} | {ops} "
                     f"| {r['variants'][label]['mb']:.1f} |")
        L.append("")
        for label, c in r["conversions"].items():
            for reason in c["skipped"][:5]:
                L.append(f"- {label}: skipped: {reason}")
        for note in r["notes"]:
            L.append(f"- Note: {note}")
        L.append("")

    L.append("## Verification against the original (`normfold.verify(original, variant, tolerance_class=\"renorm\")`)")
    L.append("")
    L.append("Reference: the original with every onnxruntime optimization off; candidate: the variant with "
             "ORT_ENABLE_ALL. The row \"original\" compares the original with itself, so it shows what "
             "onnxruntime's own optimizations alone change (the error floor).")
    L.append("")
    L.append("| model | variant | result | max abs error | max rel error | seconds |")
    L.append("|---|---|---|--:|--:|--:|")
    for r in results:
        for label, v in r["verify"].items():
            status = "passed" if v["passed"] else "**FAILED**"
            L.append(f"| {r['name']} | {label} | {status} | {v['max_abs_error']:.3g} | {v['max_rel_error']:.3g} "
                     f"| {v['seconds']:.1f} |")
        L.append(f"| {r['name']} | no-norm bound | not verified: a different function | | | |")
    L.append("")

    for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
        reps = ", ".join(f"{r['name']} {r['repeats']}" for r in results)
        L.append(f"## Latency, {level} (onnxruntime CPU; {args.warmups} warm-up run(s) per session, then "
                 f"interleaved repetitions: {reps})")
        L.append("")
        L.append("| model | variant | session s | median ms | p90 ms | median ratio to original "
                 "| p90 ratio to original |")
        L.append("|---|---|--:|--:|--:|--:|--:|")
        for r in results:
            lat = r["latency"][level]
            base = lat["original"]
            for label, x in lat.items():
                bold = "**" if label not in ("original",) and not label.startswith("original (A/A") else ""
                ratios = ("| |" if label == "original" else
                          f"| {bold}{_ratio(x['median_ms'], base['median_ms'])}{bold} "
                          f"| {_ratio(x['p90_ms'], base['p90_ms'])} |")
                L.append(f"| {r['name']} | {label} | {x['session_seconds']:.2f} | {x['median_ms']:.1f} "
                         f"| {x['p90_ms']:.1f} {ratios}")
        L.append("")

    L.append("## Norm ops onnxruntime leaves after ORT_ENABLE_ALL (CPU provider)")
    L.append("")
    L.append("Counted in the graph onnxruntime saves with `SessionOptions.optimized_model_filepath`. "
             "Skip* ops are its fusion of the residual Add into the following norm.")
    L.append("")
    cols = NORM_OPS + DECOMPOSED_OPS + ("Add",)
    short = {"LayerNormalization": "LN", "SkipLayerNormalization": "SkipLN",
             "SimplifiedLayerNormalization": "SimplifiedLN", "SkipSimplifiedLayerNormalization": "SkipSimplifiedLN",
             "RMSNormalization": "RMSNormalization"}
    L.append("| model | variant | " + " | ".join(short.get(c, c) for c in cols) + " | nodes |")
    L.append("|---|---|" + "--:|" * (len(cols) + 1))
    for r in results:
        for label, o in r["ort_ops"].items():
            L.append(f"| {r['name']} | {label} | " + " | ".join(str(o["ops"].get(c, 0)) for c in cols)
                     + f" | {o['nodes']} |")
    L.append("")

    if any("profile" in r for r in results):
        runs = ", ".join(f"{r['name']} {r['profile_runs']}" for r in results if "profile" in r)
        L.append(f"## Where the time goes: onnxruntime's kernel profile (ORT_ENABLE_ALL; interleaved runs per "
                 f"variant after a warm-up: {runs})")
        L.append("")
        L.append(" ".join("""
            Per-node kernel times from onnxruntime's own profiler (SessionOptions.enable_profiling), in ms
            per run. "Rewritten nodes" are the nodes of onnxruntime's optimized graph that exist in only one
            of the original and the variant (matched by node name): the original's norms (and a residual Add
            fused into a SkipLayerNormalization) against the variant's replacements (RMSNorms, beta Adds,
            decomposed ops). Their difference is what the rewrite itself saves or costs, far less noisy than
            end-to-end latency; "unchanged nodes" compares the time of every other node, the same work in
            both (a ratio away from 1 is noise, or a layout change).""".split()))
        L.append("")
        L.append("| model | variant | kernel ms/run | in norm ops | rewritten nodes: original -> variant ms "
                 "| saved, % of original kernel time | unchanged nodes ratio |")
        L.append("|---|---|--:|--:|--:|--:|--:|")
        for r in results:
            prof = r.get("profile")
            if not prof:
                continue
            total = prof["original"]["kernel_ms"]
            for label, p in prof.items():
                share = f"{p['norm_ms']:.1f} ({100 * p['norm_ms'] / p['kernel_ms']:.1f}%)"
                if label == "original":
                    L.append(f"| {r['name']} | {label} | {p['kernel_ms']:.1f} | {share} | | | |")
                    continue
                saved = p["removed_ms"] - p["added_ms"]
                L.append(
                    f"| {r['name']} | {label} | {p['kernel_ms']:.1f} | {share} "
                    f"| {p['removed_ms']:.1f} ({p['removed_nodes']} nodes) -> {p['added_ms']:.1f} "
                    f"({p['added_nodes']} nodes) | **{100 * saved / total:+.1f}%** | {p['common_ratio']:.3f} |"
                )
        L.append("")

    L.append("## Targets")
    L.append("")
    L.append(" ".join("""
        Converted/original median latency: at most 0.97 on the DeiT-Tiny-size model, and no slowdown
        (at most 1.00) on any model. Read against the A/A row: a ratio within the A/A row's distance
        from 1 is no difference. The no-norm bound's ratio is the best any norm rewrite could do in
        this run. "Kernel-profile estimate" is 1 - saved / original kernel time from the kernel
        profile above (ORT_ENABLE_ALL only): the latency ratio the rewritten nodes alone imply.""".split()))
    L.append("")
    L.append("| model | level | A/A ratio | no-norm bound ratio | variant | median ratio | kernel-profile estimate "
             "| target | met (median ratio) |")
    L.append("|---|---|--:|--:|---|--:|--:|--:|---|")
    for r in results:
        for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
            lat = r["latency"][level]
            base = lat["original"]["median_ms"]
            aa = next((x for k, x in lat.items() if k.startswith("original (A/A")), None)
            aa_s = "-" if aa is None else _ratio(aa["median_ms"], base)
            bound = _ratio(lat["no-norm bound"]["median_ms"], base)
            prof = r.get("profile") if level == "ORT_ENABLE_ALL" else None
            for label in [k for k in lat if k.startswith(("rmsnorm", "crmsnorm"))]:
                ratio = lat[label]["median_ms"] / base
                target = RATIO_TARGET.get(r["name"], 1.0)
                estimate = "-"
                if prof and label in prof:
                    p = prof[label]
                    estimate = f"{1 - (p['removed_ms'] - p['added_ms']) / prof['original']['kernel_ms']:.3f}"
                L.append(f"| {r['name']} | {level} | {aa_s} | {bound} | {label} | {ratio:.3f} | {estimate} "
                         f"| {target:.2f} | {'yes' if ratio <= target else '**no**'} |")
    L.append("")
    L.append(" ".join("""
        Notes: the no-norm bound drops every LayerNormalization (its output rewired to its input), so
        it computes something else; it bounds what any norm rewrite could save. The A/A row is a
        second session of the original in the same interleaved loop: its ratio to the original is
        the noise floor of every other ratio in the table. Session creation times are single
        measurements. Ratios compare figures from this one run; the machine may be noisy, so read
        ratios within the A/A distance of 1 as "no difference".""".split()))
    L.append("")
    L.append(f"Total benchmark time: {total_s:.0f} s.")
    L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved latency repetitions per level, for every model (default: "
                             + ", ".join(f"{n} {m['repeats']}" for n, m in MODELS.items()) + ")")
    parser.add_argument("--warmups", type=int, default=1,
                        help="untimed runs per session before the repetitions (normfold.bench.WARMUP_RUNS)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--gpt2-vocab", type=int, default=MODELS["gpt2_small"]["size"]["vocab"],
                        help="vocabulary of the GPT-2-size model (smaller exports need less memory)")
    parser.add_argument("--profile-runs", type=int, default=None,
                        help="interleaved runs per variant of onnxruntime's kernel profile, 0 for none (default: "
                             + ", ".join(f"{n} {m['profile_runs']}" for n, m in MODELS.items()) + ")")
    parser.add_argument("--no-aa", action="store_true", help="leave out the A/A row (a 2nd session of the original)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown results file")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "normfold-bench",
                        help="where the built models are cached and scratch outputs go")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached models")
    args = parser.parse_args(argv)
    if (args.repeats is not None and args.repeats < 1) or args.warmups < 0 or (args.profile_runs or 0) < 0:
        parser.error("--repeats must be at least 1, --warmups and --profile-runs at least 0")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    args.command_line = " ".join(["python", os.path.relpath(__file__, Path.cwd()) if argv is None else "bench",
                                  *(sys.argv[1:] if argv is None else argv)])

    from normfold import bench

    bench.WARMUP_RUNS = args.warmups  # runs of a second or more: one warm-up settles onnxruntime's arena

    started = time.perf_counter()
    args.load_start = _load()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    results = []
    try:
        for name in names:
            spec = json.loads(json.dumps(MODELS[name]))
            if name == "gpt2_small":
                spec["size"]["vocab"] = args.gpt2_vocab
            results.append(run_model(name, spec, work, scratch, args))
        info = machine_info()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = render(info, args, results, time.perf_counter() - started)
    print(text)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log(f"wrote {out}")
    passed = all(v["passed"] for r in results for v in r["verify"].values())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
