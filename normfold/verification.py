"""Numerical equivalence of two models on onnxruntime.

Both models run on the same seeded inputs; the reference with every onnxruntime graph optimization
disabled, so a fusion cannot hide a bug. Each output passes when, elementwise,

    |candidate - reference| <= atol * scale + rtol * |reference|,   scale = max(1, rms(reference)),

with (rtol, atol) taken per output dtype from REFERENCE.md's table (the coarser dtype when the two
differ), unless given, globally or per output. Integer and bool outputs must match exactly; NaNs must
sit in the same places. Inputs: N(0, 1) floats, integer ids in the range of the embedding table they
index (else [0, 10)), random bools; or the user's own (.npz).

An output that fails against a reference model is judged once more against that model evaluated in
float64 (normfold.exact): it passes when it is within the same tolerance of the exact result and no
further from it than the float32 reference run is (an ill-conditioned original, not the candidate, was off).

The reference side can also be a reference file (normfold.reference): the inputs and outputs of a
reference run saved earlier, so a candidate is checked without the original model (and without the
float64 arbiter).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from normfold import exact, io, provider_tolerances, runtime
from normfold.errors import InputError
from normfold.reference import ReferenceData
from normfold.reference import load as load_reference

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
    judged_against: str = "reference"
    """"reference", or "float64" when the float32 reference was off its own float64 evaluation and the
    candidate was checked against that instead (normfold.exact)."""


@dataclass
class VerificationResult:
    """Per-output checks plus the inputs' provenance."""

    passed: bool
    outputs: list[OutputCheck]
    provider: str
    seed: int
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    tolerance_class: str = "fold"
    requested_provider: str | None = None
    """The provider asked for; it differs from `provider` after `auto` or a fallback."""
    provider_options: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"
    """The candidate provider's arithmetic (normfold.provider_tolerances): it widens the default tolerances."""
    fallback: str | None = None

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

    def summary_lines(self, max_passing: int = 10) -> list[str]:
        """A short summary: a headline, every failing output, and the passing ones unless there are many."""
        failing = [o for o in self.outputs if not o.passed]
        head = f"verification {'passed' if self.passed else 'FAILED'} on {self._provider_label()} (seed {self.seed})"
        if failing:
            head += f": {len(failing)} of {len(self.outputs)} outputs out of tolerance"
        lines = [head]
        passing = [o for o in self.outputs if o.passed]
        shown = {id(o) for o in failing} | ({id(o) for o in passing} if len(passing) <= max_passing else set())
        for o in self.outputs:
            if id(o) in shown:
                lines.append(_output_line(o))
        if len(passing) > max_passing:
            worst = max(passing, key=lambda o: o.max_abs_error)
            lines.append(f"  ok   {len(passing)} outputs within tolerance (largest max_abs {worst.max_abs_error:.3g}, "
                         f"in {worst.name})")
        return lines

    def _provider_label(self) -> str:
        label = self.provider
        if self.requested_provider and self.requested_provider != self.provider:
            label += f" (requested {self.requested_provider})"
        return label + (f", {self.precision} tolerances" if self.precision != "fp32" else "")


def _output_line(o: OutputCheck) -> str:
    status = "ok  " if o.passed else "FAIL"
    return (f"  {status} {o.name} {o.dtype}{o.shape}: max_abs {o.max_abs_error:.3g}, max_rel "
            f"{o.max_rel_error:.3g}, cosine {o.cosine:.6f} (rtol {o.rtol:g}, atol {o.atol:.3g})"
            + (f" {o.message}" if o.message else ""))


def verify(
    reference: ir.Model | str | os.PathLike | ReferenceData,
    candidate: ir.Model | str | os.PathLike,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    tolerance_class: str | None = None,
    provider: str | runtime.ProviderChoice = "cpu",
    seed: int = 0,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    provider_options: Mapping[str, object] | None = None,
    allow_fallback: bool = False,
) -> VerificationResult:
    """Runs both models on the same inputs and compares every output (see module docstring).

    `reference` is a model (onnx-ir or an .onnx path) or a reference file (an .npz path or a
    ReferenceData), which brings its own inputs, seed and tolerances. `tolerances` maps output names
    to (atol, rtol), overriding `atol`/`rtol` and the dtype defaults for those outputs.
    `tolerance_class` is "fold" (default) or "renorm". `provider` runs the candidate (the reference
    always runs on CPU, unoptimized) with `provider_options`; an unavailable provider is an error unless
    `allow_fallback` (normfold.runtime), and a GPU provider widens the default tolerances to fit its
    arithmetic (normfold.provider_tolerances).
    """
    if not isinstance(candidate, ir.Model):
        io.load(candidate)  # validates it, external-data paths included, before onnxruntime reads it
    data = reference_data(reference, inputs=inputs, shapes=shapes, seed=seed)
    is_model = isinstance(reference, ir.Model) or (
        not isinstance(reference, ReferenceData) and Path(reference).suffix != ".npz")
    arbiter = (lambda: exact.exact_outputs(
        reference if isinstance(reference, ir.Model) else io.load(reference), data.inputs)) if is_model else None
    return _check(data, candidate, atol=atol, rtol=rtol, tolerance_class=tolerance_class, provider=provider,
                  tolerances=tolerances, provider_options=provider_options, allow_fallback=allow_fallback,
                  arbiter=arbiter)


def check_candidate(
    reference: ReferenceData,
    candidate: ir.Model | str | os.PathLike,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    tolerance_class: str | None = None,
    provider: str | runtime.ProviderChoice = "cpu",
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    provider_options: Mapping[str, object] | None = None,
    allow_fallback: bool = False,
) -> VerificationResult:
    """Runs `candidate` on a reference's inputs and compares its outputs with the reference's."""
    if not isinstance(candidate, ir.Model):
        io.load(candidate)
    return _check(reference, candidate, atol=atol, rtol=rtol, tolerance_class=tolerance_class, provider=provider,
                  tolerances=tolerances, provider_options=provider_options, allow_fallback=allow_fallback)


def reference_data(
    reference: ir.Model | str | os.PathLike | ReferenceData,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
) -> ReferenceData:
    """The reference side: a ReferenceData as given, read from an .npz, or made by running a model."""
    if isinstance(reference, ReferenceData) or (
        not isinstance(reference, ir.Model) and Path(reference).suffix == ".npz"
    ):
        if inputs is not None or shapes:
            raise InputError("a reference file brings its own inputs; inputs and shapes cannot be given with it")
        return reference if isinstance(reference, ReferenceData) else load_reference(reference)
    return run_reference(reference, inputs=inputs, shapes=shapes, seed=seed)


def run_reference(
    model: ir.Model | str | os.PathLike,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
) -> ReferenceData:
    """Runs the reference model on CPU with every graph optimization off, on given or seeded inputs."""
    ref_model = model if isinstance(model, ir.Model) else io.load(model)
    with runtime.model_file(model) as path:
        session = runtime.make_session(path, provider="cpu", optimize=False)
        feeds = make_inputs(session, ref_model, user_inputs=inputs, shapes=shapes, seed=seed)
        outputs = _run(session, feeds, "reference")
    names = [meta.name for meta in session.get_outputs()]
    given = set(inputs or {})
    return ReferenceData(
        inputs=feeds,
        outputs=dict(zip(names, outputs)),
        seed=seed,
        generated=[name for name in feeds if name not in given],
        shapes={k: [int(d) for d in v] for k, v in (shapes or {}).items()},
        input_types={meta.name: meta.type for meta in session.get_inputs() if meta.name in feeds},
        source=None if isinstance(model, ir.Model) else str(model),
        onnxruntime_version=runtime.onnxruntime().__version__,
    )


def resolve_tolerances(
    reference: ReferenceData,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    tolerance_class: str | None = None,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[str, float | None, float | None, dict[str, tuple[float, float]]]:
    """(class, atol, rtol, per-output) to check with: the given ones, else the reference file's.

    Refuses unknown classes, negative or non-finite tolerances and per-output names the reference
    has no output for.
    """
    tclass = tolerance_class or reference.tolerance_class or "fold"
    if tclass not in TOLERANCES:
        raise InputError(f"unknown tolerance class {tclass!r}; choose one of: {', '.join(TOLERANCE_ORDER)}")
    atol = reference.atol if atol is None else _tolerance(atol, "atol")
    rtol = reference.rtol if rtol is None else _tolerance(rtol, "rtol")
    per_output = dict(reference.tolerances)
    for name, pair in (tolerances or {}).items():
        try:
            a, r = pair
        except (TypeError, ValueError):
            raise InputError(f"tolerance for output {name!r}: expected (atol, rtol), got {pair!r}") from None
        per_output[name] = (_tolerance(a, f"atol of {name!r}"), _tolerance(r, f"rtol of {name!r}"))
    unknown = [name for name in per_output if name not in reference.outputs]
    if unknown:
        raise InputError(f"--tolerance: no output named {', '.join(map(repr, unknown))} "
                         f"(outputs: {', '.join(reference.outputs)})")
    return tclass, atol, rtol, per_output


def _tolerance(value: Any, label: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label}: {value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise InputError(f"{label}: {value!r} must be a finite number >= 0")
    return number


def _check(data: ReferenceData, candidate, *, atol, rtol, tolerance_class, provider, tolerances,
           provider_options=None, allow_fallback=False, arbiter=None) -> VerificationResult:
    """Compares every output; failing ones are judged again by `arbiter()` (float64 outputs of the
    reference model, normfold.exact) when one is given."""
    tclass, atol, rtol, per_output = resolve_tolerances(
        data, atol=atol, rtol=rtol, tolerance_class=tolerance_class, tolerances=tolerances)
    choice = provider_tolerances.for_verification(
        runtime.select_provider(provider, provider_options, allow_fallback=allow_fallback))
    with runtime.model_file(candidate) as cand_path:
        cand_session, choice = runtime.open_session(cand_path, provider=choice, optimize=True,
                                                    allow_fallback=allow_fallback)
        check_interface(data, cand_session)
        cand_outputs = _run(cand_session, data.inputs, "candidate")
    precision = provider_tolerances.precision(choice)
    checks = []
    for (name, ref), cand in zip(data.outputs.items(), cand_outputs):
        a, r = per_output.get(name, (atol, rtol))
        checks.append(compare(name, ref, cand, atol=a, rtol=r, tolerance_class=tclass, precision=precision))
    if arbiter is not None and not all(c.passed for c in checks):
        checks = _arbitrate(checks, data, cand_outputs, arbiter(),
                            lambda name: dict(zip(("atol", "rtol"), per_output.get(name, (atol, rtol))),
                                              tolerance_class=tclass, precision=precision))
    return VerificationResult(
        passed=all(c.passed for c in checks),
        outputs=checks,
        provider=choice.used,
        seed=data.seed,
        input_shapes={k: list(np.shape(v)) for k, v in data.inputs.items()},
        tolerance_class=tclass,
        requested_provider=choice.requested,
        provider_options=dict(choice.options),
        precision=precision,
        fallback=choice.fallback,
    )


def _arbitrate(checks, data: ReferenceData, cand_outputs, exact_outputs, tolerance_of) -> list[OutputCheck]:
    """Failing checks re-judged against the float64 evaluation (normfold.exact's rule)."""
    if exact_outputs is None:
        return checks
    judged = []
    for check, (name, ref), cand in zip(checks, data.outputs.items(), cand_outputs):
        truth = exact_outputs.get(name)
        if check.passed or truth is None:
            judged.append(check)
            continue
        against_truth = compare(name, truth, cand, **tolerance_of(name))
        reference_off = compare(name, truth, ref, **tolerance_of(name))
        if against_truth.passed and against_truth.max_abs_error <= reference_off.max_abs_error:
            against_truth.dtype, against_truth.judged_against = check.dtype, "float64"
            against_truth.message = (f"judged against the reference evaluated in float64: its float32 run is off by "
                                     f"{reference_off.max_abs_error:.3g} (ill-conditioned in float32), the candidate "
                                     f"by {against_truth.max_abs_error:.3g}")
            judged.append(against_truth)
        else:
            judged.append(check)
    return judged


def compare(name, reference, candidate, *, atol=None, rtol=None, tolerance_class="fold", precision="fp32") -> OutputCheck:
    """Compares one output pair with the tolerance rule of the module docstring; `precision` (the
    candidate provider's arithmetic, normfold.provider_tolerances) widens the default tolerances."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    dtype = _dtype_name(reference.dtype)
    base = dict(name=name, dtype=dtype, shape=list(reference.shape))
    tolerance_dtype = _coarser(dtype, _dtype_name(candidate.dtype))
    if reference.shape != candidate.shape:
        return OutputCheck(**base, passed=False, max_abs_error=float("inf"), max_rel_error=float("inf"),
                           mean_abs_error=float("inf"), cosine=0.0, rtol=0.0, atol=0.0,
                           message=f"shape differs: candidate {list(candidate.shape)}")
    if reference.dtype.kind not in "fcV":
        equal = np.array_equal(reference, candidate)
        numeric = reference.dtype.kind in "biu" and candidate.dtype.kind in "biufc"
        diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)) if numeric else None
        max_abs = float(diff.max()) if diff is not None and diff.size else 0.0
        return OutputCheck(**base, passed=bool(equal), max_abs_error=max_abs, max_rel_error=0.0 if equal else float("inf"),
                           mean_abs_error=float(diff.mean()) if diff is not None and diff.size else 0.0,
                           cosine=1.0 if equal else 0.0, rtol=0.0, atol=0.0)
    row = TOLERANCES[tolerance_class].get(tolerance_dtype, TOLERANCES[tolerance_class]["float32"])
    default_rtol, default_atol = row if atol is not None and rtol is not None else provider_tolerances.widen(row, precision)
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


def check_interface(reference: ReferenceData, cand_session) -> None:
    """The candidate takes the reference's inputs (same onnxruntime types) and has its outputs, in order."""
    cand_in = {m.name: m.type for m in cand_session.get_inputs()}
    for name in reference.inputs:
        want = reference.input_type(name)
        if cand_in.get(name) != want:
            raise InputError(f"the models' inputs differ: candidate has no input {name!r} of {want}")
    ref_out = list(reference.outputs)
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


_PRECISION = {"bfloat16": 0, "float16": 1, "float32": 2, "float64": 3}


def _coarser(a: str, b: str) -> str:
    """Of two float dtype names, the less precise (its tolerances apply); `a` when either is not a float."""
    return b if a in _PRECISION and b in _PRECISION and _PRECISION[b] < _PRECISION[a] else a


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    return "bfloat16" if "bfloat16" in name else name
