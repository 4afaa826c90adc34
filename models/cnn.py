"""Seeded torch models whose BatchNorm layers make folding non-trivial.

Every factory is ``fn(seed=0, **size_kwargs) -> torch.nn.Module`` and returns
a module in eval mode; ``fn.input_shapes`` holds its example input shapes
(size kwargs never change them). Weights come from torch's default
initialisers run under ``seed``; BatchNorm statistics and affine parameters
are then redrawn so that some channels have tiny or huge variance and
negative or zero gamma, and producer weights are rescaled so activations stay
O(1). The global torch RNG is left untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def seeded(*input_shapes: tuple[int, ...]) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Turn ``build(**size_kwargs)`` into a seeded, eval-mode factory.

    ``input_shapes`` are the example input shapes for the default sizes; they
    are kept as ``factory.input_shapes`` and drive the calibration pass.
    """

    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        @functools.wraps(build)
        def factory(seed: int = 0, **size_kwargs: Any) -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = build(**size_kwargs).eval()
            generator = torch.Generator().manual_seed(seed)
            for bn in batchnorms(module):
                randomize_batchnorm(bn, generator)
            calibration = [torch.randn(shape, generator=generator) for shape in input_shapes]
            normalize_preactivations(module, calibration)
            return module

        del factory.__wrapped__  # the factory's signature is (seed, **size_kwargs)
        factory.input_shapes = input_shapes
        return factory

    return decorate


def batchnorms(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm1d/2d/3d submodules of ``module``, in definition order."""
    return [m for m in module.modules() if isinstance(m, _BATCHNORMS)]


@torch.no_grad()
def randomize_batchnorm(bn: nn.Module, generator: torch.Generator) -> None:
    """Draw running stats and affine params; mark a few extreme channels.

    running_mean ~ N(0, 0.5) and running_var ~ U(0.2, 2); then, over a random
    permutation of the channels, one eighth (at least one) get their variance
    scaled by 1e-2, one eighth by 1e2, one eighth a negated gamma and one
    channel gamma = 0.
    """
    c = bn.num_features
    mean = torch.randn(c, generator=generator) * 0.5
    var = torch.empty(c).uniform_(0.2, 2.0, generator=generator)
    gamma = torch.empty(c).uniform_(0.5, 1.5, generator=generator)
    beta = torch.randn(c, generator=generator) * 0.2
    perm = torch.randperm(c, generator=generator)
    k = max(1, c // 8)
    var[perm[:k]] *= 1e-2
    var[perm[k : 2 * k]] *= 1e2
    gamma[perm[2 * k : 3 * k]] *= -1.0
    gamma[perm[3 * k : 3 * k + 1]] = 0.0
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.copy_(gamma)
    bn.bias.copy_(beta)


def _layer_bn_pairs(module: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(predecessor, bn) for every BN that directly follows a layer in an nn.Sequential."""
    pairs = []
    for seq in module.modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq)
            pairs += [(a, b) for a, b in zip(children, children[1:]) if isinstance(b, _BATCHNORMS)]
    return pairs


@torch.no_grad()
def normalize_preactivations(module: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """Rescale each BN's producing layer so the BN input has unit RMS.

    Random running statistics do not match the real activations, so without
    this the residual nets' outputs grow geometrically with depth (ResNet-50
    reached ~1e10). One eval forward pass on ``inputs`` divides each
    producer's weight and bias by the RMS its BN sees, in network order.
    """
    pairs = _layer_bn_pairs(module)
    if len(pairs) != len(batchnorms(module)):
        raise ValueError("every BatchNorm must directly follow its conv/linear in an nn.Sequential")

    def pre_hook(layer: nn.Module) -> Callable[[nn.Module, tuple[torch.Tensor]], tuple[torch.Tensor]]:
        def hook(_bn: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
            scale = args[0].pow(2).mean().sqrt().clamp_min(1e-12)
            layer.weight.div_(scale)
            if layer.bias is not None:
                layer.bias.div_(scale)
            return (args[0] / scale,)

        return hook

    handles = [bn.register_forward_pre_hook(pre_hook(layer)) for layer, bn in pairs]
    try:
        module(*inputs)
    finally:
        for handle in handles:
            handle.remove()


def _conv_bn(conv: nn.Module, bn: nn.Module, act: nn.Module | None) -> nn.Sequential:
    layers = [conv, bn] if act is None else [conv, bn, act]
    return nn.Sequential(*layers)


def _conv2d_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return _conv_bn(conv, nn.BatchNorm2d(cout), None if act is None else act())


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (strided) -> 1x1, plus shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv2d_bn(cin, width, 1),
            _conv2d_bn(width, width, 3, stride),
            _conv2d_bn(width, cout, 1, act=None),
        )
        needs_projection = stride != 1 or cin != cout
        self.shortcut = _conv2d_bn(cin, cout, 1, stride, act=None) if needs_projection else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _resnet(
    stem: nn.Module, cin: int, widths: Sequence[int], blocks: Sequence[int], expansion: int, num_classes: int
) -> nn.Sequential:
    layers = [stem]
    for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(Bottleneck(cin, width, width * expansion, stride))
            cin = width * expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


@seeded((1, 3, 32, 32))
def resnet_like(
    widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (1, 2, 1), expansion: int = 2, num_classes: int = 10
) -> nn.Module:
    """Small bottleneck ResNet for 1x3x32x32 inputs (3x3 stem, no max-pool)."""
    stem = _conv2d_bn(3, widths[0], 3)
    return _resnet(stem, widths[0], widths, blocks, expansion, num_classes)


@seeded((1, 3, 224, 224))
def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 layout (bottlenecks 3-4-6-3, widths 64..2048) for 1x3x224x224."""
    stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    )
    return _resnet(stem, 64, (64, 128, 256, 512), (3, 4, 6, 3), 4, num_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv2d_bn(cin, hidden, 1, act=nn.ReLU6)]
        layers += [
            _conv2d_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            _conv2d_bn(hidden, cout, 1, act=None),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


@seeded((1, 3, 32, 32))
def mobilenet_like(
    stem_width: int = 16,
    settings: Sequence[tuple[int, int, int, int]] = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2)),
    last_width: int = 64,
    num_classes: int = 10,
) -> nn.Module:
    """MobileNetV2-style net for 1x3x32x32; settings are (expand, out, repeats, stride)."""
    layers = [_conv2d_bn(3, stem_width, 3, 2, act=nn.ReLU6)]
    cin = stem_width
    for expand, cout, repeats, stride in settings:
        for i in range(repeats):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += [
        _conv2d_bn(cin, last_width, 1, act=nn.ReLU6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(last_width, num_classes),
    ]
    return nn.Sequential(*layers)


@seeded((1, 32, 4, 4))
def convtranspose_decoder(channels: Sequence[int] = (32, 16, 16, 8)) -> nn.Module:
    """Decoder for 1x32x4x4 latents: grouped, strided ConvTranspose2d + BN.

    ``channels`` are the four layers' outputs; their groups are 2, 4, 1 and 8
    (the last with output_padding and dilation). Output is 1x8x32x32.
    """
    c1, c2, c3, c4 = channels
    convs = [
        nn.ConvTranspose2d(32, c1, 4, stride=2, padding=1, groups=2),
        nn.ConvTranspose2d(c1, c2, 4, stride=2, padding=1, groups=4, bias=False),
        nn.ConvTranspose2d(c2, c3, 3, stride=1, padding=1),
        nn.ConvTranspose2d(c3, c4, 3, stride=2, padding=2, output_padding=1, dilation=2, groups=8),
    ]
    layers = []
    for i, conv in enumerate(convs):
        last = i == len(convs) - 1
        layers.append(_conv_bn(conv, nn.BatchNorm2d(conv.out_channels), None if last else nn.ReLU()))
    return nn.Sequential(*layers)


@seeded((4, 32))
def mlp_bn(hidden: Sequence[int] = (64, 48), out_features: int = 10) -> nn.Module:
    """MLP on (4, 32) inputs: Linear + BatchNorm1d (+ ReLU), the last without ReLU."""
    sizes = [32, *hidden, out_features]
    layers = []
    for i, (fin, fout) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        linear = nn.Linear(fin, fout, bias=i % 2 == 0)
        layers.append(_conv_bn(linear, nn.BatchNorm1d(fout), None if last else nn.ReLU()))
    return nn.Sequential(*layers)


@seeded((2, 4, 64))
def conv1d_bn(channels: int = 16) -> nn.Module:
    """Conv1d + BN stack on (2, 4, 64): plain, strided/dilated/grouped, depthwise."""
    c = channels
    return nn.Sequential(
        _conv_bn(nn.Conv1d(4, c, 5, padding=2), nn.BatchNorm1d(c), nn.ReLU()),
        _conv_bn(
            nn.Conv1d(c, c, 3, stride=2, padding=2, dilation=2, groups=4, bias=False),
            nn.BatchNorm1d(c),
            nn.ReLU(),
        ),
        _conv_bn(nn.Conv1d(c, c, 3, padding=1, groups=c), nn.BatchNorm1d(c), None),
    )


@seeded((1, 2, 8, 12, 12))
def conv3d_bn(channels: int = 8, out_channels: int = 12) -> nn.Module:
    """Conv3d + BN stack on (1, 2, 8, 12, 12): plain, strided/dilated/grouped, 1x1x1."""
    c = channels
    return nn.Sequential(
        _conv_bn(nn.Conv3d(2, c, 3, padding=1, bias=False), nn.BatchNorm3d(c), nn.ReLU()),
        _conv_bn(
            nn.Conv3d(c, c, 3, stride=(1, 2, 2), padding=(1, 2, 2), dilation=(1, 2, 2), groups=2),
            nn.BatchNorm3d(c),
            nn.ReLU(),
        ),
        _conv_bn(nn.Conv3d(c, out_channels, 1), nn.BatchNorm3d(out_channels), None),
    )
