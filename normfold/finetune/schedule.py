"""The removal schedule and the optimisation recipe of LayerNorm removal (REFERENCE.md, Baroni et al. 2025).

Removal order: every MLP-input LN layer by layer, then the attention q/k LNs, then the v LNs, then the
final LN. Norm k (in that order) becomes FakeLN at step start + sum of the gaps before it, the gap being
that of the previous norm's stage. The published GPT-2 small schedule (12 layers) is start 20, gaps
2 / 2 / 3: MLP at 20..42, q/k at 44..66, v at 68..101, final at 104, of roughly 300 steps.

Recipe: AdamW (weight decay on matrices only), linear warmup to lr_max, then cosine to lr_min at the
last step; loss = cross-entropy + aux_weight * aux, where aux = mean over tokens t >= 1 of
(s_t / sigma_f - 1)^2, s_t the per-token std at the final norm's input and sigma_f its calibrated
scale: it keeps the final norm's input scale where FakeLN assumes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from normfold.finetune.gpt2 import STAGES, NormSite

PUBLISHED_STEPS = 300
"""About how many steps the published GPT-2 small run takes (157M tokens at ~0.5M tokens per step)."""


@dataclass(frozen=True)
class RemovalSchedule:
    """When each norm becomes FakeLN: start step and the gap after each norm of a stage."""

    start: int = 20
    gap_mlp: int = 2
    gap_qk: int = 2
    gap_v: int = 3

    @classmethod
    def scaled(cls, steps: int, layers: int) -> RemovalSchedule:
        """The published schedule stretched to `steps` steps and `layers` layers.

        The start and the final norm's removal keep their published fractions of the run (20/300 and
        104/300); the steps between are shared among the 3 * layers gaps in the published 2:2:3 ratio.
        A run too short for that removes one norm per step, ending before the last step.
        """
        start = round(steps * 20 / PUBLISHED_STEPS)
        unit = (round(steps * 104 / PUBLISHED_STEPS) - start) // (7 * layers)
        if unit >= 1:
            return cls(start=start, gap_mlp=2 * unit, gap_qk=2 * unit, gap_v=3 * unit)
        if steps < 3 * layers + 1:
            raise ValueError(f"{steps} steps are too few to remove {3 * layers + 1} norms one step apart")
        return cls(start=min(start, steps - 1 - 3 * layers), gap_mlp=1, gap_qk=1, gap_v=1)

    def steps_for(self, sites: list[NormSite]) -> dict[str, int]:
        """Site name -> the step at which it becomes FakeLN (sites in removal order)."""
        gaps = {"mlp": self.gap_mlp, "qk": self.gap_qk, "v": self.gap_v, "final": 0}
        order = sorted(sites, key=lambda s: (STAGES.index(s.stage), s.layer or 0))
        when, step = {}, self.start
        for site in order:
            when[site.name] = step
            step += gaps[site.stage]
        return when

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings (published GPT-2 small values by default)."""

    lr_max: float = 6e-4
    lr_min: float = 3e-4
    warmup: int = 25
    weight_decay: float = 0.01
    aux_weight: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0

    def lr(self, step: int, steps: int) -> float:
        """Linear warmup over `warmup` steps, then cosine from lr_max to lr_min at step `steps` - 1."""
        if step < self.warmup:
            return self.lr_max * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, steps - 1 - self.warmup)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(math.pi * min(1.0, progress)))

    def optimizer(self, model: nn.Module) -> torch.optim.AdamW:
        """AdamW with weight decay on parameters of rank >= 2 only (not on biases, gains, positions' 1-D)."""
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": other, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.lr_max, betas=self.betas)

    def to_dict(self) -> dict:
        return asdict(self)


def aux_loss(x: torch.Tensor, sigma: torch.Tensor, eps: float) -> torch.Tensor:
    """mean over tokens t >= 1 of (sqrt(var(x_t) + eps) / sigma - 1)^2 (see the module docstring)."""
    std = torch.sqrt(x[..., 1:, :].var(dim=-1, unbiased=False) + eps)
    return ((std / sigma - 1.0) ** 2).mean()
