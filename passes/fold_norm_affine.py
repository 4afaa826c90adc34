"""fold-norm-affine: folds a LayerNorm's or RMSNorm's gamma and beta into the linears that read it.

With n the normalized value and every reader a linear map z = y W + b on the width axis (behind
width-preserving views, normfold.consumers):
    z = (n * gamma + beta) W + b = n (diag(gamma) W) + (beta W + b)
so W' = diag(gamma) W (row i of W scaled by gamma_i) and b' = b + beta W (a new Add when the MatMul
had no bias; Gemm's C' = beta_g C + alpha beta op(B), beta_g = 1). The norm then keeps no affine:
a fused op gets gamma = 1 and no beta, a decomposed one loses its Mul and Add.

Refused, with the reason: a reader that is not such a linear map (the residual Add of a Post-LN
model, an activation, a graph output), a non-constant gamma or beta, or a Skip*Norm. New weights are
new initializers, so a weight tied to another use (ln_f -> tied unembedding) is untied, not changed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normfold import foldmath
from normfold.constants import constant
from normfold.consumers import LinearReader, NotLinear, linear_readers
from normfold.detect import NormSite, find_sites
from normfold.rewrite import NormPass, add_initializer, bypass, insert_after_value


class Refused(Exception):
    """The affine of this norm cannot be folded; the message says why."""


class FoldNormAffine(NormPass):
    """Replaces a norm's gamma/beta with scaled weights and biases in the linears that read it."""

    name = "fold-norm-affine"
    handles = ("LayerNorm", "RMSNorm")
    needs_shapes = True
    summary = "fold LayerNorm/RMSNorm gamma and beta into every linear that reads the norm"

    def rewrite(self, model: ir.Model) -> None:
        for site in find_sites(model):
            if site.kind not in self.handles:
                continue
            try:
                affine = _affine(site, model)
                if affine is None:
                    continue  # nothing left to fold: gamma is 1 and beta 0 (or absent)
                readers = linear_readers(site.y, model)
                plans = [_fold_plan(reader, *affine, model) for reader in readers]
            except (Refused, NotLinear) as exc:
                self.skip(site.nodes[0], str(exc))
                continue
            for apply in plans:
                apply()
            _drop_affine(site, model)
            self.applied()


def _affine(site: NormSite, model: ir.Model) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(gamma, beta) in float64, or None when the norm has no affine to fold."""
    if site.spelling.startswith("com.microsoft.Skip"):
        raise Refused("folding the affine of a Skip*Normalization is not supported")
    arrays = []
    for role, value in (("gamma", site.gamma), ("beta", site.beta)):
        if value is None:
            arrays.append(None)
            continue
        const = constant(value, model)
        if const.array is None:
            raise Refused(f"its {role} is not constant: {const.reason}")
        arrays.append(np.asarray(const.array, dtype=np.float64).reshape(-1))
    gamma, beta = arrays
    if (gamma is None or np.all(gamma == 1.0)) and (beta is None or not np.any(beta)):
        return None
    width = gamma.size if gamma is not None else beta.size
    return (gamma if gamma is not None else np.ones(width)), beta


def _fold_plan(reader: LinearReader, gamma: np.ndarray, beta: np.ndarray | None, model: ir.Model):
    """Checks one reader and returns the edit that folds (gamma, beta) into it."""
    node, weight, axis = reader.node, reader.weight, reader.weight_axis
    if weight.shape[axis] != gamma.size:
        raise Refused(f"{node.op_type} {node.name!r} reads {weight.shape[axis]} features, the norm has {gamma.size}")
    new_weight = _cast(foldmath.scale_channels(weight, gamma, axis=axis), weight.dtype, "weight")
    delta = None
    if beta is not None and np.any(beta):
        w64 = np.asarray(weight, dtype=np.float64)
        delta = beta @ w64 if axis == 0 else w64 @ beta
    if node.op_type == "Gemm":
        return _gemm_edit(node, new_weight, delta, model)
    return _matmul_edit(node, new_weight, delta, model)


def _gemm_edit(node: ir.Node, new_weight, delta, model):
    c = constant(node.inputs[2], model).array if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 2 and node.inputs[2] is not None and c is None:
        raise Refused(f"the C input of Gemm {node.name!r} is not constant")
    alpha = node.attributes.get_float("alpha", 1.0)
    beta_g = node.attributes.get_float("beta", 1.0)
    new_c = None
    if delta is not None or c is not None:
        new_c = (0.0 if c is None else beta_g * np.asarray(c, np.float64)) + (0.0 if delta is None else alpha * delta)
        new_c = _cast(np.asarray(new_c), new_weight.dtype, "bias")

    def apply() -> None:
        _set(node, 1, new_weight, model, "weight")
        if new_c is not None:
            _set(node, 2, new_c, model, "bias")
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)

    return apply


def _matmul_edit(node: ir.Node, new_weight, delta, model):
    delta = None if delta is None else _cast(delta, new_weight.dtype, "bias")
    bias_add, bias_index, bias = _following_bias(node, model)
    if delta is not None and bias_add is not None:
        new_bias = _cast(np.asarray(bias, np.float64) + delta, new_weight.dtype, "bias")

    def apply() -> None:
        _set(node, 1, new_weight, model, "weight")
        if delta is None:
            return
        if bias_add is not None:
            _set(bias_add, bias_index, new_bias, model, "bias")
            return
        out = node.outputs[0]
        shift = add_initializer(node.graph, f"{out.name}_norm_beta", delta, model)
        insert_after_value(out, ir.node("Add", [out, shift], name=f"{node.name or 'matmul'}_norm_beta"))

    return apply


def _following_bias(node: ir.Node, model: ir.Model):
    """(Add, index, bias) when the MatMul's only reader adds a constant bias over its output features."""
    out = node.outputs[0]
    uses = out.uses()
    if out.is_graph_output() or len(uses) != 1 or uses[0][0].op_type != "Add":
        return None, None, None
    add = uses[0][0]
    index = 1 - uses[0][1]
    bias = constant(add.inputs[index], model).array
    features = node.inputs[1].shape[-1] if node.inputs[1].shape is not None else None
    if bias is None or bias.ndim != 1 or bias.size != features:
        return None, None, None
    return add, index, bias


def _drop_affine(site: NormSite, model: ir.Model) -> None:
    """Removes gamma and beta from the norm itself (they now live in its readers)."""
    fused_op = site.nodes[0] if site.fused else None
    for value in (site.beta, site.gamma):
        if value is None:
            continue
        owner = next(n for n in site.nodes if value in n.inputs)
        if owner is not fused_op:
            bypass(owner, owner.inputs[1] if owner.inputs[0] is value else owner.inputs[0])
        elif value is site.gamma:
            ones = np.ones_like(constant(value, model).array)
            owner.replace_input_with(1, add_initializer(owner.graph, f"{value.name}_ones", ones, model))
        else:
            owner.replace_input_with(2, None)
            owner.resize_inputs(2)


def _set(node: ir.Node, index: int, array: np.ndarray, model: ir.Model, role: str) -> None:
    old = node.inputs[index] if index < len(node.inputs) else None
    base = old.name if old is not None and old.name else f"{node.name or node.op_type}_{role}"
    value = add_initializer(node.graph, f"{base}_affine", array, model)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _cast(array: np.ndarray, dtype, role: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.asarray(array).astype(dtype)
    if not np.all(np.isfinite(cast)):
        raise Refused(f"the folded {role} overflows {np.dtype(dtype).name}")
    return cast
