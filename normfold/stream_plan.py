"""Planning the writes into each residual stream, shared by the LayerNorm -> RMSNorm/CRMSNorm passes.

For every stream (normfold.residual) each writer is recentred by folding (normfold.recentre) where
it can be; a writer that cannot gets an explicit x - mean(x) (normfold.emit) if it does not depend
on another such writer. A chain of them (each layer's LayerNorm output writing the next residual
sum) is a Post-LN model: every stream in the chain, and every stream feeding it, is refused.
With `drop_last` (CRMSNorm) the recentred writers also lose their last element.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from normfold import recentre
from normfold.constants import constant
from normfold.detect import NormSite
from normfold.emit import Emitter
from normfold.recentre import NotFoldable
from normfold.report import node_label
from normfold.residual import Stream


@dataclass
class StreamPlan:
    """What recentring one stream takes: edits to apply, writers to centre explicitly, resized values."""

    edits: list = field(default_factory=list)
    explicit: list[tuple[ir.Value, tuple[ir.Node, int] | None]] = field(default_factory=list)
    touched: list[ir.Value] = field(default_factory=list)


def plan_streams(streams: list[Stream], model: ir.Model, *, drop_last: bool = False):
    """({id(stream): StreamPlan}, {id(stream): reason}) for every stream: planned, or refused and why."""
    plans, refusals = {}, {}
    for stream in streams:
        try:
            plans[id(stream)] = _plan_writers(stream, model, drop_last)
        except NotFoldable as exc:
            refusals[id(stream)] = str(exc)
    for stream, reason in _post_ln_chains(streams, plans).items():
        del plans[id(stream)]
        refusals[id(stream)] = reason
    return plans, refusals


def apply_explicit(plan: StreamPlan, model: ir.Model, target: str, *, keep: int | None = None) -> dict[int, ir.Value]:
    """Inserts the explicit centrings (sliced to the first `keep` elements if given); returns
    {id(old value): new value} so sites reading a centred value can follow it."""
    moved = {}
    for value, use in plan.explicit:
        moved[id(value)] = _centre(value, use, model, target, keep)
    return moved


def _plan_writers(stream: Stream, model: ir.Model, drop_last: bool) -> StreamPlan:
    """Edits recentring every writer by folding, plus the writers that need an explicit centring op."""
    plan = StreamPlan(touched=list(stream.values) if drop_last else [])
    writes = [(leaf, None) for leaf in stream.leaves] + [(node.inputs[i], (node, i)) for node, i in stream.external]
    for value, use in writes:
        try:
            if use is not None and constant(value, model).array is None:
                reader = next(n for n, _ in value.uses() if n is not use[0])
                raise NotFoldable(f"{value.name!r} is also read by {node_label(reader)}")
            plan.edits += recentre.plan(value, model, use, drop_last=drop_last, touched=plan.touched)
        except NotFoldable:
            plan.explicit.append((value, use))
    return plan




def _post_ln_chains(streams: list[Stream], plans: dict) -> dict[Stream, str]:
    """Streams whose explicitly centred writers depend on one another: a centring op in every layer.

    One explicit centring is fine (BLOOM's embedding LayerNorm output); a chain of them is Post-LN,
    where each layer's LayerNorm output writes the next residual sum.
    """
    explicit = {id(value): stream for stream in streams if id(stream) in plans
                for value, _ in plans[id(stream)].explicit}
    refused: dict[int, tuple[Stream, str]] = {}
    for stream in streams:
        for value, _ in (plans[id(stream)].explicit if id(stream) in plans else ()):
            upstream = _depends_on_any(value, set(explicit) - {id(value)})
            if upstream is None:
                continue
            reason = (f"Post-LN: the stream is written by {value.name!r}, which cannot be recentred by folding "
                      f"and is computed from another such writer ({upstream.name!r}); an exact conversion would "
                      "need a centring op in every layer")
            refused[id(stream)] = (stream, reason)
            refused.setdefault(id(explicit[id(upstream)]), (explicit[id(upstream)], reason))
    chain = [value for stream, _ in refused.values() for value, _ in plans[id(stream)].explicit]
    reason = next((r for _, r in refused.values()), "")
    for stream in streams:
        if id(stream) in plans and id(stream) not in refused:
            outputs = {id(s.y) for s in stream.readers}
            if any(_depends_on_any(value, outputs) is not None or id(value) in outputs for value in chain):
                refused[id(stream)] = (stream, f"Post-LN: its output feeds the residual chain of a Post-LN model "
                                               f"({reason.removeprefix('Post-LN: ')})")
    return {stream: reason for stream, reason in refused.values()}




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




def _centre(value: ir.Value, use, model: ir.Model, target: str, keep: int | None) -> ir.Value:
    """Inserts value - mean(value), sliced to its first `keep` elements if given, and makes the given use
    (or every use) read it; returns it."""
    uses = [use] if use is not None else list(value.uses())
    order = {id(n): i for i, n in enumerate(uses[0][0].graph)}
    anchor = min((n for n, _ in uses), key=lambda n: order[id(n)])
    emitter = Emitter(model, anchor, target)
    centred = emitter.centre(value, name=f"{value.name}/recentre")
    centred.shape, centred.type = value.shape, value.type
    if keep is not None:
        centred = emitter.keep_first(centred, keep, name=f"{value.name}/drop_last")
        centred.type = value.type
    for node, index in uses:
        node.replace_input_with(index, centred)
    return centred




def not_self_contained(site: NormSite) -> str:
    inside = {id(n) for n in site.nodes}
    for node in site.nodes:
        for out in node.outputs:
            if out is site.y:
                continue
            if out.is_graph_output() or any(id(user) not in inside for user, _ in out.uses()):
                return f"its intermediate value {out.name!r} is used outside the LayerNorm"
    return ""
