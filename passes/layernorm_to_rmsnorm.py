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

from normfold import recentre
from normfold.constants import constant
from normfold.detect import NormSite, find_sites
from normfold.emit import Emitter
from normfold.recentre import NotFoldable
from normfold.report import node_label
from normfold.residual import Stream, find_streams, why_outside
from normfold.rewrite import NormPass, replace_value


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
        plans = {}
        for stream in streams:
            try:
                plans[id(stream)] = _plan_writers(stream, model)
            except NotFoldable as exc:
                for site in stream.readers:
                    self.skip(site.nodes[0], str(exc))
        for stream, reason in _post_ln_chains(streams, plans).items():
            del plans[id(stream)]
            for site in stream.readers:
                self.skip(site.nodes[0], reason)
        for stream in streams:
            if id(stream) in plans:
                self._convert(stream, *plans[id(stream)], model)
        in_streams = {id(site.nodes[0]) for stream in streams for site in stream.readers}
        for site in sites:
            if id(site.nodes[0]) not in in_streams:
                self.skip(site.nodes[0], why_outside(site))

    def _convert(self, stream: Stream, edits, explicit, model: ir.Model) -> None:
        replaceable = []
        for site in stream.readers:
            reason = _not_self_contained(site)
            if reason:
                self.skip(site.nodes[0], reason)
            else:
                replaceable.append(site)
        if not replaceable:
            return
        for edit in edits:
            edit()
        for value, use in explicit:
            centred = _centre(value, use, model, self.target)
            for site in replaceable:
                if site.x is value:
                    site.x = centred
        for site in replaceable:
            _replace_with_rmsnorm(site, model, self.target)
            self.applied()


def _post_ln_chains(streams: list[Stream], plans: dict) -> dict[Stream, str]:
    """Streams whose explicitly centred writers depend on one another: a centring op in every layer.

    One explicit centring is fine (BLOOM's embedding LayerNorm output); a chain of them is Post-LN,
    where each layer's LayerNorm output writes the next residual sum.
    """
    explicit = {id(value): stream for stream in streams if id(stream) in plans
                for value, _ in plans[id(stream)][1]}
    refused: dict[int, tuple[Stream, str]] = {}
    for stream in streams:
        for value, _ in plans.get(id(stream), ((), ()))[1]:
            upstream = _depends_on_any(value, set(explicit) - {id(value)})
            if upstream is None:
                continue
            reason = (f"Post-LN: the stream is written by {value.name!r}, which cannot be recentred by folding "
                      f"and is computed from another such writer ({upstream.name!r}); an exact conversion would "
                      "need a centring op in every layer")
            refused[id(stream)] = (stream, reason)
            refused.setdefault(id(explicit[id(upstream)]), (explicit[id(upstream)], reason))
    chain = [value for stream, _ in refused.values() for value, _ in plans[id(stream)][1]]
    reason = next((r for _, r in refused.values()), "")
    for stream in streams:
        if id(stream) in plans and id(stream) not in refused:
            outputs = {id(s.y) for s in stream.readers}
            if any(_depends_on_any(value, outputs) is not None or id(value) in outputs for value in chain):
                refused[id(stream)] = (stream, f"Post-LN: its output feeds the residual chain of a Post-LN model "
                                               f"({reason.removeprefix('Post-LN: ')})")
    return {stream: reason for stream, reason in refused.values()}


def _plan_writers(stream: Stream, model: ir.Model):
    """Edits recentring every writer by folding, plus the writers that need an explicit centring op."""
    edits, explicit = [], []
    writes = [(leaf, None) for leaf in stream.leaves] + [(node.inputs[i], (node, i)) for node, i in stream.external]
    for value, use in writes:
        try:
            if use is not None and constant(value, model).array is None:
                reader = next(n for n, _ in value.uses() if n is not use[0])
                raise NotFoldable(f"{value.name!r} is also read by {node_label(reader)}")
            edits += recentre.plan(value, model, use)
        except NotFoldable:
            explicit.append((value, use))
    return edits, explicit


def _depends_on_any(value: ir.Value, targets: set[int]) -> ir.Value | None:
    """The first value whose id is in `targets` that `value` is computed from (itself excluded)."""
    seen, stack = set(), [i for i in (value.producer().inputs if value.producer() else ()) if i is not None]
    while stack:
        v = stack.pop()
        if id(v) in targets:
            return v
        if id(v) in seen or v.producer() is None:
            continue
        seen.add(id(v))
        stack.extend(i for i in v.producer().inputs if i is not None)
    return None


def _not_self_contained(site: NormSite) -> str:
    inside = {id(n) for n in site.nodes}
    for node in site.nodes:
        for out in node.outputs:
            if out is site.y:
                continue
            if out.is_graph_output() or any(id(user) not in inside for user, _ in out.uses()):
                return f"its intermediate value {out.name!r} is used outside the LayerNorm"
    return ""


def _centre(value: ir.Value, use, model: ir.Model, target: str) -> ir.Value:
    """Inserts value - mean(value) and makes the given use (or every use) read it; returns it."""
    uses = [use] if use is not None else list(value.uses())
    order = {id(n): i for i, n in enumerate(uses[0][0].graph)}
    anchor = min((n for n, _ in uses), key=lambda n: order[id(n)])
    centred = Emitter(model, anchor, target).centre(value, name=f"{value.name}/recentre")
    centred.shape, centred.type = value.shape, value.type
    for node, index in uses:
        node.replace_input_with(index, centred)
    return centred


def _replace_with_rmsnorm(site: NormSite, model: ir.Model, target: str) -> None:
    dtype = site.x.dtype or (site.gamma.dtype if site.gamma is not None else ir.DataType.FLOAT)
    emitter = Emitter(model, site.nodes[-1], target)
    y = emitter.rmsnorm(site.x, epsilon=site.epsilon, gamma=site.gamma, beta=site.beta, dtype=dtype,
                        name=site.name)
    y.shape, y.type = site.y.shape, site.y.type
    replace_value(site.y, y)
    graph = site.nodes[0].graph
    for node in reversed(site.nodes):
        graph.remove(node, safe=True)
