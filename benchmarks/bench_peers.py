#!/usr/bin/env python3
"""Runtime suite: normfold's outputs against the original, the no-norm bound and every peer's output.

    python benchmarks/bench_peers.py [--models resnet50,deit_tiny,gpt2_small] [--repeats N]
                                     [--peers ort-offline,...] [--out benchmarks/results/peers_runtime.md]

For each model (ResNet-50 with its BatchNorms kept, dynamo export; a DeiT-Tiny-size ViT, batch 8; a
GPT-2-small-size decoder, sequence 512; all float32, seed 0, built once in a child process and cached):

1. Variants, each made by a child process timed from fork to exit with its peak RSS
   (bench_fold_batchnorm.run_child): `normfold convert --no-verify` with each exact pass set and target
   (default passes, target ort and onnx; layernorm-to-rmsnorm and layernorm-to-crmsnorm on the
   transformers), `remove-layernorm --approximate --calibration` when normfold has that pass, every
   peer of benchmarks/peers.py, and the no-norm bound (every norm's output rewired to its input).
   A variant whose maker fails is recorded with its error, not dropped silently.
2. Equivalence of each variant with the original: normfold.verify (reference: the original with every
   onnxruntime optimization off; candidate with ORT_ENABLE_ALL) at the fp32 tolerances of the model's
   rewrite ("fold" for ResNet-50, "renorm" for the transformers), the same for every row, the original
   against itself included (the error floor). An approximate pass reports its drift instead.
3. Latency on onnxruntime CPU: normfold.bench.benchmark over every variant of one model in one process,
   interleaved repetitions, plus a second session of the original (A/A: the noise floor), once with
   ORT_ENABLE_ALL and once with ORT_DISABLE_ALL; ratios of medians to the original's. Idle onnxruntime
   threads sleep (normfold.bench's default): spinning threads of the other sessions would take the
   cores of the one being timed.

Only ratios from the same run mean anything; absolute times are not comparable across machines or runs.
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
import bench_fold_batchnorm as bn_bench  # noqa: E402  (shared benchmark helpers)
import bench_layernorm_to_rmsnorm as ln_bench  # noqa: E402
import peers as peer_tools  # noqa: E402
from bench_fold_batchnorm import log, machine_info, machine_table, run_child  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "peers_runtime.md"
LEVELS = ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL")
RATIO_TARGET = 1.01
"""normfold's outputs may be at most this much slower than the original under ORT_ENABLE_ALL."""

# Norm op types: the original's (what "rewritten" counts) and every form a rewrite or fusion leaves.
NORM_OPS = ("BatchNormalization", "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "RMSNormalization", "EmbedLayerNormalization")

_TRANSFORMER_VARIANTS = [
    ("normfold default, target ort", None, "ort"),
    ("normfold default, target onnx", None, "onnx"),
    ("normfold layernorm-to-rmsnorm, target ort", "layernorm-to-rmsnorm", "ort"),
    ("normfold layernorm-to-crmsnorm, target ort", "layernorm-to-crmsnorm", "ort"),
]

MODELS = {
    "resnet50": {
        "title": "ResNet-50, BatchNorms kept (dynamo export); input 1x3x224x224",
        "norm_ops": ("BatchNormalization",),
        "tolerance_class": "fold",
        "transformers": {"model_type": "bert", "heads": 0, "hidden": 0},  # it has no CNN model type
        "variants": [("normfold default, target ort", None, "ort"), ("normfold default, target onnx", None, "onnx")],
        "repeats": 20,
    },
    "deit_tiny": {
        **ln_bench.MODELS["deit_tiny"],
        "norm_ops": ("LayerNormalization",),
        "tolerance_class": "renorm",
        "transformers": {"model_type": "vit", "heads": 3, "hidden": 192},
        "variants": _TRANSFORMER_VARIANTS,
        "repeats": 10,
    },
    "gpt2_small": {
        **ln_bench.MODELS["gpt2_small"],
        "norm_ops": ("LayerNormalization",),
        "tolerance_class": "renorm",
        "transformers": {"model_type": "gpt2", "heads": 12, "hidden": 768},
        "variants": _TRANSFORMER_VARIANTS,
        "repeats": 5,
    },
}


# --- variants --------------------------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    """The installed `normfold` console script beside this interpreter, else the same entry point."""
    script = Path(sys.executable).parent / "normfold"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), *args]
    return [sys.executable, "-c", "import sys; from normfold.cli import main; sys.exit(main())", *args]


def make_variant(argv: list[str], dst: Path, scratch: Path) -> dict:
    """Runs one maker in a child process; returns its wall time and peak RSS, or its error."""
    try:
        result = run_child(argv, cwd=scratch)
    except RuntimeError as exc:
        lines = [ln for ln in str(exc).splitlines()[1:] if ln.strip()]
        return {"error": (lines[-1] if lines else str(exc).splitlines()[0])[:300]}
    if not dst.is_file():
        return {"error": "wrote no output"}
    return {"wall_s": result["wall_s"], "rss_mib": result["rss_mib"]}


def calibration_file(original: Path, scratch: Path, batches: int = 4) -> Path:
    """Seeded inputs for an approximate pass's calibration: `batches` model batches (seeds 1, 2, ...,
    never the verification's seed 0) stacked along the leading axis, as normfold.calibration reads them."""
    import numpy as np

    from normfold import io, runtime
    from normfold.verification import make_inputs

    session = runtime.make_session(original, optimize=False)
    model = io.load(original)
    feeds = [make_inputs(session, model, seed=seed) for seed in range(1, batches + 1)]
    path = scratch / f"{original.stem}_calibration.npz"
    np.savez(path, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
    return path


def make_variants(name: str, spec: dict, original: Path, scratch: Path, peers: list[str], *,
                  approximate: bool = True) -> dict[str, dict]:
    """Every variant of one model: label -> {path, kind, wall_s, rss_mib} or {kind, error}."""
    from normfold.passes import PASSES

    variants: dict[str, dict] = {}
    for i, (label, pass_name, target) in enumerate(spec["variants"]):
        if pass_name is not None and pass_name not in PASSES:
            variants[label] = {"kind": "normfold", "error": f"pass {pass_name!r} is not in this normfold"}
            continue
        dst = scratch / f"{name}_normfold{i}.onnx"
        argv = cli("convert", str(original), "-o", str(dst), "--target", target, "--no-verify", "--force",
                   *(["--passes", pass_name] if pass_name else []))
        log(f"{name}: {label} ...")
        variants[label] = {"kind": "normfold", "path": dst, **make_variant(argv, dst, scratch)}
    if approximate and "remove-layernorm" in PASSES and "LayerNormalization" in spec["norm_ops"]:
        label, dst = "normfold remove-layernorm (approximate, calibrated)", scratch / f"{name}_removeln.onnx"
        argv = cli("convert", str(original), "-o", str(dst), "--passes", "remove-layernorm", "--approximate",
                   "--calibration", str(calibration_file(original, scratch)), "--no-verify", "--force")
        log(f"{name}: {label} ...")
        variants[label] = {"kind": "approximate", "path": dst, **make_variant(argv, dst, scratch)}
    t = spec["transformers"]
    for peer in peers:
        label, dst = f"peer: {peer}", scratch / f"{name}_{peer}.onnx"
        argv = [sys.executable, str(Path(peer_tools.__file__).resolve()), peer, str(original), str(dst),
                "--model-type", t["model_type"], "--heads", str(t["heads"]), "--hidden", str(t["hidden"])]
        log(f"{name}: {label} ...")
        variants[label] = {"kind": "peer", "path": dst, **make_variant(argv, dst, scratch)}
    log(f"{name}: no-norm bound ...")
    bound = scratch / f"{name}_nonorm.onnx"
    start = time.perf_counter()
    ln_bench.strip_layernorms(original, bound, op_types=spec["norm_ops"])
    variants["no-norm bound"] = {"kind": "bound", "path": bound, "wall_s": time.perf_counter() - start}
    return variants


def file_facts(path: Path, norm_ops: tuple[str, ...], original_norms: int | None = None) -> dict:
    """Op counts of a model file: nodes, norm ops left of each type, norms rewritten, size with its data."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
    own = sum(ops.get(op, 0) for op in norm_ops)
    return {
        "nodes": sum(ops.values()),
        "norms": {op: ops[op] for op in NORM_OPS if ops.get(op)},
        "norms_of_original_type": own,
        "rewritten": None if original_norms is None else original_norms - own,
        "mb": size / 1e6,
        "ops": dict(ops),
    }


def check(original: Path, candidate: Path, tolerance_class: str) -> dict:
    """normfold.verify of the candidate against the original; an error (a model onnxruntime cannot run)
    is recorded as such."""
    import normfold

    start = time.perf_counter()
    try:
        result = normfold.verify(original, candidate, tolerance_class=tolerance_class)
    except Exception as exc:  # a peer's output may not load or run: that is a result too
        return {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}",
                "seconds": time.perf_counter() - start}
    return {"passed": result.passed, "max_abs_error": result.max_abs_error, "max_rel_error": result.max_rel_error,
            "seconds": time.perf_counter() - start}


def latency(paths: dict[str, Path], repeats: int, label: str) -> dict:
    """normfold.bench.benchmark over every runnable variant at each optimization level, interleaved."""
    from normfold import bench

    out = {}
    names = list(paths)
    for level in LEVELS:
        log(f"{label}: latency, {level}, {len(names)} sessions, {repeats} interleaved repetitions ...")
        results = bench.benchmark([paths[n] for n in names], provider="cpu", repeats=repeats,
                                  optimize=level == "ORT_ENABLE_ALL")
        out[level] = {n: r.to_dict() for n, r in zip(names, results)}
    return out


def run_model(name: str, spec: dict, original: Path, scratch: Path, *, peers: list[str], repeats: int,
              approximate: bool = True) -> dict:
    """Variants, equivalence and latency of one model (see the module docstring)."""
    facts = file_facts(original, spec["norm_ops"])
    variants = make_variants(name, spec, original, scratch, peers, approximate=approximate)
    for label, v in variants.items():
        if "path" in v and "error" not in v:
            v["facts"] = file_facts(v["path"], spec["norm_ops"], facts["norms_of_original_type"])
            if v["kind"] != "bound":
                log(f"{name}: verifying {label} ...")
                v["check"] = check(original, v["path"], spec["tolerance_class"])
    aa = check(original, original, spec["tolerance_class"])
    runnable = {"original": original, "original (A/A: 2nd session)": original}
    runnable.update((label, v["path"]) for label, v in variants.items()
                    if "facts" in v and "error" not in v.get("check", {}))
    return {"name": name, "spec": {k: v for k, v in spec.items() if k != "variants"}, "facts": facts,
            "original_check": aa, "variants": variants, "repeats": repeats,
            "latency": latency(runnable, repeats, name)}


def build(name: str, work: Path, rebuild: bool) -> Path:
    """The cached model (built in a child process with torch limited to one thread when missing)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the export child's torch: one thread on a shared machine
    if name == "resnet50":
        return bn_bench.build_model(work, "dynamo", rebuild)[0]
    return ln_bench.build_model(work, name, ln_bench.MODELS[name], rebuild)[0]


# --- report ----------------------------------------------------------------------------------------


def _ratio(x: dict | None, base: dict, key: str = "median_ms") -> str:
    return "" if x is None else f"{x[key] / base[key]:.3f}"


def _equivalence(v: dict) -> str:
    c = v.get("check")
    if c is None:
        return "not checked: a different function" if v["kind"] == "bound" else ""
    if "error" in c:
        return f"**could not run**: {c['error']}"
    errors = f"max abs {c['max_abs_error']:.2g}, rel {c['max_rel_error']:.2g}"
    if v["kind"] == "approximate":
        return f"drift: {errors}"
    return f"{'equivalent' if c['passed'] else '**NOT equivalent**'} ({errors})"


def render_model(r: dict) -> list[str]:
    spec, facts, lat = r["spec"], r["facts"], r["latency"]
    base = {level: lat[level]["original"] for level in LEVELS}
    L = [f"## {r['name']}: {spec['title']}", ""]
    norms = ", ".join(f"{k} {v}" for k, v in facts["norms"].items())
    aa = r["original_check"]
    L.append(f"Original: {facts['mb']:.1f} MB, {facts['nodes']} nodes ({norms}). Equivalence at the fp32 "
             f"\"{spec['tolerance_class']}\" tolerances; the original against itself (onnxruntime's own "
             f"optimizations only): max abs {aa.get('max_abs_error', float('nan')):.2g}. Latency: "
             f"{r['repeats']} interleaved repetitions per level after a warm-up, idle onnxruntime threads "
             f"sleeping (session.intra_op.allow_spinning=0).")
    L.append("")
    L.append("| variant | made in s | peak MiB | nodes | norm ops left | norms rewritten | MB | equivalence "
             "| ENABLE_ALL median ms | ENABLE_ALL ratio | p90 ratio | DISABLE_ALL median ms | DISABLE_ALL ratio |")
    L.append("|---|--:|--:|--:|---|--:|--:|---|--:|--:|--:|--:|--:|")
    rows = [("original", {"kind": "original", "facts": {**facts, "rewritten": 0}}),
            ("original (A/A: 2nd session)", {"kind": "original", "facts": {**facts, "rewritten": 0}})]
    rows += list(r["variants"].items())
    for label, v in rows:
        if "error" in v:
            L.append(f"| {label} | | | | | | | **failed**: {v['error']} | | | | | |")
            continue
        f = v["facts"]
        en, dis = lat["ORT_ENABLE_ALL"].get(label), lat["ORT_DISABLE_ALL"].get(label)
        left = ", ".join(f"{k} {n}" for k, n in f["norms"].items()) or "none"
        made = f"{v['wall_s']:.1f}" if "wall_s" in v else ""
        rss = f"{v['rss_mib']:.0f}" if "rss_mib" in v else ""
        bold = "**" if v["kind"] == "normfold" else ""
        L.append(
            f"| {label} | {made} | {rss} | {f['nodes']} | {left} | {f['rewritten']} | {f['mb']:.1f} "
            f"| {_equivalence(v) if label != 'original' else 'reference'} "
            f"| {en['median_ms']:.1f} | {bold}{_ratio(en, base['ORT_ENABLE_ALL'])}{bold} "
            f"| {_ratio(en, base['ORT_ENABLE_ALL'], 'p90_ms')} "
            f"| {dis['median_ms']:.1f} | {_ratio(dis, base['ORT_DISABLE_ALL'])} |"
            if en and dis else
            f"| {label} | {made} | {rss} | {f['nodes']} | {left} | {f['rewritten']} | {f['mb']:.1f} "
            f"| {_equivalence(v)} | not timed | | | | |"
        )
    L.append("")
    return L


def targets(r: dict) -> list[dict]:
    """Each normfold variant against the targets: ratio <= RATIO_TARGET under ORT_ENABLE_ALL, and faster
    than every peer whose output rewrote fewer of the original's norm nodes."""
    lat = r["latency"]["ORT_ENABLE_ALL"]
    base = lat["original"]["median_ms"]
    rows = []
    for label, v in r["variants"].items():
        if v["kind"] != "normfold" or label not in lat:
            continue
        ratio = lat[label]["median_ms"] / base
        beaten, lost = [], []
        for peer, p in r["variants"].items():
            if p["kind"] != "peer" or peer not in lat or p["facts"]["rewritten"] >= v["facts"]["rewritten"]:
                continue
            (beaten if lat[label]["median_ms"] < lat[peer]["median_ms"] else lost).append(peer.removeprefix("peer: "))
        rows.append({"model": r["name"], "variant": label, "ratio": ratio, "ratio_met": ratio <= RATIO_TARGET,
                     "beaten": beaten, "lost": lost, "equivalent": v.get("check", {}).get("passed", False)})
    return rows


def render(info: dict, args, results: list[dict], total_s: float) -> str:
    L = ["# Runtime suite: normfold against its peers on onnxruntime CPU", "",
         f"Command: `{args.command_line}`", ""]
    L += machine_table(info)
    L.append(f"| load average (1 min) at start / end | {args.load_start} / {ln_bench._load()} |")
    L.append("")
    L.append(" ".join("""
        Columns: "made in s" and "peak MiB" are the wall time (interpreter start-up included) and peak
        RSS of the child process that made the variant; "norm ops left" counts the norm op types in
        the file (onnxruntime's fused forms included); "norms rewritten" is how many of the original's
        norm nodes (BatchNormalization or LayerNormalization) are no longer there; "equivalence" is
        normfold.verify against the original; ratios are medians over the original's median in the
        same interleaved loop (ORT_ENABLE_ALL and ORT_DISABLE_ALL); the A/A row is a second session
        of the original, its ratio the noise floor of every other.""".split()))
    L.append("")
    for r in results:
        L += render_model(r)
    L.append("## Targets (ORT_ENABLE_ALL)")
    L.append("")
    L.append(f"Each normfold output: median ratio to the original at most {RATIO_TARGET}, and faster than every "
             "peer whose output rewrote fewer of the original's norm nodes (peers that rewrote as many or "
             "more are not a target).")
    L.append("")
    L.append("| model | variant | equivalent | A/A ratio | ratio | <= 1.01 | faster than | slower than |")
    L.append("|---|---|---|--:|--:|---|---|---|")
    for r in results:
        lat = r["latency"]["ORT_ENABLE_ALL"]
        aa = _ratio(lat["original (A/A: 2nd session)"], lat["original"])
        for t in targets(r):
            L.append(f"| {t['model']} | {t['variant']} | {'yes' if t['equivalent'] else '**no**'} | {aa} "
                     f"| {t['ratio']:.3f} | {'yes' if t['ratio_met'] else '**no**'} "
                     f"| {', '.join(t['beaten']) or '-'} | {', '.join(f'**{p}**' for p in t['lost']) or '-'} |")
    L.append("")
    L.append(f"Total suite time: {total_s:.0f} s.")
    L.append("")
    return "\n".join(L)


def render_saved(args, files: list[Path]) -> int:
    """Writes the report of saved runs (each run's results JSON), merged model by model."""
    merged: dict[str, dict] = {}
    source: dict[str, str] = {}
    commands, starts = [], []
    for f in files:
        saved = json.loads(f.read_text())
        for r in saved["results"]:
            merged[r["name"]] = r
            source[r["name"]] = saved["command_line"]
        commands.append(saved["command_line"])
        starts.append(saved["load_start"])
    args.command_line = "` and `".join(commands)
    args.load_start = ", ".join(starts)
    results = [merged[n] for n in MODELS if n in merged]
    text = render(machine_info(), args, results, sum(json.loads(f.read_text())["seconds"] for f in files))
    if len(files) > 1:
        runs = "; ".join(f"{n}: `{source[n]}`" for n in merged)
        text = text.replace("\n## ", f"\nMerged from separate runs (date and machine rows: rendering time): {runs}.\n\n## ", 1)
    args.out.write_text(text)
    log(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--peers", default=",".join(peer_tools.PEERS), help="comma-separated subset of the peers")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repetitions per level (default: "
                             + ", ".join(f"{n} {m['repeats']}" for n, m in MODELS.items()) + ")")
    parser.add_argument("--warmups", type=int, default=1, help="untimed runs per session before the repetitions")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown results file")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "normfold-bench",
                        help="model cache and scratch outputs")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached models")
    parser.add_argument("--from-json", help="comma-separated saved results (peers_runtime_partial.json) to render "
                                            "instead of measuring; a later file's model replaces an earlier one's")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    peers = [p for p in args.peers.split(",") if p]
    if not names or set(names) - set(MODELS) or set(peers) - set(peer_tools.PEERS):
        parser.error(f"choose --models from {', '.join(MODELS)} and --peers from {', '.join(peer_tools.PEERS)}")
    if (args.repeats is not None and args.repeats < 1) or args.warmups < 0:
        parser.error("--repeats must be at least 1 and --warmups at least 0")
    args.command_line = " ".join(["python", "benchmarks/bench_peers.py", *(sys.argv[1:] if argv is None else argv)])
    if args.from_json:
        return render_saved(args, [Path(f) for f in args.from_json.split(",")])

    from normfold import bench

    bench.WARMUP_RUNS = args.warmups
    started = time.perf_counter()
    args.load_start = ln_bench._load()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        original = build(name, work, args.rebuild)
        scratch = Path(tempfile.mkdtemp(prefix=f"peers-{name}-", dir=work))
        try:
            results.append(run_model(name, MODELS[name], original, scratch, peers=peers,
                                     repeats=args.repeats or MODELS[name]["repeats"]))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        saved = {"command_line": args.command_line, "load_start": args.load_start,
                 "seconds": time.perf_counter() - started, "results": results}
        (work / "peers_runtime_partial.json").write_text(json.dumps(saved, default=str))
    text = render(machine_info(), args, results, time.perf_counter() - started)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log(f"wrote {args.out}")
    ok = all(t["equivalent"] for r in results for t in targets(r))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
