"""Per-norm average per-token std over calibration batches, measured with forward pre-hooks.

For each norm with input x (batch, seq, d) and epsilon eps, the per-token std is
    s_bt = sqrt(mean_i (x_bti - mean_i x_bti)^2 + eps)
(exactly the divisor LayerNorm uses). sigma = mean of s_bt over every token at position t >= 1 and
sigma0 = mean over position 0, both accumulated in float64 over all batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class NormStats:
    """Calibrated scales of one norm: sigma (positions >= 1), sigma0 (position 0), tokens seen."""

    sigma: float
    sigma0: float
    tokens: int


def token_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    """sqrt(var(x_t) + eps) per token (biased variance over the last axis, as LayerNorm)."""
    return torch.sqrt(x.var(dim=-1, unbiased=False) + eps)


@torch.no_grad()
def measure(model: nn.Module, batches: Iterable[torch.Tensor], norms: Mapping[str, nn.Module]) -> dict[str, NormStats]:
    """Runs `model(batch)` for every batch and returns each norm's NormStats."""
    sums = {name: [0.0, 0.0, 0, 0] for name in norms}  # sum rest, sum pos0, count rest, count pos0
    handles = []

    def hook(name: str, eps: float):
        def record(_module: nn.Module, args: tuple) -> None:
            std = token_std(args[0].double(), eps)
            acc = sums[name]
            acc[0] += float(std[..., 1:].sum())
            acc[1] += float(std[..., 0].sum())
            acc[2] += std[..., 1:].numel()
            acc[3] += std[..., 0].numel()
        return record

    for name, module in norms.items():
        handles.append(module.register_forward_pre_hook(hook(name, float(module.eps))))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stats = {}
    for name, (rest, first, n_rest, n_first) in sums.items():
        if n_first == 0:
            raise ValueError("calibration needs at least one batch")
        sigma0 = first / n_first
        stats[name] = NormStats(sigma=rest / n_rest if n_rest else sigma0, sigma0=sigma0, tokens=n_rest + n_first)
    return stats


def calibrate(
    model: nn.Module, batches: Iterable[torch.Tensor], norms: Mapping[str, nn.Module], *, position0: str = "separate"
) -> dict[str, NormStats]:
    """Measures the norms and stores the scales in them (SwitchableNorm.set_scale).

    position0 "separate" keeps position 0's own scale; "shared" uses sigma for every position.
    """
    if position0 not in ("separate", "shared"):
        raise ValueError(f"position0 must be 'separate' or 'shared', got {position0!r}")
    stats = measure(model, batches, norms)
    for name, s in stats.items():
        norms[name].set_scale(s.sigma, s.sigma0 if position0 == "separate" else s.sigma)
    return stats
