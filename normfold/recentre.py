"""Recentring a value along its width axis: v' = v - mean_width(v) 1, folded into whatever computes it.

Folding rules, applied from the value back to its producers:
  constant              subtract its mean along the width axis (broadcast to the width first)
  x @ W   (MatMul)      W' = W - mean over W's output columns       (each row of W recentred)
  Gemm                  the output columns of op(B) likewise, and C
  Conv (width = C_out)  W'[o] = W[o] - mean_o W[o],  b' = b - mean(b)
  Gather(E, ids)        every row of the table E recentred; a table another node also reads (a tied
                        LM head) stays as it is and the gathered row means are subtracted instead
  Add / Sub / Neg, Mul by a scalar constant, Identity, Dropout, Cast: recentre each data operand
  Transpose, Reshape, Concat, Expand, Unsqueeze, Squeeze: follow the width axis to the operand
Every intermediate on the way must have a single reader besides Shape nodes (another reader would see
the change; a Shape reader sees no values, and under CRMSNorm's d-1 storage reads the new width);
weights are replaced by new initializers, so a tied or shared weight is untied, never changed under
its other users. `plan` only checks and records edits; nothing changes until they are applied, so a
refusal leaves the model untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from normfold import foldmath
from normfold.constants import constant, is_constant
from normfold.derived import DerivedTensor, Recentre
from normfold.rewrite import add_initializer, unique_node_name
from normfold.shapes import rank

Edit = Callable[[], None]
_PASS_THROUGH = {"Identity", "Dropout", "Cast", "Neg"}
MAX_DEPTH = 32


class NotFoldable(Exception):
    """The value cannot be recentred by changing constants; the message says why."""


def plan(value: ir.Value, model: ir.Model, use: tuple[ir.Node, int] | None = None, *,
         drop_last: bool = False, touched: list[ir.Value] | None = None, width: int | None = None) -> list[Edit]:
    """Edits that recentre `value` along its last axis, for every reader (use=None) or one (node, index).

    With `drop_last`, the recentred value is also stored without its last element (CRMSNorm's d-1
    dimensions): weights and constants lose their last output channel, and the shape constants of
    Reshape/Expand nodes on the way say d-1. Every value whose width changes is appended to `touched`.
    """
    value_rank = rank(value, model)
    if value.shape is not None and value_rank and isinstance(value.shape[-1], int):
        width = value.shape[-1]
    if not isinstance(width, int):
        raise NotFoldable(f"the width (last dim) of {value.name!r} is unknown")
    planner = _Planner(model, width, drop_last)
    if value_rank is None:
        edits = planner.through_computed_reshape(value)
    else:
        edits = planner.plan(value, value_rank - 1, value_rank, use, top=True, depth=0)
    if touched is not None:
        touched.extend(planner.touched)
    return edits


def shape_edit(node: ir.Node, axis: int, width: int, model: ir.Model) -> Edit:
    """An edit making the Reshape/Expand shape constant of `node` say width - 1 at output `axis`
    (negative: counted from the end, for outputs of unknown rank).

    An entry of -1 (inferred) or, for Reshape, 0 (copied from the input) needs no change."""
    target = constant(node.inputs[1], model).array
    if target is None:
        if axis < 0 and node.op_type == "Reshape" and _last_target_entry(node, model) == width:
            return _computed_shape_edit(node, width, model)
        raise NotFoldable(f"the shape of {node.op_type} {node.outputs[0].name!r} is computed, not constant")
    if axis < 0:
        position = target.size + axis
    else:
        out_shape = node.outputs[0].shape
        position = axis - (len(out_shape) - target.size) if out_shape is not None else axis
    if not 0 <= position < target.size:
        raise NotFoldable(f"{node.op_type} {node.outputs[0].name!r} broadcasts the width axis")
    entry = int(target.reshape(-1)[position])
    if (node.op_type == "Reshape" and entry in (-1, 0)) or (node.op_type == "Expand" and entry == 1):
        return lambda: None  # inferred, copied or broadcast from the input: follows it to d-1
    if entry != width:
        raise NotFoldable(f"{node.op_type} {node.outputs[0].name!r} gives the width axis {entry}, not {width}")
    new = target.reshape(-1).copy()
    new[position] = width - 1

    def apply() -> None:
        node.replace_input_with(1, add_initializer(node.graph, f"{node.inputs[1].name}_crms", new, model))

    return apply


class _Planner:
    """Walks from a value to the constants that determine it, recording the edits."""

    def __init__(self, model: ir.Model, width: int, drop_last: bool = False) -> None:
        self.model = model
        self.width = width
        self.drop_last = drop_last
        self.touched: list[ir.Value] = []

    def plan(self, value, axis, value_rank, use, *, top, depth) -> list[Edit]:
        if depth > MAX_DEPTH:
            raise NotFoldable(f"{value.name!r} is too far from any constant")
        if is_constant(value, self.model):
            return [self._constant(value, axis, value_rank, use)]
        node = value.producer()
        if node is None:
            raise NotFoldable(f"{value.name!r} is a graph input")
        self.touched.append(value)
        if not top and sum(1 for user, _ in value.uses() if user.op_type != "Shape") > 1:
            raise NotFoldable(f"{value.name!r} is also read elsewhere")
        if node.domain not in ("", "ai.onnx"):
            raise NotFoldable(f"{value.name!r} is computed by {node.domain}.{node.op_type}")
        if self._tied_gather(node, axis, value_rank):
            return [self._row_mean_edit(node, value, use)]
        return self._through(node, value, axis, value_rank, depth)

    def _tied_gather(self, node: ir.Node, axis: int, value_rank: int) -> bool:
        """An embedding lookup whose table another node also reads (a tied LM head)."""
        if self.drop_last or node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
            return False
        table = node.inputs[0]
        return axis == value_rank - 1 and any(user is not node for user, _ in table.uses())

    def _row_mean_edit(self, node: ir.Node, value: ir.Value, use) -> Edit:
        """Keeps a tied table as it is (no second copy of it) and subtracts the gathered row means:
        E[ids] - mean(E, axis=-1)[ids], which is exactly the lookup in the recentred table."""
        table = constant(node.inputs[0], self.model).array
        if table is None:
            raise NotFoldable(f"the embedding table {node.inputs[0].name!r} is not constant")
        means = np.asarray(table, dtype=np.float64).mean(axis=-1, keepdims=True).astype(table.dtype)
        model = self.model

        def apply() -> None:
            uses = [use] if use is not None else list(value.uses())
            row_means = add_initializer(node.graph, f"{node.inputs[0].name}_row_mean", means, model)
            gathered = ir.node("Gather", [row_means, node.inputs[1]], {"axis": 0},
                               name=unique_node_name(node.graph, f"{node.name}_row_mean"))
            centred = ir.node("Sub", [value, gathered.outputs[0]],
                              name=unique_node_name(node.graph, f"{node.name}_recentre"))
            centred.outputs[0].shape, centred.outputs[0].type = value.shape, value.type
            node.graph.insert_after(node, [gathered, centred])
            for user, index in uses:
                user.replace_input_with(index, centred.outputs[0])

        return apply

    def through_computed_reshape(self, value: ir.Value, depth: int = 0) -> list[Edit]:
        """A value without static shape made by Reshape(x, Concat(..., [width])) (exporters' dynamic-shape
        spelling of x.view(*x.shape[:-1], d)): its last axis is x's last axis."""
        node = value.producer()
        if node is None or node.op_type != "Reshape" or not self._keeps_last(node):
            raise NotFoldable(f"the rank of {value.name!r} is unknown")
        self.touched.append(value)
        edits = self._operand(node, 0, rank(node.inputs[0], self.model) - 1, depth)
        if self.drop_last:
            edits.append(_computed_shape_edit(node, self.width, self.model))
        return edits

    def _keeps_last(self, node: ir.Node) -> bool:
        source_rank = rank(node.inputs[0], self.model)
        source_width = node.inputs[0].shape[-1] if node.inputs[0].shape is not None and source_rank else None
        if source_rank is None or source_width != self.width:
            return False
        return _last_target_entry(node, self.model) == self.width

    def _operand(self, node, index, axis, depth) -> list[Edit]:
        """Plans operand `index` of `node` whose axis `axis` (counted in the operand) is the width."""
        v = node.inputs[index]
        r = rank(v, self.model)
        if r is None:
            raise NotFoldable(f"the rank of {v.name!r} is unknown")
        return self.plan(v, axis, r, (node, index), top=False, depth=depth + 1)

    def _through(self, node, value, axis, value_rank, depth) -> list[Edit]:
        op = node.op_type
        if op in _PASS_THROUGH:
            return self._operand(node, 0, axis, depth)
        if op in ("Add", "Sub"):
            return [e for i in (0, 1) for e in self._broadcast_operand(node, i, axis, value_rank, depth)]
        if op == "Mul":
            for i in (0, 1):
                c = constant(node.inputs[1 - i], self.model).array
                if c is not None and c.size == 1:
                    return self._operand(node, i, axis, depth)
            raise NotFoldable(f"{value.name!r} is a product of two computed values")
        if op == "MatMul" and axis == value_rank - 1:
            return [self._weight(node, 1, axis=-1)]
        if op == "Gemm" and axis == 1:
            edits = [self._weight(node, 1, axis=0 if node.attributes.get_int("transB", 0) else 1)]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                edits.append(self._weight(node, 2, axis=-1))
            return edits
        if op == "Conv" and axis == 1:
            edits = [self._weight(node, 1, axis=0)]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                edits.append(self._weight(node, 2, axis=0))
            return edits
        if op == "Gather" and node.attributes.get_int("axis", 0) == 0 and axis == value_rank - 1:
            return [self._weight(node, 0, axis=-1)]
        if op == "Transpose":
            perm = node.attributes.get_ints("perm", None) or list(reversed(range(value_rank)))
            return self._operand(node, 0, perm[axis], depth)
        if op == "Concat":
            if node.attributes.get_int("axis", 0) % value_rank == axis:
                raise NotFoldable(f"{value.name!r} concatenates along the width axis")
            return [e for i in range(len(node.inputs)) for e in self._operand(node, i, axis, depth)]
        if op == "Reshape" and axis == value_rank - 1 and not _static(node) and self._keeps_last(node):
            return self.through_computed_reshape(value, depth)
        if op in ("Reshape", "Expand", "Unsqueeze", "Squeeze", "Flatten"):
            edits = self._operand(node, 0, _axis_before(node, axis, value_rank), depth)
            if self.drop_last and op in ("Reshape", "Expand"):
                edits.append(shape_edit(node, axis, self.width, self.model))
            return edits
        raise NotFoldable(f"{value.name!r} is computed by {op}, which normfold cannot recentre by folding")

    def _broadcast_operand(self, node, index, axis, value_rank, depth) -> list[Edit]:
        """An Add/Sub operand; one of lower rank lacking the width axis must be a constant (becomes 0)."""
        v = node.inputs[index]
        r = rank(v, self.model)
        if r is None:
            raise NotFoldable(f"the rank of {v.name!r} is unknown")
        shifted = axis - (value_rank - r)
        if shifted >= 0:
            return self._operand(node, index, shifted, depth)
        array = constant(v, self.model).array
        if array is None:
            raise NotFoldable(f"{v.name!r} is added uniformly along the width and is not constant")
        return [self._constant(v, axis, value_rank, (node, index))]

    def _weight(self, node: ir.Node, index: int, *, axis: int) -> Edit:
        """An edit giving `node` a new initializer: its input `index` recentred along `axis`.

        The new weight is a DerivedTensor of the old: computed one block at a time when the model is
        saved, so a stream's writers are never in memory at once."""
        if not is_constant(node.inputs[index], self.model):
            raise NotFoldable(f"{node.op_type} input {node.inputs[index].name!r} is not constant")
        source, model = node.inputs[index], self.model

        def apply() -> None:
            new = self._recentred(source, axis)
            node.replace_input_with(index, add_initializer(node.graph, f"{source.name}_recentred", new, model))

        return apply

    def _recentred(self, value: ir.Value, axis: int, value_rank: int | None = None) -> np.ndarray | DerivedTensor:
        """The constant `value` (seen with rank `value_rank`: leading 1s added) recentred along `axis` in
        its dtype: a DerivedTensor when its width axis is full, else widened to the stream's width now."""
        tensor = value.const_value if value.is_initializer() else None
        if tensor is None or (value_rank is not None and len(tensor.shape) != value_rank):
            array = constant(value, self.model).array
            target_rank = array.ndim if value_rank is None else value_rank
            tensor = ir.tensor(array.reshape((1,) * (target_rank - array.ndim) + array.shape))
        if tensor.shape[axis] == self.width:
            return DerivedTensor(tensor, Recentre(axis, self.width - 1 if self.drop_last else None))
        array = tensor.numpy()
        return self._drop(foldmath.recentre(array, axis=axis, width=self.width), axis).astype(array.dtype)

    def _constant(self, value, axis, value_rank, use) -> Edit:
        """An edit replacing a constant by its recentred copy, for one use or for all of them (computed
        when applied, as `_weight`)."""
        uses = [use] if use is not None else list(value.uses())
        model = self.model

        def apply() -> None:
            new = self._recentred(value, axis, value_rank)
            replacement = add_initializer(uses[0][0].graph, f"{value.name}_recentred", new, model)
            for node, index in uses:
                node.replace_input_with(index, replacement)

        return apply

    def _drop(self, array: np.ndarray, axis: int) -> np.ndarray:
        """Without its last element along `axis`, when storing the stream in d-1 dimensions."""
        return np.take(array, np.arange(self.width - 1), axis=axis) if self.drop_last else array


def _last_target_entry(node: ir.Node, model: ir.Model) -> int | None:
    """The last entry of a Reshape target that is constant, or built by Concat ending in a constant."""
    target = node.inputs[1]
    array = constant(target, model).array
    if array is not None:
        return int(array.reshape(-1)[-1])
    producer = target.producer()
    if producer is not None and producer.op_type == "Concat":
        tail = constant(producer.inputs[-1], model).array
        if tail is not None and tail.size:
            return int(tail.reshape(-1)[-1])
    return None


def _computed_shape_edit(node: ir.Node, width: int, model: ir.Model) -> Edit:
    """Gives the Reshape its own copy of the Concat that builds its target, with the constant tail
    saying width - 1 (the Concat may be shared with Reshapes that keep width d)."""
    concat = node.inputs[1].producer()
    tail = constant(concat.inputs[-1], model).array.reshape(-1).copy()
    tail[-1] = width - 1

    def apply() -> None:
        new_tail = add_initializer(concat.graph, f"{concat.inputs[-1].name}_crms", tail, model)
        copy = ir.node("Concat", [*concat.inputs[:-1], new_tail], {"axis": concat.attributes.get_int("axis", 0)},
                       name=unique_node_name(node.graph, f"{concat.name or 'concat'}_crms"))
        node.graph.insert_before(node, copy)
        node.replace_input_with(1, copy.outputs[0])

    return apply


def _static(node: ir.Node) -> bool:
    """True when the node's first input and output have fully static shapes."""
    src, out = node.inputs[0].shape, node.outputs[0].shape
    return src is not None and out is not None and all(isinstance(d, int) for d in list(src) + list(out))


def _axis_before(node: ir.Node, axis: int, value_rank: int) -> int:
    """The input axis that becomes output `axis` (same size, same number of elements before it)."""
    src, out = node.inputs[0].shape, node.outputs[0].shape
    if node.op_type == "Expand" and src is not None:
        shifted = axis - (value_rank - len(src))
        if shifted < 0 or src[shifted] == 1:
            raise NotFoldable(f"{node.outputs[0].name!r} broadcasts along the width axis")
        return shifted
    if not _static(node):
        raise NotFoldable(f"the shapes around {node.op_type} {node.outputs[0].name!r} are not static")
    before = int(np.prod(list(out)[:axis], dtype=np.int64))
    for candidate in range(len(src)):
        if src[candidate] == out[axis] and int(np.prod(list(src)[:candidate], dtype=np.int64)) == before:
            return candidate
    raise NotFoldable(f"{node.op_type} {node.outputs[0].name!r} splits or merges the width axis")
