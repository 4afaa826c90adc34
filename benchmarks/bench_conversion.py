#!/usr/bin/env python3
"""Conversion cost at scale: wall time and peak memory of `normfold convert --no-verify` against the
load+save floor and against the peers, on Pre-LN transformers of about 100 MB to over 2 GB.

    python benchmarks/bench_conversion.py [--sizes 100,1000,2400] [--scaling 100,250,500,1000,2400]
                                          [--peers ort-offline,...] [--out benchmarks/results/conversion_cost.md]

Models come from benchmarks/big_models.py (seeded random float32 weights, external data, width 2048,
vocabulary 32000), generated once into --work-dir (never the repository). Every measured run is a child
process (bench_fold_batchnorm.run_child: wall time from fork to exit, interpreter start-up included;
peak RSS from os.wait4, its waited-for descendants included), started after the model's files have
been read once so every run finds them in the page cache:

- floor: `onnx.load` + `onnx.save` (external data to one file), and `onnx_ir.load` + `onnx_ir.save`;
  the faster of the two is "the floor";
- `normfold convert MODEL -o OUT --no-verify` (the default passes: every LayerNorm becomes an RMSNorm
  and its affine is folded, so nearly every weight is rewritten: the worst case for normfold);
- optionally `normfold convert` with verification (--verify-max-mb), reported separately;
- each peer of benchmarks/peers.py, under a memory cap (RLIMIT_AS, --mem-cap-gb) and a time limit
  (--timeout); a peer that fails, runs out of memory or time is recorded with the reason.

--sizes get every row (peers included); --scaling sizes (a superset is fine) get the floors and normfold
only, for the time/memory-against-size table and plot (benchmarks/results/conversion_scaling.png).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import big_models  # noqa: E402
import peers as peer_tools  # noqa: E402
from bench_fold_batchnorm import log, machine_info, machine_table, run_child  # noqa: E402
from bench_peers import cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SHAPES = ((300, 512, 16000), (600, 1024, 32000), (1500, 1536, 32000), (None, 2048, 32000))
"""(up to MB, width, vocabulary): wider models as they grow, the embedding and head about 10 to 60% of
the weights, as in GPT-2-like models."""
TARGET_TIME, TARGET_MEMORY = 2.0, 1 / 3
"""Targets for the >2 GB model: at most 2x the floor's wall time, peak RSS under a third of its size."""

_ONNX_FLOOR = """
import sys, onnx
from pathlib import Path
model = onnx.load(sys.argv[1])
onnx.save(model, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,
          location=Path(sys.argv[2]).name + ".data", size_threshold=1024)
"""

_IR_FLOOR = """
import sys, onnx_ir as ir
from pathlib import Path
ir.save(ir.load(sys.argv[1]), sys.argv[2], external_data=Path(sys.argv[2]).name + ".data")
"""

# Sets a memory cap (address space) and execs the command: a peer that needs more fails with
# MemoryError (or is killed) instead of taking the machine's memory from everyone else.
_CAP = """
import os, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
os.execv(sys.argv[2], sys.argv[2:])
"""


def shape_for(mb: float) -> tuple[int, int]:
    """(width, vocabulary) of the generated model of about `mb` MB."""
    return next((w, v) for top, w, v in SHAPES if top is None or mb <= top)


def model_for(work: Path, mb: int) -> Path:
    """The cached generated model of about `mb` MB (generated in a child process when missing)."""
    width, vocab = shape_for(mb)
    path = work / f"pre_ln_w{width}_v{vocab}_{mb}mb.onnx"
    data = Path(str(path) + ".data")
    if path.is_file() and data.is_file():
        return path
    log(f"generating {path.name} ...")
    tmp = Path(tempfile.mkdtemp(prefix=".generating-", dir=work))
    try:
        run_child([sys.executable, str(Path(big_models.__file__).resolve()), str(tmp / path.name), "--mb", str(mb),
                   "--width", str(width), "--vocab", str(vocab)], cwd=work)
        os.replace(tmp / data.name, data)  # data first, model last: a model file always has its data
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def warm(path: Path) -> None:
    """Reads the model's files once, so every measured run starts from the page cache."""
    for p in path.parent.glob(path.name + "*"):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def commands(src: Path, out: Path, peers: list[str], *, verify: bool, cap: int, timeout: int) -> dict[str, list]:
    """label -> argv of every run for one model (outputs under `out`)."""
    runs = {
        "floor: onnx.load + onnx.save": [sys.executable, "-c", _ONNX_FLOOR, str(src), str(out / "onnx.onnx")],
        "floor: onnx_ir.load + onnx_ir.save": [sys.executable, "-c", _IR_FLOOR, str(src), str(out / "ir.onnx")],
        "normfold convert --no-verify": cli("convert", str(src), "-o", str(out / "normfold.onnx"), "--no-verify",
                                            "--force", "--report", str(out / "report.json")),
    }
    if verify:
        runs["normfold convert (with verification)"] = cli("convert", str(src), "-o", str(out / "verified.onnx"),
                                                           "--force")
    for peer in peers:
        argv = [sys.executable, str(Path(peer_tools.__file__).resolve()), peer, str(src), str(out / f"{peer}.onnx"),
                "--model-type", "bert"]  # generic fusions: the model has no attention
        runs[f"peer: {peer}"] = ["timeout", "-s", "KILL", str(timeout), sys.executable, "-S", "-c", _CAP, str(cap),
                                 *argv]
    return runs


def measure(argv: list, out: Path) -> dict:
    """One child run: wall time and peak RSS, or the reason it failed; its outputs are removed after."""
    try:
        result = run_child(argv, cwd=out)
        outcome = {"wall_s": result["wall_s"], "rss_mib": result["rss_mib"]}
    except RuntimeError as exc:
        outcome = {"error": failure_reason(str(exc))}
    report = out / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        outcome["rewritten"] = {"applied": sum(p["applied"] for p in data["passes"]),
                                "untouched_initializers": len(data.get("untouched_initializers") or {})}
    for p in out.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    return outcome


def failure_reason(text: str) -> str:
    """One line saying why a child failed: its signal, else the last line of its stderr."""
    first = text.splitlines()[0]
    match = re.search(r"exited (-?\d+)", first)
    code = int(match.group(1)) if match else None
    if code in (-9, 137):
        return "killed (SIGKILL: its time limit, or the system out of memory)"
    if code is not None and code < 0:
        return f"crashed ({signal.Signals(-code).name}; under the memory cap, an allocation failure)"
    lines = [ln for ln in text.splitlines()[1:] if ln.strip()]
    return (lines[-1] if lines else first)[:240]


def run_size(work: Path, mb: int, peers: list[str], args) -> dict:
    src = model_for(work, mb)
    size = model_bytes(src)
    out = Path(tempfile.mkdtemp(prefix="conv-", dir=work))
    runs = commands(src, out, peers, verify=mb <= args.verify_max_mb, cap=int(args.mem_cap_gb * 2**30),
                    timeout=args.timeout)
    results: dict[str, list[dict]] = {label: [] for label in runs}
    try:
        for round_ in range(args.repeats):
            for label, argv in runs.items():
                if round_ and "error" in results[label][-1]:
                    continue  # a failure is not retried
                warm(src)
                log(f"{mb} MB: {label} (round {round_ + 1}/{args.repeats}) ...")
                results[label].append(measure(argv, out))
                log(f"  -> {results[label][-1]}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    summary = {}
    for label, rs in results.items():
        ok = [r for r in rs if "error" not in r]
        summary[label] = ({"error": rs[-1]["error"]} if not ok else
                          {"wall_s": statistics.median(r["wall_s"] for r in ok),
                           "rss_mib": statistics.median(r["rss_mib"] for r in ok),
                           "wall_all": [r["wall_s"] for r in ok], **({"rewritten": ok[-1]["rewritten"]}
                                                                     if "rewritten" in ok[-1] else {})})
    return {"mb": mb, "bytes": size, "runs": summary}


# --- report ----------------------------------------------------------------------------------------


def floor(r: dict) -> tuple[str, dict]:
    floors = [(k, v) for k, v in r["runs"].items() if k.startswith("floor") and "wall_s" in v]
    return min(floors, key=lambda kv: kv[1]["wall_s"])


def render(info: dict, args, results: list[dict], total_s: float) -> str:
    L = ["# Conversion cost: normfold convert against the load+save floor and the peers", "",
         f"Command: `{args.command_line}`", ""]
    L += machine_table(info)
    L.append("")
    L.append(" ".join(f"""
        Models: benchmarks/big_models.py Pre-LN transformers (float32 random weights, external data;
        width and vocabulary by size: {", ".join(f"{w}/{v} up to {t} MB" if t else f"{w}/{v} above"
        for t, w, v in SHAPES)}; the depth sets the size). Each row is a child process, timed
        from fork to exit (interpreter start-up and imports included) after the model's files were
        read into the page cache; peak MiB is its peak resident set (os.wait4, descendants included).
        "x floor" divides by the faster floor (onnx or onnx_ir load+save of the same model). normfold
        runs its default passes, which rewrite nearly every weight of these models (the worst case);
        "rewritten" gives the rewrites applied and the initializers left untouched. Peers run under a
        {args.mem_cap_gb:g} GB address-space cap and a {args.timeout} s limit; their failures are
        listed as they happened. Medians of {args.repeats} run(s).""".split()))
    L.append("")
    for r in results:
        name, base = floor(r)
        L.append(f"## {r['bytes'] / 1e6:,.0f} MB model")
        L.append("")
        L.append("| run | wall s | every run s | x floor | peak MiB | peak / model size | notes |")
        L.append("|---|--:|--:|--:|--:|--:|---|")
        for label, v in r["runs"].items():
            if "error" in v:
                L.append(f"| {label} | | | | | | **failed**: {failure_reason(v['error'])} |")
                continue
            note = ""
            if "rewritten" in v:
                note = (f"{v['rewritten']['applied']} rewrites, {v['rewritten']['untouched_initializers']} "
                        "initializers untouched")
            if label == name:
                note = (note + "; " if note else "") + "the floor"
            every = " ".join(f"{w:.2f}" for w in v.get("wall_all", [v["wall_s"]]))
            L.append(f"| {label} | {v['wall_s']:.1f} | {every} | {v['wall_s'] / base['wall_s']:.2f} "
                     f"| {v['rss_mib']:.0f} | {v['rss_mib'] * 2**20 / r['bytes']:.3f} | {note} |")
        L.append("")
    big = [r for r in results if r["bytes"] > 2**31 and "wall_s" in r["runs"].get("normfold convert --no-verify", {})]
    if big:
        L.append("## Targets (models over 2 GB)")
        L.append("")
        L.append(f"normfold convert --no-verify within {TARGET_TIME:g}x the floor's wall time, peak RSS under "
                 f"{TARGET_MEMORY:.2f} of the model's size. \"x fastest floor\" is the stricter reading: "
                 "normfold's median against the floor's fastest single run.")
        L.append("")
        L.append("| model MB | normfold s | floor s | x floor | x fastest floor | met | peak MiB | peak / size | met |")
        L.append("|--:|--:|--:|--:|--:|---|--:|--:|---|")
        for r in big:
            v, (_, base) = r["runs"]["normfold convert --no-verify"], floor(r)
            ratio, share = v["wall_s"] / base["wall_s"], v["rss_mib"] * 2**20 / r["bytes"]
            strict = v["wall_s"] / min(base.get("wall_all", [base["wall_s"]]))
            L.append(f"| {r['bytes'] / 1e6:,.0f} | {v['wall_s']:.1f} | {base['wall_s']:.1f} | {ratio:.2f} "
                     f"| {strict:.2f} | {'yes' if max(ratio, strict) <= TARGET_TIME else '**no**'} "
                     f"| {v['rss_mib']:.0f} | {share:.3f} | {'yes' if share < TARGET_MEMORY else '**no**'} |")
        L.append("")
    if total_s:
        L.append(f"Total benchmark time: {total_s:.0f} s.")
        L.append("")
    return "\n".join(L)


SCALING_RUNS = ("floor: onnx.load + onnx.save", "floor: onnx_ir.load + onnx_ir.save", "normfold convert --no-verify")


def render_scaling(results: list[dict]) -> list[str]:
    L = ["## Scaling: conversion time and peak memory against model size", "",
         "| model MB | " + " | ".join(f"{k} s | {k} MiB" for k in SCALING_RUNS) + " | normfold x floor |",
         "|--:|" + "--:|--:|" * len(SCALING_RUNS) + "--:|"]
    for r in sorted(results, key=lambda r: r["bytes"]):
        cells = []
        for k in SCALING_RUNS:
            v = r["runs"].get(k, {})
            cells.append(f"{v['wall_s']:.1f} | {v['rss_mib']:.0f}" if "wall_s" in v else "failed | ")
        nf = r["runs"].get("normfold convert --no-verify", {})
        ratio = f"{nf['wall_s'] / floor(r)[1]['wall_s']:.2f}" if "wall_s" in nf else ""
        L.append(f"| {r['bytes'] / 1e6:,.0f} | " + " | ".join(cells) + f" | {ratio} |")
    L.append("")
    L.append("![conversion time and peak memory against model size](conversion_scaling.png)")
    L.append("")
    return L


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    results = sorted(results, key=lambda r: r["bytes"])
    labels = list(SCALING_RUNS) + sorted({k for r in results for k in r["runs"] if k.startswith("peer")})
    for label in labels:
        pts = [(r["bytes"] / 1e9, r["runs"][label]) for r in results if "wall_s" in r["runs"].get(label, {})]
        if not pts:
            continue
        style = "-o" if label.startswith(("floor", "normfold")) else "--x"
        ax_t.plot([p[0] for p in pts], [p[1]["wall_s"] for p in pts], style, label=label)
        ax_m.plot([p[0] for p in pts], [p[1]["rss_mib"] / 1024 for p in pts], style, label=label)
    sizes = [r["bytes"] / 1e9 for r in results]
    ax_m.plot(sizes, [s * 1e9 / 2**30 / 3 for s in sizes], ":", color="grey", label="a third of the model")
    ax_t.set(xlabel="model size (GB)", ylabel="wall time (s)", title="conversion time")
    ax_m.set(xlabel="model size (GB)", ylabel="peak RSS (GiB)", title="peak memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,2400", help="model sizes in MB measured with every run")
    parser.add_argument("--scaling", default="100,250,500,1000,2400",
                        help="model sizes in MB for the scaling table and plot (floors and normfold only)")
    parser.add_argument("--peers", default=",".join(peer_tools.PEERS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each child (medians reported)")
    parser.add_argument("--verify-max-mb", type=int, default=1000,
                        help="also time convert with verification on models up to this size")
    parser.add_argument("--mem-cap-gb", type=float, default=8.0, help="peers' address-space cap")
    parser.add_argument("--timeout", type=int, default=600, help="peers' time limit in seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "conversion_cost.md")
    parser.add_argument("--plot", type=Path, default=RESULTS / "conversion_scaling.png")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "normfold-conversion")
    parser.add_argument("--from-json", type=Path, help="re-render the results a run saved (conversion_partial.json)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    scaling = [int(s) for s in args.scaling.split(",") if s]
    peers = [p for p in args.peers.split(",") if p]
    if set(peers) - set(peer_tools.PEERS) or args.repeats < 1:
        parser.error(f"--peers from {', '.join(peer_tools.PEERS)}; --repeats at least 1")
    given = sys.argv[1:] if argv is None else list(argv)
    if args.from_json:  # the command that measured, not the one re-rendering
        i = given.index("--from-json") if "--from-json" in given else None
        given = given[:i] + given[i + 2:] if i is not None else [a for a in given if not a.startswith("--from-json")]
    args.command_line = " ".join(["python", "benchmarks/bench_conversion.py", *given])
    started = time.perf_counter()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.from_json.read_text()) if args.from_json else []
    for mb in [] if args.from_json else sorted(set(sizes) | set(scaling)):
        results.append(run_size(work, mb, peers if mb in sizes else [], args))
        results[-1]["elapsed_s"] = time.perf_counter() - started
        (work / "conversion_partial.json").write_text(json.dumps(results))
    total = results[-1].get("elapsed_s", 0.0) if args.from_json else time.perf_counter() - started
    text = render(machine_info(), args, [r for r in results if r["mb"] in sizes], total)
    text += "\n" + "\n".join(render_scaling(results))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(results, args.plot)
    log(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
