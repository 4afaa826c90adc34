"""The base class of normfold's passes and the small graph edits they share.

A pass follows onnx-ir's `InPlacePass` contract (`PassResult(model, modified)`) and, in addition,
records what it applied and every candidate it skipped with the reason, for the report.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from normfold import io
from normfold.constants import LEGACY_INPUT_INITIALIZERS_IR
from normfold.report import Skip, node_label


class NormPass(ir.passes.InPlacePass):
    """Base of every normfold pass: subclasses implement `rewrite` and call `applied`/`skip`."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True
    default: ClassVar[bool] = True
    """Whether `convert` runs it when no passes are named (alternatives to a default pass are not)."""
    tolerance_class: ClassVar[str] = "fold"
    """Which row of the verification tolerance table this pass's rewrites need (see normfold.verification)."""
    summary: ClassVar[str] = ""
    needs_shapes: ClassVar[bool] = False
    """Whether the pipeline must annotate inferred shapes before this pass runs (stripped afterwards)."""
    handles: ClassVar[tuple[str, ...]] = ()
    """The site kinds (normfold.detect) this pass rewrites, for `normfold inspect`."""

    def __init__(self, *, target: str = "auto") -> None:
        super().__init__()
        self.target = target
        """Which runtime emitted norm ops are chosen for (normfold.emit.TARGETS)."""
        self.applied_count = 0
        self.skipped: list[Skip] = []
        self.notes: list[Skip] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.applied_count = 0
        self.skipped = []
        self.notes = []
        self.rewrite(model)
        return ir.passes.PassResult(model, modified=self.applied_count > 0)

    def rewrite(self, model: ir.Model) -> None:
        """Applies the rewrite everywhere it is safe; subclasses implement it."""
        raise NotImplementedError

    def applied(self) -> None:
        self.applied_count += 1

    def skip(self, node: ir.Node, reason: str) -> None:
        self.skipped.append(Skip(node_label(node), reason))

    def note(self, node: ir.Node, reason: str) -> None:
        """Records how a candidate was rewritten when it was not the pass's first choice."""
        self.notes.append(Skip(node_label(node), reason))


def add_initializer(graph: ir.Graph, base_name: str, data: np.ndarray | ir.TensorProtocol,
                    model: ir.Model) -> ir.Value:
    """Adds a new initializer named after `base_name` (made unique) holding `data`: an array, or a tensor
    such as a normfold.derived.DerivedTensor (computed when saved, one block at a time).

    A big array of a model with external data goes straight to disk (normfold.io.new_tensor), so a
    pass that rewrites every weight of a large model never holds more than the one it is computing.
    Below IR 4 the main graph's initializers must also be listed as graph inputs, so it is.
    """
    name = unique_name(graph, base_name)
    if isinstance(data, ir.TensorProtocol):
        tensor = data
        tensor.name = name
    else:
        tensor = io.new_tensor(model, data, name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    if model.ir_version < LEGACY_INPUT_INITIALIZERS_IR and graph is model.graph:
        graph.inputs.append(value)
    return value


def set_input(node: ir.Node, index: int, array: np.ndarray | ir.TensorProtocol, model: ir.Model, role: str,
              suffix: str) -> None:
    """Gives `node` a new initializer holding `array` (an array or a tensor) as input `index` (appended if
    missing), named after the input it replaces (or the node and `role`) plus `suffix`; the old value is
    left to its other users."""
    old = node.inputs[index] if index < len(node.inputs) else None
    base = old.name if old is not None and old.name else f"{node.name or node.op_type}_{role}"
    value = add_initializer(node.graph, f"{base}_{suffix}", array, model)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def cast_finite(array: np.ndarray, dtype) -> np.ndarray | None:
    """The float64 result of a fold cast once to the model's dtype, or None if the dtype cannot hold it
    (an fp16 overflow): the caller then refuses the fold."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.asarray(array).astype(dtype)
    return cast if np.all(np.isfinite(cast)) else None


def unique_node_name(graph: ir.Graph, base_name: str) -> str:
    """`base_name`, or `base_name_1`, ... whichever no node of the graph is called yet (onnxruntime
    rejects duplicate node names)."""
    taken = {node.name for node in graph}
    if base_name not in taken:
        return base_name
    return next(f"{base_name}_{i}" for i in itertools.count(1) if f"{base_name}_{i}" not in taken)


def unique_name(graph: ir.Graph, base_name: str) -> str:
    """`base_name`, or `base_name_1`, `base_name_2`, ... whichever no value of the graph uses yet."""
    taken = _value_names(graph)
    if base_name not in taken:
        return base_name
    return next(f"{base_name}_{i}" for i in itertools.count(1) if f"{base_name}_{i}" not in taken)


def _value_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        names.update(v.name for v in node.outputs)
    return names


def only_consumer(value: ir.Value, node: ir.Node) -> bool:
    """True when `node` is the value's only reader and the value is not a graph output."""
    return not value.is_graph_output() and all(user is node for user, _ in value.uses())


def bypass(node: ir.Node, replacement: ir.Value) -> None:
    """Makes every reader of the node's first output read `replacement` instead, then drops the node."""
    replace_value(node.outputs[0], replacement)
    node.graph.remove(node, safe=True)


def replace_value(old: ir.Value, replacement: ir.Value) -> None:
    """Every reader of `old` reads `replacement` instead.

    If `old` is a graph output, `replacement` takes over its name, type and shape so the graph's
    interface is unchanged.
    """
    if old.is_graph_output():
        name = old.name
        ir.convenience.replace_all_uses_with(old, replacement, replace_graph_outputs=True)
        old.name = None
        replacement.name = name
        replacement.type = old.type or replacement.type
        replacement.shape = old.shape or replacement.shape
    else:
        ir.convenience.replace_all_uses_with(old, replacement)


def insert_after_value(value: ir.Value, node: ir.Node) -> None:
    """Inserts `node`, which reads `value`, right after value's producer; every other reader of `value`
    (and the graph output it may be, whose name moves to the node's output) reads the node's output."""
    value.producer().graph.insert_after(value.producer(), node)
    node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
    uses = [(user, index) for user, index in value.uses() if user is not node]
    for user, index in uses:
        user.replace_input_with(index, node.outputs[0])
    if value.is_graph_output():
        graph = value.producer().graph
        name = value.name
        position = next(i for i, out in enumerate(graph.outputs) if out is value)
        value.name = f"{name}_before_{node.op_type.lower()}"
        node.outputs[0].name = name
        node.outputs[0].type = value.type
        node.outputs[0].shape = value.shape
        graph.outputs[position] = node.outputs[0]
