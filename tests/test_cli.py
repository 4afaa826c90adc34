"""The `normfold` command: outputs, exit codes, reports, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from normfold.cli import main
from toy_models import conv_bn


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), path)
    return path


def files(directory) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_convert_writes_default_output_and_report(model_path, capsys):
    report_path = model_path.parent / "report.json"
    assert main(["convert", str(model_path), "--report", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "fold-batchnorm: applied 1, skipped 0" in out and "verification passed" in out
    converted = onnx.load(model_path.parent / "m.normfold.onnx")
    assert [n.op_type for n in converted.graph.node] == ["Conv", "Relu"]
    report = json.loads(report_path.read_text())
    assert report["passes"][0]["applied"] == 1
    assert report["ops_before"]["BatchNormalization"] == 1 and "BatchNormalization" not in report["ops_after"]
    assert report["verification"]["passed"] is True
    assert report["output"].endswith("m.normfold.onnx")


def test_convert_refuses_existing_output_without_force(model_path, capsys):
    out = model_path.parent / "out.onnx"
    out.write_bytes(b"keep me")
    assert main(["convert", str(model_path), "-o", str(out)]) == 2
    assert "already exists (use --force to overwrite)" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["convert", str(model_path), "-o", str(out), "--force"]) == 0
    assert onnx.load(out).graph.node[0].op_type == "Conv"


def test_convert_never_overwrites_its_input(model_path, capsys):
    before = model_path.read_bytes()
    assert main(["convert", str(model_path), "-o", str(model_path), "--force"]) == 2
    assert "refusing to overwrite the input model" in capsys.readouterr().err
    assert model_path.read_bytes() == before


def test_verification_failure_exits_1_and_writes_no_model(model_path, monkeypatch, capsys):
    from normfold import foldmath

    real = foldmath.bn_scale_shift
    monkeypatch.setattr(foldmath, "bn_scale_shift", lambda *a: (real(*a)[0] * 1.01, real(*a)[1]))
    report_path = model_path.parent / "report.json"
    before = files(model_path.parent)
    assert main(["convert", str(model_path), "--report", str(report_path)]) == 1
    captured = capsys.readouterr()
    assert "verification FAILED" in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith("normfold: error: the converted model is not")
    assert files(model_path.parent) == before | {"report.json"}
    assert json.loads(report_path.read_text())["verification"]["passed"] is False


def test_nothing_to_rewrite_exits_0_without_output(tmp_path, capsys):
    proto = conv_bn()
    proto.graph.node[1].input[1] = "x"
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    assert main(["convert", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skipped 1" in out and "BN scale is not constant" in out and "no output written" in out
    assert files(tmp_path) == {"m.onnx"}


def test_passes_lists_every_pass(capsys):
    assert main(["passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["fold-batchnorm", "exact"], ["layernorm-to-rmsnorm", "exact"], ["layernorm-to-crmsnorm", "exact"],
        ["emit-rmsnorm", "exact"], ["fold-norm-affine", "exact"], ["remove-layernorm", "approximate"]]


def test_inspect_text_and_json(model_path, capsys):
    assert main(["inspect", str(model_path)]) == 0
    assert "fold-batchnorm: applies" in capsys.readouterr().out
    assert main(["inspect", str(model_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "normfold.inspect/1"
    assert data["sites"][0]["kind"] == "BatchNorm" and data["sites"][0]["nodes"] == ["bn"]


def test_verify_exit_codes_and_json(model_path, tmp_path, capsys):
    assert main(["verify", str(model_path), str(model_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    proto = conv_bn()
    w = numpy_helper.to_array(proto.graph.initializer[0]) * 1.1
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "w"))
    other = tmp_path / "other.onnx"
    onnx.save(proto, other)
    assert main(["verify", str(model_path), str(other)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_prints_a_table_and_json(model_path, capsys):
    assert main(["bench", str(model_path), str(model_path), "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["model", "session"] and len(lines) == 3
    assert main(["bench", str(model_path), "--repeats", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (result,) = data["models"]
    assert data["schema"] == "normfold.bench/1" and result["median_ms"] > 0 and result["repeats"] == 2


@pytest.mark.parametrize("shape", ["x", "x=", "=1,2", "x=1,a", "x=-1"])
def test_bad_shape_arguments_are_one_line_errors(model_path, shape, capsys):
    assert main(["verify", str(model_path), str(model_path), "--shape", shape]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shape" in err


def test_usage_errors_exit_2_with_one_line(capsys):
    assert main(["convert"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("normfold: error: usage:")


@pytest.mark.parametrize("module", ["normfold.cli", "normfold"])
def test_installed_command_runs_without_traceback(tmp_path, module):
    missing = tmp_path / "missing.onnx"
    result = subprocess.run([sys.executable, "-m", module, "convert", str(missing)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"normfold: error: {missing}: no such file\n"


def test_remove_layernorm_is_a_subcommand(tmp_path, capsys):
    """`normfold remove-layernorm` is wired into the CLI: a bad model directory is one line, exit 2,
    nothing written (its full behaviour is in tests/finetune/test_command.py)."""
    out = tmp_path / "out"
    assert main(["remove-layernorm", str(tmp_path / "missing"), "--data", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]
    assert not out.exists()
