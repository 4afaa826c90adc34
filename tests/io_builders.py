"""Small ONNX models built with onnx.helper for the IO and bad-input tests (no torch needed)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CUSTOM_DOMAIN = "custom.domain"
OPSET = 17
IR_VERSION = 8


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def conv_bn_model(*, channels: int = 16, seed: int = 0, weight_as_output: bool = False) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> BatchNormalization -> custom.domain::MyRelu -> Add(offset) -> y, and k -> kid.

    Carries everything a round trip must keep: metadata_props, doc strings, producer, a custom-domain
    opset import with a model-local function, symbolic dims, value_info, two inputs and two outputs.
    """
    rng = _rng(seed)
    c = channels
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "B"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c).astype(np.float32), "var"),
        numpy_helper.from_array(rng.standard_normal((1, c, 1, 1)).astype(np.float32), "offset"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn",
                         epsilon=1e-5),
        helper.make_node("MyRelu", ["b"], ["r"], name="myrelu", domain=CUSTOM_DOMAIN),
        helper.make_node("Add", ["r", "offset"], ["y"], name="add"),
        helper.make_node("Identity", ["k"], ["kid"], name="ident"),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 8, 8]),
        helper.make_tensor_value_info("kid", TensorProto.INT64, ["M"]),
    ]
    if weight_as_output:
        outputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [c, 3, 3, 3]))
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["M"]),
        ],
        outputs,
        initializer=inits,
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", c, 8, 8])],
        doc_string="graph doc",
    )
    function = helper.make_function(
        CUSTOM_DOMAIN, "MyRelu", ["X"], ["Y"], [helper.make_node("Relu", ["X"], ["Y"])],
        opset_imports=[helper.make_opsetid("", OPSET)], doc_string="function doc",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(CUSTOM_DOMAIN, 1)],
        functions=[function],
        producer_name="io-tests",
        producer_version="1.2.3",
        doc_string="model doc",
        ir_version=IR_VERSION,
    )
    helper.set_model_props(model, {"author": "tests", "license": "MIT", "zzz": "last"})
    return model


def add_model(*, shape=(2, 3), seed: int = 0) -> onnx.ModelProto:
    """y = x + W with one float initializer W: the smallest model with a tensor."""
    w = _rng(seed).standard_normal(shape).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"], name="add")],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def pre_ln_model(opset: int, *, d: int = 8, vocab: int = 11) -> onnx.ModelProto:
    """ids -> Gather(wte) -> h0 -> LN1 -> MatMul -> Relu -> MatMul -> + h0 -> LN_f -> MatMul(head) -> logits.

    A Pre-LN block written with ops every opset >= 7 has: decomposed LayerNorms (ReduceMean with its axes
    attribute, over axis 2, Sub, Pow, Add, Sqrt, Div, Mul, Add), for the old-opset cases of the corpus.
    """
    rng = _rng(opset)
    inits, nodes = [], []

    def init(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def ln(prefix, x):
        axes = dict(axes=[2])
        nodes.extend([
            helper.make_node("ReduceMean", [x], [f"{prefix}/mu"], name=f"{prefix}/mean", **axes),
            helper.make_node("Sub", [x, f"{prefix}/mu"], [f"{prefix}/xc"], name=f"{prefix}/sub"),
            helper.make_node("Pow", [f"{prefix}/xc", init(f"{prefix}.two", 2.0)], [f"{prefix}/sq"],
                             name=f"{prefix}/pow"),
            helper.make_node("ReduceMean", [f"{prefix}/sq"], [f"{prefix}/var"], name=f"{prefix}/var", **axes),
            helper.make_node("Add", [f"{prefix}/var", init(f"{prefix}.eps", 1e-5)], [f"{prefix}/ve"],
                             name=f"{prefix}/add_eps"),
            helper.make_node("Sqrt", [f"{prefix}/ve"], [f"{prefix}/std"], name=f"{prefix}/sqrt"),
            helper.make_node("Div", [f"{prefix}/xc", f"{prefix}/std"], [f"{prefix}/n"], name=f"{prefix}/div"),
            helper.make_node("Mul", [f"{prefix}/n", init(f"{prefix}.g", rng.uniform(0.5, 1.5, d))], [f"{prefix}/ng"],
                             name=f"{prefix}/mul"),
            helper.make_node("Add", [f"{prefix}/ng", init(f"{prefix}.b", rng.standard_normal(d))], [f"{prefix}/y"],
                             name=f"{prefix}/add"),
        ])
        return f"{prefix}/y"

    nodes.append(helper.make_node("Gather", [init("wte", rng.standard_normal((vocab, d)) + 3.0), "ids"], ["h0"],
                                  name="embed"))
    a = ln("ln1", "h0")
    nodes.append(helper.make_node("MatMul", [a, init("w1", rng.standard_normal((d, d)) / d**0.5)], ["f"], name="fc"))
    nodes.append(helper.make_node("Relu", ["f"], ["r"], name="relu"))
    nodes.append(helper.make_node("MatMul", ["r", init("w2", rng.standard_normal((d, d)) / d**0.5)], ["p"],
                                  name="proj"))
    nodes.append(helper.make_node("Add", ["h0", "p"], ["h1"], name="residual"))
    f = ln("ln_f", "h1")
    nodes.append(helper.make_node("MatMul", [f, init("head", rng.standard_normal((d, vocab)))], ["logits"],
                                  name="head"))
    graph = helper.make_graph(nodes, "pre_ln", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5, vocab])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def conv_bn_spatial_model(opset: int, spatial: int | None) -> onnx.ModelProto:
    """x[1,2,4,4] -> Conv -> BatchNormalization(spatial) -> y; spatial=0 (opsets 7-8) has per-element statistics."""
    rng = _rng(opset)
    shape = [3] if spatial in (None, 1) else [3, 4, 4]
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), n) for n in ("g", "b", "m")]
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, shape).astype(np.float32), "v"))
    attrs = {} if spatial is None else {"spatial": spatial}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn", **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def save_with_external_data(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    """Saves a copy of `model` with every tensor in one external file beside it."""
    model = copy.deepcopy(model)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or path.name + ".data", size_threshold=0)
    return path


def external_reference(model: onnx.ModelProto, name: str, location: str, *, offset: int | None = None,
                       length: int | None = None) -> onnx.ModelProto:
    """A copy of `model` whose initializer `name` points at `location` instead of holding its data."""
    model = copy.deepcopy(model)
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entries = {"location": location}
    if offset is not None:
        entries["offset"] = str(offset)
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model


def initializer_bytes(model: onnx.ModelProto, name: str) -> bytes:
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    return numpy_helper.to_array(tensor).tobytes()


def all_tensor_protos(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every TensorProto of a model: initializers and attributes, in every graph, subgraph and function."""
    found: list[onnx.TensorProto] = []

    def nodes(node_list):
        for node in node_list:
            for attr in node.attribute:
                if attr.HasField("t"):
                    found.append(attr.t)
                found.extend(attr.tensors)
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    graph(g)

    def graph(g):
        found.extend(g.initializer)
        nodes(g.node)

    graph(proto.graph)
    for function in proto.functions:
        nodes(function.node)
    return found


def external_locations(path: Path) -> set[str]:
    """The `location` of every external tensor in the model file (initializers, attributes, functions)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {
        next(e.value for e in tensor.external_data if e.key == "location")
        for tensor in all_tensor_protos(proto)
        if tensor.data_location == TensorProto.EXTERNAL
    }


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` (hidden ones too) with its size and mtime, to detect any write."""
    result = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            result[str(p.relative_to(directory))] = (st.st_size, st.st_mtime_ns)
    return result


def normfold_command() -> list[str]:
    """The installed `normfold` command, or the module run by this interpreter."""
    exe = shutil.which("normfold", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "normfold.cli"]


def run_normfold(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(normfold_command() + [str(a) for a in args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, **kwargs)
