#!/usr/bin/env python3
"""The peer optimizers normfold is compared with, each run the way its documentation shows.

    python benchmarks/peers.py PEER SRC.onnx DST.onnx [--model-type bert|gpt2|vit] [--heads N] [--hidden N]

PEER is one of:
- `ort-offline`: onnxruntime's own graph optimizer, saved offline (SessionOptions.optimized_model_filepath
  with ORT_ENABLE_ALL on the CPU provider; external initializers go to DST.data when the source had any);
- `ort-transformers`: onnxruntime.transformers.optimizer.optimize_model with --model-type (its default
  opt_level for that type), saved with save_model_to_file;
- `onnxsim`: onnxsim.simplify on the loaded model (external data loaded), saved with onnx.save;
- `onnxslim`: onnxslim.slim(SRC, DST);
- `onnxoptimizer`: onnxoptimizer.optimize with its default passes (fusions and eliminations).

Each run is meant to be a child process of a benchmark (benchmarks/bench_fold_batchnorm.run_child times it
and reads its peak RSS); it prints one JSON line with its own VmHWM. A peer that raises exits 1 with
its error on stderr: the benchmark records that, it does not hide it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PEERS = ("ort-offline", "ort-transformers", "onnxsim", "onnxslim", "onnxoptimizer")
_PROTOBUF_LIMIT = 2**31 - 1


def has_external_data(path: Path) -> bool:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _save(model, dst: Path, external: bool) -> None:
    import onnx

    if external or model.ByteSize() > _PROTOBUF_LIMIT:
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(dst))


def ort_offline(src: Path, dst: Path, external: bool, **_) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.optimized_model_filepath = str(dst)
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         dst.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), sess_options=options, providers=["CPUExecutionProvider"])


def ort_transformers(src: Path, dst: Path, external: bool, model_type: str, heads: int, hidden: int) -> None:
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    optimized = optimize_model(str(src), model_type=model_type, num_heads=heads, hidden_size=hidden, use_gpu=False)
    optimized.save_model_to_file(str(dst), use_external_data_format=external)


def onnxsim(src: Path, dst: Path, external: bool, **_) -> None:
    import onnx
    import onnxsim as sim

    model, ok = sim.simplify(onnx.load(str(src)))
    if not ok:
        raise RuntimeError("onnxsim's own check says the simplified model differs")
    _save(model, dst, external)


def onnxslim(src: Path, dst: Path, external: bool, **_) -> None:
    import onnxslim as slim

    slim.slim(str(src), str(dst))


def onnxoptimizer(src: Path, dst: Path, external: bool, **_) -> None:
    import onnx
    import onnxoptimizer as opt

    _save(opt.optimize(onnx.load(str(src))), dst, external)


RUNNERS = {"ort-offline": ort_offline, "ort-transformers": ort_transformers, "onnxsim": onnxsim,
           "onnxslim": onnxslim, "onnxoptimizer": onnxoptimizer}


def run(peer: str, src: Path, dst: Path, *, model_type: str = "bert", heads: int = 0, hidden: int = 0) -> None:
    """Runs one peer on SRC, writing DST (and DST.data when the source keeps external data)."""
    RUNNERS[peer](Path(src), Path(dst), has_external_data(Path(src)), model_type=model_type, heads=heads,
                  hidden=hidden)
    if not Path(dst).is_file():
        raise RuntimeError(f"{peer} wrote no output")


def _hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--model-type", default="bert", help="ort-transformers' model_type")
    parser.add_argument("--heads", type=int, default=0, help="ort-transformers' num_heads (0: detect)")
    parser.add_argument("--hidden", type=int, default=0, help="ort-transformers' hidden_size (0: detect)")
    args = parser.parse_args(argv)
    try:
        run(args.peer, args.src, args.dst, model_type=args.model_type, heads=args.heads, hidden=args.hidden)
    except Exception as exc:  # recorded by the benchmark as this peer's failure
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        print(f"{args.peer} failed: {type(exc).__name__}: {text}", file=sys.stderr)
        return 1
    print(json.dumps({"vmhwm_mib": _hwm_mib(), "pid": os.getpid()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
