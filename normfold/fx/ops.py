"""What an FX node computes, in both capture forms, for the normalization passes.

A symbolic_trace graph calls modules (nn.LayerNorm, nn.Linear, nn.Embedding, transformers' Conv1D)
and Python functions/methods; a torch.export graph calls aten ops whose parameters are get_attr
nodes. `kind` names both spellings alike ("layer_norm", "linear", "add", "view", ...), and the
matchers below return the pieces a pass needs: the data input, the parameters as `ParamRef`s (which
know how to give one node a new value without changing it under any other user), and the axes.

Weight layouts: nn.Linear / aten.linear (out, in); Conv1D and aten.addmm (in, out); embedding
tables (rows, d); convolutions (C_out, C_in/G, k...).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from normfold.fx.graph import bound_args, fetch_attr, remove_attr_if_unused, unique_attr_name

SHAPE_ONLY = {"_assert_tensor_metadata", "sym_size", "size", "dim", "numel", "sym_numel", "_assert_scalar"}
"""Readers that see a tensor's metadata, never its values."""

PASS_THROUGH = {"dropout", "alias", "clone", "contiguous", "to", "identity", "_to_copy", "type_as", "float",
                "double", "detach", "feature_dropout"}
"""Ops that return their first input's values unchanged (up to a cast), whatever the axis."""

_MODULE_KINDS = {nn.LayerNorm: "layer_norm", nn.RMSNorm: "rms_norm", nn.Linear: "linear", nn.Embedding: "embedding",
                 nn.Dropout: "dropout", nn.Identity: "identity", nn.Conv1d: "conv", nn.Conv2d: "conv",
                 nn.Conv3d: "conv"}


def kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The op a node computes, one name for every spelling (module class, aten op, function, method)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for cls, name in _MODULE_KINDS.items():
            if isinstance(module, cls):
                return name
        return "conv1d_hf" if type(module).__name__ == "Conv1D" and hasattr(module, "nf") else None
    if node.op == "call_method":
        return {"__getitem__": "getitem", "reshape": "reshape"}.get(node.target, node.target)
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target._opname
        if target is operator.getitem:
            return "getitem"
        if target in (operator.add, operator.iadd):
            return "add"
        if target in (operator.sub, operator.isub):
            return "sub"
        if target in (operator.mul, operator.imul):
            return "mul"
        return getattr(target, "__name__", None)
    return None


def shape(node) -> tuple[int, ...] | None:
    """The static output shape of a tensor-valued node (torch.export's or ShapeProp's record)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        dims = tuple(value.shape)
    else:
        meta = node.meta.get("tensor_meta")
        if not hasattr(meta, "shape"):
            return None
        dims = tuple(meta.shape)
    return dims if all(isinstance(d, int) for d in dims) else None


_FUNCTIONAL = {
    nn.functional.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    nn.functional.rms_norm: ("input", "normalized_shape", "weight", "eps"),
    torch._C._nn.linear: ("input", "weight", "bias"),
    nn.functional.embedding: ("input", "weight"),
}
"""Argument names of the torch.nn.functional calls that symbolic_trace records."""


_DEFAULTS = {"weight": None, "bias": None, "eps": 1e-5}


def positional_calls(gm: fx.GraphModule) -> None:
    """Moves the keyword arguments of traced torch.nn.functional calls (F.layer_norm(x, s, weight=w))
    to their positions, so every matcher reads parameters by position; same call, same result."""
    for node in gm.graph.nodes:
        names = _FUNCTIONAL.get(node.target) if node.op == "call_function" else None
        if not names or not any(k in names for k in node.kwargs):
            continue
        last = max(names.index(k) for k in node.kwargs if k in names)
        given = {**dict(zip(names, node.args)), **node.kwargs}
        node.args = tuple(given.get(n, _DEFAULTS.get(n)) for n in names[: last + 1])
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in names}


def call_arg_names(node: fx.Node) -> tuple[str, ...]:
    """The positional argument names of a call_function (aten schema or torch.nn.functional), else ()."""
    if node.op != "call_function":
        return ()
    if isinstance(node.target, torch._ops.OpOverload):
        return tuple(a.name for a in node.target._schema.arguments)
    return _FUNCTIONAL.get(node.target, ())


def refresh_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Records every tensor node's current shape and dtype as node.meta["val"] (a meta tensor), by
    running the module once on `example_inputs` (earlier rewrites may have changed widths). If the run
    fails, the shapes recorded so far stay (torch.export's own, or none); buffers the run updates are
    restored. Functional calls are made positional first (positional_calls)."""

    class _Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                node.meta["val"] = torch.empty(result.shape, dtype=result.dtype, device="meta")
            return result

    positional_calls(gm)
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    try:
        with torch.no_grad():
            _Recorder(gm).run(*example_inputs)
    except Exception:  # noqa: BLE001 - shapes stay as recorded; unknown ones make the passes refuse
        pass
    finally:  # a training-mode BatchNorm updated its running statistics: put them back
        with torch.no_grad():
            for name, b in gm.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` (positional) or `name` (keyword) of a call, else `default`."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def data_input(node: fx.Node):
    """The tensor a call reads first (self for a method, args[0] otherwise)."""
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def readers(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that see its values (not shape-only readers)."""
    return [u for u in node.users if u.op == "output" or u.target is not None and not _shape_only(u)]


def _shape_only(node: fx.Node) -> bool:
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target._opname in SHAPE_ONLY
    return node.op == "call_method" and node.target in SHAPE_ONLY


# --------------------------------------------------------------------------- parameters


@dataclass
class ParamRef:
    """Where `node` reads a parameter: a module attribute (call_module) or a get_attr argument."""

    node: fx.Node
    attr: str | None = None
    """The attribute of the called module (call_module)."""
    index: int | None = None
    """The position of the get_attr argument in node.args (call_function)."""

    def get(self, gm: fx.GraphModule) -> torch.Tensor | None:
        if self.attr is not None:
            return getattr(gm.get_submodule(self.node.target), self.attr, None)
        source = self.node.args[self.index] if self.index < len(self.node.args) else None
        return fetch_attr(gm, source.target) if isinstance(source, fx.Node) and source.op == "get_attr" else None

    def array(self, gm: fx.GraphModule) -> np.ndarray:
        """The value in float64."""
        return self.get(gm).detach().to(torch.float64).cpu().numpy()

    def set(self, gm: fx.GraphModule, value, *, suffix: str, parametrization: nn.Module | None = None) -> None:
        """Gives this node a new parameter holding `value` (cast to the old dtype); every other user of
        the old one keeps it (a tied or shared weight is untied). `parametrization` wraps it
        (torch.nn.utils.parametrize), for training."""
        old = self.get(gm)
        tensor = torch.as_tensor(np.asarray(value)).to(dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter) or parametrization is not None:
            tensor = nn.Parameter(tensor, requires_grad=old.requires_grad)
        owner, name = self._owner(gm, suffix, tensor)
        if parametrization is not None:
            parametrize.register_parametrization(owner, name, parametrization)

    def _owner(self, gm: fx.GraphModule, suffix: str, tensor: torch.Tensor) -> tuple[nn.Module, str]:
        """Stores `tensor` where this node reads it (a new attribute if the old one has other readers)."""
        if self.attr is not None:
            module = own_module(gm, self.node)
            setattr(module, self.attr, tensor)
            return module, self.attr
        source = self.node.args[self.index]
        target = source.target
        shared = len(source.users) > 1 or any(
            n is not source and n.op == "get_attr" and n.target == target and n.users for n in gm.graph.nodes)
        if shared:
            target = unique_attr_name(gm, f"{target}_{suffix}")
        prefix, _, name = target.rpartition(".")
        owner = gm.get_submodule(prefix) if prefix else gm
        if name in owner._parameters or name in owner._buffers or name in owner.__dict__:
            delattr(owner, name)
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(name, tensor)
        else:
            owner.register_buffer(name, tensor)
        if shared:
            with gm.graph.inserting_before(self.node):
                fresh = gm.graph.get_attr(target)
            fresh.meta = dict(source.meta)
            self.node.update_arg(self.index, fresh)
        return owner, name


def own_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module `node` calls, cloned under a new name first if another node calls it too."""
    if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) > 1:
        clone = copy.deepcopy(gm.get_submodule(node.target))
        name = unique_attr_name(gm, f"{node.target}_{node.name}")
        gm.add_submodule(name, clone)
        node.target = name
    return gm.get_submodule(node.target)


def is_shared(gm: fx.GraphModule, ref: ParamRef) -> bool:
    """True when the parameter has another name, another reader, or its module another call site."""
    tensor = ref.get(gm)
    if sum(1 for _, p in gm.named_parameters(remove_duplicate=False) if p is tensor) > 1:
        return True
    if ref.attr is not None:
        return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == ref.node.target) > 1
    return len(ref.node.args[ref.index].users) > 1


def prune(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erases a get_attr node nobody reads any more, and its attribute when no other node reads it."""
    if node.op == "get_attr" and not node.users:
        target = node.target
        gm.graph.erase_node(node)
        remove_attr_if_unused(gm, target)


def get_attr_ref(node: fx.Node, index: int) -> ParamRef | None:
    """A ParamRef for argument `index` when it is a get_attr node, else None."""
    source = node.args[index] if index < len(node.args) else None
    return ParamRef(node, index=index) if isinstance(source, fx.Node) and source.op == "get_attr" else None


# --------------------------------------------------------------------------- matchers


@dataclass
class LinearOp:
    """A linear map y = x W (+ b) along the last axis: nn.Linear, aten.linear, Conv1D or aten.addmm."""

    node: fx.Node
    x: fx.Node
    weight: ParamRef
    bias: ParamRef | None
    in_axis: int
    """The weight axis of input features (1 for (out, in) layouts, 0 for (in, out))."""

    @property
    def out_axis(self) -> int:
        return 1 - self.in_axis


def as_linear(gm: fx.GraphModule, node: fx.Node) -> LinearOp | None:
    """The linear map `node` computes with constant parameters, or None."""
    k = kind(gm, node)
    if node.op == "call_module" and k in ("linear", "conv1d_hf"):
        module = gm.get_submodule(node.target)
        if parametrize.is_parametrized(module):
            return None
        bias = ParamRef(node, attr="bias") if module.bias is not None else None
        return LinearOp(node, data_input(node), ParamRef(node, attr="weight"), bias, 1 if k == "linear" else 0)
    if node.op != "call_function":
        return None
    if k == "linear" and call_arg_names(node)[:3] == ("input", "weight", "bias"):
        weight, bias = get_attr_ref(node, 1), get_attr_ref(node, 2)
        if weight is None or (arg(node, 2, "bias") is not None and bias is None):
            return None
        return LinearOp(node, node.args[0], weight, bias, 1)
    if k == "addmm" and node.target == torch.ops.aten.addmm.default:
        args = bound_args(node)
        weight, bias = get_attr_ref(node, 2), get_attr_ref(node, 0)
        if weight is None or bias is None or args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
            return None
        if len(bias.get(gm).shape) != 1:
            return None
        return LinearOp(node, node.args[1], weight, bias, 0)
    return None


@dataclass
class NormOp:
    """A LayerNorm or RMSNorm over the last axis."""

    node: fx.Node
    kind: str  # "LayerNorm" or "RMSNorm"
    x: fx.Node
    width: int
    eps: float | None
    weight: ParamRef | None
    bias: ParamRef | None


def as_norm(gm: fx.GraphModule, node: fx.Node) -> NormOp | None:
    """The LayerNorm/RMSNorm `node` computes over the last axis only, or None."""
    k = kind(gm, node)
    if k not in ("layer_norm", "rms_norm"):
        return None
    label = "LayerNorm" if k == "layer_norm" else "RMSNorm"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if len(module.normalized_shape) != 1 or parametrize.is_parametrized(module):
            return None
        weight = ParamRef(node, attr="weight") if getattr(module, "weight", None) is not None else None
        has_bias = label == "LayerNorm" and getattr(module, "bias", None) is not None  # RMSNorm ignores one
        bias = ParamRef(node, attr="bias") if has_bias else None
        return NormOp(node, label, data_input(node), int(module.normalized_shape[0]), module.eps, weight, bias)
    names = call_arg_names(node)
    if not names:
        return None
    args = {**dict(zip(names, node.args)), **node.kwargs}
    normalized = list(args.get("normalized_shape", []))
    if len(normalized) != 1:
        return None
    refs = {}
    for name in ("weight", "bias"):
        if name in names and args.get(name) is not None:
            index = names.index(name)
            if index >= len(node.args):
                return None
            refs[name] = get_attr_ref(node, index)
            if refs[name] is None:
                return None
    return NormOp(node, label, node.args[0], int(normalized[0]), args.get("eps"), refs.get("weight"), refs.get("bias"))


def why_unmatched(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """For a LayerNorm/RMSNorm call as_norm does not match, why (None for any other node)."""
    if kind(gm, node) not in ("layer_norm", "rms_norm") or as_norm(gm, node) is not None:
        return None
    if node.op == "call_module" and parametrize.is_parametrized(gm.get_submodule(node.target)):
        return "its parameters are parametrized (trained through a function)"
    shape_arg = gm.get_submodule(node.target).normalized_shape if node.op == "call_module" else \
        {**dict(zip(call_arg_names(node), node.args)), **node.kwargs}.get("normalized_shape")
    if shape_arg is not None and len(shape_arg) != 1:
        return f"it normalizes over {len(shape_arg)} axes, not the last one only"
    return "its gamma/beta are not parameters of the module"


def set_bias(gm: fx.GraphModule, linear: LinearOp, value, *, suffix: str) -> None:
    """Gives the linear layer at `linear.node` the bias `value`, adding one where it had none."""
    if linear.bias is not None:
        linear.bias.set(gm, value, suffix=suffix)
        return
    weight = linear.weight.get(gm)
    param = nn.Parameter(torch.as_tensor(np.asarray(value)).to(dtype=weight.dtype, device=weight.device),
                         requires_grad=weight.requires_grad)
    if linear.node.op == "call_module":
        own_module(gm, linear.node).bias = param
        return
    base = linear.node.args[1].target
    target = unique_attr_name(gm, f"{base.rpartition('.')[0] + '.' if '.' in base else ''}bias_{suffix}")
    prefix, _, name = target.rpartition(".")
    (gm.get_submodule(prefix) if prefix else gm).register_parameter(name, param)
    with gm.graph.inserting_before(linear.node):
        node = gm.graph.get_attr(target)
    linear.node.args = (*linear.node.args[:2], node)
