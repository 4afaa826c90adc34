"""Modules the FX normalization passes emit, and the recentring kept in the forward pass for training.

CRMSNorm (Jiang et al. 2023): a zero-mean x in R^d stored as its first d-1 elements (x_d = -sum x_i):
    CRMSNorm(x) = x / sqrt((sum_i x_i^2 + (sum_i x_i)^2) / d + eps),
which is RMSNorm of the full vector, returned in the same d-1 storage.

Recentre is a torch.nn.utils.parametrize parametrization W -> W - mean(W, axis): a converted module
trained with it keeps every stream writer zero-mean (AdamW's element-wise update would otherwise put
a mean back, which the RMSNorms would see); `freeze` turns it into plain recentred weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class CRMSNorm(nn.Module):
    """Replaces LayerNorm of a zero-mean d-vector stored in d-1 dimensions (no affine: folded away)."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.width = width
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in fp32 at least
        square = wide.pow(2).sum(-1, keepdim=True) + wide.sum(-1, keepdim=True).pow(2)
        return (wide * torch.rsqrt(square / self.width + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.width}, eps={self.eps}"


class Recentre(nn.Module):
    """W -> W - mean(W, axis): a parametrization keeping a stream writer zero-mean while training."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - weight.mean(dim=self.axis, keepdim=True)


def is_trainable(module: nn.Module) -> bool:
    """True when some weight of `module` (or a submodule) is kept recentred by a parametrization."""
    return any(parametrize.is_parametrized(m) for m in module.modules())


def freeze(module: nn.Module) -> nn.Module:
    """Turns every Recentre parametrization into its plain recentred weight, in place (for inference
    and export); returns `module`."""
    for m in list(module.modules()):
        if parametrize.is_parametrized(m):
            # parametrize keeps each tensor's property on a generated class that a deep copy shares:
            # give this module its own, so removing the property leaves every copy working
            cls = type(m)
            own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, own)
            for name in list(m.parametrizations.keys()):
                if all(isinstance(p, Recentre) for p in m.parametrizations[name]):
                    parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return module
