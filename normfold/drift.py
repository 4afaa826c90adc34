"""How far an approximate rewrite moved a model's outputs, on the calibration set.

Per float output, over every sample (reference r, candidate c, in float64):
    max_abs_error  = max |c - r|,   mean_abs_error = mean |c - r|
and, for outputs with a last axis of at least 2 entries (logits):
    kl_divergence  = mean over rows of KL(softmax(r) || softmax(c)) = sum p_r (log p_r - log p_c), in nats
    top1_agreement = fraction of rows where argmax c == argmax r
(a row is one vector along the last axis, e.g. one token's logits). Integer and bool outputs report
`mismatches`, the number of differing elements.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir


@dataclass
class OutputDrift:
    """The drift of one output, accumulated over batches."""

    name: str
    elements: int = 0
    rows: int = 0
    max_abs_error: float = 0.0
    mean_abs_error: float = 0.0
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    mismatches: int | None = None
    _abs_sum: float = field(default=0.0, repr=False)
    _kl_sum: float = field(default=0.0, repr=False)
    _agree: int = field(default=0, repr=False)

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise ValueError(f"output {self.name!r}: shapes differ, {reference.shape} vs {candidate.shape}")
        self.elements += reference.size
        if reference.dtype.kind not in "fc":
            self.mismatches = (self.mismatches or 0) + int(np.count_nonzero(reference != candidate))
            return
        r, c = reference.astype(np.float64), candidate.astype(np.float64)
        diff = np.abs(c - r)
        self.max_abs_error = max(self.max_abs_error, float(diff.max(initial=0.0)))
        self._abs_sum += float(diff.sum())
        self.mean_abs_error = self._abs_sum / self.elements if self.elements else 0.0
        if r.ndim and r.shape[-1] >= 2:
            rows_r, rows_c = r.reshape(-1, r.shape[-1]), c.reshape(-1, r.shape[-1])
            self.rows += rows_r.shape[0]
            log_p, log_q = _log_softmax(rows_r), _log_softmax(rows_c)
            self._kl_sum += float(np.sum(np.exp(log_p) * (log_p - log_q)))
            self._agree += int(np.count_nonzero(rows_r.argmax(axis=-1) == rows_c.argmax(axis=-1)))
            self.kl_divergence = self._kl_sum / self.rows
            self.top1_agreement = self._agree / self.rows

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}



@dataclass
class Drift:
    """Per-output drift between a reference model and an approximate rewrite of it."""

    outputs: list[OutputDrift] = field(default_factory=list)
    samples: int = 0

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    def add(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], samples: int) -> None:
        """Adds one batch: outputs keyed by name (the candidate must have every reference output)."""
        if not self.outputs:
            self.outputs = [OutputDrift(name) for name in reference]
        for out in self.outputs:
            if out.name not in candidate:
                raise ValueError(f"the candidate has no output {out.name!r}")
            out.add(reference[out.name], candidate[out.name])
        self.samples += samples

    def to_dict(self) -> dict:
        return {"samples": self.samples, "max_abs_error": self.max_abs_error,
                "outputs": [o.to_dict() for o in self.outputs]}

    def summary_lines(self) -> list[str]:
        return summary_lines(self.to_dict())


def summary_lines(drift: Mapping) -> list[str]:
    """Summary of a drift dict (`Drift.to_dict()`, as the report stores it): a headline, one line per output."""
    lines = [f"drift on {drift['samples']} calibration samples (approximate rewrite, not an equivalence check):"]
    for o in drift["outputs"]:
        if o["mismatches"] is not None:
            lines.append(f"  {o['name']}: {o['mismatches']} of {o['elements']} elements differ")
            continue
        text = f"  {o['name']}: max abs {o['max_abs_error']:.3g}, mean abs {o['mean_abs_error']:.3g}"
        if o["kl_divergence"] is not None:
            text += f", KL {o['kl_divergence']:.3g} nats, top-1 agreement {o['top1_agreement']:.2%}"
        lines.append(text + f" ({o['rows'] or o['elements']} {'rows' if o['rows'] else 'elements'})")
    return lines


def measure(pairs: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], int]]) -> Drift:
    """Drift over batches of (reference outputs, candidate outputs, number of samples)."""
    drift = Drift()
    for reference, candidate, samples in pairs:
        drift.add(reference, candidate, samples)
    return drift


def on_calibration(reference: ir.Model, candidate: ir.Model, inputs: Mapping[str, np.ndarray], *,
                   provider: str = "cpu") -> Drift:
    """Runs both models on the calibration inputs (normfold.calibration.run_model) and measures the drift."""
    from normfold.calibration import run_model

    ref_runs = run_model(reference, inputs, provider=provider)
    cand_runs = run_model(candidate, inputs, provider=provider)
    return measure((ref, cand, next(iter(feeds.values())).shape[0])
                   for (feeds, ref), (_, cand) in zip(ref_runs, cand_runs))


def approximate_verification(reference: ir.Model, candidate: ir.Model, inputs: Mapping[str, np.ndarray], *,
                             calibration: list | None = None, provider: str = "cpu") -> dict:
    """The report's `verification` for an approximate rewrite: no pass/fail (`passed` is None), the drift
    on the calibration set, and the LayerNorms' calibrated sigmas."""
    drift = on_calibration(reference, candidate, inputs, provider=provider)
    return {"approximate": True, "passed": None, "max_abs_error": drift.max_abs_error, "drift": drift.to_dict(),
            "calibration": [s.to_dict() for s in calibration or []]}


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
