"""fold-batchnorm on FX: folds inference-mode BatchNorm into the Conv, ConvTranspose or Linear before it.

BN(y) = s * y + t per channel, s = gamma / sqrt(var + eps), t = beta - s * mean (normfold.foldmath,
the ONNX side's arithmetic, in float64):
  Conv1d/2d/3d            W'[o] = s_o W[o],                            b' = s b + t  (b = 0 if absent)
  ConvTranspose1d/2d/3d   W'[i, j] = W[i, j] s[g(i) C_out/G + j],      b' = s b + t  (W is (C_in, C_out/G, k...))
  Linear + BatchNorm1d    W'[o] = s_o W[o],                            b' = s b + t, only on a 2-D (N, C)
                          input, where BN's channel axis 1 is the Linear's output axis.

Matched in both capture forms: call_module nodes (nn.BatchNorm1d/2d/3d, nn.Conv*, nn.ConvTranspose*,
nn.Linear) from symbolic tracing, and torch.export's call_function aten ops (aten.batch_norm,
aten._native_batch_norm_legit_no_training, torch.nn.functional.batch_norm; aten.conv1d/2d/3d,
aten.conv_transpose1d/2d/3d, aten.convolution, aten.linear) reading get_attr parameters.

Folded weights are always new Parameters: a parameter shared with another module is never changed
under it (it is untied, with a note). A conv module called at several places gets a folded copy for
this call site (with a note). Refused, with the reason: BN in training mode or without running
statistics, BN parameters computed in the graph, a producer whose output is read by anything else
(another node or the graph output), an unbatched conv or a Linear output of rank != 2, channel
counts that disagree, folded weights that overflow the parameter dtype.
"""

from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from normfold import foldmath
from normfold.fx.graph import bound_args, fetch_attr, node_label, remove_attr_if_unused, set_arg, set_parameter
from normfold.fx.graph import tensor_shapes, unique_attr_name
from normfold.report import PassReport, Skip

NAME = "fold-batchnorm"
TOLERANCE_CLASS = "fold"

_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CONVS = {nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv", nn.ConvTranspose1d: "conv_transpose",
          nn.ConvTranspose2d: "conv_transpose", nn.ConvTranspose3d: "conv_transpose", nn.Linear: "linear"}
_ATEN = torch.ops.aten
_ATEN_PRODUCERS = {
    _ATEN.conv1d: "conv", _ATEN.conv2d: "conv", _ATEN.conv3d: "conv", _ATEN.conv_transpose1d: "conv_transpose",
    _ATEN.conv_transpose2d: "conv_transpose", _ATEN.conv_transpose3d: "conv_transpose",
    _ATEN.convolution: None, _ATEN.linear: "linear",
}


class Refused(Exception):
    """The fold does not apply here; the message says why."""


@dataclass
class BatchNorm:
    """A BN call read as the per-channel affine map (scale, shift), in float64."""

    node: torch.fx.Node
    output: torch.fx.Node
    """The node whose value the folded producer replaces (the BN call, or getitem 0 of a tuple BN)."""
    input: torch.fx.Node
    scale: np.ndarray
    shift: np.ndarray
    module: str | None = None
    """The BN submodule a call_module BN calls, removed once nothing calls it."""
    attrs: list[str] = field(default_factory=list)
    """The get_attr targets a functional BN reads, removed (with their owner) once nothing reads them."""


@dataclass
class Producer:
    """The Conv/ConvTranspose/Linear call feeding a BN, with its current weight and bias."""

    node: torch.fx.Node
    kind: str
    groups: int
    weight: torch.Tensor
    bias: torch.Tensor | None


def run(gm: torch.fx.GraphModule, example_inputs: tuple, report: PassReport) -> int:
    """Folds every foldable BN in `gm`; returns how many were folded."""
    shapes = tensor_shapes(gm, example_inputs)
    applied = 0
    for node in list(gm.graph.nodes):
        if not _is_batchnorm(gm, node):
            continue
        try:
            bn = read_batchnorm(gm, node)
            producer = read_producer(gm, bn, shapes)
            weight, bias = folded(producer, bn)
        except Refused as exc:
            report.skipped.append(Skip(node_label(node), str(exc)))
            continue
        _write(gm, producer, weight, bias, bn, report)
        _remove_batchnorm(gm, bn, producer.node)
        applied += 1
    if applied:
        gm.graph.lint()
        gm.recompile()
    return applied


def _is_batchnorm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) in _BN_MODULES
    return node.op == "call_function" and node.target in (
        _ATEN.batch_norm.default, _ATEN._native_batch_norm_legit_no_training.default, nn.functional.batch_norm)


def read_batchnorm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> BatchNorm:
    """Reads an inference-mode BN's statistics and affine parameters, or raises Refused."""
    output, attrs, module_target = node, [], None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        args = dict(input=node.args[0] if node.args else node.kwargs.get("input"), weight=module.weight,
                    bias=module.bias, running_mean=module.running_mean, running_var=module.running_var,
                    training=module.training, eps=module.eps)
        module_target = node.target
    elif node.target is nn.functional.batch_norm:
        args = dict(inspect.signature(nn.functional.batch_norm).bind(*node.args, **node.kwargs).arguments)
        args.setdefault("training", False)
        args.setdefault("eps", 1e-5)
    else:
        args = bound_args(node)
        args.setdefault("training", False)
        if node.target is _ATEN._native_batch_norm_legit_no_training.default:
            output = _first_item(node)
    if args["running_mean"] is None or args["running_var"] is None:
        raise Refused("BatchNorm has no running statistics (track_running_stats=False): it normalizes with "
                      "each batch's statistics")
    if args["training"]:
        raise Refused("BatchNorm is in training mode (batch statistics); call .eval() on the module first")
    if node.op != "call_module":
        args = {**args, **{k: _constant(gm, args.get(k), k, attrs) for k in
                           ("weight", "bias", "running_mean", "running_var")}}
    mean, var = args["running_mean"], args["running_var"]
    channels = mean.numel()
    gamma = np.ones(channels) if args.get("weight") is None else _float64(args["weight"])
    beta = np.zeros(channels) if args.get("bias") is None else _float64(args["bias"])
    scale, shift = foldmath.bn_scale_shift(gamma, beta, _float64(mean), _float64(var), float(args["eps"]))
    if not isinstance(args["input"], torch.fx.Node):
        raise Refused("BatchNorm's input is not a value computed in the graph")
    return BatchNorm(node, output, args["input"], scale, shift, module_target, attrs)


def _first_item(node: torch.fx.Node) -> torch.fx.Node:
    """The getitem 0 of a tuple-returning BN; refuses when its saved-statistics outputs are read."""
    items = [user for user in node.users if user.target is operator.getitem]
    if len(items) != len(node.users) or len(items) != 1 or items[0].args[1] != 0:
        raise Refused("BatchNorm's saved-statistics outputs are read")
    return items[0]


def _constant(gm: torch.fx.GraphModule, value, what: str, owned: list[str]):
    """The tensor a get_attr argument reads (None stays None); refuses a value computed in the graph."""
    if value is None:
        return None
    if not isinstance(value, torch.fx.Node) or value.op != "get_attr":
        raise Refused(f"BatchNorm's {what} is not a parameter or buffer but a value computed in the graph")
    owned.append(value.target)
    return fetch_attr(gm, value.target)


def read_producer(gm: torch.fx.GraphModule, bn: BatchNorm, shapes: dict) -> Producer:
    """The Conv/ConvTranspose/Linear call whose only reader is `bn`, with its checks, or raises Refused."""
    node = bn.input
    producer = _module_producer(gm, node) if node.op == "call_module" else _aten_producer(gm, node)
    if producer is None:
        raise Refused(f"its input comes from {node_label(node)}, not a Conv, ConvTranspose or Linear")
    others = [user for user in node.users if user is not bn.node]
    if others:
        what = ", ".join("the graph output" if u.op == "output" else node_label(u) for u in others)
        raise Refused(f"the output of {node_label(node)} is also read by {what}")
    out_channels = producer.weight.shape[1] * producer.groups if producer.kind == "conv_transpose" \
        else producer.weight.shape[0]
    if out_channels != len(bn.scale):
        raise Refused(f"{node_label(node)} has {out_channels} output channels, BatchNorm {len(bn.scale)}")
    shape = shapes.get(node)
    if shape is None:
        raise Refused(f"the shape of {node_label(node)}'s output is unknown (the graph did not run on the "
                      "example inputs)")
    if producer.kind == "linear" and len(shape) != 2:
        raise Refused(f"BatchNorm reads a rank-{len(shape)} output of Linear {node_label(node)}: its channel "
                      "axis 1 is not the Linear's output axis (only a 2-D (N, C) input folds)")
    if producer.kind != "linear" and len(shape) != producer.weight.ndim:
        raise Refused(f"{node_label(node)} runs unbatched (rank {len(shape)}): BatchNorm's channel axis is "
                      "not its output-channel axis")
    return producer


def _module_producer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Producer | None:
    module = gm.get_submodule(node.target)
    kind = _CONVS.get(type(module))
    if kind is None:
        return None
    return Producer(node, kind, getattr(module, "groups", 1), module.weight, module.bias)


def _aten_producer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Producer | None:
    if node.op != "call_function" or getattr(node.target, "overloadpacket", None) not in _ATEN_PRODUCERS:
        return None
    args = bound_args(node)
    kind = _ATEN_PRODUCERS[node.target.overloadpacket]
    if kind is None:
        kind = "conv_transpose" if args["transposed"] else "conv"
    weight, bias = args["weight"], args.get("bias")
    for value, what in ((weight, "weight"), (bias, "bias")):
        if value is not None and (not isinstance(value, torch.fx.Node) or value.op != "get_attr"):
            raise Refused(f"the {what} of {node_label(node)} is computed in the graph, not a parameter")
    return Producer(node, kind, int(args.get("groups", 1)), fetch_attr(gm, weight.target),
                    None if bias is None else fetch_attr(gm, bias.target))


def folded(producer: Producer, bn: BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The producer's weight and bias with the BN folded in, in the weight's dtype and device."""
    weight = _float64(producer.weight)
    if producer.kind == "conv_transpose":
        weight = foldmath.scale_channels(weight, bn.scale, axis=1, groups=producer.groups)
    else:
        weight = foldmath.scale_channels(weight, bn.scale, axis=0)
    bias = foldmath.affine_after_bias(None if producer.bias is None else _float64(producer.bias), bn.scale, bn.shift)
    dtype, device = producer.weight.dtype, producer.weight.device
    result = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(dtype=dtype, device=device) for a in (weight, bias))
    if not all(bool(torch.isfinite(t).all()) for t in result):
        raise Refused(f"the folded weights of {node_label(producer.node)} overflow {str(dtype).removeprefix('torch.')}")
    return result


def _write(gm: torch.fx.GraphModule, producer: Producer, weight: torch.Tensor, bias: torch.Tensor,
           bn: BatchNorm, report: PassReport) -> None:
    """Gives the producer's call site the folded weight and bias as new parameters."""
    node = producer.node
    if node.op == "call_module":
        target = original = node.target
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is
                 gm.get_submodule(target)]
        if len(calls) > 1:
            clone = copy.deepcopy(gm.get_submodule(target))
            target = unique_attr_name(gm, f"{target}_bnfold")
            gm.add_submodule(target, clone)
            node.target = target
            report.notes.append(Skip(node_label(bn.node), f"{original} is called at "
                                     f"{len(calls)} places: this call site got a folded copy, {target}"))
        for name, value in (("weight", weight), ("bias", bias)):
            _note_shared(gm, getattr(gm.get_submodule(target), name), f"{target}.{name}", bn, report)
            set_parameter(gm, f"{target}.{name}", value)
        return
    args = bound_args(node)
    owner = args["weight"].target.rpartition(".")[0]
    shared = []
    for name, value in (("weight", weight), ("bias", bias)):
        old = args.get(name)
        if old is not None and _exclusive(gm, old, node):
            set_parameter(gm, old.target, value)
            continue
        if old is not None:
            shared.append(old.target)
        target = unique_attr_name(gm, old.target if old is not None else f"{owner}.bias".lstrip("."))
        set_parameter(gm, target, value)
        with gm.graph.inserting_before(node):
            set_arg(node, name, gm.graph.get_attr(target))
    if shared:
        report.notes.append(Skip(node_label(bn.node), f"{' and '.join(shared)} also read elsewhere: the folded "
                                 "call site got its own copy, the other readers keep the original"))


def _exclusive(gm: torch.fx.GraphModule, attr: torch.fx.Node, reader: torch.fx.Node) -> bool:
    """Whether `reader` is the only reader of the tensor `attr` fetches (under any name)."""
    tensor = fetch_attr(gm, attr.target)
    names = [name for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(
        remove_duplicate=False)] if t is tensor]
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in names]
    return names == [attr.target] and readers == [attr] and list(attr.users) == [reader]


def _note_shared(gm: torch.fx.GraphModule, param, path: str, bn: BatchNorm, report: PassReport) -> None:
    """Notes that the producer's parameter is also another module's: that one keeps the original."""
    if param is None:
        return
    owner = path.rpartition(".")[0]
    others = [name for name, p in gm.named_parameters(remove_duplicate=False)
              if p is param and name.rpartition(".")[0] != owner]
    if others:
        report.notes.append(Skip(node_label(bn.node), f"{path} is shared with {', '.join(others)}: the folded "
                                 f"call site got its own copy, {', '.join(others)} keeps the original"))


def _remove_batchnorm(gm: torch.fx.GraphModule, bn: BatchNorm, producer: torch.fx.Node) -> None:
    """Routes the BN's readers to the producer, erases the BN and the attributes only it read."""
    bn.output.replace_all_uses_with(producer)
    if bn.output is not bn.node:
        gm.graph.erase_node(bn.output)
    params = [a for a in bn.node.all_input_nodes if a.op == "get_attr"]
    gm.graph.erase_node(bn.node)
    prefixes = {target.rpartition(".")[0] for target in bn.attrs if "." in target}
    dangling = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.rpartition(".")[0] in prefixes]
    for node in dict.fromkeys(params + dangling):
        if not node.users:
            gm.graph.erase_node(node)
    for target in [*([bn.module] if bn.module else []), *bn.attrs, *prefixes]:
        try:
            remove_attr_if_unused(gm, target)
        except AttributeError:  # already removed with its owner
            pass


def _float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()
