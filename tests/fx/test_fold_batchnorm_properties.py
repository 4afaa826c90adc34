"""fold-batchnorm on FX, property-based: random Conv/ConvTranspose/Linear shapes, groups, strides,
biases and BN statistics, folded and checked in float64 and float32 against the original."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import normfold.fx as nfx  # noqa: E402
from normfold.fx.verify import verify_module  # noqa: E402

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def conv_bn(draw):
    """(module, input) for a random conv/convtranspose/linear followed by a BN with random statistics."""
    kind = draw(st.sampled_from(["conv", "convtranspose", "linear"]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    bias = draw(st.booleans())
    if kind == "linear":
        fin, fout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        layer, dims, shape = nn.Linear(fin, fout, bias=bias), 1, (draw(st.integers(2, 4)), fin)
    else:
        dims = draw(st.integers(1, 3))
        groups = draw(st.sampled_from([1, 2, 3]))
        cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
        kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        cls = (_CONV if kind == "conv" else _CONVT)[dims]
        layer = cls(cin, cout, kernel, stride=stride, groups=groups, bias=bias)
        shape = (draw(st.integers(1, 2)), cin, *[draw(st.integers(kernel, kernel + 2)) for _ in range(dims)])
    channels = layer.out_features if kind == "linear" else layer.out_channels
    bn = _BN[dims](channels, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
        bn.running_mean.copy_(torch.randn(channels, generator=generator) * 3)
        bn.running_var.copy_(torch.rand(channels, generator=generator) * 4 + 1e-3)
        bn.weight.copy_(torch.randn(channels, generator=generator))
        bn.bias.copy_(torch.randn(channels, generator=generator))
    return nn.Sequential(layer, bn).eval(), torch.randn(shape, generator=generator)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=conv_bn(), capture=st.sampled_from(["symbolic_trace", "symbolic_trace", "export"]))
def test_random_producers_fold_exactly(case, capture):
    module, x = case
    gm, report = nfx.convert(module, (x,), ["fold-batchnorm"], capture=capture)
    assert report.passes[0].applied == 1, report.summary_lines()
    for dtype in (torch.float64, torch.float32):
        result = verify_module(module, gm, (x,), dtype=dtype)
        assert result.passed, result.summary_lines()
