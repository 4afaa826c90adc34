"""The pass manager: runs passes to a bounded fixed point, cleans up once, verifies, reports.

`convert(model, passes)` rewrites the model in place:
1. every pass runs in order; the sequence repeats while any pass changed the graph, at most
   MAX_ITERATIONS times;
2. nodes and initializers the passes orphaned are removed (ones that were unused before are kept:
   normfold changes only what it rewrote);
3. unless `verify=False`, the result is compared with the original on onnxruntime; a failure raises
   VerificationError carrying the report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from normfold import io
from normfold.constants import LEGACY_INPUT_INITIALIZERS_IR
from normfold.emit import TARGETS
from normfold.errors import InputError, VerificationError
from normfold.passes import PASSES
from normfold.report import PassReport, Report, op_counts, tensor_sha256
from normfold.rewrite import NormPass
from normfold.verification import TOLERANCE_ORDER, verify as verify_models

MAX_ITERATIONS = 8


def resolve_passes(
    passes: Sequence[str | NormPass] | None, *, approximate: bool = False, target: str = "auto"
) -> list[NormPass]:
    """Pass objects for names or instances; None means every exact default pass. Named passes get `target`."""
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    if passes is None:
        return [cls(target=target) for cls in PASSES.values() if cls.exact and cls.default]
    resolved = []
    for item in passes:
        if isinstance(item, NormPass):
            resolved.append(item)
            continue
        if item not in PASSES:
            raise InputError(f"unknown pass {item!r}; known passes: {', '.join(PASSES)}")
        resolved.append(PASSES[item](target=target))
    for p in resolved:
        if not p.exact and not approximate:
            raise InputError(f"pass {p.name!r} is approximate: ask for it explicitly with --approximate")
    if not resolved:
        raise InputError("no passes selected")
    return resolved


def run_passes(model: ir.Model, passes: Sequence[NormPass]) -> Report:
    """Runs `passes` to a bounded fixed point, then removes what they orphaned; returns the report."""
    report = Report(passes=[PassReport(p.name) for p in passes], ops_before=op_counts(model))
    unused_before = _unused(model)
    tensors_before = {id(v): v.const_value for g in model.graphs() for v in g.initializers.values()}
    unannotated = _infer_shapes(model) if any(p.needs_shapes for p in passes) else []
    for _ in range(MAX_ITERATIONS):
        changed = False
        for p, entry in zip(passes, report.passes):
            start = time.perf_counter()
            result = p(model)
            entry.seconds += time.perf_counter() - start
            entry.iterations += 1
            entry.applied += p.applied_count
            entry.skipped = list(p.skipped)
            entry.notes += p.notes
            changed |= result.modified
        if not changed:
            break
    remove_orphans(model, unused_before)
    for value in unannotated:
        if not value.is_graph_output():  # a graph output keeps its type, whichever node writes it now
            value.shape, value.type = None, None
    report.ops_after = op_counts(model)
    if report.applied:
        report.untouched_initializers = {
            v.name: tensor_sha256(v.const_value) for g in model.graphs() for v in g.initializers.values()
            if v.const_value is not None and tensors_before.get(id(v)) is v.const_value
        }
    return report


def _infer_shapes(model: ir.Model) -> list[ir.Value]:
    """Annotates values with onnx's inferred shapes; returns those that had none, to strip them again
    at the end, so the saved model's value_info stays as the user had it."""
    bare = [v for v in _all_values(model) if v.shape is None or v.type is None]
    ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
    return [v for v in bare if v.shape is not None or v.type is not None]


def _all_values(model: ir.Model):
    for graph in model.graphs():
        for node in graph:
            yield from node.outputs


def convert(
    model: ir.Model | onnx.ModelProto | str | os.PathLike,
    passes: Sequence[str | NormPass] | None = None,
    *,
    verify: bool = True,
    approximate: bool = False,
    target: str = "auto",
    calibration: Mapping[str, np.ndarray] | None = None,
    **verify_options,
) -> tuple[ir.Model, Report]:
    """Rewrites `model` (in place if an ir.Model; a path is loaded, a ModelProto wrapped) and returns it
    with its report.

    `target` picks the form of emitted norm ops (normfold.emit). `calibration` (input name -> array with a
    leading sample dim) feeds the passes that need it (remove-layernorm); when an approximate pass applied,
    the report's verification is the drift on it (normfold.drift) instead of an equivalence check.
    `verify_options` go to normfold.verification.verify (inputs, shapes, atol, rtol, provider,
    provider_options, allow_fallback, seed).
    Raises VerificationError, with `.report`, when the result is not equivalent.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    source = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if source is not None:
        model = io.load(source)
    elif isinstance(model, onnx.ModelProto):
        model = io.from_proto(model)
    timings["load"] = time.perf_counter() - start
    selected = resolve_passes(passes, approximate=approximate, target=target)
    _give_calibration(selected, calibration)
    reference = source if source is not None else (snapshot(model) if verify else None)

    start = time.perf_counter()
    report = run_passes(model, selected)
    timings["passes"] = time.perf_counter() - start
    report.input = str(source) if source is not None else None
    if verify and report.applied and any(not p.exact for p, e in zip(selected, report.passes) if e.applied):
        start = time.perf_counter()
        report.verification = _drift(reference, model, selected, calibration, verify_options.get("provider", "cpu"))
        timings["drift"] = time.perf_counter() - start
    elif verify and report.applied:
        start = time.perf_counter()
        result = verify_models(reference, model, tolerance_class=_tolerance_class(selected, report), **verify_options)
        timings["verify"] = time.perf_counter() - start
        report.verification = result.to_dict()
        report.timings = timings
        if not result.passed:
            error = VerificationError(
                f"the converted model is not equivalent: max abs error {result.max_abs_error:.3g} "
                f"(see the report for each output)"
            )
            error.report = report
            raise error
    report.timings = timings
    if report.applied:
        applied = ", ".join(f"{p.name} x{p.applied}" for p in report.passes if p.applied)
        io.add_provenance(model, applied)
    return model, report


def _give_calibration(passes: Sequence[NormPass], calibration: Mapping[str, np.ndarray] | None) -> None:
    """Hands the calibration data to the passes that need it; InputError if one has none."""
    for p in passes:
        if getattr(p, "needs_calibration", False) and p.calibration is None:
            if calibration is None:
                raise InputError(f"pass {p.name!r} needs calibration data: give --calibration FILE.npz")
            p.calibration = calibration


def _drift(reference, model: ir.Model, passes: Sequence[NormPass], calibration, provider: str) -> dict:
    """The verification entry of an approximate conversion: the drift on the calibration data."""
    from normfold.drift import approximate_verification

    data = calibration if calibration is not None else next(p.calibration for p in passes if not p.exact)
    stats = [s for p in passes for s in getattr(p, "stats", [])]
    reference = reference if isinstance(reference, ir.Model) else io.load(reference)
    return approximate_verification(reference, model, data, calibration=stats, provider=provider)


def _tolerance_class(passes: Sequence[NormPass], report: Report) -> str:
    used = [p.tolerance_class for p, entry in zip(passes, report.passes) if entry.applied]
    return max(used, key=TOLERANCE_ORDER.index, default=TOLERANCE_ORDER[0])


def snapshot(model: ir.Model) -> ir.Model:
    """An independent copy of the graph to verify or experiment on; tensors (and the external-data base
    directory) are shared, which is safe because passes never mutate a tensor, only replace it."""
    return model.clone()


def _unused(model: ir.Model) -> set[int]:
    """Ids of the nodes and initializer values nothing reads (graph outputs count as read)."""
    ids = set()
    for graph in model.graphs():
        ids.update(id(n) for n in graph if _is_dead(n))
        ids.update(id(v) for v in graph.initializers.values() if not v.uses() and not v.is_graph_output())
    return ids


def _is_dead(node: ir.Node) -> bool:
    return all(not out.uses() and not out.is_graph_output() for out in node.outputs)


def remove_orphans(model: ir.Model, unused_before: set[int]) -> None:
    """Removes nodes and initializers that nothing reads any more, except those already unused before.

    At IR < 4 an orphaned initializer is also dropped from the graph inputs, where it was listed by rule.
    """
    for graph in model.graphs():
        while dead := [n for n in graph if _is_dead(n) and id(n) not in unused_before]:
            graph.remove(dead, safe=True)
        for name, value in list(graph.initializers.items()):
            if value.uses() or value.is_graph_output() or id(value) in unused_before:
                continue
            if value.is_graph_input():
                if model.ir_version >= LEGACY_INPUT_INITIALIZERS_IR:
                    continue
                graph.inputs.remove(value)
            graph.initializers.pop(name)

