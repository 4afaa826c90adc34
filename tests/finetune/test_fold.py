"""The real removal: FakeLN folded away, a model with no norm module, an ONNX graph with no norm op."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune_helpers import tiny_gpt2
from normfold.errors import InputError
from normfold.finetune import export, fold, gpt2
from normfold.finetune.calibration import calibrate
from normfold.finetune.fold import FoldedLinear


def _all_fake(model, ids, position0="separate"):
    gpt2.install(model)
    norms = gpt2.norm_modules(model)
    calibrate(model, [ids], norms, position0=position0)
    for norm in norms.values():
        norm.make_fake()
    return model


def _shifted_ids(seed=3):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 64, size=(2, 16)))


@pytest.mark.parametrize("position0", ["separate", "shared"])
@pytest.mark.parametrize("tied", [True, False])
def test_folded_model_has_no_norm_and_computes_the_fakeln_model(ids, position0, tied):
    model = _all_fake(tiny_gpt2(tied=tied), ids, position0)
    # perturb the stream's mean so the recentring of every writer matters
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.bias.add_(3.0)
        model.transformer.h[1].mlp.c_proj.bias.sub_(2.0)
    ln_free = fold.fold(model)
    assert not fold.has_norm_modules(ln_free)
    assert fold.has_norm_modules(model)
    other = _shifted_ids()
    with torch.no_grad():
        expected, actual = model(other).logits, ln_free(other).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(expected.pow(2).mean().sqrt())))
    scaled = [m.position0_scale is not None for m in ln_free.modules() if isinstance(m, FoldedLinear)]
    assert len(scaled) == 5 and all(scaled) == (position0 == "separate") and any(scaled) == (position0 == "separate")
    assert ln_free.lm_head.weight.data_ptr() != ln_free.transformer.wte.weight.data_ptr()
    # the writers are recentred: the embeddings' rows are zero-mean
    assert float(ln_free.transformer.wte.weight.detach().mean(-1).abs().max()) < 1e-6


def test_fold_leaves_the_source_model_alone(ids):
    model = _all_fake(tiny_gpt2(), ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold.fold(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fold_refuses_while_a_norm_is_real(ids, model):
    gpt2.install(model)
    norms = gpt2.norm_modules(model)
    calibrate(model, [ids], norms)
    for name, norm in norms.items():
        if name != "transformer.ln_f":
            norm.make_fake()
    with pytest.raises(InputError, match="still real.*ln_f"):
        fold.fold(model)


def test_exported_onnx_has_zero_norm_ops_and_matches_torch(tmp_path, ids):
    original = tiny_gpt2()
    with_ln = export.export_onnx(original, tmp_path / "with_ln.onnx", batch=2, seq=16)
    assert export.norm_ops(with_ln).get("LayerNormalization") == 5  # the check can see norms
    model = _all_fake(tiny_gpt2(), ids)
    ln_free = fold.fold(model)
    onnx_model = export.export_onnx(ln_free, tmp_path / "ln_free.onnx", batch=2, seq=16)
    assert export.norm_ops(onnx_model) == {}
    check = export.verify_onnx(model, tmp_path / "ln_free.onnx", _shifted_ids())
    assert check.passed, check.message
    with torch.no_grad():
        scale = max(1.0, float(model(_shifted_ids()).logits.pow(2).mean().sqrt()))
    assert check.rtol == 1e-4 and check.atol == pytest.approx(1e-5 * scale)
    # the comparison is real: the original model's export does not match the FakeLN model
    assert not export.verify_onnx(model, tmp_path / "with_ln.onnx", _shifted_ids()).passed


def test_ln_free_checkpoint_round_trip(tmp_path, ids):
    model = _all_fake(tiny_gpt2(), ids)
    ln_free = fold.fold(model)
    fold.save_ln_free(ln_free, tmp_path)
    loaded = fold.load_ln_free(tmp_path)
    assert not fold.has_norm_modules(loaded)
    saved, restored = ln_free.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    other = _shifted_ids()
    with torch.no_grad():  # the loaded model may pick another attention kernel (sdpa): rounding only
        torch.testing.assert_close(loaded(other).logits, ln_free(other).logits, rtol=1e-5, atol=1e-6)


def test_loading_a_plain_checkpoint_as_ln_free_is_refused(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(InputError, match="not an LN-free checkpoint"):
        fold.load_ln_free(tmp_path)


def test_ln_free_model_runs_in_float16(tmp_path, ids):
    """No huge-epsilon trick: the LN-free export in fp16 stays within fp16 tolerances of fp32 torch."""
    model = _all_fake(tiny_gpt2(), ids)
    ln_free = fold.fold(model)
    export.export_onnx(ln_free, tmp_path / "half.onnx", batch=2, seq=16, dtype="float16")
    check = export.verify_onnx(model, tmp_path / "half.onnx", _shifted_ids(), rtol=1e-2, atol=1e-2)
    assert check.dtype == "float32" and check.passed, check.message
    assert np.isfinite(check.max_abs_error) and check.max_abs_error > 0
