"""Numerical equivalence of two models on onnxruntime.

Both models run on the same seeded inputs; the reference with every onnxruntime graph optimization
disabled, so a fusion cannot hide a bug. Each output passes when, elementwise,

    |candidate - reference| <= atol * scale + rtol * |reference|,   scale = max(1, rms(reference)),

with (rtol, atol) taken per output dtype from REFERENCE.md's table, unless given. Integer and bool
outputs must match exactly; NaNs must sit in the same places. Inputs: N(0, 1) floats, integer ids in
the range of the embedding table they index (else [0, 10)), random bools; or the user's own (.npz).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from normfold import io, runtime
from normfold.errors import InputError

# (rtol, atol-before-scaling) per dtype and per kind of rewrite, from REFERENCE.md.
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "fold": {"float32": (1e-4, 1e-5), "float64": (1e-4, 1e-5), "float16": (1e-2, 1e-2), "bfloat16": (3e-2, 3e-2)},
    "renorm": {"float32": (1e-4, 1e-4), "float64": (1e-4, 1e-4), "float16": (1e-2, 1e-2), "bfloat16": (3e-2, 3e-2)},
}
TOLERANCE_ORDER = ("fold", "renorm")
"""Tolerance classes from strictest to loosest; a pipeline verifies with the loosest its passes need."""


@dataclass
class OutputCheck:
    """The comparison of one output."""

    name: str
    dtype: str
    shape: list[int]
    passed: bool
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    cosine: float
    rtol: float
    atol: float
    nonfinite: int = 0
    """Reference elements that are NaN or infinite (they must match exactly, and prove little)."""
    worst_index: list[int] | None = None
    worst_reference: float | None = None
    worst_candidate: float | None = None
    message: str = ""


@dataclass
class VerificationResult:
    """Per-output checks plus the inputs' provenance."""

    passed: bool
    outputs: list[OutputCheck]
    provider: str
    seed: int
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["max_abs_error"] = self.max_abs_error
        data["max_rel_error"] = self.max_rel_error
        return data

    def summary_lines(self) -> list[str]:
        lines = [f"verification {'passed' if self.passed else 'FAILED'} on {self.provider} (seed {self.seed})"]
        for o in self.outputs:
            status = "ok  " if o.passed else "FAIL"
            lines.append(
                f"  {status} {o.name} {o.dtype}{o.shape}: max_abs {o.max_abs_error:.3g}, max_rel "
                f"{o.max_rel_error:.3g}, cosine {o.cosine:.6f} (rtol {o.rtol:g}, atol {o.atol:.3g})"
                + (f" {o.message}" if o.message else "")
            )
        return lines


def verify(
    reference: ir.Model | str | os.PathLike,
    candidate: ir.Model | str | os.PathLike,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    tolerance_class: str = "fold",
    provider: str = "cpu",
    seed: int = 0,
) -> VerificationResult:
    """Runs both models on the same inputs and compares every output (see module docstring)."""
    ref_model = reference if isinstance(reference, ir.Model) else io.load(reference)
    if not isinstance(candidate, ir.Model):
        io.load(candidate)  # validates it, external-data paths included, before onnxruntime reads it
    with runtime.model_file(reference) as ref_path, runtime.model_file(candidate) as cand_path:
        ref_session = runtime.make_session(ref_path, provider="cpu", optimize=False)
        cand_session = runtime.make_session(cand_path, provider=provider, optimize=True)
        feeds = make_inputs(ref_session, ref_model, user_inputs=inputs, shapes=shapes, seed=seed)
        _check_same_interface(ref_session, cand_session, feeds)
        ref_outputs = _run(ref_session, feeds, "reference")
        cand_outputs = _run(cand_session, feeds, "candidate")
    checks = [
        compare(meta.name, ref, cand, atol=atol, rtol=rtol, tolerance_class=tolerance_class)
        for meta, ref, cand in zip(ref_session.get_outputs(), ref_outputs, cand_outputs)
    ]
    return VerificationResult(
        passed=all(c.passed for c in checks),
        outputs=checks,
        provider=provider,
        seed=seed,
        input_shapes={k: list(v.shape) for k, v in feeds.items()},
    )


def compare(name, reference, candidate, *, atol=None, rtol=None, tolerance_class="fold") -> OutputCheck:
    """Compares one output pair with the tolerance rule of the module docstring."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    dtype = _dtype_name(reference.dtype)
    base = dict(name=name, dtype=dtype, shape=list(reference.shape))
    if reference.shape != candidate.shape:
        return OutputCheck(**base, passed=False, max_abs_error=float("inf"), max_rel_error=float("inf"),
                           mean_abs_error=float("inf"), cosine=0.0, rtol=0.0, atol=0.0,
                           message=f"shape differs: candidate {list(candidate.shape)}")
    if reference.dtype.kind not in "fc":
        equal = np.array_equal(reference, candidate)
        diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)) if reference.dtype.kind != "O" else None
        max_abs = float(diff.max()) if diff is not None and diff.size else 0.0
        return OutputCheck(**base, passed=bool(equal), max_abs_error=max_abs, max_rel_error=0.0 if equal else float("inf"),
                           mean_abs_error=float(diff.mean()) if diff is not None and diff.size else 0.0,
                           cosine=1.0 if equal else 0.0, rtol=0.0, atol=0.0)
    default_rtol, default_atol = TOLERANCES[tolerance_class].get(dtype, TOLERANCES[tolerance_class]["float32"])
    ref64, cand64 = reference.astype(np.float64), candidate.astype(np.float64)
    finite = np.isfinite(ref64)
    scale = max(1.0, float(np.sqrt(np.mean(np.square(ref64[finite]))))) if finite.any() else 1.0
    rtol = default_rtol if rtol is None else rtol
    atol_abs = (default_atol if atol is None else atol) * scale
    diff = np.abs(cand64 - ref64)
    same_nonfinite = (np.isnan(ref64) & np.isnan(cand64)) | (np.isinf(ref64) & (ref64 == cand64))
    diff = np.where(same_nonfinite, 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    magnitude = np.abs(np.where(finite, ref64, 0.0))
    bad = diff > atol_abs + rtol * magnitude
    rel = diff / np.maximum(magnitude, atol_abs)
    check = OutputCheck(
        **base,
        passed=not bool(bad.any()),
        max_abs_error=float(diff.max()) if diff.size else 0.0,
        max_rel_error=float(rel.max()) if rel.size else 0.0,
        mean_abs_error=float(diff.mean()) if diff.size else 0.0,
        cosine=_cosine(ref64[finite & np.isfinite(cand64)], cand64[finite & np.isfinite(cand64)]),
        rtol=rtol,
        atol=atol_abs,
        nonfinite=int((~finite).sum()),
    )
    if check.nonfinite:
        check.message = f"{check.nonfinite} reference elements are NaN or infinite. "
    if bad.any():
        worst = np.unravel_index(int(np.argmax(np.where(bad, diff, -1.0))), diff.shape)
        check.worst_index = [int(i) for i in worst]
        check.worst_reference = float(ref64[worst])
        check.worst_candidate = float(cand64[worst])
        check.message += (f"{int(bad.sum())} of {bad.size} elements out of tolerance; worst at {check.worst_index}: "
                         f"reference {check.worst_reference:.6g}, candidate {check.worst_candidate:.6g}")
    return check


def make_inputs(session, model: ir.Model, *, user_inputs=None, shapes=None, seed=0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input that is not an initializer; user arrays win, `shapes` fix dynamic dims."""
    rng = np.random.default_rng(seed)
    user_inputs = dict(user_inputs or {})
    shapes = dict(shapes or {})
    defaults = {v.name for v in model.graph.inputs if v.is_initializer()}
    metas = [meta for meta in session.get_inputs() if meta.name not in defaults]
    known = {meta.name for meta in metas}
    unknown = sorted((set(user_inputs) | set(shapes)) - known)
    if unknown:
        raise InputError(f"no model input named {', '.join(map(repr, unknown))} (inputs: {', '.join(sorted(known))})")
    feeds = {}
    for meta in metas:
        if meta.name in user_inputs:
            feeds[meta.name] = np.asarray(user_inputs[meta.name])
            continue
        shape = _resolve_shape(meta, shapes.get(meta.name))
        feeds[meta.name] = _random_input(meta.type, shape, rng, id_range=_id_range(model, meta.name))
    return feeds


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads user inputs from an .npz file (no pickled objects)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read inputs ({str(exc).splitlines()[0][:200]})") from None


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def _random_input(ort_type: str, shape: list[int], rng: np.random.Generator, *, id_range: int | None):
    if ort_type == "tensor(bfloat16)":
        import ml_dtypes

        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    if ort_type not in _ORT_TYPES:
        raise InputError(f"cannot generate inputs of type {ort_type}; pass them with --inputs FILE.npz")
    dtype = np.dtype(_ORT_TYPES[ort_type])
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, id_range or 10, size=shape).astype(dtype)


MAX_GENERATED_ELEMENTS = 1 << 28
"""Largest input normfold generates by itself (1 GiB of float32); larger ones must come from --inputs."""


def _resolve_shape(meta, override: list[int] | None) -> list[int]:
    shape = _declared_or_given_shape(meta, override)
    if int(np.prod(shape, dtype=object)) > MAX_GENERATED_ELEMENTS:
        raise InputError(
            f"input {meta.name!r} of shape {shape} is too large to generate; give a smaller shape with "
            f"--shape or the data with --inputs"
        )
    return shape


def _declared_or_given_shape(meta, override: list[int] | None) -> list[int]:
    if override is not None:
        if len(override) != len(meta.shape):
            raise InputError(f"--shape {meta.name}: {len(override)} dims given, the input has {len(meta.shape)}")
        return [int(d) for d in override]
    dynamic = [str(d) if d is not None else "?" for d in meta.shape if not isinstance(d, int) or d < 0]
    if dynamic:
        example = ",".join(str(d) if isinstance(d, int) and d >= 0 else "N" for d in meta.shape)
        raise InputError(
            f"input {meta.name!r} has dynamic dims {dynamic}: give its shape with --shape {meta.name}={example}"
        )
    return list(meta.shape)


def _id_range(model: ir.Model, input_name: str) -> int | None:
    """The row count of the table an integer input indexes through Gather, if the model says so."""
    value = next((v for v in model.graph.inputs if v.name == input_name), None)
    if value is None:
        return None
    for user, index in value.uses():
        if user.op_type == "Gather" and index == 1 and user.inputs[0] is not None and user.inputs[0].shape is not None:
            dim = user.inputs[0].shape[user.attributes.get_int("axis", 0)]
            if isinstance(dim, int):
                return dim
    return None


def _check_same_interface(ref_session, cand_session, feeds) -> None:
    cand_in = {m.name: m.type for m in cand_session.get_inputs()}
    ref_in = {m.name: m.type for m in ref_session.get_inputs()}
    for name in feeds:
        if cand_in.get(name) != ref_in[name]:
            raise InputError(f"the models' inputs differ: candidate has no input {name!r} of {ref_in[name]}")
    ref_out = [m.name for m in ref_session.get_outputs()]
    cand_out = [m.name for m in cand_session.get_outputs()]
    if ref_out != cand_out:
        raise InputError(f"the models' outputs differ: reference {ref_out}, candidate {cand_out}")


def _run(session, feeds, which: str) -> list:
    try:
        return session.run(None, feeds)
    except Exception as exc:  # onnxruntime's own exception types
        raise InputError(f"onnxruntime failed to run the {which} model: {runtime.ort_error_message(exc)}") from None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a.reshape(-1), b.reshape(-1)) / (na * nb))


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    return "bfloat16" if "bfloat16" in name else name
