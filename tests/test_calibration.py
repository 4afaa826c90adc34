"""normfold.calibration: each LayerNorm's average per-token std on onnxruntime, checked against numpy.

The graphs are written by hand (x -> MatMul W0 + b0 -> LayerNorm -> MatMul W1), so the value each
LayerNorm normalizes can be computed in numpy: h = x W0 + b0, sigma(token) = sqrt(var(h) + eps).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfold
from normfold.calibration import calibrate, load_calibration
from normfold.errors import InputError
from normfold.report import op_counts

D, SEQ, EPS = 8, 5, 1e-5


def ln_model(*, spelling: str = "fused", batch: int | str = 2, seq: int = SEQ, rank: int = 3, seed: int = 0):
    """x (batch, seq, D) -> h = x W0 + b0 -> LN(h) -> y W1 (two outputs: y W1 and h itself when rank 2 is
    asked, the LN reads h reshaped to (batch * seq, D)). Returns (ModelProto, W0, b0)."""
    rng = np.random.default_rng(seed)
    w0, b0 = rng.standard_normal((D, D)).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    w1 = rng.standard_normal((D, 3)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, D).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w0, "W0"), (b0, "b0"), (w1, "W1"), (gamma, "gamma"),
                                                         (beta, "beta"))]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["xw"]), helper.make_node("Add", ["xw", "b0"], ["h"])]
    ln_in = "h"
    if rank == 2:
        inits.append(numpy_helper.from_array(np.array([-1, D], np.int64), "flat"))
        nodes.append(helper.make_node("Reshape", ["h", "flat"], ["h_flat"]))
        ln_in = "h_flat"
    if spelling == "fused":
        nodes.append(helper.make_node("LayerNormalization", [ln_in, "gamma", "beta"], ["y"], axis=-1, epsilon=EPS))
    else:
        inits += [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                  numpy_helper.from_array(np.array(EPS, np.float32), "eps")]
        nodes += [
            helper.make_node("ReduceMean", [ln_in], ["mu"], axes=[-1]),
            helper.make_node("Sub", [ln_in, "mu"], ["dev"]),
            helper.make_node("Pow", ["dev", "two"], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
            helper.make_node("Add", ["var", "eps"], ["var_eps"]),
            helper.make_node("Sqrt", ["var_eps"], ["std"]),
            helper.make_node("Div", ["dev", "std"], ["normed"]),
            helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
            helper.make_node("Add", ["scaled", "beta"], ["y"]),
        ]
    nodes.append(helper.make_node("MatMul", ["y", "W1"], ["out"]))
    out_shape = [batch, seq, 3] if rank == 3 else [None, 3]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, D])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w0, b0


def numpy_sigmas(x: np.ndarray, w0: np.ndarray, b0: np.ndarray) -> np.ndarray:
    """sigma per token, (samples, seq), in float64 from the float32 h onnxruntime computes."""
    h = (x @ w0 + b0).astype(np.float64)
    return np.sqrt(h.var(axis=-1) + EPS)


@pytest.mark.parametrize("spelling", ["fused", "decomposed"])
def test_sigma_and_position_zero_match_numpy(spelling):
    proto, w0, b0 = ln_model(spelling=spelling)
    x = np.random.default_rng(1).standard_normal((6, SEQ, D)).astype(np.float32)
    x[:, 0] *= 4.0  # position 0 is louder, as a BOS token is
    (stats,) = calibrate(normfold.io.from_proto(proto), {"x": x})
    sigmas = numpy_sigmas(x, w0, b0)
    assert stats.input == "h" and stats.tokens == 6 * SEQ
    np.testing.assert_allclose(stats.sigma, sigmas[:, 1:].mean(), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma_first, sigmas[:, 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(stats.relative_spread, sigmas[:, 1:].std() / sigmas[:, 1:].mean(), rtol=1e-5)
    assert stats.sigma_first > 2 * stats.sigma


def test_chunks_of_a_static_batch_give_the_same_numbers_as_one_run():
    static, _, _ = ln_model(batch=2)
    dynamic, w0, b0 = ln_model(batch="batch")
    x = np.random.default_rng(2).standard_normal((10, SEQ, D)).astype(np.float32)  # dynamic: chunks of 8 and 2
    a = calibrate(normfold.io.from_proto(static), {"x": x})[0]
    b = calibrate(normfold.io.from_proto(dynamic), {"x": x})[0]
    np.testing.assert_allclose([a.sigma, a.sigma_first], [b.sigma, b.sigma_first], rtol=1e-6)
    np.testing.assert_allclose(a.sigma, numpy_sigmas(x, w0, b0)[:, 1:].mean(), rtol=1e-6)


def test_rank_two_input_has_no_position_axis():
    proto, w0, b0 = ln_model(rank=2)
    x = np.random.default_rng(3).standard_normal((4, SEQ, D)).astype(np.float32)
    (stats,) = calibrate(normfold.io.from_proto(proto), {"x": x})
    assert stats.sigma_first is None
    np.testing.assert_allclose(stats.sigma, numpy_sigmas(x, w0, b0).mean(), rtol=1e-6)


def test_calibration_leaves_the_model_unchanged():
    proto, _, _ = ln_model()
    model = normfold.io.from_proto(proto)
    before = (op_counts(model), [v.name for v in model.graph.outputs])
    calibrate(model, {"x": np.ones((2, SEQ, D), np.float32)})
    assert (op_counts(model), [v.name for v in model.graph.outputs]) == before


# --------------------------------------------------------------------------- bad calibration files


def write(tmp_path, **arrays):
    path = tmp_path / "cal.npz"
    np.savez(path, **arrays)
    return path


def one_line_error(call) -> str:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_missing_and_garbage_files_are_input_errors(tmp_path):
    assert "not found" in one_line_error(lambda: load_calibration(tmp_path / "nope.npz"))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    assert "cannot read inputs" in one_line_error(lambda: load_calibration(garbage))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "cal.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    assert "cannot read inputs" in one_line_error(lambda: load_calibration(path))


@pytest.mark.parametrize("arrays,words", [
    ({}, "holds no arrays"),
    ({"x": np.float32(1.0)}, "leading batch"),
    ({"x": np.array(["a", "b"])}, "numeric"),
    ({"x": np.zeros((2, 3)), "y": np.zeros((3, 3))}, "different sample counts"),
    ({"x": np.zeros((0, 3))}, "no samples"),
])
def test_malformed_arrays_are_input_errors(tmp_path, arrays, words):
    path = write(tmp_path, **arrays)
    assert words in one_line_error(lambda: load_calibration(path))


@pytest.mark.parametrize("arrays,words", [
    ({"y": np.zeros((2, SEQ, D), np.float32)}, "missing 'x'"),
    ({"x": np.zeros((2, SEQ, D), np.float32), "z": np.zeros((2, 1))}, "no model input named 'z'"),
    ({"x": np.zeros((2, SEQ, D), np.int64)}, "the model expects float32"),
    ({"x": np.zeros((3, SEQ, D), np.float32)}, "not a multiple of the model's batch size 2"),
    ({"x": np.zeros((2, D), np.float32)}, "rank 2"),
])
def test_data_that_does_not_fit_the_model_is_refused(arrays, words):
    proto, _, _ = ln_model(batch=2)
    model = normfold.io.from_proto(proto)
    assert words in one_line_error(lambda: calibrate(model, arrays))


def test_float64_data_is_fed_as_float32():
    proto, w0, b0 = ln_model()
    x = np.random.default_rng(4).standard_normal((2, SEQ, D))
    (stats,) = calibrate(normfold.io.from_proto(proto), {"x": x})
    np.testing.assert_allclose(stats.sigma, numpy_sigmas(x.astype(np.float32), w0, b0)[:, 1:].mean(), rtol=1e-6)


def test_batches_refuse_a_wrong_sequence_length():
    proto, _, _ = ln_model()
    model = normfold.io.from_proto(proto)
    message = one_line_error(lambda: calibrate(model, {"x": np.zeros((2, SEQ + 1, D), np.float32)}))
    assert "onnxruntime failed on the calibration data" in message
