"""fold-norm-affine on torch.fx: a norm's gamma/beta folded into every linear layer reading it.

A norm's output is n * gamma + beta (LayerNorm, RMSNorm, a decomposed RMSNorm x * rsqrt(..) * gamma,
or an RMSNorm followed by its bias as layernorm-to-rmsnorm emits it). When every reader of it,
through width-keeping views, is a linear map on the last axis (nn.Linear, aten.linear, aten.addmm,
transformers' Conv1D) with constant parameters, y = (n * gamma + beta) W^T + b becomes
    y = n W'^T + b',   W' = W diag(gamma),   b' = b + W beta
(normfold.foldmath.scale_channels / input_shift_bias), and the norm loses its affine. A weight
shared with another layer (a tied LM head) is untied: the folded copy belongs to this reader only.
Refused, with the reason, when any reader is not such a linear layer (Post-LN's residual sum, an
output of the module, an activation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import fx, nn

from normfold import foldmath
from normfold.fx import ops
from normfold.fx.graph import node_label, unique_attr_name
from normfold.fx.residual import keeps_width
from normfold.report import PassReport, Skip

NAME = "fold-norm-affine"
_COPIES = {"to", "_to_copy", "type_as", "alias", "float", "double", "clone", "contiguous"}


@dataclass
class Affine:
    """A norm whose output `out` is n * gamma + beta; `strip` removes gamma and beta from the graph."""

    norm: fx.Node
    out: fx.Node
    width: int
    gamma: np.ndarray | None
    beta: np.ndarray | None
    strip: object


def run(gm: fx.GraphModule, example_inputs: tuple, report: PassReport) -> int:
    """Folds every norm affine whose readers are all linear; returns how many norms were folded."""
    ops.refresh_shapes(gm, example_inputs)
    applied = 0
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph:
            continue  # erased by an earlier fold
        affine = find_affine(gm, node)
        if affine is None:
            if (reason := ops.why_unmatched(gm, node)) is not None:
                report.skipped.append(Skip(node_label(node), reason))
            continue
        linears, reason = linear_readers(gm, affine)
        if reason is not None:
            report.skipped.append(Skip(node_label(affine.norm), reason))
            continue
        fold(gm, affine, linears)
        applied += 1
    if applied:
        gm.graph.lint()
        gm.recompile()
    return applied


def find_affine(gm: fx.GraphModule, node: fx.Node) -> Affine | None:
    """The norm affine computed at `node` (a norm, or the mul by gamma of a decomposed RMSNorm)."""
    norm = ops.as_norm(gm, node)
    if norm is not None:
        gamma = norm.weight.array(gm) if norm.weight is not None else None
        beta = norm.bias.array(gm) if norm.bias is not None else None
        add = _bias_after(gm, norm) if beta is None else None
        if add is not None:
            beta = add[1]
            return Affine(node, add[0], norm.width, gamma, beta,
                          lambda: (_bypass(gm, add[0], node), _strip_norm(gm, norm)))
        if gamma is None and beta is None:
            return None
        return Affine(node, node, norm.width, gamma, beta, lambda: _strip_norm(gm, norm))
    if ops.kind(gm, node) == "mul" and len(node.args) == 2:
        for i in (0, 1):
            param, other = node.args[i], node.args[1 - i]
            dims = ops.shape(node)
            if isinstance(param, fx.Node) and param.op == "get_attr" and isinstance(other, fx.Node) \
                    and dims and ops.shape(param) == (dims[-1],) and _is_rms_scaled(gm, other):
                gamma = ops.ParamRef(node, index=i).array(gm)
                return Affine(node, node, dims[-1], gamma, None, lambda: _bypass(gm, node, other))
    return None


def _bias_after(gm: fx.GraphModule, norm: ops.NormOp) -> tuple[fx.Node, np.ndarray] | None:
    """(add node, beta) when the norm's only reader adds a parameter of its width (RMSNorm + beta, as
    layernorm-to-rmsnorm emits it)."""
    users = list(norm.node.users)
    if len(users) != 1 or ops.kind(gm, users[0]) != "add" or len(users[0].args) != 2:
        return None
    add = users[0]
    beta_node = add.args[1] if add.args[0] is norm.node else add.args[0]
    if not (isinstance(beta_node, fx.Node) and beta_node.op == "get_attr" and ops.shape(beta_node) == (norm.width,)):
        return None
    return add, ops.ParamRef(add, index=add.args.index(beta_node)).array(gm)


def _is_rms_scaled(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when `node` is x * rsqrt(...) (through casts): a decomposed RMSNorm before its gamma."""
    while ops.kind(gm, node) in _COPIES:
        node = ops.data_input(node)
    return ops.kind(gm, node) == "mul" and any(
        isinstance(a, fx.Node) and ops.kind(gm, a) == "rsqrt" for a in node.args[:2])


def linear_readers(gm: fx.GraphModule, affine: Affine) -> tuple[list[ops.LinearOp], str | None]:
    """Every linear layer reading the affine output through views, or the reason it cannot fold."""
    found, stack = [], [affine.out]
    while stack:
        value = stack.pop()
        for user in ops.readers(value):
            if user.op == "output":
                return [], "its output is an output of the module"
            linear = ops.as_linear(gm, user)
            if linear is not None and linear.x is value and sum(a is value for a in user.args) == 1 \
                    and linear.weight.get(gm).shape[linear.in_axis] == affine.width:
                found.append(linear)
            elif keeps_width(gm, user, value):
                stack.append(user)
            else:
                return [], f"its output is also read by {node_label(user)}, which is not a linear layer"
    if not found:
        return [], "no linear layer reads its output"
    return found, None


def fold(gm: fx.GraphModule, affine: Affine, linears: list[ops.LinearOp]) -> None:
    """W' = W diag(gamma), b' = b + W beta for every reader; then the norm loses its affine."""
    for linear in linears:
        weight = linear.weight.array(gm)
        if affine.beta is not None:
            rows = weight if linear.in_axis == 1 else weight.T
            bias = linear.bias.array(gm) if linear.bias is not None else 0.0
            ops.set_bias(gm, linear, bias + foldmath.input_shift_bias(rows, affine.beta), suffix="normfolded")
        if affine.gamma is not None:
            linear.weight.set(gm, foldmath.scale_channels(weight, affine.gamma, axis=linear.in_axis),
                              suffix="normfolded")
    affine.strip()


def _strip_norm(gm: fx.GraphModule, norm: ops.NormOp) -> None:
    """The norm without gamma and beta: a new affine-free module, or None for the aten arguments."""
    node = norm.node
    if node.op == "call_module":
        old = gm.get_submodule(node.target)
        cls = nn.LayerNorm if norm.kind == "LayerNorm" else nn.RMSNorm
        new = cls(norm.width, eps=old.eps, elementwise_affine=False)
        calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
        path = node.target if calls == 1 else unique_attr_name(gm, f"{node.target}_{node.name}")
        prefix, _, name = path.rpartition(".")
        setattr(gm.get_submodule(prefix) if prefix else gm, name, new)
        node.target = path
        return
    sources = [node.args[r.index] for r in (norm.weight, norm.bias) if r is not None]
    node.args = tuple(None if a in sources else a for a in node.args)
    for source in sources:
        ops.prune(gm, source)


def _bypass(gm: fx.GraphModule, node: fx.Node, replacement: fx.Node) -> None:
    """Readers of `node` read `replacement` instead; `node` and its parameter are erased."""
    node.replace_all_uses_with(replacement)
    params = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
    gm.graph.erase_node(node)
    for param in params:
        ops.prune(gm, param)



