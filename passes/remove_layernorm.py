"""remove-layernorm: each LayerNorm becomes its calibrated linear form and is folded away (approximate).

FakeLN(x) = (x - mu(x)) / sigma_avg * gamma + beta (Heimersheim 2024; Baroni et al. 2025), with
sigma_avg the LayerNorm's average per-token std over calibration data (normfold.calibration). FakeLN
is linear, so it disappears into the graph:
- centring: for a LayerNorm reading a residual stream (normfold.residual), every writer of the
  stream is recentred as in layernorm-to-rmsnorm (normfold.stream_plan), so mu(x) = 0 already.
  Any other LayerNorm (a stream that cannot be recentred by folding, a value also read elsewhere)
  gets the centring matrix C = I - 1 1^T / d folded into its linear readers, or an explicit
  x - mean(x) (linear, not a normalization) when a reader is not linear;
- scale and shift: with s = gamma / sigma_avg, every linear reader z = y W + b (normfold.consumers)
  becomes z = x W' + b' with W' = diag(s) W (C diag(s) W when centring there), b' = b + beta W.
  When a reader is not linear, or is a bias-less MatMul wider than the norm (an LM head, where beta W
  would be a new Add over every logit: consumers.wide_new_bias), the LayerNorm becomes
  Mul(x, s) [+ Add beta] instead.
- position 0: its std differs (BOS / attention sink), so it gets its own sigma_0 when the
  LayerNorm's input is (batch, seq, d) with a static seq and sigma_0 differs from sigma_avg by more
  than 1%: x is first multiplied by a (seq, 1) constant [sigma_avg / sigma_0, 1, ..., 1]. Otherwise
  (or with position0="shared") every position uses sigma_avg (measured over positions >= 1).
No normalization op remains. The result is exact only when every token's std equals the
calibrated one; `convert` reports the drift on the calibration set instead of an equivalence check.

Refused, with the reason: a Post-LN model (every LayerNorm: removal is defined for Pre-LN
transformers), a LayerNorm whose intermediates are used elsewhere, over more than the last axis,
with a non-constant gamma/beta, whose input has zero std on the calibration data, or whose FakeLN
constants overflow the model's dtype (fp16).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from normfold import foldmath
from normfold.calibration import LayerStats, calibrate
from normfold.constants import constant
from normfold.consumers import NotLinear, cast_checked, linear_edit, linear_readers, wide_new_bias
from normfold.detect import NormSite, find_sites
from normfold.emit import Emitter
from normfold.errors import InputError
from normfold.residual import find_streams
from normfold.rewrite import NormPass, cast_finite, replace_value
from normfold.stream_plan import apply_explicit, plan_streams

POSITION0 = ("separate", "shared")
OWN_SCALE_RATIO = 0.01
"""Position 0 gets its own scale when |sigma_avg / sigma_0 - 1| exceeds this."""


class RemoveLayerNorm(NormPass):
    """Replaces each LayerNorm with its calibrated linear form (FakeLN), folded into its neighbours."""

    name = "remove-layernorm"
    exact = False
    default = False
    tolerance_class = "renorm"
    handles = ("LayerNorm",)
    needs_shapes = True
    needs_calibration = True
    summary = "approximate: LayerNorm -> calibrated FakeLN folded away, no norm op left (needs --calibration)"

    def __init__(self, *, target: str = "auto", calibration: Mapping[str, np.ndarray] | None = None,
                 position0: str = "separate", provider: str = "cpu") -> None:
        super().__init__(target=target)
        if position0 not in POSITION0:
            raise InputError(f"position0 must be one of {', '.join(POSITION0)}, got {position0!r}")
        self.calibration = calibration
        self.position0 = position0
        self.provider = provider
        self.stats: list[LayerStats] = []
        """The calibration of every LayerNorm measured (the latest measurement of each), for the report."""

    def rewrite(self, model: ir.Model) -> None:
        sites = [s for s in find_sites(model) if s.kind == "LayerNorm"]
        if not sites:
            return
        streams = find_streams(model, sites)
        plans, refusals = plan_streams(streams, model)
        post_ln = next((r for r in refusals.values() if r.startswith("Post-LN")), None)
        if post_ln is not None:
            for site in sites:
                self.skip(site.nodes[0], "Post-LN model: LayerNorm removal needs a Pre-LN transformer "
                                         f"({post_ln.removeprefix('Post-LN: ')})")
            return
        candidates = [site for site in sites if self._removable(site, model)]
        if not candidates or self.calibration is None:  # no calibration: analysis only (normfold inspect)
            return
        measured = calibrate(model, self.calibration, candidates, provider=self.provider)
        names = {st.name for st in measured}
        self.stats = [st for st in self.stats if st.name not in names] + measured
        stats = {id(site.nodes[0]): st for site, st in zip(candidates, measured) if self._measured(site, st)}
        moved: dict[int, ir.Value] = {}
        done: set[int] = set()
        for stream in streams:
            if id(stream) not in plans:
                continue
            removable = [site for site in stream.readers if id(site.nodes[0]) in stats]
            done.update(id(site.nodes[0]) for site in stream.readers)
            if not removable:
                continue
            for edit in plans[id(stream)].edits:
                edit()
            apply_explicit(plans[id(stream)], model, self.target, moved=moved)
            for site in removable:
                moved[id(site.y)] = self._remove(site, stats[id(site.nodes[0])], model, centred=True)
        for site in sites:
            if id(site.nodes[0]) not in done and id(site.nodes[0]) in stats:
                self._remove(site, stats[id(site.nodes[0])], model, centred=False)

    def _removable(self, site: NormSite, model: ir.Model) -> bool:
        """True when the site's structure allows replacing it; else records why not."""
        reason = site.escaping_intermediate() or _why_not(site, model)
        if reason:
            self.skip(site.nodes[0], reason)
        return not reason

    def _measured(self, site: NormSite, stats: LayerStats) -> bool:
        """True when the calibration gave the site a usable sigma; else records why not."""
        if np.isfinite(stats.sigma) and stats.sigma > 0:
            return True
        self.skip(site.nodes[0], f"its input has std {stats.sigma:.3g} on the calibration data")
        return False

    def _remove(self, site: NormSite, stats: LayerStats, model: ir.Model, *, centred: bool) -> ir.Value:
        """Replaces the site by FakeLN folded into its readers; `centred`: its input is zero-mean already.
        Returns the value that now stands for the site's output (its own if it refuses: fp16 overflow)."""
        x = site.refresh_input()
        dtype = (x.dtype or ir.DataType.FLOAT).numpy()
        gamma, beta = (_array(v, model) for v in (site.gamma, site.beta))
        width = _width(site, gamma, beta)
        scale = (np.ones(width) if gamma is None else gamma) / stats.sigma
        per_position = self._position_factor(site, stats)
        factor = cast_finite(scale if per_position is None else per_position * scale, dtype)
        shift = None if beta is None else cast_finite(beta, dtype)
        if factor is None or (beta is not None and shift is None):
            self.skip(site.nodes[0], f"its FakeLN constants overflow {np.dtype(dtype).name}")
            return site.y
        emitter = Emitter(model, site.nodes[-1], self.target)
        try:
            readers = linear_readers(site.y, model)
            wide = wide_new_bias(readers, width, model) if beta is not None and np.any(beta) else None
            if wide:
                raise NotLinear(wide)
            edits = [self._fold(reader, scale, beta, centred, model) for reader in readers]
        except NotLinear as exc:
            edits = None
            self.note(site.nodes[0], f"kept as a Mul by a constant: {exc}")
        if edits is not None:
            for apply in edits:
                apply()
            out = x
            if per_position is not None:
                out = emitter.node("Mul", [x, emitter.constant(f"{site.name}/position_scale",
                                                               per_position.astype(dtype))],
                                   name=f"{site.name}/position_scale")
        else:
            out = x if centred else emitter.centre(x, name=f"{site.name}/centre")
            out = emitter.node("Mul", [out, emitter.constant(f"{site.name}/fake_ln_scale", factor)],
                               name=f"{site.name}/fake_ln_scale")
            if shift is not None:
                out = emitter.node("Add", [out, emitter.constant(f"{site.name}/fake_ln_beta", shift)],
                                   name=f"{site.name}/fake_ln_beta")
        if site.y.dtype is not None and x.dtype is not None and site.y.dtype != x.dtype:
            out = emitter.node("Cast", [out], {"to": site.y.dtype}, name=f"{site.name}/to_output_type")
        if out is not x:
            out.shape, out.type = site.y.shape, site.y.type
        replace_value(site.y, out)
        graph = site.nodes[0].graph
        for node in reversed(site.nodes):
            graph.remove(node, safe=True)
        self.applied()
        return out

    def _fold(self, reader, scale: np.ndarray, beta: np.ndarray | None, centred: bool, model: ir.Model):
        """The edit folding diag(scale) (and C unless `centred`) and beta into one linear reader."""
        node, weight, axis = reader.node, reader.weight.numpy(), reader.weight_axis
        if weight.shape[axis] != scale.size:
            raise NotLinear(f"{node.op_type} {node.name!r} reads {weight.shape[axis]} features, "
                            f"the norm has {scale.size}")
        folded = foldmath.scale_channels(weight, scale, axis=axis)
        if not centred:
            folded = foldmath.recentre(folded, axis=axis)
        delta = None
        if beta is not None and np.any(beta):
            w64 = np.asarray(weight, dtype=np.float64)
            delta = beta @ w64 if axis == 0 else w64 @ beta
        return linear_edit(node, cast_checked(folded, weight.dtype, "weight"), delta, model)

    def _position_factor(self, site: NormSite, stats: LayerStats) -> np.ndarray | None:
        """The (seq, 1) factor giving position 0 its own sigma, or None (see module docstring)."""
        first = stats.sigma_first
        if self.position0 == "shared" or first is None or abs(stats.sigma / first - 1) <= OWN_SCALE_RATIO:
            return None
        shape = site.x.shape
        if shape is None or len(shape) != 3 or not isinstance(shape[1], int):
            self.note(site.nodes[0], f"position 0 (sigma {first:.4g}) shares sigma {stats.sigma:.4g}: its input "
                                     "is not (batch, seq, d) with a static seq")
            return None
        factor = np.ones((shape[1], 1))
        factor[0, 0] = stats.sigma / first
        return factor


def _why_not(site: NormSite, model: ir.Model) -> str:
    rank = len(site.x.shape) if site.x.shape is not None else None
    if site.axis not in (-1,) and (rank is None or site.axis != rank - 1):
        return f"it normalizes over axes {site.axis}, not the last axis only"
    for role, value in (("gamma", site.gamma), ("beta", site.beta)):
        if value is not None and constant(value, model).array is None:
            return f"its {role} is not constant"
    if site.spelling.startswith("com.microsoft.Skip"):
        return "removing a SkipLayerNormalization is not supported"
    return ""


def _array(value: ir.Value | None, model: ir.Model) -> np.ndarray | None:
    return None if value is None else np.asarray(constant(value, model).array, dtype=np.float64).reshape(-1)


def _width(site: NormSite, gamma, beta) -> int:
    for array in (gamma, beta):
        if array is not None:
            return array.size
    return site.x.shape[-1]
