"""Recentring an FX value along its width axis: v' = v - mean_width(v) 1, folded into what computes it
(the ONNX side's normfold.recentre, on nodes). All arithmetic is normfold.foldmath's, in float64.

Folding rules, from the value back to its producers:
  parameter (get_attr)      subtract its mean along the width axis (broadcast to the width first)
  linear / Conv1D / addmm   the weight along its output axis, and the bias
  embedding                 every row of the table (a tied table is untied: the lookup gets a copy)
  conv (groups 1, axis 1)   W'[o] = W[o] - mean_o W[o], b' = b - mean(b)
  add / sub / neg, mul by a scalar, dropout, casts: each data operand (a Python scalar added becomes 0)
  transpose, permute, view, reshape, flatten, (un)squeeze, expand, cat, slice, select: follow the axis
Every intermediate must have a single reader besides shape-only ones. `plan` only checks and records
edits; nothing changes until they are applied, so a refusal leaves the graph untouched.

With `drop_last` (CRMSNorm's d-1 storage) weights and parameters also lose their last element along
the width axis, and view/reshape/expand sizes saying d on the way say d-1. With `trainable` the
recentring stays in the forward pass (a normfold.fx.modules.Recentre parametrization), so training
keeps the stream zero-mean; a tied table then stays tied and is refused here (the caller centres
the lookup explicitly).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import fx

from normfold import foldmath
from normfold.fx import ops
from normfold.fx.graph import fetch_attr, unique_attr_name
from normfold.fx.modules import Recentre

Edit = Callable[[], None]
MAX_DEPTH = 32
_SIZES = {"view", "reshape", "_unsafe_view", "expand"}


class NotFoldable(Exception):
    """The value cannot be recentred by changing parameters; the message says why."""


def plan(gm: fx.GraphModule, node: fx.Node, width: int, *, drop_last: bool = False, trainable: bool = False,
         consumer: fx.Node | None = None) -> list[Edit]:
    """Edits that recentre `node` along its last axis, for all its readers (a parameter: for
    `consumer` only, when given)."""
    dims = ops.shape(node)
    if dims is None:
        raise NotFoldable(f"the shape of {node.name!r} is unknown")
    planner = _Planner(gm, width, drop_last, trainable)
    if node.op == "get_attr":
        return [planner.parameter(node, len(dims) - 1, consumer=consumer)]
    return planner.plan(node, len(dims) - 1, top=True, depth=0)


def scalar_edit(node: fx.Node, index: int) -> Edit:
    """A Python number added to the stream is a uniform shift: recentred, it is 0."""
    return lambda: node.update_arg(index, 0)


def _renorms_rows(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An nn.Embedding with max_norm rescales the rows it looks up: recentring them would change that."""
    return getattr(gm.get_submodule(node.target), "max_norm", None) is not None


def active_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A dropout that can drop something in training: p > 0 (and, for a call, its train flag set)."""
    if node.op == "call_module":
        return gm.get_submodule(node.target).p > 0
    p = ops.arg(node, 1, "p", 0.5)
    train = ops.arg(node, 2, "train", None)
    train = ops.arg(node, 2, "training", True) if train is None else train
    return (not isinstance(p, (int, float)) or p > 0) and train is not False


class _Planner:
    """Walks from a value to the parameters that determine it, recording the edits."""

    def __init__(self, gm: fx.GraphModule, width: int, drop_last: bool, trainable: bool) -> None:
        self.gm, self.width, self.drop_last, self.trainable = gm, width, drop_last, trainable

    def plan(self, node, axis: int, *, top: bool, depth: int) -> list[Edit]:
        if depth > MAX_DEPTH:
            raise NotFoldable(f"{node.name!r} is too far from any parameter")
        if not isinstance(node, fx.Node):
            raise NotFoldable(f"a constant {node!r} is broadcast along the width")
        if node.op == "placeholder":
            raise NotFoldable(f"{node.name!r} is a module input")
        if node.op == "get_attr":
            return [self.parameter(node, axis)]
        if not top and len(ops.readers(node)) > 1:
            raise NotFoldable(f"{node.name!r} is also read elsewhere")
        k = ops.kind(self.gm, node)
        rank = len(ops.shape(node) or ())
        linear = ops.as_linear(self.gm, node)
        if linear is not None and axis == rank - 1:
            edits = [self._weight(linear.weight, linear.out_axis, f"{node.name} weight")]
            if linear.bias is not None:
                edits.append(self._weight(linear.bias, 0, f"{node.name} bias"))
            return edits
        if k == "embedding" and axis == rank - 1:
            if node.op == "call_module" and _renorms_rows(self.gm, node):
                raise NotFoldable(f"{node.name!r} renormalizes its rows (max_norm)")
            index = 1 if ops.call_arg_names(node)[:2] == ("input", "weight") else 0
            ref = ops.ParamRef(node, attr="weight") if node.op == "call_module" else ops.get_attr_ref(node, index)
            if ref is None:
                raise NotFoldable(f"the table of {node.name!r} is not a parameter")
            return [self._weight(ref, 1, f"{node.name} table")]
        if k in ("conv", "conv1d", "conv2d", "conv3d") and axis == 1:
            return self._conv(node)
        return self._through(node, k, axis, rank, depth)

    def _through(self, node, k, axis, rank, depth) -> list[Edit]:
        src = ops.data_input(node)
        if self.trainable and k in ("dropout", "feature_dropout") and active_dropout(self.gm, node):
            raise NotFoldable(f"{node.name!r} is a dropout: in training it gives the recentred branch a mean again")
        if k in ops.PASS_THROUGH or k == "neg":
            return self._operand(src, axis, depth)
        if k in ("add", "sub") and len(node.args) >= 2 and ops.arg(node, 2, "alpha", 1) == 1:
            return [e for i in (0, 1) for e in self._broadcast_operand(node, i, axis, rank, depth)]
        if k in ("mul", "div") and len(node.args) == 2:
            a, b = node.args
            if isinstance(b, (int, float)):  # x * c, x / c
                return self._operand(a, axis, depth)
            if k == "mul" and isinstance(a, (int, float)):  # c * x
                return self._operand(b, axis, depth)
            raise NotFoldable(f"{node.name!r} is a product or quotient of computed values")
        if k == "transpose":
            dims = [ops.arg(node, i, f"dim{i - 1}") % rank for i in (1, 2)]
            source = dims[1] if axis == dims[0] else dims[0] if axis == dims[1] else axis
            return self._operand(src, source, depth)
        if k == "permute":
            perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            return self._operand(src, perm[axis] % rank, depth)
        if k in ("slice", "select"):
            dim = ops.arg(node, 1, "dim", 0) % len(ops.shape(src))
            if dim == axis and k == "slice":
                raise NotFoldable(f"{node.name!r} slices the width axis")
            return self._operand(src, axis + (k == "select" and dim <= axis), depth)
        if k == "cat":
            if ops.arg(node, 1, "dim", 0) % rank == axis:
                raise NotFoldable(f"{node.name!r} concatenates along the width axis")
            return [e for v in node.args[0] for e in self._operand(v, axis, depth)]
        if k in _SIZES | {"flatten", "unsqueeze", "squeeze"}:
            edits = self._operand(src, self._axis_before(node, src, axis), depth)
            if self.drop_last and k in _SIZES:
                edits.append(self._size_edit(node, axis, rank))
            return edits
        if ops.as_norm(self.gm, node) is not None:
            raise NotFoldable(f"{node.name!r} is the output of a norm, whose gamma and beta give it a mean")
        raise NotFoldable(f"{node.name!r} is computed by {k}, which normfold cannot recentre by folding")

    def _operand(self, node, axis: int, depth: int) -> list[Edit]:
        return self.plan(node, axis, top=False, depth=depth + 1)

    def _broadcast_operand(self, node, index, axis, rank, depth) -> list[Edit]:
        operand = node.args[index]
        if isinstance(operand, (int, float)):
            return [scalar_edit(node, index)]
        dims = ops.shape(operand)
        if dims is None:
            raise NotFoldable(f"the shape of {operand.name!r} is unknown")
        shifted = axis - (rank - len(dims))
        if shifted < 0 or (dims[shifted] == 1 and self.width > 1):
            if operand.op == "get_attr" and not self.drop_last:
                return [self.parameter(operand, max(shifted, 0), consumer=node)]
            raise NotFoldable(f"{operand.name!r} is added uniformly along the width and is not a parameter")
        return self._operand(operand, shifted, depth)

    def _axis_before(self, node, src, axis) -> int:
        """The input axis that becomes output `axis` (same size, same number of elements before it)."""
        before_dims, out = ops.shape(src), ops.shape(node)
        if before_dims is None or out is None:
            raise NotFoldable(f"the shapes around {node.name!r} are not static")
        if ops.kind(self.gm, node) == "expand":
            shifted = axis - (len(out) - len(before_dims))
            if shifted < 0 or before_dims[shifted] != out[axis]:
                raise NotFoldable(f"{node.name!r} broadcasts along the width axis")
            return shifted
        before = int(np.prod(out[:axis], dtype=np.int64))
        for candidate in range(len(before_dims)):
            if before_dims[candidate] == out[axis] and int(np.prod(before_dims[:candidate], dtype=np.int64)) == before:
                return candidate
        raise NotFoldable(f"{node.name!r} splits or merges the width axis")

    def _size_edit(self, node, axis: int, rank: int) -> Edit:
        """view/reshape/expand sizes: the entry of the width axis says d - 1 (-1, inferred, stays)."""
        sizes = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        entry = sizes[axis] if len(sizes) == rank else None
        if entry == -1:
            return lambda: None
        if entry != self.width:
            raise NotFoldable(f"{node.name!r} gives the width axis size {entry!r}, not {self.width}")
        new = list(sizes)
        new[axis] = self.width - 1

        def apply() -> None:
            if isinstance(node.args[1], (list, tuple)):
                node.update_arg(1, new)
            else:
                node.args = (node.args[0], *new)

        return apply

    def _conv(self, node) -> list[Edit]:
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if module.groups != 1:
                raise NotFoldable(f"{node.name!r} is a grouped convolution")
            refs = [ops.ParamRef(node, attr="weight")]
            refs += [ops.ParamRef(node, attr="bias")] if module.bias is not None else []
        else:
            if ops.arg(node, 6, "groups", 1) != 1:
                raise NotFoldable(f"{node.name!r} is a grouped convolution")
            refs = [ops.get_attr_ref(node, 1)]
            refs += [ops.get_attr_ref(node, 2)] if ops.arg(node, 2, "bias") is not None else []
            if any(r is None for r in refs):
                raise NotFoldable(f"the parameters of {node.name!r} are not constant")
        return [self._weight(r, 0, f"{node.name} {'weight' if i == 0 else 'bias'}") for i, r in enumerate(refs)]

    def _weight(self, ref: ops.ParamRef, axis: int, what: str) -> Edit:
        """Gives ref's node a recentred copy of the parameter (along `axis`)."""
        value = ref.get(self.gm)
        if value is None:
            raise NotFoldable(f"the {what} is not a parameter")
        if self.trainable and ops.is_shared(self.gm, ref):
            raise NotFoldable(f"the {what} is tied to another layer (kept tied for training)")
        original = ref.array(self.gm)
        if self.trainable:
            return lambda: ref.set(self.gm, original, suffix="recentred", parametrization=Recentre(axis))
        new = self._drop(foldmath.recentre(original, axis=axis), axis)
        return lambda: ref.set(self.gm, new, suffix="recentred")

    def parameter(self, node: fx.Node, axis: int, consumer: fx.Node | None = None) -> Edit:
        """Replaces a get_attr parameter (for `consumer`, or all its readers) by its recentred copy."""
        value = fetch_attr(self.gm, node.target)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise NotFoldable(f"{node.name!r} is not a floating-point parameter")
        array = value.detach().to(torch.float64).cpu().numpy()
        trainable = self.trainable and array.shape[axis] == self.width
        new = array if trainable else self._drop(foldmath.recentre(array, axis=axis, width=self.width), axis)
        gm = self.gm

        def apply() -> None:
            users = [consumer] if consumer is not None else list(node.users)
            target = unique_attr_name(gm, f"{node.target}_recentred")
            prefix, _, name = target.rpartition(".")
            owner = gm.get_submodule(prefix) if prefix else gm
            owner.register_parameter(name, torch.nn.Parameter(
                torch.as_tensor(new).to(value.dtype), requires_grad=isinstance(value, torch.nn.Parameter)))
            with gm.graph.inserting_after(node):
                fresh = gm.graph.get_attr(target)
            if trainable:
                torch.nn.utils.parametrize.register_parametrization(owner, name, Recentre(axis))
            for user in users:
                user.replace_input_with(node, fresh)
            ops.prune(gm, node)

        return apply

    def _drop(self, array: np.ndarray, axis: int) -> np.ndarray:
        """Without its last element along `axis`, when the stream is stored in d-1 dimensions."""
        return np.take(array, np.arange(self.width - 1), axis=axis) if self.drop_last else array
