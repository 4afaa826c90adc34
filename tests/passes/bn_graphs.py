"""Small BatchNormalization graphs for the fold-batchnorm tests, built with onnx.helper (no torch).

Every builder returns a `Case`: an onnx.ModelProto with static input shapes and seeded weights
(numpy.random.default_rng(seed)), the number of BN folds the pass should apply, and the dtype
that picks the tolerance row of REFERENCE.md.

BN parameters (`bn_params`) are deliberately awkward: gamma has a zero and negative entries,
the variance spans 1e-6..1e3 (log-uniform), mean and beta are random, epsilon is uniform in
[1e-6, 1e-3] (rounded to float32, as the attribute stores it).

The module also holds float64 numpy references of Conv, ConvTranspose and BatchNormalization
(`conv_ref`, `conv_transpose_ref`, `bn_ref`), written from the ONNX operator definitions,
for tests that compare against exact arithmetic rather than against onnxruntime.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

# The IR version onnx shipped with each opset (onnx.helper.VERSION_TABLE), so that every model
# is one a real exporter could have written.
IR_FOR_OPSET = {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8,
                19: 9, 20: 9, 21: 10}


def tensor_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


@dataclass
class BNParams:
    """A BatchNormalization's constants, stored in their model dtype."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    def arrays(self) -> list[np.ndarray]:
        return [self.gamma, self.beta, self.mean, self.var]


def bn_params(rng: np.random.Generator, channels: int, *, dtype=np.float32, var_range=(1e-6, 1e3),
              special_gamma: bool = True, eps: float | None = None) -> BNParams:
    """Random inference-mode BN constants (see module docstring)."""
    gamma = rng.normal(0.0, 1.5, size=channels)
    if special_gamma and channels >= 2:
        gamma[0] = 0.0
        gamma[1] = -abs(gamma[1]) - 0.1
    lo, hi = np.log10(var_range[0]), np.log10(var_range[1])
    var = 10.0 ** rng.uniform(lo, hi, size=channels)
    if channels >= 3:  # make sure both ends of the range are present
        var[-1], var[-2] = var_range[0], var_range[1]
    mean = rng.normal(0.0, 2.0, size=channels)
    beta = rng.normal(0.0, 1.0, size=channels)
    if eps is None:
        eps = rng.uniform(1e-6, 1e-3)
    eps = float(np.float32(eps))
    dt = np.dtype(dtype)
    return BNParams(gamma.astype(dt), beta.astype(dt), mean.astype(dt), var.astype(dt), eps)


@dataclass
class Case:
    """A test model, how many BNs the pass should fold in it, and its activation dtype."""

    name: str
    model: onnx.ModelProto
    folds: int
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    def __repr__(self) -> str:  # shows up in pytest ids and failures
        return f"Case({self.name})"


class GraphBuilder:
    """Accumulates nodes, inputs, outputs and initializers, then makes a ModelProto."""

    def __init__(self, *, dtype=np.float32, seed: int = 0):
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.arrays: dict[str, np.ndarray] = {}
        self._counter = itertools.count()

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self._counter)}"

    def input(self, name: str, shape, dtype=None) -> str:
        dims = None if shape is None else list(shape)
        self.inputs.append(helper.make_tensor_value_info(name, tensor_type(dtype or self.dtype), dims))
        return name

    def init(self, name: str, array: np.ndarray, *, as_input: bool = False) -> str:
        """An initializer; `as_input` also lists it among the graph inputs (overridable at IR >= 4)."""
        array = np.asarray(array)
        self.initializers.append(numpy_helper.from_array(array, name))
        self.arrays[name] = array
        if as_input:
            self.input(name, array.shape, array.dtype)
        return name

    def const_node(self, name: str, array: np.ndarray) -> str:
        """A Constant node producing `array` under `name`."""
        array = np.asarray(array)
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_t")))
        self.arrays[name] = array
        return name

    def random(self, shape, *, scale: float | None = None, dtype=None) -> np.ndarray:
        if scale is None:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
            scale = 1.0 / np.sqrt(max(fan_in, 1))
        return (self.rng.normal(0.0, 1.0, size=shape) * scale).astype(dtype or self.dtype)

    def node(self, op: str, inputs, *, outputs=None, name: str | None = None, **attrs) -> str:
        outputs = outputs or [self.fresh(op.lower() + "_out")]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name or self.fresh(op), **attrs))
        return outputs[0]

    def bn(self, x: str, channels: int, *, params: BNParams | None = None, param_dtype=None, name: str | None = None,
           training_mode: int | None = None, extra_outputs=(), as_input: tuple[str, ...] = (),
           graph_inputs: tuple[str, ...] = (), output: str | None = None, **attrs) -> str:
        """A BatchNormalization on `x`; returns its output name.

        `as_input`: roles ("scale", "bias", "mean", "var") whose initializer is also a graph input;
        `graph_inputs`: roles that are plain graph inputs (no initializer);
        `extra_outputs`: names of the running-statistics outputs to create.
        """
        params = params or bn_params(self.rng, channels, dtype=param_dtype or self.dtype)
        name = name or self.fresh("bn")
        names = []
        for role, array in zip(("scale", "bias", "mean", "var"), params.arrays()):
            pname = f"{name}_{role}"
            if role in graph_inputs:
                self.input(pname, array.shape, array.dtype)
            else:
                self.init(pname, array, as_input=role in as_input)
            names.append(pname)
        if training_mode is not None:
            attrs["training_mode"] = training_mode
        outputs = [output or f"{name}_y", *extra_outputs]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *names], outputs, name=name,
                                           epsilon=params.eps, **attrs))
        return outputs[0]

    def output(self, name: str, dtype=None, shape=None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, tensor_type(dtype or self.dtype), shape))
        return name

    def build(self, *, opset: int = 17, ir_version: int | None = None, value_info: bool = False) -> onnx.ModelProto:
        ir_version = IR_FOR_OPSET[opset] if ir_version is None else ir_version
        inputs = list(self.inputs)
        if ir_version < 4:  # IR 3: every initializer is listed among the graph inputs, by rule
            listed = {v.name for v in inputs}
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in self.initializers if t.name not in listed]
        graph = helper.make_graph(self.nodes, "g", inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version,
                                  producer_name="normfold-tests")
        # Graph outputs get their full type (elem type and shape) from onnx's shape inference, so the
        # model passes onnx.checker; intermediate value_info is kept only when asked for.
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {v.name: v for v in inferred.graph.output}
        for out in model.graph.output:
            if shapes.get(out.name) is not None and shapes[out.name].type.tensor_type.HasField("shape"):
                out.type.CopyFrom(shapes[out.name].type)
        if value_info:
            model.graph.value_info.extend(inferred.graph.value_info)
        return model


def _per_dim(value, dims: int) -> list[int]:
    return [value] * dims if isinstance(value, int) else list(value)


def _pads(value, dims: int) -> list[int]:
    return [value] * (2 * dims) if isinstance(value, int) else list(value)


def _fmt(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _tag(dtype, param_dtype) -> str:
    dt = np.dtype(dtype).name
    return dt if param_dtype is None or np.dtype(param_dtype) == np.dtype(dtype) else f"{dt}-params{np.dtype(param_dtype).name}"


# ---------------------------------------------------------------------------------------------------
# BN after a producer


def conv_bn(*, dims: int = 2, cin: int = 4, cout: int = 6, groups: int = 1, kernel=3, strides=1, dilations=1,
            pads=0, bias: bool = True, size: int = 7, batch: int = 2, dtype=np.float32, param_dtype=None,
            opset: int = 17, seed: int = 0) -> Case:
    """x -> Conv -> BN -> y."""
    g = GraphBuilder(dtype=dtype, seed=seed)
    kernel = _per_dim(kernel, dims)
    x = g.input("x", [batch, cin] + [size] * dims)
    inputs = [x, g.init("W", g.random([cout, cin // groups, *kernel]))]
    if bias:
        inputs.append(g.init("B", g.random([cout], scale=1.0)))
    y = g.node("Conv", inputs, name="conv", kernel_shape=kernel, strides=_per_dim(strides, dims),
               dilations=_per_dim(dilations, dims), pads=_pads(pads, dims), group=groups)
    g.output(g.bn(y, cout, param_dtype=param_dtype, output="y"))
    name = (f"conv{dims}d-cin{cin}-cout{cout}-g{groups}-k{_fmt(kernel)}-s{_fmt(strides)}-d{_fmt(dilations)}"
            f"-p{_fmt(pads)}-{'bias' if bias else 'nobias'}-{_tag(dtype, param_dtype)}-opset{opset}")
    return Case(name, g.build(opset=opset), 1, np.dtype(dtype))


def conv_transpose_bn(*, dims: int = 2, cin: int = 4, cout: int = 6, groups: int = 1, kernel=3, strides=1,
                      dilations=1, pads=0, output_padding=0, bias: bool = True, size: int = 5, batch: int = 2,
                      dtype=np.float32, param_dtype=None, opset: int = 17, seed: int = 0) -> Case:
    """x -> ConvTranspose -> BN -> y (weight layout (C_in, C_out/G, k...))."""
    g = GraphBuilder(dtype=dtype, seed=seed)
    kernel = _per_dim(kernel, dims)
    x = g.input("x", [batch, cin] + [size] * dims)
    inputs = [x, g.init("W", g.random([cin, cout // groups, *kernel]))]
    if bias:
        inputs.append(g.init("B", g.random([cout], scale=1.0)))
    y = g.node("ConvTranspose", inputs, name="convT", kernel_shape=kernel, strides=_per_dim(strides, dims),
               dilations=_per_dim(dilations, dims), pads=_pads(pads, dims),
               output_padding=_per_dim(output_padding, dims), group=groups)
    g.output(g.bn(y, cout, param_dtype=param_dtype, output="y"))
    name = (f"convT{dims}d-cin{cin}-cout{cout}-g{groups}-k{_fmt(kernel)}-s{_fmt(strides)}-d{_fmt(dilations)}"
            f"-p{_fmt(pads)}-outpad{_fmt(output_padding)}-{'bias' if bias else 'nobias'}-{_tag(dtype, param_dtype)}"
            f"-opset{opset}")
    return Case(name, g.build(opset=opset), 1, np.dtype(dtype))


C_SHAPES = (None, "N", "1N", "MN", "scalar")


def _gemm_c(g: GraphBuilder, c_shape, m: int, n: int):
    shape = {"N": [n], "1N": [1, n], "MN": [m, n], "M1": [m, 1], "scalar": [1]}[c_shape]
    return g.init("C", g.random(shape, scale=1.0))


def gemm_bn(*, m: int = 5, k: int = 7, n: int = 6, trans_a: int = 0, trans_b: int = 0, alpha: float = 1.0,
            beta: float = 1.0, c_shape=None, dtype=np.float32, param_dtype=None, opset: int = 17,
            seed: int = 0) -> Case:
    """A -> Gemm(B, C) -> BN (on the 2-D (M, N) output) -> y."""
    g = GraphBuilder(dtype=dtype, seed=seed)
    a = g.input("A", [k, m] if trans_a else [m, k])
    inputs = [a, g.init("B", g.random([n, k] if trans_b else [k, n], scale=1 / np.sqrt(k)))]
    if c_shape is not None:
        inputs.append(_gemm_c(g, c_shape, m, n))
    y = g.node("Gemm", inputs, name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    g.output(g.bn(y, n, param_dtype=param_dtype, output="y"))
    name = f"gemm-tA{trans_a}-tB{trans_b}-alpha{alpha}-beta{beta}-C{c_shape}-{_tag(dtype, param_dtype)}-opset{opset}"
    return Case(name, g.build(opset=opset), 1, np.dtype(dtype))


def matmul_bn(*, m: int = 5, k: int = 7, n: int = 6, bias=None, bias_first: bool = False, dtype=np.float32,
              param_dtype=None, opset: int = 17, seed: int = 0) -> Case:
    """x (M, K) -> MatMul(W) [-> Add(b)] -> BN -> y. bias: None, "N" or "1N"; bias_first: Add(b, mm)."""
    g = GraphBuilder(dtype=dtype, seed=seed)
    x = g.input("x", [m, k])
    y = g.node("MatMul", [x, g.init("W", g.random([k, n], scale=1 / np.sqrt(k)))], name="matmul")
    if bias is not None:
        b = g.init("b", g.random([n] if bias == "N" else [1, n], scale=1.0))
        y = g.node("Add", [b, y] if bias_first else [y, b], name="add")
    g.output(g.bn(y, n, param_dtype=param_dtype, output="y"))
    name = f"matmul-bias{bias}{'-first' if bias_first else ''}-{_tag(dtype, param_dtype)}-opset{opset}"
    return Case(name, g.build(opset=opset), 1, np.dtype(dtype))


# ---------------------------------------------------------------------------------------------------
# BN before a consumer


def bn_conv(*, dims: int = 2, cin: int = 4, cout: int = 6, groups: int = 1, kernel=3, strides=1, dilations=1,
            pads=0, auto_pad: str | None = None, bias: bool = True, size: int = 7, batch: int = 2,
            dtype=np.float32, param_dtype=None, opset: int = 17, seed: int = 0) -> Case:
    """x -> BN -> Conv -> y. Folds only when the Conv reads no padding (pads all 0, or auto_pad VALID)."""
    g = GraphBuilder(dtype=dtype, seed=seed)
    kernel = _per_dim(kernel, dims)
    x = g.input("x", [batch, cin] + [size] * dims)
    h = g.bn(x, cin, param_dtype=param_dtype, name="bn")
    inputs = [h, g.init("W", g.random([cout, cin // groups, *kernel]))]
    if bias:
        inputs.append(g.init("B", g.random([cout], scale=1.0)))
    attrs = dict(kernel_shape=kernel, strides=_per_dim(strides, dims), dilations=_per_dim(dilations, dims),
                 group=groups)
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    if pads is not None:
        attrs["pads"] = _pads(pads, dims)
    g.output(g.node("Conv", inputs, outputs=["y"], name="conv", **attrs))
    folds = int(not any(_pads(pads or 0, dims)) and auto_pad in (None, "NOTSET", "VALID"))
    name = (f"bn-conv{dims}d-cin{cin}-cout{cout}-g{groups}-k{_fmt(kernel)}-s{_fmt(strides)}-d{_fmt(dilations)}"
            f"-p{_fmt(pads)}-auto{auto_pad}-{'bias' if bias else 'nobias'}-{_tag(dtype, param_dtype)}-opset{opset}")
    return Case(name, g.build(opset=opset), folds, np.dtype(dtype))


def bn_gemm(*, m: int = 5, k: int = 7, n: int = 6, trans_a: int = 0, trans_b: int = 0, alpha: float = 1.0,
            beta: float = 1.0, c_shape=None, dtype=np.float32, param_dtype=None, opset: int = 17,
            seed: int = 0) -> Case:
    """x (M, K) -> BN -> Gemm(B, C) -> y. Folds only with transA=0 (BN's channels are Gemm's K)."""
    g = GraphBuilder(dtype=dtype, seed=seed)
    x = g.input("x", [k, m] if trans_a else [m, k])
    h = g.bn(x, m if trans_a else k, param_dtype=param_dtype, name="bn")
    inputs = [h, g.init("B", g.random([n, k] if trans_b else [k, n], scale=1 / np.sqrt(k)))]
    if c_shape is not None:
        inputs.append(_gemm_c(g, c_shape, m, n))
    g.output(g.node("Gemm", inputs, outputs=["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha,
                    beta=beta))
    name = f"bn-gemm-tA{trans_a}-tB{trans_b}-alpha{alpha}-beta{beta}-C{c_shape}-{_tag(dtype, param_dtype)}-opset{opset}"
    return Case(name, g.build(opset=opset), int(trans_a == 0), np.dtype(dtype))


# ---------------------------------------------------------------------------------------------------
# float64 references (ONNX operator semantics), for exact comparisons


def conv_ref(x, w, b=None, *, strides=None, dilations=None, pads=None, groups: int = 1) -> np.ndarray:
    """ONNX Conv in float64. x (N, C, *S), w (O, C/G, *K), pads [begins..., ends...]."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    dims = x.ndim - 2
    kernel = w.shape[2:]
    strides = strides or [1] * dims
    dilations = dilations or [1] * dims
    pads = pads or [0] * (2 * dims)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[dims + i]) for i in range(dims)])
    n, c = x.shape[:2]
    o = w.shape[0]
    out = [(x.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(dims)]
    xg = x.reshape(n, groups, c // groups, *x.shape[2:])
    wg = w.reshape(groups, o // groups, c // groups, *kernel)
    y = np.zeros((n, groups, o // groups, *out))
    for tap in np.ndindex(*kernel):
        window = tuple(slice(tap[i] * dilations[i], tap[i] * dilations[i] + strides[i] * (out[i] - 1) + 1, strides[i])
                       for i in range(dims))
        patch = xg[(slice(None),) * 3 + window]
        y += np.einsum("ngc...,goc->ngo...", patch, wg[(slice(None),) * 3 + tap])
    y = y.reshape(n, o, *out)
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, o) + (1,) * dims)
    return y


def conv_transpose_ref(x, w, b=None, *, strides=None, dilations=None, pads=None, output_padding=None,
                       groups: int = 1) -> np.ndarray:
    """ONNX ConvTranspose in float64. x (N, C, *S), w (C, O/G, *K); output size
    stride * (S - 1) + output_padding + (K - 1) * dilation + 1 - pad_begin - pad_end."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    dims = x.ndim - 2
    kernel = w.shape[2:]
    strides = strides or [1] * dims
    dilations = dilations or [1] * dims
    pads = pads or [0] * (2 * dims)
    output_padding = output_padding or [0] * dims
    n, c = x.shape[:2]
    og = w.shape[1]
    size = x.shape[2:]
    full = [strides[i] * (size[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(dims)]
    xg = x.reshape(n, groups, c // groups, *size)
    wg = w.reshape(groups, c // groups, og, *kernel)
    y = np.zeros((n, groups, og, *full))
    for tap in np.ndindex(*kernel):
        window = tuple(slice(tap[i] * dilations[i], tap[i] * dilations[i] + strides[i] * (size[i] - 1) + 1, strides[i])
                       for i in range(dims))
        y[(slice(None),) * 3 + window] += np.einsum("ngc...,gco->ngo...", xg, wg[(slice(None),) * 3 + tap])
    y = y.reshape(n, groups * og, *full)
    crop = tuple(slice(pads[i], full[i] - pads[dims + i]) for i in range(dims))
    y = y[(slice(None), slice(None)) + crop]
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape((1, groups * og) + (1,) * dims)
    return y


def bn_ref(x, params: BNParams) -> np.ndarray:
    """Inference-mode BatchNormalization in float64, channel axis 1."""
    x = np.asarray(x, np.float64)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    gamma, beta, mean, var = (np.asarray(a, np.float64).reshape(shape) for a in params.arrays())
    return (x - mean) / np.sqrt(var + params.eps) * gamma + beta


# ---------------------------------------------------------------------------------------------------
# running and comparing on onnxruntime

TOLERANCE = {  # REFERENCE.md, "Verification tolerances", BN / affine folds: (rtol, atol before scaling)
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(np.float64): (1e-4, 1e-5),
    np.dtype(np.float16): (1e-2, 1e-2),
}


def ort_session(model: onnx.ModelProto, *, optimize: bool = False):
    """A CPU InferenceSession; `optimize=False` disables every graph optimization (for references)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """N(0, 1) data for every graph input that is not an initializer."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tt = value.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feeds


def run(model: onnx.ModelProto, feeds, *, optimize: bool = False) -> dict[str, np.ndarray]:
    session = ort_session(model, optimize=optimize)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def assert_close(actual, reference, dtype=None, *, what: str = "output") -> None:
    """|actual - reference| <= atol + rtol |reference| elementwise, REFERENCE.md fold tolerances for `dtype`."""
    actual = np.asarray(actual, np.float64)
    reference64 = np.asarray(reference, np.float64)
    rtol, atol = TOLERANCE[np.dtype(dtype or np.asarray(reference).dtype)]
    scale = max(1.0, float(np.sqrt(np.mean(np.square(reference64))))) if reference64.size else 1.0
    assert actual.shape == reference64.shape, f"{what}: shape {actual.shape} != {reference64.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    np.testing.assert_allclose(actual, reference64, rtol=rtol, atol=atol * scale, err_msg=what)


def assert_equivalent(reference: onnx.ModelProto, candidate: onnx.ModelProto, dtype, *, seed: int = 0) -> None:
    """Runs both on the same N(0, 1) inputs (reference unoptimized, candidate both ways) and compares."""
    feeds = random_feeds(reference, seed)
    expected = run(reference, feeds, optimize=False)
    for optimize in (False, True):
        got = run(candidate, feeds, optimize=optimize)
        assert list(got) == list(expected), f"outputs differ: {list(got)} vs {list(expected)}"
        for name in expected:
            assert_close(got[name], expected[name], dtype, what=f"output {name!r} (candidate optimize={optimize})")
