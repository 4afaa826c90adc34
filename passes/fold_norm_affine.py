"""fold-norm-affine: folds a LayerNorm's or RMSNorm's gamma and beta into the linears that read it.

With n the normalized value and every reader a linear map z = y W + b on the width axis (behind
width-preserving views, normfold.consumers):
    z = (n * gamma + beta) W + b = n (diag(gamma) W) + (beta W + b)
so W' = diag(gamma) W (row i of W scaled by gamma_i) and b' = b + beta W (a new Add when the MatMul
had no bias; Gemm's C' = beta_g C + alpha beta op(B), beta_g = 1). The norm then keeps no affine:
gamma becomes 1 and beta goes. A decomposed norm keeps its Mul, by ones (x * 1 == x): onnxruntime fuses
the decomposed spelling into its norm kernel only with that Mul, and runs the five loose ops about 2.7x
slower (benchmarks/results/kernel_profile_deit_tiny.md); its Add goes.

Refused, with the reason: a reader that is not such a linear map (the residual Add of a Post-LN
model, an activation, a graph output), a non-constant gamma or beta, a Skip*Norm, or a beta that
would need a new Add wider than the norm (a bias-less LM head: slower, not faster). New weights are
new initializers, so a weight tied to another use (ln_f -> tied unembedding) is untied, not changed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normfold import derived
from normfold.constants import constant
from normfold.consumers import LinearReader, NotLinear, linear_edit, linear_readers, wide_new_bias
from normfold.derived import DerivedTensor, Scale
from normfold.detect import NormSite, find_sites
from normfold.rewrite import NormPass, add_initializer, bypass


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
                gamma, beta = affine
                readers = linear_readers(site.y, model)
                wide = wide_new_bias(readers, gamma.size, model) if beta is not None and np.any(beta) else None
                if wide:  # the norm keeps its affine, and a tied head stays tied
                    raise NotWorthFolding(f"{wide}; the affine stays on the norm")
                plans = [_fold_plan(reader, gamma, beta, model) for reader in readers]
            except (NotLinear, NotWorthFolding) as exc:
                self.skip(site.nodes[0], str(exc))
                continue
            for apply in plans:
                apply()
            _drop_affine(site, model)
            self.applied()


def _affine(site: NormSite, model: ir.Model) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(gamma, beta) in float64, or None when the norm has no affine to fold."""
    if site.spelling.startswith("com.microsoft.Skip"):
        raise NotLinear("folding the affine of a Skip*Normalization is not supported")
    arrays = []
    for role, value in (("gamma", site.gamma), ("beta", site.beta)):
        if value is None:
            arrays.append(None)
            continue
        const = constant(value, model)
        if const.array is None:
            raise NotLinear(f"its {role} is not constant: {const.reason}")
        arrays.append(np.asarray(const.array, dtype=np.float64).reshape(-1))
    gamma, beta = arrays
    if (gamma is None or np.all(gamma == 1.0)) and (beta is None or not np.any(beta)):
        return None
    width = gamma.size if gamma is not None else beta.size
    return (gamma if gamma is not None else np.ones(width)), beta


class NotWorthFolding(Exception):
    """Folding would make the model slower; the message says why."""


def _fold_plan(reader: LinearReader, gamma: np.ndarray, beta: np.ndarray | None, model: ir.Model):
    """Checks one reader and returns the edit that folds (gamma, beta) into it.

    No weight is read whole: max|W| (for the overflow bound) and beta W come from one read of its rows
    in blocks, and the scaled weight is a DerivedTensor, computed block by block when the model is saved."""
    node, weight, axis = reader.node, reader.weight, reader.weight_axis
    if weight.shape[axis] != gamma.size:
        raise NotLinear(f"{node.op_type} {node.name!r} reads {weight.shape[axis]} features, the norm has {gamma.size}")
    largest_gamma = float(np.abs(gamma).max(initial=0.0))
    shift = beta if beta is not None and np.any(beta) else None
    largest, delta = derived.scan_linear(weight, shift, axis=axis, largest=not largest_gamma <= 1.0)  # NaN too
    scaled = DerivedTensor(weight, Scale(axis, gamma))
    # max|gamma| <= 1 cannot overflow (largest is None, not read); else the bound max|W| max|gamma|
    if largest is not None and not derived.stays_finite(scaled, largest * largest_gamma):
        raise NotLinear(f"the folded weight overflows {reader.dtype.name}")
    return linear_edit(node, scaled, delta, model)


def _drop_affine(site: NormSite, model: ir.Model) -> None:
    """Removes gamma and beta from the norm itself (they now live in its readers): gamma becomes ones
    (the Mul of a decomposed norm stays: onnxruntime fuses a decomposed norm into its own kernel only
    with it, benchmarks/results/kernel_profile_deit_tiny.md), beta goes (its Add, or a fused op's input)."""
    fused_op = site.nodes[0] if site.fused else None
    for value in (site.beta, site.gamma):
        if value is None:
            continue
        owner = next(n for n in site.nodes if value in n.inputs)
        if value is site.gamma:
            ones = np.ones_like(constant(value, model).array)
            owner.replace_input_with(list(owner.inputs).index(value),
                                     add_initializer(owner.graph, f"{value.name}_ones", ones, model))
        elif owner is not fused_op:
            bypass(owner, owner.inputs[1] if owner.inputs[0] is value else owner.inputs[0])
        else:
            owner.replace_input_with(2, None)
            owner.resize_inputs(2)


