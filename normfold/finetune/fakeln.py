"""FakeLN: a LayerNorm whose per-token scale is replaced by a calibrated constant.

    LN(x)_t     = (x_t - mean(x_t)) / sqrt(var(x_t) + eps) * gamma + beta
    FakeLN(x)_t = (x_t - mean(x_t)) / sigma_t * gamma + beta,   sigma_t = sigma0 if t == 0 else sigma

sigma is the average over calibration tokens of sqrt(var(x_t) + eps) at positions t >= 1 and sigma0
the same average at position 0 (whose std differs: no context, attention sink). FakeLN is linear in x,
so it can be folded into the linears that read it (see fold.py). It equals LN exactly on every token
whose std equals its calibrated value.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SwitchableNorm(nn.Module):
    """Replaces a LayerNorm with one that computes either the real LayerNorm or FakeLN."""

    def __init__(self, ln: nn.LayerNorm, *, copy: bool = False) -> None:
        super().__init__()
        if len(ln.normalized_shape) != 1 or not ln.elementwise_affine:
            raise ValueError("only a LayerNorm over the last axis with gamma is supported")
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = float(ln.eps)
        self.weight = nn.Parameter(ln.weight.detach().clone()) if copy else ln.weight
        bias = ln.bias
        self.bias = nn.Parameter(bias.detach().clone()) if copy and bias is not None else bias
        self.register_buffer("sigma", torch.tensor(float("nan")))
        self.register_buffer("sigma0", torch.tensor(float("nan")))
        self.register_buffer("fake", torch.tensor(False))

    @property
    def is_fake(self) -> bool:
        return bool(self.fake)

    def set_scale(self, sigma: float, sigma0: float) -> None:
        """Stores the calibrated std (positions >= 1) and the one of position 0."""
        self.sigma.fill_(sigma)
        self.sigma0.fill_(sigma0)

    def make_fake(self) -> None:
        """Switches to FakeLN; the scale must have been calibrated."""
        if not (torch.isfinite(self.sigma) and torch.isfinite(self.sigma0)):
            raise RuntimeError("FakeLN needs a calibrated scale (calibration.calibrate)")
        self.fake.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        centred = x - x.mean(dim=-1, keepdim=True)
        positions = torch.arange(x.shape[-2], device=x.device)
        inverse = torch.where(positions == 0, 1.0 / self.sigma0, 1.0 / self.sigma).to(x.dtype)
        out = centred * inverse[:, None] * self.weight
        return out if self.bias is None else out + self.bias


class SplitQKV(nn.Module):
    """Replaces a fused q/k/v Conv1D read through one LN with two norms: one for q,k and one for v.

    out = [norm_qk(x) W[:, :2d] + b[:2d],  norm_v(x) W[:, 2d:] + b[2d:]]   (Conv1D layout, y = x W + b)
    With both norms real and equal this is exactly the original c_attn(ln_1(x)).
    """

    def __init__(self, ln: nn.LayerNorm, linear: nn.Module) -> None:
        super().__init__()
        self.norm_qk = SwitchableNorm(ln, copy=True)
        self.norm_v = SwitchableNorm(ln, copy=True)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        split = 2 * (weight.shape[1] // 3)
        qk = self.norm_qk(x) @ weight[:, :split] + bias[:split]
        v = self.norm_v(x) @ weight[:, split:] + bias[split:]
        return torch.cat([qk, v], dim=-1)
