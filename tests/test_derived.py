"""normfold.derived: a derived weight, read, streamed or nested, equals the whole-array float64 form cast once."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest

from normfold import derived, foldmath
from normfold.derived import CrmsReader, DerivedTensor, Recentre, Scale

SHAPES_AXES = [((300, 7), 1), ((300, 7), 0), ((5, 4, 9), -1), ((5, 4, 9), 1), ((5, 4, 9), 0), ((11,), 0)]


def on_disk(array: np.ndarray, tmp_path, offset: int = 64) -> ir.ExternalTensor:
    """`array` as an external tensor at `offset` in a file (the way a loaded model's weights are)."""
    path = tmp_path / "weights.data"
    with open(path, "wb") as file:
        file.write(b"\0" * offset)
        file.write(array.tobytes())
    return ir.ExternalTensor("weights.data", offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
                             shape=ir.Shape(array.shape), name="w", base_dir=str(tmp_path))


@pytest.fixture(params=[64, derived.BLOCK_BYTES], ids=["tiny-blocks", "default-blocks"])
def block_bytes(request, monkeypatch):
    monkeypatch.setattr(derived, "BLOCK_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("where", ["memory", "file"])
def test_recentre_equals_the_float64_recentring_cast_once(shape, axis, dtype, where, block_bytes, tmp_path):
    array = (np.random.default_rng(0).standard_normal(shape) + 100).astype(dtype)
    source = ir.tensor(array) if where == "memory" else on_disk(array, tmp_path)
    got = DerivedTensor(source, Recentre(axis)).numpy()
    expected = foldmath.recentre(array, axis=axis).astype(dtype)
    assert got.dtype == dtype and got.shape == array.shape
    if axis % array.ndim:  # the mean of each block's own rows: the same float64 sums as the whole array
        assert np.array_equal(got, expected)
    else:  # the column mean summed block by block: equal up to the float64 summation order (1 unit, rarely)
        ulp = np.spacing(np.abs(expected).astype(dtype)).astype(np.float64)
        assert np.all(np.abs(got.astype(np.float64) - expected.astype(np.float64)) <= ulp)
    assert np.abs(got.astype(np.float64).mean(axis=axis)).max() < 1e-2


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
@pytest.mark.parametrize("exact_in_dtype", [True, False])
def test_scale_equals_the_float64_scaling_cast_once(shape, axis, exact_in_dtype, block_bytes, tmp_path):
    rng = np.random.default_rng(1)
    array = rng.standard_normal(shape).astype(np.float32)
    factors = rng.uniform(0.5, 1.5, shape[axis])
    if exact_in_dtype:  # the float32 fast path must give the float64 path's bits
        factors = factors.astype(np.float32).astype(np.float64)
    got = DerivedTensor(on_disk(array, tmp_path), Scale(axis, factors)).numpy()
    assert np.array_equal(got, foldmath.scale_channels(array, factors, axis=axis).astype(np.float32))


@pytest.mark.parametrize("axis", [0, 1])
def test_keep_drops_the_last_entries_along_the_axis(axis, block_bytes, tmp_path):
    array = np.random.default_rng(2).standard_normal((40, 30)).astype(np.float32)
    keep = array.shape[axis] - 1
    full = foldmath.recentre(array, axis=axis)
    got = DerivedTensor(on_disk(array, tmp_path), Recentre(axis, keep=keep)).numpy()
    expected = np.take(full, np.arange(keep), axis=axis).astype(np.float32)
    ulp = np.spacing(np.abs(expected)).astype(np.float64)
    assert got.shape == expected.shape and np.all(np.abs(got - expected) <= ulp)
    factors = np.linspace(0.5, 2.0, array.shape[axis])
    scaled = DerivedTensor(ir.tensor(array), Scale(axis, factors, keep=keep)).numpy()
    expected = np.take(foldmath.scale_channels(array, factors, axis=axis), np.arange(keep), axis=axis)
    assert np.array_equal(scaled, expected.astype(np.float32))


def test_a_derived_tensor_of_a_derived_tensor_applies_both_maps(block_bytes, tmp_path):
    """A recentred embedding scaled again as a head: recentre along axis 0 (a column mean over every row
    of the inner result) of a scale along axis 1."""
    array = np.random.default_rng(3).standard_normal((64, 24)).astype(np.float32)
    factors = np.linspace(0.5, 2.0, 24)
    inner = DerivedTensor(on_disk(array, tmp_path), Scale(1, factors))
    outer = DerivedTensor(inner, Recentre(0))
    step = foldmath.scale_channels(array, factors, axis=1).astype(np.float32)
    expected = foldmath.recentre(step, axis=0).astype(np.float32)
    np.testing.assert_allclose(outer.numpy(), expected, rtol=0, atol=float(np.spacing(np.float32(8))))


@pytest.mark.parametrize("axis", [0, 1])
def test_streaming_writes_the_same_bytes_as_the_whole_array(axis, block_bytes, tmp_path):
    array = np.random.default_rng(4).standard_normal((123, 17)).astype(np.float16)
    tensor = DerivedTensor(on_disk(array, tmp_path), Recentre(axis))
    sink = io.BytesIO()
    tensor.tofile(sink)
    assert sink.getvalue() == tensor.numpy().tobytes() == tensor.tobytes()


def test_streaming_a_large_tensor_holds_a_block_not_the_tensor(tmp_path):
    """64 MB streamed to a file: the Python-side peak is a few blocks (numpy reports to tracemalloc)."""
    array = np.ones((4096, 4096), dtype=np.float32)
    tensor = DerivedTensor(on_disk(array, tmp_path), Scale(0, np.full(4096, 0.5)))
    del array
    tracemalloc.start()
    with open(tmp_path / "out.data", "wb") as file:
        tensor.tofile(file)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * derived.BLOCK_BYTES, peak
    out = np.fromfile(tmp_path / "out.data", dtype=np.float32)
    assert out.size == 4096 * 4096 and np.all(out == 0.5)


@pytest.mark.parametrize("axis", [0, 1])
def test_scan_linear_equals_the_whole_array_forms(axis, block_bytes, tmp_path):
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((37, 23)).astype(np.float32)
    weight[7, 3] = -42.0
    shift = rng.standard_normal(weight.shape[axis])
    tensor = on_disk(weight, tmp_path)
    w64 = weight.astype(np.float64)
    largest, shifted = derived.scan_linear(tensor, shift, axis=axis, largest=True)
    np.testing.assert_allclose(shifted, shift @ w64 if axis == 0 else w64 @ shift, rtol=1e-12, atol=1e-12)
    assert largest == 42.0
    assert derived.scan_linear(tensor, None, axis=axis, largest=False) == (None, None)


def test_scale_overflow_comes_out_infinite():
    out = DerivedTensor(ir.tensor(np.full((2, 3), 60000, np.float16)), Scale(1, np.array([1.0, 2.0, 1.0]))).numpy()
    assert np.isinf(out[:, 1]).all() and np.isfinite(out[:, [0, 2]]).all()


def test_a_truncated_data_file_is_an_error_not_garbage(tmp_path):
    array = np.ones((64, 8), dtype=np.float32)
    tensor = on_disk(array, tmp_path)
    with open(tmp_path / "weights.data", "r+b") as file:
        file.truncate(64 + array.nbytes // 2)
    with pytest.raises(ValueError, match="ends before"):
        DerivedTensor(tensor, Recentre(1)).numpy()


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_crms_reader_equals_the_float64_form_cast_once(axis, dtype, block_bytes, tmp_path):
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((33, 21)).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, weight.shape[axis])
    got = DerivedTensor(on_disk(weight, tmp_path), CrmsReader(axis, gamma)).numpy()
    expected = foldmath.crms_input_weight(weight, gamma, axis=axis).astype(dtype)
    assert got.shape == expected.shape and np.array_equal(got, expected)
