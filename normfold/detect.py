"""Finds every normalization site of a model and says what each pass would do with it.

Fused ops: BatchNormalization, LayerNormalization, RMSNormalization, InstanceNormalization,
GroupNormalization, and onnxruntime's SimplifiedLayerNormalization, SkipLayerNormalization and
SkipSimplifiedLayerNormalization.

Decomposed spellings, matched from the variance reduction backwards and the normalization forwards:
    LayerNorm: d = x - ReduceMean(x);  v = ReduceMean(d^2)
    RMSNorm:   d = x;                  v = ReduceMean(d^2)
    then       y = d / Sqrt(v + eps)   or   d * Reciprocal(Sqrt(v + eps))   or   d * (1 / Sqrt(v + eps)),
               optionally * gamma (+ beta)
where d^2 is Pow(d, 2) or Mul(d, d), ReduceMean's axes come as an attribute or an input, both
reductions use the same trailing axes with keepdims=1, and eps is a constant scalar; the Casts of
mixed-precision exports are part of the site: of x, of d (fp16 TorchScript LayerNorm), of y back. Anything else that merely
looks like a norm is not reported as one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from normfold.constants import constant
from normfold.report import node_label
from normfold.shapes import rank

SCHEMA = "normfold.inspect/1"

FUSED_KINDS = {
    ("", "BatchNormalization"): "BatchNorm",
    ("", "LayerNormalization"): "LayerNorm",
    ("", "RMSNormalization"): "RMSNorm",
    ("", "InstanceNormalization"): "InstanceNorm",
    ("", "GroupNormalization"): "GroupNorm",
    ("", "SimplifiedLayerNormalization"): "RMSNorm",
    ("com.microsoft", "SimplifiedLayerNormalization"): "RMSNorm",
    ("com.microsoft", "SkipLayerNormalization"): "LayerNorm",
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): "RMSNorm",
}
_DEFAULT_EPSILON = {"BatchNorm": 1e-5, "LayerNorm": 1e-5, "RMSNorm": None, "InstanceNorm": 1e-5, "GroupNorm": 1e-5}


@dataclass
class Site:
    """One normalization site as `normfold inspect` shows it (plain data, stable JSON)."""

    kind: str
    name: str
    spelling: str
    nodes: list[str]
    axis: int | list[int] | None
    epsilon: float | None
    dtype: str | None
    input: str
    output: str
    placement: str | None = None
    placement_reason: str | None = None
    passes: dict[str, str] = field(default_factory=dict)


@dataclass
class NormSite:
    """One normalization site in the graph: the nodes that spell it and the values it connects.

    `x` is the normalized input (before any Cast wrapper), `y` the final output (after the affine
    and any Cast back); `gamma`/`beta` are the affine operands, None when absent.
    """

    kind: str
    spelling: str
    nodes: list[ir.Node]
    x: ir.Value
    y: ir.Value
    axis: int | list[int] | None
    epsilon: float | None
    gamma: ir.Value | None = None
    beta: ir.Value | None = None

    @property
    def name(self) -> str:
        return node_label(self.nodes[0])

    def escaping_intermediate(self) -> str:
        """Why the site cannot be replaced as a whole (an intermediate read outside it), or ""."""
        inside = {id(n) for n in self.nodes}
        for node in self.nodes:
            for out in node.outputs:
                if out is not self.y and (out.is_graph_output() or any(id(u) not in inside for u, _ in out.uses())):
                    return f"its intermediate value {out.name!r} is used outside the {self.kind}"
        return ""

    def refresh_input(self) -> ir.Value:
        """Re-reads `x` from the graph (a rewrite may have redirected the site's reads) and returns it."""
        self.x = self.nodes[0].inputs[0]
        return self.x

    @property
    def fused(self) -> bool:
        """True for a fused norm op (possibly followed by the Add of its beta), False when decomposed."""
        return not self.spelling.startswith("decomposed")

    def describe(self) -> Site:
        return Site(
            kind=self.kind,
            name=self.name,
            spelling=self.spelling,
            nodes=[node_label(n) for n in self.nodes],
            axis=self.axis,
            epsilon=self.epsilon,
            dtype=_dtype(self.x) or _dtype(self.y) or _dtype(self.gamma),
            input=self.x.name if self.x is not None else "",
            output=self.y.name,
        )


def find_sites(model: ir.Model) -> list[NormSite]:
    """Every normalization site of every graph, in graph order."""
    sites = []
    for graph in model.graphs():
        covered: set[int] = set()
        for node in graph:
            if id(node) in covered:
                continue
            site = _fused_site(node, model) or _decomposed_site(node, model, covered)
            if site is not None:
                covered.update(id(n) for n in site.nodes)
            if site is not None:
                sites.append(site)
    return sites


def inspect(model: ir.Model) -> list[dict]:
    """Sites as dicts, each with, per pass that handles its kind, "applies" or the reason it does not."""
    from normfold.pipeline import run_passes, snapshot
    from normfold.passes import PASSES

    from normfold.residual import placements

    found = find_sites(model)
    sites = [site.describe() for site in found]
    where = placements(model, found)
    for site, view in zip(found, sites):
        view.placement, view.placement_reason = where.get(id(site.nodes[0]), (None, None))
    for cls in PASSES.values():
        handled = [s for s in sites if s.kind in cls.handles]
        if not handled:
            continue
        trial = snapshot(model)
        report = run_passes(trial, [cls()])
        reasons = {skip.node: skip.reason for skip in report.passes[0].skipped}
        for site in handled:
            site.passes[cls.name] = f"does not apply: {reasons[site.name]}" if site.name in reasons else "applies"
            if reasons.get(site.name, "").startswith("Post-LN"):
                site.placement, site.placement_reason = "Post-LN", reasons[site.name]
    return [asdict(s) for s in sites]


def _fused_site(node: ir.Node, model: ir.Model | None = None) -> NormSite | None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    kind = FUSED_KINDS.get((domain, node.op_type))
    if kind is None:
        return None
    default_axis = 1 if kind in ("BatchNorm", "InstanceNorm", "GroupNorm") else -1
    skip = 2 if node.op_type.startswith("Skip") else 1  # Skip*Norm: (input, skip, gamma, beta, bias)
    gamma = node.inputs[skip] if len(node.inputs) > skip else None
    beta = node.inputs[skip + 1] if kind == "LayerNorm" and len(node.inputs) > skip + 1 else None
    nodes, y = [node], node.outputs[0]
    if kind == "RMSNorm" and skip == 1 and model is not None:
        y, _, beta, tail = _affine_tail(y, "beta-only", model)  # a beta added after the op, as normfold emits
        nodes += tail
    return NormSite(
        kind=kind,
        spelling=node.op_type if not domain else f"{domain}.{node.op_type}",
        nodes=nodes,
        x=node.inputs[0],
        y=y,
        axis=node.attributes.get_int("axis", default_axis),
        epsilon=_as_float32_text(node.attributes.get_float("epsilon", _DEFAULT_EPSILON[kind])),
        gamma=gamma if kind in ("LayerNorm", "RMSNorm") else None,
        beta=beta,
    )


def _decomposed_site(node: ir.Node, model: ir.Model, covered: set[int]) -> Site | None:
    """Matches a decomposed LayerNorm/RMSNorm whose variance ReduceMean is `node`."""
    if id(node) in covered or not _is_op(node, "ReduceMean"):
        return None
    square = node.inputs[0].producer() if node.inputs[0] is not None else None
    d = _squared_operand(square, model)
    axes = _reduce_axes(node, model)
    if d is None or not _trailing(axes, rank(d, model)) or node.attributes.get_int("keepdims", 1) != 1:
        return None
    normalized, eps, tail = _normalize_tail(node, d, model)
    if normalized is None:
        return None
    nodes = [square, node, *tail]
    kind, x = "RMSNorm", d
    centre = d.producer()
    mid_cast = centre if _is_op(centre, "Cast") else None  # fp16 TorchScript exports: Sub -> Cast -> Pow
    if mid_cast is not None:
        centre = mid_cast.inputs[0].producer()
    if _is_op(centre, "Sub") and _is_op(mean := centre.inputs[1].producer(), "ReduceMean"):
        # The centred value must stay inside the norm: if anything else reads it, the Sub is a centring
        # of its own and the norm is an RMSNorm of the centred value (as normfold emits for BLOOM).
        inside = {id(n) for n in [*nodes, *([mid_cast] if mid_cast is not None else [])]}
        private = all(id(user) in inside for user, _ in d.uses()) and (
            mid_cast is None or all(user is mid_cast for user, _ in centre.outputs[0].uses()))
        if private and mean.inputs[0] is centre.inputs[0] and _reduce_axes(mean, model) == axes and \
                mean.attributes.get_int("keepdims", 1) == 1:
            kind, x = "LayerNorm", centre.inputs[0]
            nodes = [mean, centre, *([mid_cast] if mid_cast is not None else []), *nodes]
    cast_back = _single_user(normalized)
    if _is_op(cast_back, "Cast"):
        nodes.append(cast_back)
        normalized = cast_back.outputs[0]
    output, gamma, beta, affine = _affine_tail(normalized, kind, model)
    nodes += affine
    cast_in = x.producer()
    inside = {id(n) for n in nodes}
    if _is_op(cast_in, "Cast") and all(id(user) in inside for user, _ in x.uses()):
        nodes.insert(0, cast_in)
        x = cast_in.inputs[0]
    if len(output.uses()) == 1 and _is_op(cast_out := output.uses()[0][0], "Cast"):
        nodes.append(cast_out)
        output = cast_out.outputs[0]
    covered.update(id(n) for n in nodes)
    return NormSite(
        kind=kind,
        spelling="decomposed: " + " ".join(n.op_type for n in nodes),
        nodes=nodes,
        x=x,
        y=output,
        axis=axes[0] if len(axes) == 1 else axes,
        epsilon=eps,
        gamma=gamma,
        beta=beta,
    )


def _squared_operand(square: ir.Node | None, model: ir.Model) -> ir.Value | None:
    """d for Pow(d, 2) or Mul(d, d), else None."""
    if _is_op(square, "Mul") and square.inputs[0] is square.inputs[1]:
        return square.inputs[0]
    if _is_op(square, "Pow"):
        exponent = constant(square.inputs[1], model).array
        if exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0:
            return square.inputs[0]
    return None


def _normalize_tail(variance: ir.Node, d: ir.Value, model: ir.Model):
    """Follows v -> Add(eps) -> Sqrt -> Div(d, .) or Mul(d, Reciprocal(.)); returns (y, eps, nodes)."""
    add = _single_user(variance.outputs[0])
    if not _is_op(add, "Add"):
        return None, None, []
    other = add.inputs[1] if add.inputs[0] is variance.outputs[0] else add.inputs[0]
    eps = constant(other, model).array
    sqrt = _single_user(add.outputs[0])
    if eps is None or eps.size != 1 or not _is_op(sqrt, "Sqrt"):
        return None, None, []
    user = _single_user(sqrt.outputs[0])
    if _is_op(user, "Div") and user.inputs[0] is d and user.inputs[1] is sqrt.outputs[0]:
        return user.outputs[0], float(eps.reshape(-1)[0]), [add, sqrt, user]
    if _is_op(user, "Reciprocal") or (_is_op(user, "Div") and user.inputs[1] is sqrt.outputs[0]
                                      and _is_one(constant(user.inputs[0], model).array)):
        mul = _single_user(user.outputs[0])
        if _is_op(mul, "Mul") and d in mul.inputs:
            return mul.outputs[0], float(eps.reshape(-1)[0]), [add, sqrt, user, mul]
    return None, None, []


def _is_one(array: np.ndarray | None) -> bool:
    return array is not None and array.size == 1 and float(array.reshape(-1)[0]) == 1.0


def _affine_tail(normalized: ir.Value, kind: str, model: ir.Model):
    """Absorbs a following Mul by a constant gamma and Add of a constant beta (only the Add for
    kind "beta-only") whose shape is (d,) or (1, ..., 1, d): a per-position constant is not a norm's
    affine and stays outside. Returns (output, gamma, beta, nodes)."""
    nodes, value, operands = [], normalized, {"Mul": None, "Add": None}
    for op in {"beta-only": ("Add",)}.get(kind, ("Mul", "Add")):
        user = _single_user(value)
        if not _is_op(user, op):
            break
        other = user.inputs[1] if user.inputs[0] is value else user.inputs[0]
        array = constant(other, model).array
        if array is None or not _per_channel(array, normalized):
            break
        nodes.append(user)
        operands[op] = other
        value = user.outputs[0]
    return value, operands["Mul"], operands["Add"], nodes


def _per_channel(array: np.ndarray, value: ir.Value) -> bool:
    """True for a (d,)-like constant: every axis but the last has size 1 (d checked when known)."""
    if array.ndim == 0 or any(n != 1 for n in array.shape[:-1]):
        return False
    width = value.shape[-1] if value.shape is not None and len(value.shape) else None
    return not isinstance(width, int) or array.shape[-1] == width


def _reduce_axes(node: ir.Node, model: ir.Model) -> list[int] | None:
    """ReduceMean's axes from the attribute (opset < 18) or the second input (opset >= 18)."""
    attr = node.attributes.get_ints("axes", None)
    if attr is not None:
        return sorted(int(a) for a in attr)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant(node.inputs[1], model).array
        return None if axes is None else sorted(int(a) for a in np.asarray(axes).reshape(-1))
    return None  # reduces over all axes: not a per-token norm


def _trailing(axes: list[int] | None, rank: int | None) -> bool:
    """True when `axes` are the last len(axes) axes of a value of rank `rank` (negative axes need no known rank)."""
    if not axes:
        return False
    if rank is not None:
        normalized = sorted(a + rank if a < 0 else a for a in axes)
        return normalized == list(range(rank - len(axes), rank))
    return sorted(axes) == list(range(-len(axes), 0))


def _single_user(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    return uses[0][0] if len(uses) == 1 and not value.is_graph_output() else None


def _is_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _as_float32_text(eps: float | None) -> float | None:
    """An epsilon attribute (stored as float32) as the decimal a user wrote: 1e-05, not 1.0000000656e-05."""
    return None if eps is None else float(str(np.float32(eps)))


def _dtype(value: ir.Value | None) -> str | None:
    if value is None or value.dtype is None:
        return None
    return "bfloat16" if value.dtype == ir.DataType.BFLOAT16 else str(value.dtype.numpy())
