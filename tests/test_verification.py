"""normfold.verification: tolerances, failure reporting, inputs, dynamic dims."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import normfold
from normfold.errors import InputError
from normfold import io, runtime
from normfold.verification import compare, load_inputs, make_inputs
from toy_models import conv_bn


def test_identical_models_pass_with_zero_error(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), path)
    result = normfold.verify(path, path)
    assert result.passed and result.max_abs_error < 1e-5  # the candidate runs with ORT's fusions on
    (out,) = result.outputs
    assert out.cosine == pytest.approx(1.0) and out.shape == [1, 4, 8, 8]


def test_a_perturbed_weight_fails_and_names_the_worst_element(tmp_path):
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    proto = conv_bn()
    onnx.save(proto, ref)
    w = numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w[0, 0, 1, 1] += 1e-2
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    onnx.save(proto, cand)
    result = normfold.verify(ref, cand)
    assert not result.passed
    (out,) = result.outputs
    assert out.worst_index is not None and out.worst_index[1] == 0  # channel 0 carries the perturbation
    assert "out of tolerance" in out.message


def test_tolerance_scales_with_output_rms():
    ref = np.full(100, 1000.0, np.float32)
    within = ref + 1000.0 * 1e-5 * 0.5 + 0.1  # atol*scale + rtol*|ref| = 0.01 + 0.1
    assert compare("y", ref, within).passed
    assert not compare("y", ref, ref + 0.2).passed


@pytest.mark.parametrize("dtype,rtol", [(np.float16, 1e-2), (np.float32, 1e-4)])
def test_per_dtype_tolerances(dtype, rtol):
    ref = np.ones(10, dtype)
    assert compare("y", ref, ref * (1 + 0.5 * rtol)).rtol == rtol
    assert compare("y", ref, ref * (1 + 0.5 * rtol)).passed
    assert not compare("y", ref, ref * (1 + 3 * rtol)).passed


def test_integer_outputs_must_match_exactly_and_nans_must_coincide():
    assert compare("i", np.arange(4), np.arange(4)).passed
    assert not compare("i", np.arange(4), np.arange(4) + 1).passed
    nan = np.array([1.0, np.nan], np.float32)
    check = compare("y", nan, nan.copy())
    assert check.passed and check.nonfinite == 1 and "NaN" in check.message
    assert not compare("y", nan, np.array([1.0, 2.0], np.float32)).passed
    assert not compare("y", np.array([1.0, 2.0], np.float32), nan).passed


def test_shape_mismatch_fails():
    assert not compare("y", np.zeros((2, 3)), np.zeros((3, 2))).passed


def _dynamic_model() -> onnx.ModelProto:
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [table],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_dynamic_dims_need_a_shape_and_say_which(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_dynamic_model(), path)
    with pytest.raises(InputError, match=r"dynamic dims \['batch', 'seq'\].*--shape ids=N,N"):
        normfold.verify(path, path)
    result = normfold.verify(path, path, shapes={"ids": [2, 5]})
    assert result.passed and result.input_shapes == {"ids": [2, 5]}


def test_integer_ids_stay_in_the_range_of_the_table_they_index():
    model = io.from_proto(_dynamic_model())
    with runtime.model_file(model) as path:
        feeds = make_inputs(runtime.make_session(path), model, shapes={"ids": [4, 50]}, seed=1)
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() == 6


def test_user_inputs_from_npz_are_used(tmp_path):
    path, npz = tmp_path / "m.onnx", tmp_path / "in.npz"
    onnx.save(conv_bn(), path)
    np.savez(npz, x=np.zeros((1, 3, 8, 8), np.float32))
    inputs = load_inputs(npz)
    result = normfold.verify(path, path, inputs=inputs)
    assert result.passed and result.input_shapes == {"x": [1, 3, 8, 8]}
    with pytest.raises(InputError, match="no model input named 'nope'"):
        normfold.verify(path, path, inputs={"nope": np.zeros(1)})


def test_models_with_different_outputs_are_refused(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(conv_bn(), a)
    proto = conv_bn()
    proto.graph.output[0].name = "n"
    del proto.graph.node[2]
    onnx.save(proto, b)
    with pytest.raises(InputError, match="outputs differ"):
        normfold.verify(a, b)


def test_inputs_too_large_to_generate_are_refused_before_allocating(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2**40])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2**40])],
    )
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)
    with pytest.raises(InputError, match="too large to generate.*--shape.*--inputs"):
        normfold.verify(path, path)
