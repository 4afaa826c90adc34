"""A corpus of broken and hostile model files, fed to `normfold convert/inspect/verify`.

Every one must end with exit status 2, exactly one line on stderr starting with "normfold: error:",
no traceback, and no file written anywhere. The validation gaps behind some of them (huge dims,
deep nesting, sparse tensors, ...) are also checked directly on normfold.io.load.

Old opsets: below opset 7 a model is refused (the corpus's "opset-too-old"); from 7 up every pass either
applies, exactly (verified) and in ops of the model's own opset (the opset import is never bumped), or
skips its site with the reason (BatchNormalization with spatial=0, opsets 7-8), leaving the model unchanged.
"""

from __future__ import annotations

import os
import random
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normfold import cli, io
from normfold.errors import InputError
from normfold.validate import MAX_SUBGRAPH_DEPTH

from io_builders import add_model, conv_bn_model, conv_bn_spatial_model, listing, pre_ln_model, run_normfold


def _write(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())  # no checker: these models are broken on purpose
    return path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def deep_protobuf(depth: int) -> bytes:
    """ModelProto bytes whose graph nests If subgraphs `depth` deep, built without protobuf's own
    recursion limit (so deeper than any parser accepts)."""
    graph = b""
    for _ in range(depth):
        attr = _field(1, b"then_branch") + _field(6, graph) + _varint(20 << 3) + _varint(5)
        node = _field(1, b"c") + _field(2, b"y") + _field(4, b"If") + _field(5, attr)
        graph = _field(1, node) + _field(2, b"g")
    opset = _varint(2 << 3) + _varint(17)
    return _varint(1 << 3) + _varint(8) + _field(7, graph) + _field(8, opset)


def nested_model(depth: int) -> onnx.ModelProto:
    """Main graph with If subgraphs nested `depth` deep (then-branch only recurses)."""
    leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["y0"])], "g0", [],
                             [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [2, 3])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "e", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    graph = leaf
    for i in range(1, depth + 1):
        graph = helper.make_graph(
            [helper.make_node("If", ["c"], [f"y{i}"], then_branch=graph, else_branch=other)], f"g{i}", [],
            [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 3])])
    graph.input.extend([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                        helper.make_tensor_value_info("c", TensorProto.BOOL, [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _tensor(name: str, data_type: int, dims: list[int], *, raw: bytes | None = None,
            floats: list[float] | None = None) -> onnx.TensorProto:
    """A TensorProto built field by field (onnx.helper.make_tensor refuses inconsistent ones)."""
    tensor = TensorProto(name=name, data_type=data_type, dims=dims)
    if raw is not None:
        tensor.raw_data = raw
    if floats is not None:
        tensor.float_data.extend(floats)
    return tensor


def _with_initializer(tensor: onnx.TensorProto) -> onnx.ModelProto:
    model = add_model()
    model.graph.initializer[0].CopyFrom(tensor)
    return model


def _broken(case: str, d: Path) -> Path:
    """Writes the corpus file for `case` into `d` and returns its path."""
    path = d / f"{case}.onnx"
    valid = conv_bn_model().SerializeToString()
    if case == "missing":
        return path
    if case == "directory":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(valid[: len(valid) // 2])
    elif case == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif case == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + random.Random(1).randbytes(200))
    elif case == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("model.onnx", valid)
    elif case == "text":
        path.write_text("this is not a model, just some text\nwith two lines\n")
    elif case == "over-2gb-sparse":
        with open(path, "wb") as f:
            f.truncate(2**31 + 16)  # sparse: takes no disk, must be refused without being read
    else:
        model = add_model()
        if case == "ir-too-new":
            model.ir_version = 99
        elif case == "ir-too-old":
            model.ir_version = 1
        elif case == "no-opset":
            del model.opset_import[:]
        elif case == "opset-too-old":
            model.opset_import[0].version = 5
        elif case == "opset-too-new":
            model.opset_import[0].version = 99
        elif case == "no-graph":
            model.ClearField("graph")
        elif case == "undefined-value":
            model.graph.node[0].input[0] = "nope"
        elif case == "undefined-output":
            model.graph.output[0].name = "nope"
        elif case == "cycle":
            model.graph.node.extend([helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])])
        elif case == "raw-data-mismatch":
            model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
        elif case == "huge-dims":
            model = _with_initializer(_tensor("W", TensorProto.FLOAT, [2**20, 2**20]))
        elif case == "overflowing-dims":  # the product of the dims overflows int64
            model = _with_initializer(_tensor("W", TensorProto.FLOAT, [2**62, 2**62, 4]))
        elif case == "unknown-domain":  # a node of a domain with no opset_import entry
            model.graph.node.append(helper.make_node("Foo", ["y"], ["z"], name="foo", domain="com.unknown"))
            model.graph.output[0].name = "z"
        elif case == "huge-dims-raw":
            model = _with_initializer(_tensor("W", TensorProto.FLOAT, [2**40], raw=b"\0" * 24))
        elif case == "negative-dims":
            model = _with_initializer(_tensor("W", TensorProto.FLOAT, [-2, -3], floats=[1.0] * 6))
        elif case == "typed-data-count":
            model = _with_initializer(_tensor("W", TensorProto.FLOAT, [2, 3], floats=[1.0] * 5))
        elif case == "unknown-dtype":
            model.graph.initializer[0].data_type = 99
        elif case == "string-raw-data":
            model = _with_initializer(_tensor("W", TensorProto.STRING, [2, 3], raw=b"abcdef"))
        elif case == "constant-attr-mismatch":
            bad = _tensor("v", TensorProto.FLOAT, [2, 3], raw=b"\0" * 8)
            model.graph.node.insert(0, helper.make_node("Constant", [], ["W2"], value=bad))
        elif case == "sparse-initializer":
            values = helper.make_tensor("W", TensorProto.FLOAT, [2], [1.0, 2.0])
            indices = helper.make_tensor("i", TensorProto.INT64, [2], [0, 4])
            del model.graph.initializer[:]
            model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2, 3]))
        elif case == "training-info":
            model.training_info.add()
        elif case == "deep-nesting":
            model = nested_model(MAX_SUBGRAPH_DEPTH + 2)
        elif case == "deep-protobuf":
            path.write_bytes(deep_protobuf(400))
            return path
        else:
            raise AssertionError(case)
        _write(path, model)
    return path


CORPUS = {  # case -> a word the error line must contain
    "missing": "no such file",
    "directory": "directory",
    "fifo": "not a regular file",
    "empty": "empty",
    "truncated": "not a valid ONNX model",
    "random-bytes": "ONNX model",
    "png": "ONNX model",
    "zip": "ONNX model",
    "text": "ONNX model",
    "over-2gb-sparse": "2 GB",
    "ir-too-new": "ir_version 99",
    "ir-too-old": "ir_version 1",
    "no-opset": "no ai.onnx opset",
    "opset-too-old": "opset 5",
    "opset-too-new": "opset 99",
    "no-graph": "no graph",
    "undefined-value": "'nope'",
    "undefined-output": "'nope'",
    "cycle": "cycle",
    "raw-data-mismatch": "20 bytes",
    "huge-dims": "holds 0 values",
    "huge-dims-raw": "holds 24 bytes",
    "overflowing-dims": "holds 0 values",
    "unknown-domain": "'com.unknown'",
    "negative-dims": "negative dims",
    "typed-data-count": "holds 5 values",
    "unknown-dtype": "data type",
    "string-raw-data": "string",
    "constant-attr-mismatch": "holds 8 bytes",
    "sparse-initializer": "sparse",
    "training-info": "training_info",
    "deep-nesting": "nested",
    "deep-protobuf": "ONNX model",
}


@pytest.fixture
def good(tmp_path) -> Path:
    (tmp_path / "good").mkdir()
    path = tmp_path / "good" / "good.onnx"
    onnx.save(add_model(), path)
    return path


def _one_error_line(stderr: str, word: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("normfold: error:"), stderr
    assert "Traceback" not in stderr
    assert word in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CORPUS))
def test_load_refuses(tmp_path, case):
    path = _broken(case, tmp_path)
    with pytest.raises(InputError) as info:
        io.load(path)
    assert "\n" not in str(info.value) and CORPUS[case] in str(info.value)


@pytest.mark.parametrize("case", list(CORPUS))
@pytest.mark.parametrize("command", ["convert", "inspect", "verify-reference", "verify-candidate"])
def test_cli_refuses(tmp_path, capsys, good, case, command):
    (tmp_path / "in").mkdir()
    path = _broken(case, tmp_path / "in")
    argv = {
        "convert": ["convert", str(path), "--no-verify"],
        "inspect": ["inspect", str(path)],
        "verify-reference": ["verify", str(path), str(good)],
        "verify-candidate": ["verify", str(good), str(path)],
    }[command]
    before = listing(tmp_path)
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    _one_error_line(captured.err, CORPUS[case])
    assert listing(tmp_path) == before


def test_cli_convert_with_explicit_output_writes_nothing(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    path = _broken("raw-data-mismatch", tmp_path / "in")
    before = listing(tmp_path)
    code = cli.main(["convert", str(path), "-o", str(tmp_path / "out.onnx"), "--force"])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "bytes")
    assert listing(tmp_path) == before


@pytest.mark.parametrize(("case", "command"), [
    ("random-bytes", "convert"), ("truncated", "inspect"), ("cycle", "verify-reference"),
    ("huge-dims", "verify-candidate"), ("missing", "convert"), ("deep-protobuf", "inspect"),
])
def test_installed_command_prints_no_traceback(tmp_path, good, case, command):
    """The real `normfold` executable (a separate process: one line, no traceback, exit 2)."""
    (tmp_path / "in").mkdir()
    path = _broken(case, tmp_path / "in")
    args = {"convert": ["convert", path], "inspect": ["inspect", path],
            "verify-reference": ["verify", path, good], "verify-candidate": ["verify", good, path]}[command]
    before = listing(tmp_path)
    result = run_normfold(*args)
    assert result.returncode == 2, result.stderr
    _one_error_line(result.stderr, CORPUS[case])
    assert result.stdout == ""
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", ["convert", "verify"])
def test_an_op_onnxruntime_does_not_know_is_refused_by_commands_that_run_the_model(tmp_path, capsys, command):
    """A node of an imported custom domain with no implementation: inspect lists the model's sites, but
    convert (which verifies) and verify cannot run it: exit 2, one line, nothing written."""
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Foo", ["y"], ["z"], name="foo", domain="com.unknown"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("com.unknown", 1))
    path = _write(tmp_path / "m.onnx", model)
    before = listing(tmp_path)
    argv = {"convert": ["convert", str(path), "--shape", "x=1,3,8,8", "--shape", "k=2"],
            "verify": ["verify", str(path), str(path), "--shape", "x=1,3,8,8", "--shape", "k=2"]}[command]
    assert cli.main(argv) == 2
    _one_error_line(capsys.readouterr().err, "com.unknown:Foo")
    assert listing(tmp_path) == before
    assert cli.main(["inspect", str(path)]) == 0
    assert "BatchNormalization" in capsys.readouterr().out


def test_initializer_that_is_a_graph_output_converts(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(weight_as_output=True), path)
    out = tmp_path / "out.onnx"
    code = cli.main(["convert", str(path), "-o", str(out), "--shape", "x=2,3,8,8", "--shape", "k=5"])
    assert code == 0, capsys.readouterr().err
    saved = onnx.load(out)
    assert [o.name for o in saved.graph.output] == ["y", "kid", "W"]
    assert "BatchNormalization" not in [n.op_type for n in saved.graph.node]
    original_w = numpy_helper.to_array(conv_bn_model().graph.initializer[0])
    np.testing.assert_array_equal(numpy_helper.to_array({t.name: t for t in saved.graph.initializer}["W"]), original_w)


def test_huge_dims_are_refused_before_allocating(tmp_path):
    path = _broken("huge-dims", tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(InputError):
            io.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20


def test_moderate_nesting_is_accepted(tmp_path):
    path = _write(tmp_path / "nested.onnx", nested_model(3))
    model = io.load(path)
    assert sum(1 for _ in model.graphs()) == 7


def test_nesting_at_the_limit_is_accepted(tmp_path):
    io.load(_write(tmp_path / "nested.onnx", nested_model(MAX_SUBGRAPH_DEPTH)))


def test_over_2gb_file_is_not_read(tmp_path, monkeypatch):
    path = _broken("over-2gb-sparse", tmp_path)
    monkeypatch.setattr(onnx, "load", lambda *a, **k: pytest.fail("the file was read"))
    with pytest.raises(InputError, match="2 GB"):
        io.load(path)


def test_from_proto_validates_too():
    model = add_model()
    model.graph.initializer[0].raw_data = b"\0" * 4
    with pytest.raises(InputError, match="holds 4 bytes"):
        io.from_proto(model)


# -- old opsets -------------------------------------------------------------------------------------------
OLD_OPSETS = [7, 9, 11, 12]


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("passes", [None, ["layernorm-to-rmsnorm"], ["layernorm-to-crmsnorm"], ["fold-norm-affine"]],
                         ids=["default", "rmsnorm", "crmsnorm", "affine"])
@pytest.mark.parametrize("opset", OLD_OPSETS)
def test_layernorm_passes_at_old_opsets_emit_ops_of_that_opset(opset, passes, target):
    import onnx_ir as ir

    import normfold

    original = pre_ln_model(opset, vocab=7)  # a head narrower than the norm: ln_f's beta folds into it
    model, report = normfold.convert(io.from_proto(original), passes, target=target)
    assert report.applied >= 2 and report.verification["passed"], report.summary_lines()
    assert all(not p["skipped"] for p in report.to_dict()["passes"]), report.summary_lines()
    proto = ir.serde.serialize_model(model)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", opset)]
    if target == "onnx":
        onnx.checker.check_model(proto, full_check=True)  # every op valid at the model's opset
    assert not {"LayerNormalization", "RMSNormalization"} & {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("opset,spatial", [(7, None), (7, 1), (9, None)])
def test_batchnorm_folds_at_old_opsets(opset, spatial):
    import normfold

    model, report = normfold.convert(io.from_proto(conv_bn_spatial_model(opset, spatial)), ["fold-batchnorm"])
    assert report.applied == 1 and report.verification["passed"], report.summary_lines()


@pytest.mark.parametrize("opset", [7, 8])
def test_per_element_batchnorm_of_old_opsets_is_skipped_with_the_reason(tmp_path, capsys, opset):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_spatial_model(opset, 0), path)
    before = listing(tmp_path)
    code = cli.main(["convert", str(path), "--passes", "fold-batchnorm"])
    out = capsys.readouterr().out
    assert code == 0
    assert "spatial=0" in out and "no output written" in out, out
    assert listing(tmp_path) == before
