"""The FX conversion report: the ONNX side's Report plus how the module was captured."""

from __future__ import annotations

from dataclasses import dataclass

from normfold.report import Report


@dataclass
class FxReport(Report):
    """A Report for a torch module; `capture` says how its graph was obtained.

    `capture` is "symbolic_trace", "torch.export" or "given" (a GraphModule passed in);
    `capture_reason` is one line saying why torch.fx.symbolic_trace could not be used when
    torch.export was (None otherwise).
    ops_before/ops_after count call_module nodes by module class name (e.g. "BatchNorm2d") and
    call_function nodes by op name (e.g. "aten.batch_norm", "add").
    """

    capture: str = ""
    capture_reason: str | None = None

    def summary_lines(self) -> list[str]:
        line = f"captured with {self.capture}"
        if self.capture_reason:
            line += f" ({self.capture_reason})"
        return [line, *super().summary_lines()]
