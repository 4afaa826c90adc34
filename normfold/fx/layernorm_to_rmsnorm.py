"""layernorm-to-rmsnorm on torch.fx: Pre-LN transformer -> Pre-RMSNorm (Jiang et al. 2023).

LN(x + c 1) = LN(x), and LN(x) = RMSNorm(x) when mean(x) = 0. For every residual stream
(normfold.fx.residual) each writer is recentred by folding (normfold.fx.recentre: projection weights
along their output axis, biases, embedding rows, parameters; a tied table is untied) or, where that
is impossible, centred explicitly (x - mean(x)); then every LayerNorm reading the stream becomes
torch.nn.RMSNorm(d, eps) carrying gamma, with beta added after (the module's `bias` parameter).
Post-LN models (BERT) are refused with the reason; so is any stream that needs a centring op in
every layer.

With `trainable=True` (normfold.fx.convert(..., for_training=True)) the recentring is a
parametrization kept in the forward pass (normfold.fx.modules), so the converted module trains like
the original under any optimizer; `normfold.fx.modules.freeze` makes the weights plain afterwards.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import torch
from torch import fx, nn

from normfold.fx import ops, residual, stream_plan
from normfold.fx.graph import node_label, remove_attr_if_unused, unique_attr_name
from normfold.fx.ops import NormOp
from normfold.report import PassReport, Skip

NAME = "layernorm-to-rmsnorm"
TOLERANCE_CLASS = "renorm"


def run(gm: fx.GraphModule, example_inputs: tuple, report: PassReport, *, trainable: bool = False) -> int:
    """Converts every stream that can be converted; returns the number of LayerNorms replaced."""
    ops.refresh_shapes(gm, example_inputs)
    streams = residual.find_streams(gm)
    plans, refusals = stream_plan.plan_streams(gm, streams, trainable=trainable)
    skip_unconverted(gm, streams, refusals, report)
    applied = 0
    for stream in streams:
        plan = plans.get(id(stream))
        if plan is None:
            continue
        apply_plan(gm, plan, report)
        for norm in stream.readers:
            replace_with_rmsnorm(gm, norm)
            applied += 1
    if applied:
        gm.graph.lint()
        gm.recompile()
    return applied


def skip_unconverted(gm: fx.GraphModule, streams, refusals: dict[int, str], report: PassReport) -> None:
    """Reports the refused streams' LayerNorms and every LayerNorm outside any stream, with why."""
    in_streams = set()
    for stream in streams:
        in_streams.update(r.node for r in stream.readers)
        for norm in stream.readers if id(stream) in refusals else ():
            report.skipped.append(Skip(node_label(norm.node), refusals[id(stream)]))
    for node in list(gm.graph.nodes):
        norm = ops.as_norm(gm, node)
        if norm is not None and norm.kind == "LayerNorm" and node not in in_streams:
            report.skipped.append(Skip(node_label(node), why_outside(gm, norm)))
        elif norm is None and ops.kind(gm, node) == "layer_norm":
            report.skipped.append(Skip(node_label(node), ops.why_unmatched(gm, node)))


def why_outside(gm: fx.GraphModule, norm: NormOp) -> str:
    """Why a LayerNorm's input is no stream: the first reader that sees its mean."""
    x = norm.x
    if not isinstance(x, fx.Node) or ops.shape(x) is None:
        return "the shape of its input is unknown"
    seen, stack = set(), [x]
    while stack:
        value = stack.pop()
        for user in ops.readers(value):
            if user is norm.node or user in seen or ops.as_norm(gm, user) is not None and user.args[0] is value:
                continue
            seen.add(user)
            if user.op == "output":
                return f"the value it normalizes, {x.name!r}, is a module output, so its mean is observable"
            if ops.kind(gm, user) in residual.VIEWS | ops.PASS_THROUGH | {"add"}:
                stack.append(user)
                continue
            return f"the value it normalizes, {x.name!r}, is also read by {node_label(user)}, which sees its mean"
    return f"the value it normalizes, {x.name!r}, reaches a reader that is not invariant to its mean"


def apply_plan(gm: fx.GraphModule, plan: stream_plan.StreamPlan, report: PassReport, *,
               keep: int | None = None) -> None:
    """Applies a stream's edits and inserts its explicit centrings (sliced to `keep` elements if given),
    noting each in the report."""
    for edit in plan.edits:
        edit()
    for value, use, why in plan.explicit:
        report.notes.append(Skip(node_label(value), f"centred by an explicit x - mean(x): {why}"))
        centre(gm, value, use, keep)


def centre(gm: fx.GraphModule, value: fx.Node, use, keep: int | None = None) -> fx.Node:
    """Inserts value - mean(value, -1) (first `keep` elements only, if given) for `use` (consumer,
    argument index) or all its readers."""
    users = [use[0]] if use is not None else ops.readers(value)
    with gm.graph.inserting_after(value):
        mean = gm.graph.call_function(torch.mean, (value, -1), {"keepdim": True})
    with gm.graph.inserting_after(mean):
        centred = gm.graph.call_function(torch.sub, (value, mean))
    result = centred
    if keep is not None:
        with gm.graph.inserting_after(centred):
            result = gm.graph.call_function(torch.narrow, (centred, -1, 0, keep))
    for node in (mean, centred, result):
        node.meta["nn_module_stack"] = value.meta.get("nn_module_stack", {})
    for user in users:
        user.replace_input_with(value, result)
    return result


def replace_with_rmsnorm(gm: fx.GraphModule, norm: NormOp) -> fx.Node:
    """Replaces the LayerNorm by nn.RMSNorm(d, eps) holding the same gamma (and beta, added after)."""
    gamma = norm.weight.get(gm) if norm.weight is not None else None
    beta = norm.bias.get(gm) if norm.bias is not None else None
    eps = norm.eps if norm.eps is not None else 1e-5
    module = nn.RMSNorm(norm.width, eps=eps, elementwise_affine=gamma is not None)
    if gamma is not None:
        module.weight = gamma if isinstance(gamma, nn.Parameter) else nn.Parameter(gamma, requires_grad=False)
    if beta is not None:
        module.bias = beta if isinstance(beta, nn.Parameter) else nn.Parameter(beta, requires_grad=False)
    path = install(gm, norm, module)
    node = norm.node
    with gm.graph.inserting_before(node):
        out = gm.graph.call_module(path, (node.args[0],))  # re-read: a centring may have redirected it
        out.meta = dict(node.meta)
        if beta is not None:
            bias = gm.graph.get_attr(f"{path}.bias")
            bias.meta = {}
            added = gm.graph.call_function(torch.add, (out, bias))
            added.meta = dict(node.meta)
            out = added
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return out


def install(gm: fx.GraphModule, norm: NormOp, module: nn.Module) -> str:
    """Registers the replacement of `norm` and returns its path: the LayerNorm's own path when nothing
    else uses it (state-dict names kept), else a new one."""
    node = norm.node
    if node.op == "call_module":
        calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
        path = node.target if calls == 1 else unique_attr_name(gm, f"{node.target}_rms")
        _set_module(gm, path, module)
        return path
    sources = [node.args[r.index] for r in (norm.weight, norm.bias) if r is not None]
    owner = sources[0].target.rpartition(".")[0] if sources else ""
    if owner and _owned_by(gm, owner, sources):
        _detach(gm, node, sources)
        _set_module(gm, owner, module)
        return owner
    path = unique_attr_name(gm, f"{owner}_rmsnorm" if owner else f"{node.name}_rmsnorm")
    _set_module(gm, path, module)
    _detach(gm, node, sources, remove=True)
    return path


def _owned_by(gm: fx.GraphModule, owner: str, sources: list[fx.Node]) -> bool:
    """True when the module at `owner` holds only this norm's parameters, read by this norm only."""
    try:
        container = gm.get_submodule(owner)
    except AttributeError:
        return False
    names = {f"{owner}.{n}" for n, _ in container.named_parameters(recurse=True)}
    names |= {f"{owner}.{n}" for n, _ in container.named_buffers(recurse=True)}
    readers = [n for n in gm.graph.nodes if n.op in ("get_attr", "call_module")
               and (n.target == owner or n.target.startswith(owner + "."))]
    return names == {s.target for s in sources} and all(len(s.users) == 1 for s in sources) \
        and all(n in sources for n in readers)


def _detach(gm: fx.GraphModule, node: fx.Node, sources: list[fx.Node], remove: bool = False) -> None:
    """Makes the norm node stop reading its get_attr parameters and erases them."""
    node.args = (node.args[0], *[None if a in sources else a for a in node.args[1:]])
    for source in sources:
        if not source.users:
            target = source.target
            gm.graph.erase_node(source)
            if remove:
                remove_attr_if_unused(gm, target)


def _set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    prefix, _, name = path.rpartition(".")
    parent = gm.get_submodule(prefix) if prefix else gm
    setattr(parent, name, module)


TRAINABLE = SimpleNamespace(NAME=NAME, TOLERANCE_CLASS=TOLERANCE_CLASS, run=partial(run, trainable=True))
"""The pass with `trainable=True`, for normfold.fx.convert(module, inputs, [TRAINABLE]): the converted
module keeps its recentring in the forward pass (freeze it with normfold.fx.modules.freeze)."""
