"""FakeLN, the switchable norm, the q/k-v split and their installation in GPT-2."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normfold.errors import InputError
from normfold.finetune import gpt2
from normfold.finetune.calibration import calibrate, token_std
from normfold.finetune.fakeln import SplitQKV, SwitchableNorm


def _ln(width=8, seed=0):
    ln = nn.LayerNorm(width, eps=1e-5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(width, generator=g) + 0.5)
        ln.bias.copy_(torch.randn(width, generator=g) * 0.1)
    return ln


def test_fakeln_equals_layernorm_on_tokens_at_the_calibrated_std():
    ln = _ln()
    norm = SwitchableNorm(ln)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 8, generator=g) * 3 + 5
    # every token rescaled to std 2 (position 0 to std 7): FakeLN with those scales is LN exactly
    centred = x - x.mean(-1, keepdim=True)
    target = torch.full((6,), 2.0)
    target[0] = 7.0
    x = centred / centred.std(-1, unbiased=False, keepdim=True) * target[:, None] + x.mean(-1, keepdim=True)
    stats = calibrate(norm, [x], {"n": norm})
    assert stats["n"].sigma == pytest.approx(float(torch.sqrt(torch.tensor(4.0 + 1e-5))), rel=1e-6)
    assert stats["n"].sigma0 == pytest.approx(float(torch.sqrt(torch.tensor(49.0 + 1e-5))), rel=1e-6)
    expected = ln(x)
    norm.make_fake()
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_fakeln_differs_from_layernorm_where_the_std_differs():
    ln = _ln()
    norm = SwitchableNorm(ln)
    x = torch.randn(2, 5, 8)
    x[:, 3] *= 10
    calibrate(norm, [x], {"n": norm})
    norm.make_fake()
    out = norm(x)
    # FakeLN is linear in the centred input: doubling it doubles the centred output
    torch.testing.assert_close(norm(2 * x) - ln.bias, 2 * (out - ln.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, ln(x), atol=1e-2)


def test_calibrated_scale_is_the_mean_per_token_std(ids, model):
    gpt2.install(model)
    norms = gpt2.norm_modules(model)
    inputs = {}
    handle = norms["transformer.h.1.ln_2"].register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    stats = calibrate(model, [ids], norms)
    handle.remove()
    std = token_std(inputs["x"].double(), 1e-5)
    assert stats["transformer.h.1.ln_2"].sigma == pytest.approx(float(std[:, 1:].mean()), rel=1e-9)
    assert stats["transformer.h.1.ln_2"].sigma0 == pytest.approx(float(std[:, 0].mean()), rel=1e-9)
    assert stats["transformer.h.1.ln_2"].tokens == ids.numel()
    assert float(norms["transformer.h.1.ln_2"].sigma0) != float(norms["transformer.h.1.ln_2"].sigma)


def test_shared_position0_uses_one_scale(ids, model):
    gpt2.install(model)
    norms = gpt2.norm_modules(model)
    calibrate(model, [ids], norms, position0="shared")
    assert all(float(n.sigma) == float(n.sigma0) for n in norms.values())
    with pytest.raises(ValueError, match="position0"):
        calibrate(model, [ids], norms, position0="bos")


def test_fake_needs_a_calibrated_scale():
    with pytest.raises(RuntimeError, match="calibrated"):
        SwitchableNorm(_ln()).make_fake()


def test_install_keeps_the_function_and_splits_every_norm(ids, model):
    expected = model(ids).logits
    sites = gpt2.install(model)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert [s.stage for s in sites] == ["mlp", "mlp", "qk", "qk", "v", "v", "final"]
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert gpt2.install(model) == sites  # idempotent


def test_install_refuses_other_architectures():
    with pytest.raises(InputError, match="GPT-2"):
        gpt2.install(nn.Sequential(nn.LayerNorm(4)))


@pytest.mark.parametrize("fake", ["qk", "v"])
def test_split_qkv_removes_q_k_and_v_separately(fake):
    ln = _ln(12)
    from transformers.pytorch_utils import Conv1D

    linear = Conv1D(36, 12)
    split = SplitQKV(ln, linear)
    x = torch.randn(2, 5, 12) * 4 + 1
    real = linear(ln(x))
    torch.testing.assert_close(split(x), real)
    norm = split.norm_qk if fake == "qk" else split.norm_v
    norm.set_scale(1.0, 1.0)
    norm.make_fake()
    out = split(x)
    kept, changed = (slice(24, 36), slice(0, 24)) if fake == "qk" else (slice(0, 24), slice(24, 36))
    torch.testing.assert_close(out[..., kept], real[..., kept])
    assert not torch.allclose(out[..., changed], real[..., changed], atol=1e-3)
    fake_ln = (x - x.mean(-1, keepdim=True)) * ln.weight + ln.bias
    torch.testing.assert_close(out[..., changed], F.linear(fake_ln, linear.weight.T, linear.bias)[..., changed])
