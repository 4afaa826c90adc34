"""normfold.fx: the rewrites of normfold on PyTorch modules, through torch.fx.

    gm, report = normfold.fx.convert(module, (x,))                 # default passes
    gm, report = normfold.fx.convert(module, (x,), ["fold-batchnorm"])
    normfold.fx.export(gm, (x,), "model.onnx")                     # then normfold.verify(...)

`convert` never changes the module it is given: it captures a deep copy (normfold.fx.capture), runs
the passes (normfold.fx.registry) to a bounded fixed point, checks the result against the original
in float64 on torch (normfold.fx.verify), and returns the GraphModule with its FxReport. Importing
normfold (the ONNX side) never imports torch; this package does.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from types import ModuleType

import torch

from normfold.errors import VerificationError
from normfold.fx import registry
from normfold.fx.capture import capture as capture_module
from normfold.fx.export import export
from normfold.fx.graph import op_counts
from normfold.fx.report import FxReport
from normfold.fx.verify import verify_module
from normfold.report import PassReport
from normfold.verification import TOLERANCE_ORDER

MAX_ITERATIONS = 8

__all__ = ["FxReport", "MAX_ITERATIONS", "convert", "export", "verify_module"]


def convert(
    module: torch.nn.Module,
    example_inputs: tuple | torch.Tensor,
    passes: Sequence[str | ModuleType] | None = None,
    *,
    capture: str = "auto",
    dynamic: bool = False,
    verify: bool = True,
    for_training: bool = False,
) -> tuple[torch.fx.GraphModule, FxReport]:
    """Rewrites a copy of `module` with `passes` (names; None: the default passes) and returns it as a
    GraphModule with its report.

    `capture` is "auto" (symbolic_trace, else torch.export), "symbolic_trace" or "export". A
    torch.export graph accepts only the example inputs' shapes unless `dynamic` (batch and sequence
    dims of size > 1 stay symbolic); a symbolic trace accepts any shape.
    With `verify`, the result is compared with `module` in float64 (normfold.fx.verify_module) when
    any rewrite applied; report.verification holds the result and VerificationError (with `.report`)
    is raised when it fails.
    `for_training` selects each pass's trainable form (the module keeps training like the original:
    recentring stays in the forward pass, normfold.fx.modules.freeze makes it plain weights); passes
    without one are refused.
    """
    inputs = normalize_inputs(example_inputs)
    selected = registry.resolve(passes, trainable=for_training)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    captured = capture_module(copy.deepcopy(module), inputs, capture, dynamic=dynamic)
    gm = captured.gm
    timings["capture"] = time.perf_counter() - start
    report = FxReport(passes=[PassReport(p.NAME) for p in selected], ops_before=op_counts(gm),
                      capture=captured.method, capture_reason=captured.reason)
    start = time.perf_counter()
    run_passes(gm, inputs, selected, report)
    timings["passes"] = time.perf_counter() - start
    report.ops_after = op_counts(gm)
    if verify and report.applied:
        start = time.perf_counter()
        result = verify_module(module, gm, inputs, tolerance_class=tolerance_class(selected, report))
        timings["verify"] = time.perf_counter() - start
        report.verification = result.to_dict()
        if not result.passed:
            report.timings = timings
            error = VerificationError(f"the converted module is not equivalent: max abs error "
                                      f"{result.max_abs_error:.3g} (see the report for each output)")
            error.report = report
            raise error
    report.timings = timings
    return gm, report


def normalize_inputs(example_inputs: tuple | list | torch.Tensor) -> tuple:
    """The example inputs as a tuple (a single tensor is wrapped)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def run_passes(gm: torch.fx.GraphModule, inputs: tuple, passes: Sequence[ModuleType], report: FxReport) -> None:
    """Runs the passes in order, repeating while any applied, at most MAX_ITERATIONS times.

    `applied` and `notes` add up over the iterations; `skipped` is the last iteration's (what is
    still left unchanged at the end).
    """
    for _ in range(MAX_ITERATIONS):
        changed = 0
        for p, entry in zip(passes, report.passes):
            current = PassReport(entry.name)
            start = time.perf_counter()
            applied = p.run(gm, inputs, current)
            entry.seconds += time.perf_counter() - start
            entry.iterations += 1
            entry.applied += applied
            entry.skipped = current.skipped
            entry.notes += current.notes
            changed += applied
        if not changed:
            break
    gm.graph.lint()
    gm.recompile()


def tolerance_class(passes: Sequence[ModuleType], report: FxReport) -> str:
    """The loosest tolerance class among the passes that applied ("fold" if none declares one)."""
    used = [getattr(p, "TOLERANCE_CLASS", "fold") for p, entry in zip(passes, report.passes) if entry.applied]
    return max(used, key=TOLERANCE_ORDER.index, default=TOLERANCE_ORDER[0])
