"""Pre-RMSNorm keeps training like the Pre-LN original (Jiang et al. 2023, Sec. 3.5), in float64.

With `trainable=True` layernorm-to-rmsnorm keeps every writer's recentring in the forward pass (a
Recentre parametrization): the same SGD and AdamW steps on the same data give the same losses. A
one-off recentring (plain weights) is not enough: the RMSNorm model's gradients are not zero-mean
and AdamW's element-wise update adds a mean on top, so its losses drift. `freeze` then yields plain
recentred weights computing what the parametrized module computes.
"""

import copy
import os
import sys

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from normfold.fx import layernorm_to_rmsnorm as rms  # noqa: E402
from normfold.fx.modules import Recentre, freeze, is_trainable  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import transformer_cases as tc  # noqa: E402

STEPS = 5
VOCAB = 101


def _optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _train(model: nn.Module, optimizer: str) -> list[float]:
    """Losses of STEPS next-token steps on seeded batches (the same for every model)."""
    opt = _optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
    generator = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (2, 8), generator=generator)
        targets = torch.randint(0, VOCAB, (2, 8), generator=generator)
        loss = nn.functional.cross_entropy(model(ids).reshape(-1, VOCAB), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _converted(base: nn.Module, name: str, trainable: bool):
    args = tc.inputs(name)
    gm = tc.export(copy.deepcopy(base), args)
    applied, report = tc.run_pass(rms, gm, args, trainable=trainable)
    assert applied == 5 and report.skipped == []
    return gm, args


def _gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tiny_gpt():
    return tc.build("tiny_gpt")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_parametrized_conversion_trains_identically(tiny_gpt, optimizer):
    reference = _train(copy.deepcopy(tiny_gpt), optimizer)
    gm, _ = _converted(tiny_gpt, "tiny_gpt", trainable=True)
    assert is_trainable(gm)
    assert _gap(_train(gm, optimizer), reference) < 1e-10
    assert reference[0] != reference[-1]  # the steps did change the model


def test_one_off_recentring_drifts_under_adamw(tiny_gpt):
    """The negative control: the same conversion without the parametrization."""
    reference = _train(copy.deepcopy(tiny_gpt), "adamw")
    gm, _ = _converted(tiny_gpt, "tiny_gpt", trainable=False)
    assert not is_trainable(gm)
    losses = _train(gm, "adamw")
    assert abs(losses[0] - reference[0]) < 1e-10  # equivalent before training...
    assert _gap(losses, reference) > 1e-2  # ...not after


def test_tied_table_stays_tied_and_freeze_gives_plain_weights(tiny_gpt):
    gm, args = _converted(tiny_gpt, "tiny_gpt", trainable=True)
    embedding = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default
                     and n.meta["val"].shape[0] == 2)
    head = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    assert embedding.args[0].target == head.args[1].target  # tied table: centred by an explicit op instead
    assert any(n.target is torch.mean for n in gm.graph.nodes)
    recentred = [m for m in gm.modules() if parametrize.is_parametrized(m)]
    assert recentred and all(isinstance(p, Recentre) for m in recentred for ps in m.parametrizations.values()
                             for p in ps)
    _train(gm, "adamw")
    frozen = freeze(copy.deepcopy(gm))
    assert not is_trainable(frozen)
    tc.assert_equivalent(gm, frozen, args)
    for module in recentred:  # trained, and still zero-mean along each writer's output axis
        for name in module.parametrizations:
            original = module.parametrizations[name].original
            axis = module.parametrizations[name][0].axis
            assert original.mean(axis).abs().max() > 1e-6
    for name, param in frozen.named_parameters():
        if "proj" in name:
            axis = 0
            assert param.mean(axis).abs().max() < 1e-12, name


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_gpt2_tied_trains_identically(optimizer):
    pytest.importorskip("transformers")
    base = tc.build("gpt2_tied")
    reference = _train(copy.deepcopy(base), optimizer)
    gm, _ = _converted(base, "gpt2_tied", trainable=True)
    assert _gap(_train(gm, optimizer), reference) < 1e-10


def test_through_convert_with_the_trainable_pass(tiny_gpt):
    """normfold.fx.convert(module, inputs, [layernorm_to_rmsnorm.TRAINABLE]): verified, trainable."""
    import normfold.fx as nfx

    gm, report = nfx.convert(tiny_gpt, tc.inputs("tiny_gpt"), [rms.TRAINABLE])
    assert report.passes[0].name == "layernorm-to-rmsnorm" and report.passes[0].applied == 5
    assert report.verification["passed"] and is_trainable(gm)
    assert _gap(_train(gm, "adamw"), _train(copy.deepcopy(tiny_gpt), "adamw")) < 1e-10


def test_for_training_selects_the_trainable_forms(tiny_gpt):
    """convert(..., for_training=True): by name or by default, the trainable pass; a pass without a
    trainable form (folding gamma, or a BatchNorm, changes how the model trains) is refused."""
    import normfold.fx as nfx
    from normfold.errors import InputError

    for passes in (None, ["layernorm-to-rmsnorm"]):
        gm, report = nfx.convert(tiny_gpt, tc.inputs("tiny_gpt"), passes, for_training=True)
        assert [p.name for p in report.passes] == ["layernorm-to-rmsnorm"] and is_trainable(gm)
    for name in ("fold-norm-affine", "fold-batchnorm", "layernorm-to-crmsnorm"):
        with pytest.raises(InputError, match=f"{name}.*no trainable form"):
            nfx.convert(tiny_gpt, tc.inputs("tiny_gpt"), [name], for_training=True)


class _WithDropout(tc.TracedPreLN):
    """Branch outputs through nn.Dropout(0.1) before the residual sums."""

    def __init__(self):
        super().__init__(tied=False)
        self.drop = nn.Dropout(0.1)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe
        for ln, fc, proj in zip(self.lns, self.fcs, self.projs):
            x = x + self.drop(proj(nn.functional.gelu(fc(ln(x)))))
        return self.head(self.ln_f(x))


def test_dropout_in_the_stream_refuses_the_trainable_conversion_only():
    """In training a dropout gives the recentred stream a mean again: the trainable conversion is
    refused with that reason (module unchanged); the inference conversion applies."""
    model = _WithDropout().double().eval()
    args = tc.traced_case()[2]
    gm = tc.trace(model)
    code = gm.code
    applied, report = tc.run_pass(rms, gm, args, trainable=True)
    assert applied == 0 and gm.code == code and len(report.skipped) == 3
    assert all("in training" in s.reason and "drop" in s.reason for s in report.skipped)
    gm = tc.trace(model)
    assert tc.run_pass(rms, gm, args)[0] == 3
    tc.assert_equivalent(model, gm, args)
