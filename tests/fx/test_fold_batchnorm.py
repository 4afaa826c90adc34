"""fold-batchnorm on FX graphs: the project's CNNs, transformers CNNs, variants, and refusals."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import normfold.fx as nfx  # noqa: E402
from normfold.models import CNN_FACTORIES, build, example_inputs  # noqa: E402
from normfold.models.cnn import batchnorms, randomize_batchnorm  # noqa: E402

CAPTURES = ["symbolic_trace", "export"]
SMALL_CNNS = [name for name in CNN_FACTORIES if name != "resnet50"]


def inputs_of(name: str) -> tuple:
    return tuple(torch.from_numpy(x) for x in example_inputs(name))


def fold(module, inputs, capture="auto"):
    return nfx.convert(module, inputs, ["fold-batchnorm"], capture=capture)


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """`module` in eval mode with BN statistics and affine parameters drawn away from (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    for bn in batchnorms(module):
        randomize_batchnorm(bn, generator)
    return module.eval()


def skipped(report) -> list:
    return report.passes[0].skipped


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("name", SMALL_CNNS)
def test_project_cnns_fold_every_batchnorm(name, capture, fx_check):
    module = build(name)
    inputs = inputs_of(name)
    expected = len(batchnorms(module))
    before = fx_check.snapshot(module)
    gm, report = fold(module, inputs, capture)
    assert report.capture == ("torch.export" if capture == "export" else "symbolic_trace")
    assert report.passes[0].applied == expected > 0
    assert skipped(report) == []
    assert fx_check.batchnorms(gm) == 0
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    assert not any("running_mean" in key for key in gm.state_dict())
    assert report.verification["passed"]
    fx_check.equivalent(module, gm, inputs)
    fx_check.state_unchanged(module, before)


def _hf_resnet():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       layer_type="bottleneck", num_channels=3)
    return transformers.ResNetModel(config)


def _hf_mobilenet_v2():
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_channels=3)
    return transformers.MobileNetV2Model(config)


@pytest.mark.parametrize("factory", [_hf_resnet, _hf_mobilenet_v2], ids=["ResNetModel", "MobileNetV2Model"])
def test_transformers_cnns(factory, fx_check):
    torch.manual_seed(0)
    module = randomized(factory())
    expected = len(batchnorms(module))
    inputs = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
    before = fx_check.snapshot(module)
    gm, report = nfx.convert(module, inputs, ["fold-batchnorm"])
    assert report.capture == "torch.export" and report.capture_reason.startswith("symbolic_trace failed")
    assert report.passes[0].applied == expected > 0
    assert skipped(report) == [] and fx_check.batchnorms(gm) == 0
    fx_check.equivalent(module, gm, inputs)
    fx_check.state_unchanged(module, before)


class ConvBN(nn.Module):
    """conv -> bn, the conv given."""

    def __init__(self, conv: nn.Module, dims: int) -> None:
        super().__init__()
        self.conv = conv
        self.bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](self._out(conv))

    @staticmethod
    def _out(conv):
        return conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels

    def forward(self, x):
        return self.bn(self.conv(x))


VARIANTS = {
    "conv2d": (lambda: nn.Conv2d(8, 12, 3, padding=1), 2, (2, 8, 6, 6)),
    "conv2d-no-bias": (lambda: nn.Conv2d(8, 12, 3, bias=False), 2, (2, 8, 6, 6)),
    "conv2d-groups": (lambda: nn.Conv2d(8, 12, 3, stride=2, groups=4), 2, (2, 8, 7, 7)),
    "conv2d-depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), 2, (2, 8, 5, 5)),
    "conv1d-groups": (lambda: nn.Conv1d(8, 4, 3, groups=2, padding_mode="circular", padding=1), 1, (2, 8, 9)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 2, groups=2), 3, (1, 4, 3, 4, 4)),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2), 2, (2, 8, 4, 4)),
    "convtranspose2d-groups": (lambda: nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4, bias=False), 2, (2, 8, 4, 4)),
    "convtranspose2d-depthwise": (lambda: nn.ConvTranspose2d(6, 6, 2, groups=6, output_padding=1, stride=2), 2,
                                  (2, 6, 3, 3)),
    "convtranspose1d-groups": (lambda: nn.ConvTranspose1d(6, 9, 3, groups=3), 1, (2, 6, 5)),
    "convtranspose3d-groups": (lambda: nn.ConvTranspose3d(4, 6, 2, groups=2), 3, (1, 4, 2, 3, 3)),
    "linear": (lambda: nn.Linear(10, 7), 1, (5, 10)),
    "linear-no-bias": (lambda: nn.Linear(10, 7, bias=False), 1, (5, 10)),
}


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_fold(variant, capture, fx_check):
    make, dims, shape = VARIANTS[variant]
    torch.manual_seed(0)
    module = randomized(ConvBN(make(), dims))
    inputs = (torch.randn(shape),)
    gm, report = fold(module, inputs, capture)
    assert report.passes[0].applied == 1 and skipped(report) == []
    assert fx_check.batchnorms(gm) == 0
    fx_check.equivalent(module, gm, inputs)


def test_grouped_convtranspose_uses_per_group_scales():
    """pytorch 180995: scaling ConvTranspose weight axis 1 by s[:C_out/G] is wrong when G > 1."""
    torch.manual_seed(0)
    module = randomized(ConvBN(nn.ConvTranspose2d(4, 6, 1, groups=2, bias=False), 2))
    gm, _ = fold(module, (torch.randn(1, 4, 2, 2),))
    bn = module.bn
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    expected = module.conv.weight * s.reshape(2, 1, 3).repeat_interleave(2, dim=0).reshape(4, 3, 1, 1)
    torch.testing.assert_close(gm.conv.weight, expected, rtol=1e-6, atol=1e-7)


class ReusedConv(nn.Module):
    """One conv module called at two places (pytorch 104593), only the first followed by a BN."""

    def __init__(self, both: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4) if both else nn.Identity()

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn2(self.conv(x * 2))


@pytest.mark.parametrize("capture", CAPTURES)
def test_reused_conv_gets_a_folded_copy(capture, fx_check):
    torch.manual_seed(0)
    module = randomized(ReusedConv())
    inputs = (torch.randn(2, 3, 5, 5),)
    gm, report = fold(module, inputs, capture)
    assert report.passes[0].applied == 1 and fx_check.batchnorms(gm) == 0
    notes = report.passes[0].notes
    assert len(notes) == 1 and ("called at 2 places" in notes[0].reason or "also read" in notes[0].reason)
    fx_check.equivalent(module, gm, inputs)
    # the unfolded call site still reads the original weights
    originals = [p for p in gm.parameters() if torch.equal(p, module.conv.weight)]
    assert len(originals) == 1
    if capture == "symbolic_trace":
        assert torch.equal(gm.conv.weight, module.conv.weight)
        assert isinstance(gm.get_submodule("conv_bnfold"), nn.Conv2d)


def test_reused_conv_with_two_batchnorms_folds_both(fx_check):
    torch.manual_seed(0)
    module = randomized(ReusedConv(both=True))
    inputs = (torch.randn(2, 3, 5, 5),)
    gm, report = fold(module, inputs)
    assert report.passes[0].applied == 2 and fx_check.batchnorms(gm) == 0
    assert len(report.passes[0].notes) == 1  # the first site got a copy; the second then had the conv alone
    fx_check.equivalent(module, gm, inputs)


class SharedWeight(nn.Module):
    """Two convs sharing one weight Parameter; only the first is followed by a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


@pytest.mark.parametrize("capture", CAPTURES)
def test_shared_parameter_is_not_changed_under_its_other_user(capture, fx_check):
    torch.manual_seed(0)
    module = randomized(SharedWeight())
    inputs = (torch.randn(2, 3, 4, 4),)
    gm, report = fold(module, inputs, capture)
    assert report.passes[0].applied == 1
    assert any("shared" in n.reason or "also read" in n.reason for n in report.passes[0].notes)
    fx_check.equivalent(module, gm, inputs)
    if capture == "symbolic_trace":
        assert torch.equal(gm.b.weight, module.a.weight) and not torch.equal(gm.a.weight, module.a.weight)


def _refused(module, inputs, capture, fx_check, *reason_parts):
    before = fx_check.snapshot(module)
    gm, report = fold(module, inputs, capture)
    assert report.passes[0].applied == 0
    assert fx_check.batchnorms(gm) == report.ops_before.get("BatchNorm1d", 0) + report.ops_before.get(
        "BatchNorm2d", 0) + report.ops_before.get("aten.batch_norm", 0) > 0
    reasons = [s.reason for s in skipped(report)]
    assert len(reasons) == 1 and all(part in reasons[0] for part in reason_parts), reasons
    assert report.verification is None
    fx_check.state_unchanged(module, before)
    return gm, report


class SecondReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ConvAlsoOutput(SecondReader):
    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("cls", [SecondReader, ConvAlsoOutput])
def test_producer_read_by_another_node_is_refused(cls, capture, fx_check):
    torch.manual_seed(0)
    module = randomized(cls())
    inputs = (torch.randn(1, 3, 5, 5),)
    gm, _ = _refused(module, inputs, capture, fx_check, "is also read by")
    with torch.no_grad():
        for a, b in zip(torch.utils._pytree.tree_leaves(module(*inputs)), torch.utils._pytree.tree_leaves(gm(*inputs))):
            assert torch.equal(a, b)


@pytest.mark.parametrize("capture", CAPTURES)
def test_training_mode_batchnorm_is_refused(capture, fx_check):
    torch.manual_seed(0)
    module = randomized(ConvBN(nn.Conv2d(3, 4, 3), 2))
    module.bn.train()
    inputs = (torch.randn(4, 3, 5, 5),)
    gm, _ = _refused(module, inputs, capture, fx_check, "training mode")
    stats = module.bn.running_mean.clone()
    fx_check.unchanged_output(module, gm, inputs)
    assert not torch.equal(module.bn.running_mean, stats)  # really in training mode


@pytest.mark.parametrize("capture", CAPTURES)
def test_batchnorm_without_running_stats_is_refused(capture, fx_check):
    torch.manual_seed(0)
    module = ConvBN(nn.Conv2d(3, 4, 3), 2)
    module.bn = nn.BatchNorm2d(4, track_running_stats=False)
    module.eval()
    inputs = (torch.randn(4, 3, 5, 5),)
    gm, _ = _refused(module, inputs, capture, fx_check, "track_running_stats=False")
    fx_check.unchanged_output(module, gm, inputs)


class LinearBN3d(nn.Module):
    """Linear on (N, L, F) then BatchNorm1d(L): BN's channel axis 1 is the sequence, not the features."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.linear(x))


@pytest.mark.parametrize("capture", CAPTURES)
def test_linear_then_batchnorm1d_on_3d_input_is_refused(capture, fx_check):
    torch.manual_seed(0)
    module = randomized(LinearBN3d())
    module.linear = nn.Linear(6, 4)  # out_features == L: channel counts agree, the axes do not
    inputs = (torch.randn(2, 4, 6),)
    gm, _ = _refused(module, inputs, capture, fx_check, "rank-3", "not the Linear's output axis")
    fx_check.unchanged_output(module, gm, inputs)


class UnbatchedConv1d(nn.Module):
    """Conv1d on an unbatched (C, L) input; BN1d then normalizes over L, not over the conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 1)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("capture", CAPTURES)
def test_unbatched_conv_is_refused(capture, fx_check):
    torch.manual_seed(0)
    module = randomized(UnbatchedConv1d())
    inputs = (torch.randn(3, 6),)
    gm, _ = _refused(module, inputs, capture, fx_check, "unbatched")
    fx_check.unchanged_output(module, gm, inputs)


@pytest.mark.parametrize("capture", CAPTURES)
def test_batchnorm_after_a_nonlinear_op_is_refused(capture, fx_check):
    torch.manual_seed(0)
    module = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    inputs = (torch.randn(1, 3, 5, 5),)
    gm, _ = _refused(module, inputs, capture, fx_check, "not a Conv, ConvTranspose or Linear")
    fx_check.unchanged_output(module, gm, inputs)


@pytest.mark.parametrize("capture", CAPTURES)
def test_batchnorm_chain_and_graph_output(capture, fx_check):
    """conv -> bn -> bn, the last BN's output being the graph output; and a BN without affine."""
    torch.manual_seed(0)
    module = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    module.append(nn.BatchNorm2d(4, affine=False).eval())
    with torch.no_grad():
        module[2].running_var.uniform_(0.5, 2.0)
        module[2].running_mean.normal_()
    inputs = (torch.randn(2, 3, 5, 5),)
    gm, report = fold(module, inputs, capture)
    assert report.passes[0].applied == 2 and fx_check.batchnorms(gm) == 0
    (last,) = gm.graph.find_nodes(op="output")[0].all_input_nodes
    assert last.target in ("0", torch.ops.aten.conv2d.default)  # the folded conv is the graph output now
    fx_check.equivalent(module, gm, inputs)


class FunctionalBN(nn.Module):
    """A conv module followed by F.batch_norm on registered buffers (no bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return nn.functional.batch_norm(self.conv(x), self.mean, self.var, self.gamma, None, False, 0.1, 1e-3)


@pytest.mark.parametrize("capture", CAPTURES)
def test_functional_batch_norm_folds(capture, fx_check):
    torch.manual_seed(0)
    module = FunctionalBN().eval()
    inputs = (torch.randn(2, 3, 5, 5),)
    gm, report = fold(module, inputs, capture)
    assert report.passes[0].applied == 1 and fx_check.batchnorms(gm) == 0
    fx_check.equivalent(module, gm, inputs)


def test_float16_module_folds(fx_check):
    torch.manual_seed(0)
    module = randomized(ConvBN(nn.Conv2d(3, 4, 3), 2)).half()
    inputs = (torch.randn(2, 3, 5, 5).half(),)
    gm, report = fold(module, inputs)
    assert report.passes[0].applied == 1 and gm.conv.weight.dtype == torch.float16
    fx_check.equivalent(module, gm, inputs)
    result = nfx.verify_module(module, gm, inputs, dtype=None)
    assert result.passed and result.outputs[0].rtol == 1e-2  # float16 tolerances


def test_folded_weights_overflowing_float16_are_refused(fx_check):
    torch.manual_seed(0)
    module = ConvBN(nn.Conv2d(3, 4, 3), 2).eval()
    with torch.no_grad():
        module.bn.running_var.fill_(1e-10)
        module.bn.weight.fill_(10.0)
        module.conv.weight.mul_(1e3)
    module.bn.eps = 1e-12
    module = module.half()
    inputs = (torch.randn(1, 3, 5, 5).half(),)
    gm, _ = _refused(module, inputs, "symbolic_trace", fx_check, "folded weights of conv (Conv2d) overflow float16")
    fx_check.unchanged_output(module, gm, inputs)


class SharedBatchNorm(nn.Module):
    """One BN module applied after two different convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) * self.bn(self.b(x))


@pytest.mark.parametrize("capture", CAPTURES)
def test_batchnorm_module_used_twice_folds_into_both_convs(capture, fx_check):
    torch.manual_seed(0)
    module = randomized(SharedBatchNorm())
    inputs = (torch.randn(2, 3, 4, 4),)
    gm, report = fold(module, inputs, capture)
    assert report.passes[0].applied == 2 and fx_check.batchnorms(gm) == 0
    assert not any("running_var" in key for key in gm.state_dict())
    fx_check.equivalent(module, gm, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("capture", CAPTURES)
def test_resnet50_folds_every_batchnorm(capture, fx_check):
    module = build("resnet50")
    inputs = inputs_of("resnet50")
    gm, report = fold(module, inputs, capture)
    assert report.passes[0].applied == len(batchnorms(module)) == 53
    assert fx_check.batchnorms(gm) == 0
    fx_check.equivalent(module, gm, inputs)


@pytest.mark.parametrize("capture", CAPTURES)
def test_frozen_weights_stay_frozen(capture):
    torch.manual_seed(0)
    module = randomized(ConvBN(nn.Conv2d(3, 4, 3), 2))
    module.conv.weight.requires_grad_(False)
    gm, report = fold(module, (torch.randn(1, 3, 5, 5),), capture)
    assert report.passes[0].applied == 1
    grads = {name.rpartition(".")[2]: p.requires_grad for name, p in gm.named_parameters()}
    assert grads == {"weight": False, "bias": True}
