"""normfold.pipeline: pass selection, bounded fixed point, cleanup of orphans only, verification."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import normfold
from normfold import io, pipeline
from normfold.errors import InputError, VerificationError
from normfold.passes import FoldBatchNorm
from toy_models import conv_bn


def test_default_passes_are_every_exact_pass():
    assert [p.name for p in pipeline.resolve_passes(None)] == [
        "fold-batchnorm", "layernorm-to-rmsnorm", "emit-rmsnorm", "fold-norm-affine"]


def test_unknown_and_empty_pass_lists_are_refused():
    with pytest.raises(InputError, match="unknown pass 'nope'; known passes: fold-batchnorm, layernorm-to-rmsnorm, layernorm-to-crmsnorm, emit"):
        pipeline.resolve_passes(["nope"])
    with pytest.raises(InputError, match="no passes selected"):
        pipeline.resolve_passes([])


def test_a_pass_instance_can_be_given_directly():
    model = io.from_proto(conv_bn())
    _, report = normfold.convert(model, [FoldBatchNorm()])
    assert report.passes[0].applied == 1 and report.verification["passed"]


def _chained_bns() -> onnx.ModelProto:
    """Conv -> BN -> BN: the second BN only becomes foldable once the first is folded."""
    proto = conv_bn()
    rng = np.random.default_rng(1)
    for name in ("gamma2", "beta2", "mean2"):
        proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), name))
    proto.graph.initializer.append(numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var2"))
    relu = proto.graph.node[2]
    relu.input[0] = "n2"
    proto.graph.node.insert(2, helper.make_node("BatchNormalization", ["n", "gamma2", "beta2", "mean2", "var2"],
                                                ["n2"], name="bn2"))
    return proto


def test_fixed_point_folds_chains_and_counts_iterations():
    model, report = normfold.convert(io.from_proto(_chained_bns()))
    entry = report.passes[0]
    assert entry.applied == 2 and entry.skipped == []
    assert entry.iterations >= 2  # the last iteration changes nothing
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    assert report.verification["passed"]


def test_cleanup_removes_only_what_the_passes_orphaned():
    proto = conv_bn()
    # A dead node and an unused initializer that were already there must survive the conversion.
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused_before"))
    proto.graph.node.append(helper.make_node("Neg", ["x"], ["dead_before"], name="dead"))
    model, report = normfold.convert(io.from_proto(proto))
    names = [n.name for n in model.graph]
    assert names == ["conv", "relu", "dead"]
    assert "unused_before" in model.graph.initializers
    assert {"gamma", "beta", "mean", "var", "w", "b"}.isdisjoint(model.graph.initializers)


def test_nothing_to_do_reports_zero_and_skips_verification():
    proto = conv_bn()
    proto.graph.node[1].input[1] = "x"  # BN scale from the graph input: not constant
    _, report = normfold.convert(io.from_proto(proto))
    assert report.applied == 0 and report.verification is None
    assert report.ops_before == report.ops_after


def test_verification_failure_raises_with_the_report(monkeypatch):
    from normfold import foldmath

    real = foldmath.bn_scale_shift
    monkeypatch.setattr(foldmath, "bn_scale_shift", lambda *a: (real(*a)[0], real(*a)[1] + 0.5))
    with pytest.raises(VerificationError) as info:
        normfold.convert(io.from_proto(conv_bn()))
    assert info.value.exit_code == 1
    assert info.value.report.verification["passed"] is False


def test_provenance_is_recorded_once_per_conversion():
    model, _ = normfold.convert(io.from_proto(conv_bn()))
    assert model.metadata_props[io.PROVENANCE_KEY].startswith(f"normfold {normfold.__version__}: fold-batchnorm x1")


def test_report_schema_is_stable():
    _, report = normfold.convert(io.from_proto(conv_bn()))
    data = report.to_dict()
    assert data["schema"] == "normfold.report/1"
    assert set(data) >= {"passes", "ops_before", "ops_after", "verification", "timings"}
    assert set(data["passes"][0]) == {"name", "applied", "iterations", "seconds", "skipped", "notes"}
    assert set(data["verification"]) >= {"passed", "max_abs_error", "max_rel_error", "outputs"}
    assert set(data["timings"]) == {"load", "passes", "verify"}


def test_unknown_target_is_refused():
    with pytest.raises(InputError, match="unknown target 'gpu'"):
        pipeline.resolve_passes(None, target="gpu")


def test_convert_accepts_a_path_a_model_proto_and_an_ir_model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), path)
    for model in (path, str(path), conv_bn(), io.from_proto(conv_bn())):
        converted, report = normfold.convert(model)
        assert report.passes[0].applied == 1 and [n.op_type for n in converted.graph] == ["Conv", "Relu"]


def test_a_pass_runs_on_its_own_as_an_onnx_ir_pass():
    model = io.from_proto(conv_bn())
    result = FoldBatchNorm()(model)
    assert result.modified and result.model is model
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    assert not FoldBatchNorm()(model).modified


def test_report_lists_untouched_initializers_with_their_sha256(tmp_path):
    import hashlib

    proto = conv_bn()
    proto.graph.initializer.append(numpy_helper.from_array(np.full(8, 0.5, np.float32), "offset"))
    relu = proto.graph.node[2]
    relu.output[0] = "r"
    proto.graph.node.append(helper.make_node("Add", ["r", "offset"], ["y"], name="add_offset"))
    model, report = normfold.convert(proto)
    assert list(report.untouched_initializers) == ["offset"]
    out = tmp_path / "out.onnx"
    normfold.save(model, out)
    saved = {i.name: numpy_helper.to_array(i).tobytes() for i in onnx.load(out).graph.initializer}
    assert report.untouched_initializers["offset"] == hashlib.sha256(saved["offset"]).hexdigest()
    assert report.to_dict()["untouched_initializers"] == report.untouched_initializers
