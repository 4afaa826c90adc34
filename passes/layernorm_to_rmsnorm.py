"""layernorm-to-rmsnorm: Pre-LN -> Pre-RMSNorm, an exact rewrite (Jiang et al., NeurIPS 2023).

LN(x) = RMSNorm(x - mu(x)) with the same epsilon, gamma and beta, and LN(x + c 1) = LN(x). For every
stream found by normfold.residual (values that only ever reach LayerNorms over the width, through
Adds and views), each writer is recentred (normfold.recentre: embedding tables, projection weights
and biases, constants), which makes every value of the stream zero-mean; then each LayerNorm that
reads it is replaced by an RMSNorm (normfold.emit). A writer that cannot be recentred by folding
gets an explicit x - mean(x) if it comes before any residual Add (an embedding LayerNorm, as in
BLOOM, or an embeddings graph input); inside the residual chain it makes the stream unconvertible:
in a Post-LN model the stream is written by each LayerNorm's own output.

Refused, with the reason, per LayerNorm: its input is also read by something that sees the mean
(attention on the raw stream, a graph output), the stream has an unfoldable writer (Post-LN), or the
decomposed LayerNorm's intermediates are used elsewhere.
"""

from __future__ import annotations

import onnx_ir as ir

from normfold.detect import find_sites
from normfold.emit import replace_with_rmsnorm
from normfold.residual import Stream, find_streams, why_outside
from normfold.rewrite import NormPass
from normfold.stream_plan import StreamPlan, apply_explicit, plan_streams


class LayerNormToRMSNorm(NormPass):
    """Replaces LayerNorms that read a recentrable stream with RMSNorms, recentring its writers."""

    name = "layernorm-to-rmsnorm"
    tolerance_class = "renorm"
    handles = ("LayerNorm",)
    needs_shapes = True
    summary = "Pre-LN -> Pre-RMSNorm: recentre every write to the residual stream, LayerNorm -> RMSNorm"

    def rewrite(self, model: ir.Model) -> None:
        sites = [s for s in find_sites(model) if s.kind == "LayerNorm"]
        streams = find_streams(model, sites)
        in_streams = {id(site.nodes[0]) for stream in streams for site in stream.readers}
        outside = [(site.nodes[0], why_outside(site)) for site in sites if id(site.nodes[0]) not in in_streams]
        plans, refusals = plan_streams(streams, model)
        moved: dict[int, ir.Value] = {}
        for stream in streams:
            if id(stream) in plans:
                self.convert_stream(stream, plans[id(stream)], model, moved)
            else:
                for site in stream.readers:
                    self.skip(site.nodes[0], refusals[id(stream)])
        for node, reason in outside:
            self.skip(node, reason)

    def convert_stream(self, stream: Stream, plan: StreamPlan, model: ir.Model, moved: dict | None = None) -> None:
        """Applies a stream's plan and replaces each of its LayerNorm readers with an RMSNorm.

        `moved` maps values already replaced by earlier streams' rewrites to their replacements; this
        stream's replaced norm outputs are added to it."""
        moved = {} if moved is None else moved
        replaceable = []
        for site in stream.readers:
            reason = site.escaping_intermediate()
            if reason:
                self.skip(site.nodes[0], reason)
            else:
                replaceable.append(site)
        if not replaceable:
            return
        for edit in plan.edits:
            edit()
        apply_explicit(plan, model, self.target, moved=moved)
        for site in replaceable:
            moved[id(site.y)] = replace_with_rmsnorm(site, model, self.target)
            self.applied()
