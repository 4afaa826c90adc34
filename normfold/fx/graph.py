"""Small FX graph helpers shared by the FX passes: attributes, names, shapes, op counts, labels."""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch.fx.passes.shape_prop import ShapeProp

BATCHNORM_OPS = ("aten.batch_norm", "aten._native_batch_norm_legit_no_training")


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    """The object at dotted path `target` (a submodule, parameter or buffer)."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def unique_attr_name(gm: torch.nn.Module, base: str) -> str:
    """`base` made unique among gm's attributes and submodules, dots kept (base, base_1, ...)."""
    candidate, i = base, 0
    while _exists(gm, candidate):
        i += 1
        candidate = f"{base}_{i}"
    return candidate


def _exists(gm: torch.nn.Module, target: str) -> bool:
    try:
        fetch_attr(gm, target)
    except AttributeError:
        return False
    return True


def set_parameter(gm: torch.fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Registers `value` as a new Parameter at dotted path `target` (its owner submodule must exist),
    replacing what was there; a replaced Parameter's requires_grad is kept (trainable if new)."""
    owner, _, name = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    old = getattr(module, name, None)
    trainable = old.requires_grad if isinstance(old, torch.nn.Parameter) else value.is_floating_point()
    if hasattr(module, name) and name not in module._parameters:
        delattr(module, name)  # a buffer or plain tensor attribute becomes a parameter
    module.register_parameter(name, torch.nn.Parameter(value, requires_grad=trainable))


def remove_attr_if_unused(gm: torch.fx.GraphModule, target: str) -> None:
    """Deletes the parameter/buffer/submodule at `target` when no node reads it any more."""
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and (node.target == target or node.target.startswith(target + ".")):
            return
    owner, _, name = target.rpartition(".")
    delattr(gm.get_submodule(owner) if owner else gm, name)


def op_name(gm: torch.nn.Module, node: torch.fx.Node) -> str | None:
    """What ops_before/ops_after count a node as: module class name, aten op ("aten.conv2d"),
    function or method name; None for placeholders, outputs, get_attr and torch.export's guard."""
    if node.op == "call_module":
        if node.target == "_guards_fn":
            return None
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return str(node.target.overloadpacket)
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return None


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Op name (see op_name) -> number of nodes."""
    counts = collections.Counter(name for node in gm.graph.nodes if (name := op_name(gm, node)))
    return dict(sorted(counts.items()))


def node_label(node: torch.fx.Node) -> str:
    """A name a user finds the node by: the module path it calls or came from, with the module class
    or the node name in parentheses."""
    if node.op == "call_module":
        owner = node.graph.owning_module
        kind = type(owner.get_submodule(node.target)).__name__ if owner is not None else None
        return f"{node.target} ({kind})" if kind else str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return f"{path} ({node.name})" if path else node.name
    return node.name


def tensor_shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> dict[torch.fx.Node, tuple[int, ...]]:
    """Node -> output shape, from torch.export's recorded values or by running ShapeProp on the inputs.

    Nodes whose output is not a single tensor are left out; an empty dict if propagation fails.
    Buffers a forward pass updates (training-mode BatchNorm statistics) are restored afterwards.
    """
    shapes = {n: tuple(v.shape) for n in gm.graph.nodes if isinstance(v := n.meta.get("val"), torch.Tensor)}
    if shapes:
        return shapes
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception:  # noqa: BLE001 - unknown shapes make the passes refuse, with that reason
        return {}
    finally:  # a training-mode BatchNorm updated its running statistics: put them back
        with torch.no_grad():
            for name, b in gm.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return {n: tuple(m.shape) for n in gm.graph.nodes if hasattr(m := n.meta.get("tensor_meta"), "shape")}


def bound_args(node: torch.fx.Node) -> dict[str, Any]:
    """An aten call's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    values = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def set_arg(node: torch.fx.Node, name: str, value: Any) -> None:
    """Sets an aten call's argument `name`, positional or keyword, filling skipped defaults."""
    if name in node.kwargs:
        node.update_kwarg(name, value)
        return
    names = [a.name for a in node.target._schema.arguments]
    index = names.index(name)
    if index < len(node.args):
        node.update_arg(index, value)
        return
    defaults, kwargs = bound_args(node), dict(node.kwargs)
    skipped = [kwargs.pop(n) if n in kwargs else defaults.get(n) for n in names[len(node.args):index]]
    node.args = (*node.args, *skipped, value)
    node.kwargs = kwargs
