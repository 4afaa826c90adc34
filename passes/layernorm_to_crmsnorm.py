"""layernorm-to-crmsnorm: Pre-LN -> Pre-CRMSNorm, an exact rewrite (Jiang et al., NeurIPS 2023).

Once every writer of a stream is recentred (as in layernorm-to-rmsnorm), each stream value x is
zero-mean, so its last element is implied, x_d = -sum_{i<d} x_i, and the stream is stored in d-1
dimensions:
- writers lose their last output channel (embedding tables, projection columns and biases,
  constants), and Reshape/Expand shape constants on the way say d-1;
- each LayerNorm reading the stream becomes CRMSNorm(x) = x / sqrt((sum x^2 + (sum x)^2)/d + eps),
  whose output n is again zero-mean and stored in d-1 dimensions;
- each linear reader of a norm output (behind width-preserving views) absorbs the norm's affine
  and the implied element: with A = diag(gamma) W, A'_i = A_i - A_d for i < d, bias b' = b + beta W;
  except a MatMul with no bias wider than the norm (an LM head: beta W would be a new Add over every
  logit, and the model slower, benchmarks/results/kernel_profile_gpt2_small.md), which reads the norm
  restored, y = [n, -sum n] * gamma + beta, and keeps its weight.
A writer that cannot be folded (BLOOM's embedding LayerNorm output) gets an explicit centring
sliced to d-1 elements. Refused, per stream, with the reason: anything layernorm-to-rmsnorm refuses,
or a shape that is computed, not constant. A stream whose norm output is read by something other
than a linear map keeps its width and gets RMSNorms instead (as layernorm-to-rmsnorm would). It is an alternative to layernorm-to-rmsnorm, so not a
default pass: ask for it with --passes layernorm-to-crmsnorm.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normfold import derived
from normfold.constants import constant
from normfold.consumers import NotLinear, linear_edit, linear_reader, weight_tensor, wide_new_bias
from normfold.derived import CrmsReader, DerivedTensor
from normfold.detect import NormSite, find_sites
from normfold.emit import Emitter
from normfold.recentre import NotFoldable, shape_edit
from normfold.report import node_label
from normfold.residual import Stream, find_streams, keeps_width, why_outside
from normfold.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from normfold.rewrite import NormPass, replace_value
from normfold.stream_plan import apply_explicit, plan_streams


class LayerNormToCRMSNorm(NormPass):
    """Replaces LayerNorms reading a recentrable stream with CRMSNorms on a stream of width d - 1."""

    name = "layernorm-to-crmsnorm"
    tolerance_class = "renorm"
    default = False
    handles = ("LayerNorm",)
    needs_shapes = True
    summary = "Pre-LN -> Pre-CRMSNorm: the residual stream stored in d-1 dims, LayerNorm -> CRMSNorm"

    def rewrite(self, model: ir.Model) -> None:
        sites = [s for s in find_sites(model) if s.kind == "LayerNorm"]
        streams = find_streams(model, sites)
        in_streams = {id(site.nodes[0]) for stream in streams for site in stream.readers}
        outside = [(site.nodes[0], why_outside(site)) for site in sites if id(site.nodes[0]) not in in_streams]
        plans, refusals = plan_streams(streams, model, drop_last=True)
        fallbacks = plan_streams(streams, model)  # planned before any stream's edits, as layernorm-to-rmsnorm does
        moved: dict[int, ir.Value] = {}
        for stream in streams:
            try:
                if id(stream) not in plans:
                    raise NotFoldable(refusals[id(stream)])
                plan = plans[id(stream)]
                notes: list[tuple[ir.Node, str]] = []
                edits = plan.edits + _stream_edits(stream, model, plan.touched, notes)
            except NotLinear as exc:
                self._fall_back_to_rmsnorm(stream, model, str(exc), moved, fallbacks)
                continue
            except NotFoldable as exc:
                for site in stream.readers:
                    self.skip(site.nodes[0], str(exc))
                continue
            for edit in edits:
                edit()
            for node, reason in notes:
                self.note(node, reason)
            width = _width(stream)
            apply_explicit(plan, model, self.target, keep=width - 1, moved=moved)
            for site in stream.readers:
                moved[id(site.y)] = _replace_with_crmsnorm(site, width, model, self.target)
                self.applied()
            for value in plan.touched:
                value.shape = None  # its width changed; onnxruntime re-infers it
        for node, reason in outside:
            self.skip(node, reason)


    def _fall_back_to_rmsnorm(self, stream: Stream, model: ir.Model, reason: str, moved: dict, fallbacks) -> None:
        """A stream whose norms are read non-linearly keeps width d, with RMSNorm instead of CRMSNorm.

        `fallbacks` are the width-d plans of every stream, made before any stream was rewritten (an earlier
        stream's rewrite may have replaced this one's writers: `moved` maps them)."""
        plans, refusals = fallbacks
        if id(stream) not in plans:
            for site in stream.readers:
                self.skip(site.nodes[0], f"{reason}; {refusals[id(stream)]}")
            return
        for site in stream.readers:
            self.note(site.nodes[0], f"RMSNorm instead of CRMSNorm, the stream keeps width d: {reason}")
        rms = LayerNormToRMSNorm(target=self.target)
        rms.convert_stream(stream, plans[id(stream)], model, moved)
        self.applied_count += rms.applied_count
        self.skipped += rms.skipped


def _stream_edits(stream: Stream, model: ir.Model, touched: list[ir.Value], notes: list) -> list:
    """The views inside the stream and every reader's edits (the writers are planned by stream_plan);
    `notes` gets (norm node, reason) for each reader that reads its norm restored."""
    width = _width(stream)
    edits = []
    for value in stream.values:
        producer = value.producer()
        if producer is not None and producer.op_type in ("Reshape", "Expand"):
            edits.append(shape_edit(producer, -1, width, model))
    for site in stream.readers:
        reason = site.escaping_intermediate()
        if reason:
            raise NotFoldable(f"{site.name}: {reason}")
        edits += _reader_edits(site, width, model, touched, notes)
    return edits


def _width(stream: Stream) -> int:
    shape = stream.readers[0].x.shape
    width = shape[-1] if shape is not None and len(shape) else None
    if not isinstance(width, int) or width < 2:
        raise NotFoldable(f"the stream's width is unknown or too small ({width})")
    return width


def _reader_edits(site: NormSite, width: int, model: ir.Model, touched: list, notes: list) -> list:
    """Edits folding the norm's affine and the implied last element into every linear reader; a reader
    that would need a new bias wider than the norm (an LM head) reads the norm restored instead."""
    gamma = _vector(site.gamma, model, width, 1.0)
    beta = _vector(site.beta, model, width, 0.0)
    edits = []
    for node, index, views in _readers_through_views(site.y, model):
        for view in views:
            touched.append(view.outputs[0])
            if view.op_type in ("Reshape", "Expand"):
                edits.append(shape_edit(view, -1, width, model))
        reader = linear_reader(node, model)
        weight, axis = reader.weight, reader.weight_axis
        if len(weight.shape) != 2 or weight.shape[axis] != width:
            raise NotLinear(f"{node.op_type} {node_label(node)} does not read the norm's {width} features")
        reason = wide_new_bias([reader], width, model) if np.any(beta) else None
        if reason:
            notes.append((site.nodes[0], f"{reason}; it reads the CRMSNorm output restored to width {width}, "
                                         "with the affine, and keeps its weight"))
            edits.append(lambda node=node, dtype=reader.dtype: _read_restored(node, gamma, beta, dtype, model))
            continue
        _reader_fold(node, weight, gamma, beta, axis, model)  # checks it now: nothing is changed if any reader fails
        edits.append(lambda node=node, axis=axis: _reader_fold(
            node, weight_tensor(node.inputs[1], model), gamma, beta, axis, model)())
    return edits


def _read_restored(node: ir.Node, gamma: np.ndarray, beta: np.ndarray, dtype: np.dtype, model: ir.Model) -> None:
    """Gives `node` the norm's output at full width with its affine, y = [n, -sum n] * gamma + beta (n the
    zero-mean CRMSNorm output in d-1 dims): a few ops over d a token instead of a bias over the reader's
    outputs; its weight stays as it was."""
    n = node.inputs[0]
    emit = Emitter(model, node, "onnx")
    name = f"{node.name or node.op_type}/restored"
    implied = emit.node("Neg", [emit.reduce("ReduceSum", n, f"{name}/sum")], name=f"{name}/implied")
    full = emit.node("Concat", [n, implied], {"axis": -1}, name=f"{name}/full")
    scaled = emit.node("Mul", [full, emit.constant(f"{name}/gamma", gamma.astype(dtype))], name=f"{name}/gamma")
    y = emit.node("Add", [scaled, emit.constant(f"{name}/beta", beta.astype(dtype))], name=f"{name}/beta")
    node.replace_input_with(0, y)


def _reader_fold(node: ir.Node, weight: ir.TensorProtocol, gamma: np.ndarray, beta: np.ndarray, axis: int,
                 model: ir.Model):
    """The edit folding (gamma, beta) and the implied last element into a linear reader with `weight`.

    Applied after the writers' edits and derived from the weight then in place: a linear that both reads
    a norm and writes the stream (its only projection) gets both edits, rows and columns. The new weight
    is a DerivedTensor (computed when saved); max|W| and beta W come from one read of W, and
    |A_i - A_d| <= 2 max|gamma| max|W| bounds the result for the overflow check."""
    new_weight = DerivedTensor(weight, CrmsReader(axis, gamma))
    largest, delta = derived.scan_linear(weight, beta if np.any(beta) else None, axis=axis, largest=True)
    if not derived.stays_finite(new_weight, 2 * largest * float(np.abs(gamma).max(initial=0.0))):
        raise NotLinear(f"the folded weight overflows {weight.dtype.numpy().name}")
    return linear_edit(node, new_weight, delta, model)


def _readers_through_views(value: ir.Value, model: ir.Model, views=(), depth: int = 0):
    """(MatMul/Gemm, input index, views on the way) for every reader of `value`; NotLinear otherwise."""
    if value.is_graph_output():
        raise NotLinear(f"the norm output {value.name!r} is a graph output")
    for node, index in value.uses():
        if node.op_type in ("MatMul", "Gemm") and index == 0 and node.domain in ("", "ai.onnx"):
            yield node, index, list(views)
        elif depth < 8 and keeps_width(node, index, model):
            yield from _readers_through_views(node.outputs[0], model, (*views, node), depth + 1)
        else:
            raise NotLinear(f"the norm output is read by {node.op_type} {node_label(node)}, not a linear map")


def _vector(value: ir.Value | None, model: ir.Model, width: int, default: float) -> np.ndarray:
    if value is None:
        return np.full(width, default)
    array = constant(value, model).array
    if array is None:
        raise NotLinear(f"the norm's affine {value.name!r} is not constant")
    return np.broadcast_to(np.asarray(array, dtype=np.float64).reshape(-1), (width,)).copy()


def _replace_with_crmsnorm(site: NormSite, width: int, model: ir.Model, target: str) -> ir.Value:
    site.refresh_input()
    dtype = site.x.dtype or (site.gamma.dtype if site.gamma is not None else ir.DataType.FLOAT)
    y = Emitter(model, site.nodes[-1], target).crmsnorm(site.x, epsilon=site.epsilon, width=width, dtype=dtype,
                                                        name=site.name)
    y.type = site.y.type
    replace_value(site.y, y)
    graph = site.nodes[0].graph
    for node in reversed(site.nodes):
        graph.remove(node, safe=True)
    return y
