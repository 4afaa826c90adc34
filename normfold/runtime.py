"""onnxruntime sessions: provider selection, provider options, and building a session.

Providers are named `cpu`, `cuda`, `tensorrt` or `auto` (the best one onnxruntime reports as
available: TensorRT, then CUDA, then CPU). Availability comes from onnxruntime itself
(`get_available_providers()` for the build, `InferenceSession.get_providers()` for whether the
provider really started). An unavailable provider is an error naming what is available and how to
install the GPU build; with `allow_fallback` it falls back to the next provider in AUTO_ORDER
instead, with a ProviderFallbackWarning, and the ProviderChoice records requested and used.

Provider options (`device_id=1`, `trt_fp16_enable=True`, ...) go to onnxruntime as strings. A
TensorRT session lists CUDA (when available) and CPU after TensorRT, onnxruntime's recommended order,
so nodes TensorRT cannot take still run: `trt_*` options go to TensorRT, the others to CUDA, and
`device_id` to both. onnxruntime's own silent fallback (it retries on CPU, printing to stdout, when a
GPU provider fails) is turned off: a provider that fails to start is reported like a missing one.

A model with external data, or too big for one protobuf, is materialized into a temporary directory
so onnxruntime can read its tensors from disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from normfold.errors import InputError, RuntimeUnavailableError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
"""Best first: what `auto` picks from, and the order a fallback walks down."""
INSTALL_HINT = "pip install 'normfold[gpu]' (onnxruntime-gpu, in place of onnxruntime)"
SHARED_GPU_OPTIONS = frozenset({"device_id", "user_compute_stream", "has_user_compute_stream"})
"""Options TensorRT and CUDA both take; under TensorRT they go to both."""


class ProviderFallbackWarning(UserWarning):
    """The requested execution provider could not be used; another one runs instead."""


@dataclass(frozen=True)
class ProviderChoice:
    """The provider asked for, the one that runs, and its options (validated, as strings)."""

    requested: str
    used: str
    options: dict[str, str] = field(default_factory=dict)
    fallback: str | None = None
    """Why `used` is not what was requested (None when it is, or when `auto` picked it)."""

    @property
    def onnxruntime_name(self) -> str:
        return PROVIDERS[self.used]

    def session_providers(self, available: list[str] | None = None) -> list[tuple[str, dict[str, str]]]:
        """onnxruntime's `providers` list: the chosen provider, then the ones that take what it cannot."""
        available = onnxruntime().get_available_providers() if available is None else available
        if self.used == "cpu":
            return [(PROVIDERS["cpu"], {})]
        if self.used == "cuda":
            return [(PROVIDERS["cuda"], dict(self.options)), (PROVIDERS["cpu"], {})]
        trt = {k: v for k, v in self.options.items() if k.startswith("trt_") or k in SHARED_GPU_OPTIONS}
        chain = [(PROVIDERS["tensorrt"], trt)]
        if PROVIDERS["cuda"] in available:
            chain.append((PROVIDERS["cuda"], {k: v for k, v in self.options.items() if not k.startswith("trt_")}))
        return chain + [(PROVIDERS["cpu"], {})]

    def describe(self) -> str:
        """One line: what runs and why."""
        if self.fallback:
            return f"{self.onnxruntime_name} (fallback from {self.requested}: {self.fallback})"
        if self.requested == "auto":
            return f"{self.onnxruntime_name} (the best of {', '.join(available_names())})"
        return self.onnxruntime_name

    def to_dict(self) -> dict:
        return {"requested": self.requested, "used": self.used, "onnxruntime": self.onnxruntime_name,
                "options": dict(self.options), "fallback": self.fallback}


def onnxruntime():
    """The onnxruntime module, or a clear error saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailableError(
            "onnxruntime is not installed: pip install 'normfold[cpu]' (or 'normfold[gpu]')"
        ) from None
    return ort


def available_names() -> list[str]:
    """onnxruntime's available providers that normfold knows by a short name, best first."""
    available = onnxruntime().get_available_providers()
    return [PROVIDERS[n] for n in AUTO_ORDER if PROVIDERS[n] in available]


def resolve_provider(name: str = "cpu") -> str:
    """Maps a short provider name to onnxruntime's, checking that this onnxruntime has it."""
    return select_provider(name).onnxruntime_name


def select_provider(
    name: str | ProviderChoice = "cpu",
    options: Mapping[str, object] | None = None,
    *,
    allow_fallback: bool = False,
) -> ProviderChoice:
    """Picks the provider to run on (see module docstring); a ProviderChoice is returned as it is."""
    if isinstance(name, ProviderChoice):
        if options:
            raise InputError("provider options go into the ProviderChoice, not beside it")
        return name
    if name != "auto" and name not in PROVIDERS:
        raise InputError(f"unknown provider {name!r}; choose one of: auto, {', '.join(PROVIDERS)}")
    options = normalize_options(options)
    available = onnxruntime().get_available_providers()
    best = next(n for n in AUTO_ORDER if PROVIDERS[n] in available or n == "cpu")
    if name == "auto":
        check_options(best, options, picked_by_auto=True)
        return ProviderChoice("auto", best, options)
    check_options(name, options)
    if PROVIDERS[name] in available:
        return ProviderChoice(name, name, options)
    missing = f"execution provider {PROVIDERS[name]} is not available in this onnxruntime " \
              f"(available: {', '.join(available)})"
    if not allow_fallback:
        raise RuntimeUnavailableError(f"{missing}; install it with {INSTALL_HINT}, or pass --allow-fallback "
                                      f"(allow_fallback=True) to run on {PROVIDERS[best]} instead")
    return fall_back(ProviderChoice(name, name, options), missing, available)


def fall_back(choice: ProviderChoice, reason: str, available: list[str] | None = None) -> ProviderChoice:
    """The next provider after `choice.used` in AUTO_ORDER that onnxruntime has, with a warning."""
    available = onnxruntime().get_available_providers() if available is None else available
    below = AUTO_ORDER[AUTO_ORDER.index(choice.used) + 1:]
    used = next((n for n in below if PROVIDERS[n] in available or n == "cpu"), None)
    if used is None:
        raise RuntimeUnavailableError(f"{reason}; no provider left to fall back to")
    kept = {k: v for k, v in choice.options.items() if not option_problem(used, k)}
    dropped = sorted(set(choice.options) - set(kept))
    text = f"{reason}; running on {PROVIDERS[used]} instead"
    if dropped:
        text += f" (options it does not take dropped: {', '.join(dropped)})"
    warnings.warn(text, ProviderFallbackWarning, stacklevel=3)
    return ProviderChoice(choice.requested, used, kept, fallback=text)


def normalize_options(options: Mapping[str, object] | None) -> dict[str, str]:
    """Provider options as onnxruntime takes them: string keys and values, booleans as True/False."""
    result = {}
    for key, value in (options or {}).items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise InputError(f"provider option {key!r}: expected a name like device_id or trt_fp16_enable")
        if isinstance(value, bool):
            text = str(value)
        elif isinstance(value, (int, float, str)):
            text = str(value).strip()
        else:
            raise InputError(f"provider option {key}: {value!r} is not a string, number or boolean")
        if text.lower() in ("true", "false") or (key.endswith("_enable") and text in ("0", "1")):
            text = "True" if text.lower() in ("true", "1") else "False"
        if not text:
            raise InputError(f"provider option {key}: empty value")
        result[key] = text
    return result


def parse_options(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (the CLI's --provider-option) as a dict; a key given twice is an error."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise InputError(f"--provider-option {item!r}: expected KEY=VALUE, e.g. device_id=1")
        if key in options:
            raise InputError(f"--provider-option: {key} is given twice")
        options[key] = value
    return normalize_options(options)


def option_problem(provider: str, key: str) -> str | None:
    """Why `key` is obviously wrong for `provider` (a short name), or None when it may be right.

    CPU takes no provider options; `trt_*` options are TensorRT's; under TensorRT every other key goes
    to the CUDA provider that follows it, which checks it itself.
    """
    if provider == "cpu":
        return "the CPU provider takes no provider options"
    if provider == "cuda" and key.startswith("trt_"):
        return "a TensorRT option, not for CUDAExecutionProvider (use --provider tensorrt)"
    return None


def check_options(provider: str, options: Mapping[str, str], *, picked_by_auto: bool = False) -> None:
    """Raises InputError for the first option `provider` cannot take."""
    for key in options:
        problem = option_problem(provider, key)
        if problem:
            picked = f"; auto picked {PROVIDERS[provider]}" if picked_by_auto else ""
            raise InputError(f"provider option {key}: {problem}{picked}")


SPINNING_KEY = "session.intra_op.allow_spinning"


def make_session(model_file: str | os.PathLike, *, provider: str | ProviderChoice = "cpu", optimize: bool = True,
                 threads: int = 0, provider_options: Mapping[str, object] | None = None,
                 allow_fallback: bool = False, spin: bool = True):
    """An InferenceSession on `model_file`; graph optimizations fully on, or fully off for a reference."""
    return open_session(model_file, provider=provider, optimize=optimize, threads=threads,
                        provider_options=provider_options, allow_fallback=allow_fallback, spin=spin)[0]


def open_session(model_file: str | os.PathLike, *, provider: str | ProviderChoice = "cpu", optimize: bool = True,
                 threads: int = 0, provider_options: Mapping[str, object] | None = None,
                 allow_fallback: bool = False, spin: bool = True):
    """(session, ProviderChoice): the session and the provider that really runs it.

    `spin=False` makes the session's idle intra-op threads sleep instead of spinning
    (session.intra_op.allow_spinning=0): for timing several sessions interleaved, where one session's
    spinning threads would take the cores from the next.

    A provider onnxruntime lists but cannot start (missing CUDA, cuDNN or TensorRT libraries, a bad
    option) is an error, or with `allow_fallback` a warned fallback down AUTO_ORDER; `auto` always walks
    down (onnxruntime-gpu lists TensorRT even where TensorRT's libraries are not installed).
    """
    ort = onnxruntime()
    choice = select_provider(provider, provider_options, allow_fallback=allow_fallback)
    allow_fallback = allow_fallback or choice.requested == "auto"
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry(SPINNING_KEY, "0")
    while True:
        try:
            session = ort.InferenceSession(str(model_file), sess_options=options,
                                           providers=choice.session_providers(), enable_fallback=0)
        except Exception as exc:  # onnxruntime raises its own exception types, all "cannot run this model"
            problem = f"onnxruntime cannot create a session on {choice.onnxruntime_name}: {ort_error_message(exc)}"
            if choice.used == "cpu":
                raise InputError(f"onnxruntime cannot load the model: {ort_error_message(exc)}") from None
            if not allow_fallback:
                raise RuntimeUnavailableError(problem) from None
            choice = fall_back(choice, problem)
            continue
        problem = provider_not_started(session.get_providers(), choice)
        if problem is None:
            return session, choice
        if not allow_fallback:
            raise RuntimeUnavailableError(problem)
        choice = fall_back(choice, problem)


def provider_not_started(started: list[str], choice: ProviderChoice) -> str | None:
    """Why the session does not run on `choice` (onnxruntime drops a provider that fails to start)."""
    if choice.onnxruntime_name in started:
        return None
    return (f"onnxruntime lists {choice.onnxruntime_name} but could not start it (its CUDA, cuDNN or TensorRT "
            f"libraries are missing or do not match this onnxruntime; started: {', '.join(started)})")


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
