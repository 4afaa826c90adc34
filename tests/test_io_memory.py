"""normfold.io at scale: external tensors read without staying mapped, rewritten weights spilled to disk
as passes make them, the same output as an in-memory conversion, and a peak memory well under the
model's size when converting a model with external data."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import normfold
from normfold import io
from normfold.derived import DerivedTensor

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import big_models  # noqa: E402
from io_builders import conv_bn_model, save_with_external_data  # noqa: E402


@pytest.fixture
def pre_ln(tmp_path) -> Path:
    """A small Pre-LN transformer with external data (11 LayerNorms, every weight rewritable)."""
    return big_models.build_pre_ln(tmp_path / "model.onnx", width=64, depth=5, vocab=500, seq=8)


def initializer_arrays(path: Path) -> dict[str, np.ndarray]:
    model = io.load(path)
    return {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}


def test_external_reads_leave_nothing_mapped(pre_ln):
    model = io.load(pre_ln)
    tensor = model.graph.initializers["head.weight"].const_value
    assert isinstance(tensor, io.StreamedExternalTensor)
    first, second = tensor.numpy(), tensor.numpy()
    assert tensor.raw is None  # no memory map kept open (its touched pages would stay resident)
    assert first is not second and not first.flags.writeable
    np.testing.assert_array_equal(first, second)
    assert tensor.tobytes() == first.tobytes() and tensor.raw is None


def test_recentred_and_scaled_weights_are_derived_not_held(pre_ln):
    """The default passes recentre writers and scale readers: every big new weight is a DerivedTensor of
    the loaded one (computed when saved), so nothing big is in memory after the passes."""
    model, report = normfold.convert(io.load(pre_ln), verify=False)
    new = [v for v in model.graph.initializers.values() if v.name not in report.untouched_initializers]
    big = [v for v in new if v.const_value.nbytes >= 4096]
    assert big and all(isinstance(v.const_value, DerivedTensor) for v in big)
    in_memory = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                    if not isinstance(v.const_value, (ir.ExternalTensor, DerivedTensor)))
    assert in_memory < 4096 * len(new)


def test_computed_weights_are_spilled_not_held(tmp_path, monkeypatch):
    """Weights a pass computes outright (a Conv with a BatchNorm folded in) go to the spill file as made."""
    source = save_with_external_data(conv_bn_model(channels=256), tmp_path / "conv.onnx")
    monkeypatch.setattr(io, "SPILL_THRESHOLD_BYTES", 4096)
    model, report = normfold.convert(io.load(source), ["fold-batchnorm"], verify=False)
    assert report.applied
    new = [v for v in model.graph.initializers.values() if v.name not in report.untouched_initializers]
    big = [v for v in new if v.const_value.nbytes >= 4096 and not isinstance(v.const_value, DerivedTensor)]
    assert big, "the pass computed no big weight: the test model does not exercise spilling"
    assert all(isinstance(v.const_value, io.StreamedExternalTensor) for v in big)
    spill_dirs = {os.path.dirname(v.const_value.path) for v in big}
    assert len(spill_dirs) == 1 and os.path.basename(next(iter(spill_dirs))).startswith(".normfold-spill-")
    in_memory = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                    if not isinstance(v.const_value, (ir.ExternalTensor, DerivedTensor)))
    assert in_memory < 4096 * len(new)  # only the small ones stay in memory
    spill_dir = next(iter(spill_dirs))
    clone = model.clone()
    del model, new, big
    gc.collect()
    assert os.path.isdir(spill_dir)  # a clone still reads from it
    assert all(v.const_value.numpy() is not None for v in clone.graph.initializers.values())
    del clone
    gc.collect()
    assert not os.path.exists(spill_dir)  # removed with the last model that used it


@pytest.mark.parametrize("passes", [None, ["layernorm-to-crmsnorm"]])
def test_spilled_conversion_saves_the_same_model(pre_ln, tmp_path, monkeypatch, passes):
    held, _ = normfold.convert(io.load(pre_ln), passes, verify=False)
    assert io.SPILL_KEY in held.meta
    monkeypatch.setattr(io, "SPILL_THRESHOLD_BYTES", 1 << 62)  # nothing spilled
    io.save(held, tmp_path / "held.onnx")
    monkeypatch.setattr(io, "SPILL_THRESHOLD_BYTES", 4096)
    spilled, _ = normfold.convert(io.load(pre_ln), passes, verify=False)
    out = io.save(spilled, tmp_path / "spilled.onnx")
    assert sorted(p.name for p in tmp_path.glob("spilled.onnx*")) == ["spilled.onnx", "spilled.onnx.data"]
    a, b = initializer_arrays(tmp_path / "held.onnx"), initializer_arrays(out)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert normfold.verify(pre_ln, out, tolerance_class="renorm").passed


def test_models_without_external_data_keep_new_tensors_in_memory(tmp_path, monkeypatch):
    path = big_models.build_pre_ln(tmp_path / "embedded.onnx", width=64, depth=2, vocab=500, seq=8, external=False)
    monkeypatch.setattr(io, "SPILL_THRESHOLD_BYTES", 1024)
    model, report = normfold.convert(io.load(path), verify=False)
    assert report.applied and io.SPILL_KEY not in model.meta
    assert not any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    assert not list(tmp_path.glob(".normfold-spill-*"))


_PEAK_CHILD = """
import json, sys
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
import normfold
from normfold import io, pipeline, passes
before = hwm()
model, report = normfold.convert(sys.argv[1], verify=False)
io.save(model, sys.argv[2])
print(json.dumps({"before": before, "after": hwm(), "applied": report.applied}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_converting_an_external_model_takes_less_than_its_size(tmp_path):
    """Every weight of this ~100 MB model is rewritten (recentred and/or gamma folded). Holding the new
    weights in memory and saving through one serialized protobuf grew the peak by about 4x the model's
    size; streamed reads, spilled weights and external-data saving keep it under 1x. (What remains is
    the passes' own float64 work and their plans; see benchmarks/results/conversion_cost.md.)"""
    src = big_models.build_pre_ln(tmp_path / "m.onnx", width=256, depth=40, vocab=4096, seq=8)
    size = sum(p.stat().st_size for p in tmp_path.glob("m.onnx*"))
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(src), str(tmp_path / "out.onnx")],
                          capture_output=True, text=True, check=True)
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peak["applied"] > 80
    growth = peak["after"] - peak["before"]
    assert growth < size, f"convert + save grew the peak RSS by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
    assert sorted(p.name for p in tmp_path.glob("out.onnx*")) == ["out.onnx", "out.onnx.data"]
