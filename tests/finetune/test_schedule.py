"""The removal schedule (published order and steps, scaled) and the recipe (lr, optimizer, aux loss)."""

from __future__ import annotations

import math

import pytest
import torch

from normfold.finetune.gpt2 import NormSite
from normfold.finetune.schedule import Recipe, RemovalSchedule, aux_loss


def _sites(layers):
    found = [NormSite(f"mlp{i}", "mlp", i) for i in range(layers)]
    found += [NormSite(f"qk{i}", "qk", i) for i in range(layers)]
    found += [NormSite(f"v{i}", "v", i) for i in range(layers)]
    return [*found, NormSite("final", "final", None)]


def test_published_gpt2_small_schedule():
    when = RemovalSchedule().steps_for(_sites(12))
    assert [when[f"mlp{i}"] for i in range(12)] == list(range(20, 43, 2))
    assert [when[f"qk{i}"] for i in range(12)] == list(range(44, 67, 2))
    assert [when[f"v{i}"] for i in range(12)] == list(range(68, 102, 3))
    assert when["final"] == 104


def test_scaled_schedule_keeps_the_published_one_and_its_order():
    assert RemovalSchedule.scaled(300, 12) == RemovalSchedule()
    sites = _sites(4)
    when = RemovalSchedule.scaled(400, 4).steps_for(list(reversed(sites)))
    steps = [when[s.name] for s in sites]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # MLP, then q/k, then v, then final
    assert steps[0] == round(400 * 20 / 300)
    assert steps[-1] <= 400 * 104 / 300 + 1


def test_lr_warmup_then_cosine():
    recipe = Recipe(lr_max=1e-3, lr_min=1e-4, warmup=10)
    assert recipe.lr(0, 100) == pytest.approx(1e-4)
    assert recipe.lr(9, 100) == pytest.approx(1e-3)
    assert recipe.lr(99, 100) == pytest.approx(1e-4)
    middle = 10 + (99 - 10) / 2
    assert recipe.lr(int(middle), 100) == pytest.approx(5.5e-4, rel=0.03)
    lrs = [recipe.lr(s, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = Recipe(weight_decay=0.01).optimizer(model)
    decay, other = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and [p.ndim for p in decay["params"]] == [2]
    assert other["weight_decay"] == 0.0 and all(p.ndim == 1 for p in other["params"])
    assert isinstance(optimizer, torch.optim.AdamW)


def test_aux_loss_is_zero_at_the_calibrated_std_and_ignores_position0():
    x = torch.randn(2, 5, 16)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True) * 3.0
    x[:, 0] *= 100
    sigma = torch.tensor(math.sqrt(9.0 + 1e-5))
    assert float(aux_loss(x, sigma, 1e-5)) == pytest.approx(0.0, abs=1e-10)
    x[:, 2] *= 2  # one of the 4 tokens after position 0 at twice the scale: (2 - 1)^2 / 4
    assert float(aux_loss(x, sigma, 1e-5)) == pytest.approx(0.25, rel=1e-4)
