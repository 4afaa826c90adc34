"""emit-rmsnorm: re-emits decomposed RMSNorms in the form the target runtime runs fastest.

RMSNorm(x) = x / sqrt(mean(x^2) + eps) * gamma is unchanged; only its spelling changes (normfold.emit):
onnxruntime's SimplifiedLayerNormalization for target "ort", RMSNormalization at opset >= 23 for
target "onnx", else the Pow/Div spelling that onnxruntime fuses. torch's dynamo exporter writes
x * Reciprocal(Sqrt(...)) and TorchScript x * (1 / Sqrt(...)), which onnxruntime 1.2x does not fuse.
A site already in the target's form, or whose intermediates are read elsewhere, is left as it is.
"""

from __future__ import annotations

import onnx_ir as ir

from normfold.constants import constant
from normfold.detect import NormSite, find_sites
from normfold.emit import RMS_OPSET, replace_with_rmsnorm, resolve_target
from normfold.rewrite import NormPass
from normfold.validate import default_opset


class EmitRMSNorm(NormPass):
    """Replaces decomposed RMSNorm subgraphs with the target's fused or fusable RMSNorm."""

    name = "emit-rmsnorm"
    tolerance_class = "renorm"
    handles = ("RMSNorm",)
    needs_shapes = True
    summary = "re-emit decomposed RMSNorms as the target's fast form (SimplifiedLayerNormalization, RMSNormalization)"

    def rewrite(self, model: ir.Model) -> None:
        target = resolve_target(self.target)
        fused_form = target == "ort" or default_opset(model) >= RMS_OPSET
        for site in find_sites(model):
            if site.kind != "RMSNorm" or site.fused:
                continue
            if not fused_form and _divides(site, model):
                continue  # already the Div spelling that onnxruntime fuses
            reason = site.escaping_intermediate() or ("" if site.x.dtype else "the dtype of its input is unknown")
            if reason:
                self.skip(site.nodes[0], reason)
                continue
            replace_with_rmsnorm(site, model, target)
            self.applied()


def _divides(site: NormSite, model: ir.Model) -> bool:
    """True when the site squares with Pow(x, 2) and normalizes with Div(x, rms): the spelling
    onnxruntime fuses (not Mul(x, x), not Div(1, rms))."""
    divides = any(n.op_type == "Div" and n.inputs[1].producer() is not None
                  and n.inputs[1].producer().op_type == "Sqrt" and constant(n.inputs[0], model).array is None
                  for n in site.nodes)
    return divides and any(n.op_type == "Pow" for n in site.nodes)
