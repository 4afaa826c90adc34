"""normfold.foldmath: the blockwise recentring equals the whole-array float64 form, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from normfold import foldmath


@pytest.mark.parametrize("shape,axis", [((300, 7), 1), ((300, 7), 0), ((5, 4, 9), -1), ((5, 4, 9), 1), ((11,), 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("block_bytes", [64, foldmath.BLOCK_BYTES])
def test_recentre_as_equals_the_float64_recentring_cast_once(shape, axis, dtype, block_bytes, monkeypatch):
    monkeypatch.setattr(foldmath, "BLOCK_BYTES", block_bytes)
    array = (np.random.default_rng(0).standard_normal(shape) + 100).astype(dtype)
    expected = foldmath.recentre(array, axis=axis).astype(dtype)
    got = foldmath.recentre_as(array, dtype, axis=axis)
    assert got.dtype == dtype and np.array_equal(got, expected)
    assert np.abs(got.astype(np.float64).mean(axis=axis)).max() < 1e-2


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("block_bytes", [64, foldmath.BLOCK_BYTES])
def test_scale_channels_as_and_shift_through_equal_the_whole_array_forms(axis, block_bytes, monkeypatch):
    monkeypatch.setattr(foldmath, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((37, 23)).astype(np.float32)
    scale, shift = rng.uniform(0.5, 1.5, weight.shape[axis]), rng.standard_normal(weight.shape[axis])
    expected = foldmath.scale_channels(weight, scale, axis=axis).astype(np.float32)
    assert np.array_equal(foldmath.scale_channels_as(weight, scale, np.float32, axis=axis), expected)
    w64 = weight.astype(np.float64)
    np.testing.assert_allclose(foldmath.shift_through(weight, shift, axis=axis),
                               shift @ w64 if axis == 0 else w64 @ shift, rtol=1e-12, atol=1e-12)


def test_scale_channels_as_overflow_comes_out_infinite():
    out = foldmath.scale_channels_as(np.full((2, 3), 60000, np.float16), np.array([1.0, 2.0, 1.0]), np.float16, axis=1)
    assert np.isinf(out[:, 1]).all() and np.isfinite(out[:, [0, 2]]).all()
