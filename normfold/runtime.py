"""onnxruntime sessions: provider selection and building a session from a model in memory or on disk.

Providers are named `cpu`, `cuda`, `tensorrt` or `auto` (the best one onnxruntime reports as
available: TensorRT, then CUDA, then CPU). A provider that is not available is an error, never a
silent fallback. A model with external data, or too big for one protobuf, is materialized into a
temporary directory so onnxruntime can read its tensors from disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from normfold.errors import InputError, RuntimeUnavailableError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def onnxruntime():
    """The onnxruntime module, or a clear error saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailableError(
            "onnxruntime is not installed: pip install 'normfold[cpu]' (or 'normfold[gpu]')"
        ) from None
    return ort


def resolve_provider(name: str = "cpu") -> str:
    """Maps a short provider name to onnxruntime's, checking that this onnxruntime has it."""
    available = onnxruntime().get_available_providers()
    if name == "auto":
        return next(PROVIDERS[n] for n in AUTO_ORDER if PROVIDERS[n] in available)
    if name not in PROVIDERS:
        raise InputError(f"unknown provider {name!r}; choose one of: auto, {', '.join(PROVIDERS)}")
    provider = PROVIDERS[name]
    if provider not in available:
        raise RuntimeUnavailableError(
            f"execution provider {provider} is not available in this onnxruntime "
            f"(available: {', '.join(available)})"
        )
    return provider


def make_session(model_file: str | os.PathLike, *, provider: str = "cpu", optimize: bool = True, threads: int = 0):
    """An InferenceSession on `model_file`; graph optimizations fully on, or fully off for a reference."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = [resolve_provider(provider)]
    if providers[0] != PROVIDERS["cpu"]:
        providers.append(PROVIDERS["cpu"])
    try:
        return ort.InferenceSession(str(model_file), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types, all "cannot run this model"
        raise InputError(f"onnxruntime cannot load the model: {ort_error_message(exc)}") from None


def ort_error_message(exc: BaseException) -> str:
    """onnxruntime's error text without its "[ONNXRuntimeError] : 1 : FAIL : file.cc:123 Func(...)" prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    if re.match(r"^\S+\.(cc|h|cpp):\d+ ", text):
        depth, end = 0, None
        for i, char in enumerate(text):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if char == ")" and depth == 0:
                end = i + 1
                break
        text = text[end:].strip() if end else text
    return text[:300]


@contextlib.contextmanager
def model_file(model: ir.Model | str | os.PathLike) -> Iterator[Path]:
    """A path onnxruntime can load: the given file, or the in-memory model saved to a temporary dir."""
    if not isinstance(model, ir.Model):
        yield Path(model)
        return
    with tempfile.TemporaryDirectory(prefix="normfold-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1 << 20)
        yield path
