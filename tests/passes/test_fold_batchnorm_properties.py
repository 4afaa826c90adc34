"""Property tests of fold-batchnorm: random Conv / ConvTranspose / BatchNormalization stacks.

Hypothesis draws a stack of 1-5 layers (1-D, 2-D or 3-D; channels, kernels, strides, dilations,
asymmetric pads, output_padding, groups including depthwise; BN anywhere, with variance spanning
1e-6..1e3, gamma with zero and negative entries, epsilon in [1e-6, 1e-3]). Each model is converted
with normfold.convert (which itself verifies against the unoptimized original on onnxruntime), and
the folded model's onnxruntime output is compared with a float64 numpy evaluation of the original
stack (bn_graphs.conv_ref / conv_transpose_ref / bn_ref), on inputs N(0, 1) scaled by 1e-3, 1 or 1e3 or
shifted by +100 (fp16: 1e-3, 1, 1e2, +10), under REFERENCE.md's tolerances:
fp32 rtol 1e-4, atol 1e-5 * max(1, rms(reference)); fp16 rtol 1e-2, atol 1e-2 * scale.

Which BNs must fold is predicted independently: a BN whose chain of preceding BNs starts at a Conv
or ConvTranspose folds after it; a run of BNs at the graph input folds only into a following Conv
that reads no padding.

Example counts: 300 fp32 stacks + 100 fp16 layers in CI (about 10 s on 2 cores). Long mode: with
NORMFOLD_LONG=1 each property runs 10000 examples
(NORMFOLD_LONG=1 pytest tests/passes/test_fold_batchnorm_properties.py, several minutes).
A failure prints the falsifying example and a reproduction blob (@reproduce_failure).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import bn_graphs as bg
import normfold
from long_mode import examples
from bn_graphs import GraphBuilder
from normfold.io import from_proto

pytest.importorskip("onnxruntime")

COMMON = dict(deadline=None, derandomize=False, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FP32_EXAMPLES = examples(300)
FP16_EXAMPLES = examples(100)


@dataclass
class Layer:
    kind: str  # "conv", "convT" or "bn"
    cout: int = 0
    groups: int = 1
    kernel: tuple = ()
    strides: tuple = ()
    dilations: tuple = ()
    pads: tuple = ()
    output_padding: tuple = ()
    bias: bool = True


@dataclass
class Stack:
    dims: int
    batch: int
    cin: int
    size: tuple  # input spatial size
    layers: list
    seed: int
    var_lo: float
    eps: tuple  # one per BN

    def expected_folds(self) -> int:
        folds = 0
        kinds = [layer.kind for layer in self.layers]
        leading = 0
        while leading < len(kinds) and kinds[leading] == "bn":
            leading += 1
        if leading < len(kinds) and kinds[leading] == "conv" and not any(self.layers[leading].pads):
            folds += leading  # BN(s) at the input fold into a following unpadded Conv
        folds += kinds[leading:].count("bn")  # every later BN has a Conv/ConvTranspose behind its BN chain
        return folds


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_layer(draw, dims: int, cin: int, size: tuple, transpose: bool):
    """A Conv or ConvTranspose layer reading `cin` channels of spatial `size`, and its output size."""
    groups = draw(st.sampled_from(_divisors(cin)))
    cout = groups * draw(st.integers(1, max(1, 6 // groups)))
    zero_pads = not transpose and draw(st.booleans())  # unpadded convs can absorb a BN before them
    kernel, strides, dilations, begins, ends, output_padding, out = [], [], [], [], [], [], []
    for s in size:
        k = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        dilation = draw(st.integers(1, 2)) if k > 1 else 1
        if transpose:
            op = draw(st.integers(0, stride - 1))
            full = stride * (s - 1) + op + (k - 1) * dilation + 1
            pb = draw(st.integers(0, min(k - 1, (full - 1) // 2)))
            pe = draw(st.integers(0, min(k - 1, full - 1 - pb)))
            o = full - pb - pe
        else:
            op = 0
            pb, pe = (0, 0) if zero_pads else (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
            if s + pb + pe < (k - 1) * dilation + 1:  # keep at least one output position
                dilation = 1
            if s + pb + pe < (k - 1) * dilation + 1:
                k = 1
            o = (s + pb + pe - (k - 1) * dilation - 1) // stride + 1
        for seq, v in zip((kernel, strides, dilations, begins, ends, output_padding, out),
                          (k, stride, dilation, pb, pe, op, o)):
            seq.append(v)
    layer = Layer("convT" if transpose else "conv", cout, groups, tuple(kernel), tuple(strides), tuple(dilations),
                  tuple(begins + ends), tuple(output_padding), draw(st.booleans()))
    return layer, tuple(out)


MAX_SIZE = {1: 16, 2: 10, 3: 6}
"""Largest spatial extent any layer may produce (keeps every example at a few ms)."""

FP16_MIN_OUTPUT = 16
"""fp16 examples have at least this many output elements. Folding stores t = beta - s * mean and s * W
in fp16, so the folded model's error is about 2^-11 * (|t| + |s W x|), while the tolerance is relative
to rms(output). With a single output element that happens to sit near a zero crossing (rms 0.5,
|t| = 43) the error (0.02) exceeds the fp16 atol of 1e-2: a one-number rms is no scale. A tensor of
16+ elements gives the rms its meaning; the tolerance itself is unchanged."""


@st.composite
def fitting_layer(draw, kind: str, dims: int, cin: int, size: tuple):
    """A `kind` layer whose output is non-empty and within MAX_SIZE; a 1x1 Conv if none fits in 4 draws."""
    for _ in range(4):
        layer, out = draw(conv_layer(dims, cin, size, kind == "convT"))
        if all(1 <= o <= MAX_SIZE[dims] for o in out):
            return layer, out
    ones = (1,) * dims
    return Layer("conv", cin, 1, ones, ones, ones, (0,) * (2 * dims), (0,) * dims, draw(st.booleans())), size


@st.composite
def stacks(draw, fp16: bool = False):
    """1-5 layers with at least one Conv/ConvTranspose and at least one BN.

    fp16: a single Conv/ConvTranspose with a BN after or before it, so the folded scales stay in
    fp16's range.
    """
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    size = tuple(draw(st.integers(2, MAX_SIZE[dims] // 2 + 1)) for _ in range(dims))
    cin = draw(st.integers(1, 6))
    if fp16:
        conv = draw(st.sampled_from(["conv", "convT"]))
        kinds = ["bn", conv] if draw(st.booleans()) else [conv, "bn"]
    else:
        kinds = [draw(st.sampled_from(["conv", "conv", "convT", "bn", "bn"])) for _ in range(draw(st.integers(1, 4)))]
        if "bn" not in kinds:
            kinds.insert(draw(st.integers(0, len(kinds))), "bn")
        if kinds.count("bn") == len(kinds):
            kinds.insert(draw(st.integers(0, len(kinds))), draw(st.sampled_from(["conv", "convT"])))
    channels, cur, layers = cin, size, []
    for kind in kinds:
        if kind == "bn":
            layers.append(Layer("bn", channels))
            continue
        layer, cur = draw(fitting_layer(kind, dims, channels, cur))
        layers.append(layer)
        channels = layer.cout
    eps = tuple(draw(st.floats(1e-6, 1e-3)) for layer in layers if layer.kind == "bn")
    var_lo = draw(st.sampled_from([1e-6, 1e-4, 1e-2]))
    batch = draw(st.integers(1, 2))
    if fp16:  # at least FP16_MIN_OUTPUT elements (see FP16_MIN_OUTPUT)
        batch = max(batch, -(-FP16_MIN_OUTPUT // (channels * int(np.prod(cur)))))
    return Stack(dims, batch, cin, size, layers, draw(st.integers(0, 2**32 - 1)), var_lo, eps)


def build_stack(stack: Stack, dtype=np.float32):
    """The ONNX model of `stack` and a float64 function computing it from the stored parameters."""
    g = GraphBuilder(dtype=dtype, seed=stack.seed)
    x = g.input("x", [stack.batch, stack.cin, *stack.size])
    ops = []
    channels, eps = stack.cin, iter(stack.eps)
    for i, layer in enumerate(stack.layers):
        last = i == len(stack.layers) - 1
        out = "y" if last else None
        if layer.kind == "bn":
            params = bg.bn_params(g.rng, channels, dtype=dtype, var_range=(stack.var_lo, 1e3), eps=next(eps))
            x = g.bn(x, channels, params=params, output=out)
            ops.append(lambda v, p=params: bg.bn_ref(v, p))
            continue
        transpose = layer.kind == "convT"
        shape = ([channels, layer.cout // layer.groups] if transpose else [layer.cout, channels // layer.groups])
        w = g.random(shape + list(layer.kernel))
        b = g.random([layer.cout], scale=1.0) if layer.bias else None
        inputs = [x, g.init(g.fresh("W"), w)] + ([g.init(g.fresh("B"), b)] if b is not None else [])
        attrs = dict(kernel_shape=list(layer.kernel), strides=list(layer.strides), dilations=list(layer.dilations),
                     pads=list(layer.pads), group=layer.groups)
        if transpose:
            attrs["output_padding"] = list(layer.output_padding)
            x = g.node("ConvTranspose", inputs, outputs=[out] if out else None, **attrs)
            ops.append(lambda v, w=w, b=b, a=attrs: bg.conv_transpose_ref(
                v, w, b, strides=a["strides"], dilations=a["dilations"], pads=a["pads"],
                output_padding=a["output_padding"], groups=a["group"]))
        else:
            x = g.node("Conv", inputs, outputs=[out] if out else None, **attrs)
            ops.append(lambda v, w=w, b=b, a=attrs: bg.conv_ref(
                v, w, b, strides=a["strides"], dilations=a["dilations"], pads=a["pads"], groups=a["group"]))
        channels = layer.cout
    g.output("y")

    def reference(feed):
        v = np.asarray(feed, np.float64)
        for op in ops:
            v = op(v)
        return v

    return g.build(opset=17), reference


INPUT_SCALES = (1e-3, 1.0, 1e3, "+100")
"""The input x is N(0, 1) times 1e-3, 1 or 1e3, or N(0, 1) + 100 (shifted)."""
FP16_INPUT_SCALES = (1e-3, 1.0, 1e2, "+10")
"""fp16 inputs: the same, with 1e3 and +100 scaled down, as fp16 holds at most 65504; an input whose exact output
is beyond that anyway (a BN with variance 1e-6 multiplies by up to 1e3) is not an example (assume)."""


def scaled_input(x: np.ndarray, scale) -> np.ndarray:
    """x shifted ("+100") or multiplied by `scale`, rounded once to x's dtype."""
    x64 = x.astype(np.float64)
    return (x64 + float(scale[1:]) if isinstance(scale, str) else x64 * scale).astype(x.dtype)


def check_stack(stack: Stack, dtype, scale=1.0) -> None:
    proto, reference = build_stack(stack, dtype)
    n_bn = sum(layer.kind == "bn" for layer in stack.layers)
    # convert() verifies the folded model against the unoptimized original on onnxruntime itself
    model, report = normfold.convert(from_proto(proto), passes=["fold-batchnorm"], seed=stack.seed % 1000)
    folds = stack.expected_folds()
    event(f"{stack.dims}-D, {len(stack.layers)} layers, {folds} of {n_bn} BNs fold")
    for layer in stack.layers:
        if layer.kind != "bn":
            grouping = "dense" if layer.groups == 1 else "groups=C_out" if layer.groups == layer.cout else "grouped"
            event(f"{layer.kind} {grouping}")
    if stack.layers[0].kind == "bn" and folds == n_bn:
        event("BN before a Conv folded")
    assert report.passes[0].applied == folds, report.summary_lines()
    assert report.ops_after.get("BatchNormalization", 0) == n_bn - folds
    if folds:
        assert report.verification["passed"], report.verification
    folded = ir.serde.serialize_model(model)
    feeds = bg.random_feeds(proto, seed=stack.seed % 1000)
    feeds["x"] = scaled_input(feeds["x"], scale)
    event(f"input scale {scale}")
    exact = reference(feeds["x"])
    # an output beyond the dtype's range (BN scales up to 1e3 times a scaled input) has no representable answer
    assume(np.abs(exact).max() <= np.finfo(dtype).max / 4)
    got = bg.run(folded, feeds)["y"]
    bg.assert_close(got, exact, dtype, what="folded model vs float64 reference")


@settings(max_examples=FP32_EXAMPLES, **COMMON)
@given(stacks(), st.sampled_from(INPUT_SCALES))
def test_random_fp32_stacks_fold_exactly(stack, scale):
    check_stack(stack, np.float32, scale)


@settings(max_examples=FP16_EXAMPLES, **COMMON)
@given(stacks(fp16=True), st.sampled_from(FP16_INPUT_SCALES))
def test_random_fp16_conv_bn_folds_within_fp16_tolerance(stack, scale):
    check_stack(stack, np.float16, scale)


def test_expected_folds_rule():
    conv0 = Layer("conv", 4, pads=(0, 0))
    conv1 = Layer("conv", 4, pads=(1, 0))
    convt = Layer("convT", 4, pads=(0, 0))
    bn = Layer("bn", 4)

    def folds(*layers):
        return Stack(1, 1, 4, (5,), list(layers), 0, 1e-6, ()).expected_folds()

    assert folds(bn, conv0) == 1
    assert folds(bn, bn, conv0, bn) == 3
    assert folds(bn, conv1, bn) == 1
    assert folds(bn, convt, bn, bn) == 2
    assert folds(bn) == 0
    assert folds(conv1, bn, conv1, bn) == 2
