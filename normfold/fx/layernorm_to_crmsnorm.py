"""layernorm-to-crmsnorm on torch.fx: Pre-LN transformer -> Pre-CRMSNorm (Jiang et al. 2023).

Once the residual stream is zero-mean (normfold.fx.layernorm_to_rmsnorm's recentring), its last
element is implied, x_d = -sum_{i<d} x_i, so the stream is stored in d-1 dimensions:
- writers are recentred and lose their last output (weight row / Conv1D column, bias element,
  embedding column, parameter element); view/reshape/expand sizes saying d on the stream say d-1;
- every LayerNorm reading it becomes CRMSNorm(d, eps) (normfold.fx.modules), whose d-1 outputs are
  the first elements of the zero-mean normalized vector n;
- each linear reader gets the norm's affine folded in and the implied element eliminated:
  A = diag(gamma) W, A'_i = A_i - A_d (normfold.foldmath.crms_input_weight), b' = b + W beta.
A stream whose norm outputs reach anything but linear layers (through views), or whose reader is
also one of its writers, stays d-wide and gets RMSNorm instead, with a note saying why.
"""

from __future__ import annotations

import torch
from torch import fx

from normfold import foldmath
from normfold.fx import fold_norm_affine, ops, residual, stream_plan
from normfold.fx.graph import node_label
from normfold.fx.layernorm_to_rmsnorm import apply_plan, install, replace_with_rmsnorm, skip_unconverted
from normfold.fx.modules import CRMSNorm
from normfold.fx.recentre import NotFoldable
from normfold.report import PassReport, Skip

NAME = "layernorm-to-crmsnorm"
TOLERANCE_CLASS = "renorm"
SIZES = {"view", "reshape", "_unsafe_view", "expand"}


def run(gm: fx.GraphModule, example_inputs: tuple, report: PassReport) -> int:
    """Converts every stream that can be converted; returns the number of LayerNorms replaced."""
    ops.refresh_shapes(gm, example_inputs)
    streams = residual.find_streams(gm)
    crms_plans, _ = stream_plan.plan_streams(gm, streams, drop_last=True)
    rms_plans, refusals = stream_plan.plan_streams(gm, streams)
    skip_unconverted(gm, streams, refusals, report)
    writers = {leaf for s in streams for leaf in s.leaves}
    work = []
    for stream in streams:
        if id(stream) not in rms_plans:
            continue
        try:
            if id(stream) not in crms_plans:
                raise NotFoldable("its writers cannot be stored in d-1 dimensions")
            readers = [_readers(gm, norm, writers) for norm in stream.readers]
            work.append((stream, crms_plans[id(stream)], readers))
        except NotFoldable as exc:
            for norm in stream.readers:
                report.notes.append(Skip(node_label(norm.node), f"RMSNorm instead of CRMSNorm: {exc}"))
            work.append((stream, rms_plans[id(stream)], None))
    applied = 0
    for stream, plan, readers in work:
        if readers is None:
            apply_plan(gm, plan, report)
            for norm in stream.readers:
                replace_with_rmsnorm(gm, norm)
        else:
            apply_plan(gm, plan, report, keep=stream.width - 1)
            for node in stream.values:
                _narrow_sizes(node, stream.width)
            for norm, (linears, views) in zip(stream.readers, readers):
                _replace_with_crmsnorm(gm, norm, linears, views)
        applied += len(stream.readers)
    if applied:
        gm.graph.lint()
        gm.recompile()
    return applied


def _readers(gm: fx.GraphModule, norm: ops.NormOp, writers: set[fx.Node]):
    """(linear readers, views between) of the norm's output, or NotFoldable saying why CRMS is unsafe."""
    affine = fold_norm_affine.Affine(norm.node, norm.node, norm.width, None, None, None)
    linears, reason = fold_norm_affine.linear_readers(gm, affine)
    if reason is not None:
        raise NotFoldable(reason)
    for linear in linears:
        if linear.node in writers:
            raise NotFoldable(f"{node_label(linear.node)} reads the norm and writes a residual stream")
    views, stack = [], [norm.node]
    while stack:
        for user in ops.readers(stack.pop()):
            if all(user is not linear.node for linear in linears):
                views.append(user)
                stack.append(user)
    for view in views:
        if ops.kind(gm, view) in SIZES and _last_size(view) not in (-1, norm.width):
            raise NotFoldable(f"{node_label(view)} gives the width a computed size")
    return linears, views


def _last_size(node: fx.Node):
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return sizes[-1] if sizes else None


def _narrow_sizes(node: fx.Node, width: int) -> None:
    """A view/reshape/expand of the stream whose last size says d says d-1."""
    if node.op not in ("call_function", "call_method") or _last_size(node) != width:
        return
    if ops.kind(node.graph.owning_module, node) not in SIZES:
        return
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        node.update_arg(1, [*node.args[1][:-1], width - 1])
    else:
        node.update_arg(len(node.args) - 1, width - 1)


def _replace_with_crmsnorm(gm: fx.GraphModule, norm: ops.NormOp, linears, views) -> None:
    """CRMSNorm(d) in place of the LayerNorm; gamma, beta and the implied element folded into the readers."""
    gamma = norm.weight.array(gm) if norm.weight is not None else None
    beta = norm.bias.array(gm) if norm.bias is not None else None
    for linear in linears:
        weight = linear.weight.array(gm)
        scale = gamma if gamma is not None else torch.ones(norm.width, dtype=torch.float64).numpy()
        if beta is not None:
            rows = weight if linear.in_axis == 1 else weight.T
            bias = linear.bias.array(gm) if linear.bias is not None else 0.0
            ops.set_bias(gm, linear, bias + foldmath.input_shift_bias(rows, beta), suffix="crms")
        linear.weight.set(gm, foldmath.crms_input_weight(weight, scale, axis=linear.in_axis), suffix="crms")
    for view in views:
        _narrow_sizes(view, norm.width)
    eps = norm.eps if norm.eps is not None else 1e-5
    path = install(gm, norm, CRMSNorm(norm.width, eps))
    node = norm.node
    with gm.graph.inserting_before(node):
        out = gm.graph.call_module(path, (node.args[0],))
    out.meta = {k: v for k, v in node.meta.items() if k != "val"}
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
