"""normfold.io: preservation through load/convert/save, atomic saves, overwrite refusals, external data
(lazy loading, own data file, > 2 GB round trip) and external-data path safety."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfold
from normfold import cli, io
from normfold.errors import InputError, UnsafePathError

from io_builders import (
    CUSTOM_DOMAIN,
    add_model,
    conv_bn_model,
    external_locations,
    external_reference,
    listing,
    run_normfold,
    save_with_external_data,
)

SHAPES = {"x": [2, 3, 8, 8], "k": [5]}
SHAPE_ARGS = ["--shape", "x=2,3,8,8", "--shape", "k=5"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in Path(directory).iterdir() if p.name.startswith(".normfold")]


# --------------------------------------------------------------------------------------------------
# Preservation


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _io_signature(values) -> list:
    return [(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in values]


def _assert_preserved(original: onnx.ModelProto, saved: onnx.ModelProto, *, converted: bool) -> None:
    assert saved.ir_version == original.ir_version
    assert {o.domain: o.version for o in saved.opset_import} == {o.domain: o.version for o in original.opset_import}
    assert saved.producer_name == original.producer_name
    assert saved.producer_version == original.producer_version
    assert saved.doc_string == original.doc_string
    assert saved.graph.doc_string == original.graph.doc_string
    props = {p.key: p.value for p in saved.metadata_props}
    keys = [p.key for p in saved.metadata_props]
    assert keys.count(io.PROVENANCE_KEY) == (1 if converted else 0)
    provenance = props.pop(io.PROVENANCE_KEY, None)
    assert props == {p.key: p.value for p in original.metadata_props}
    if converted:
        assert provenance.startswith(f"normfold {normfold.__version__}: ") and "fold-batchnorm" in provenance
    assert _io_signature(saved.graph.input) == _io_signature(original.graph.input)
    assert _io_signature(saved.graph.output) == _io_signature(original.graph.output)
    saved_vi = {v.name: v for v in saved.graph.value_info}
    for vi in original.graph.value_info:
        assert vi.name in saved_vi, f"value_info {vi.name!r} lost"
        assert _io_signature([saved_vi[vi.name]]) == _io_signature([vi])
    assert [(f.domain, f.name) for f in saved.functions] == [(f.domain, f.name) for f in original.functions]
    for f_saved, f_orig in zip(saved.functions, original.functions):
        assert list(f_saved.input) == list(f_orig.input) and list(f_saved.output) == list(f_orig.output)
        assert [n.op_type for n in f_saved.node] == [n.op_type for n in f_orig.node]
        assert {o.domain: o.version for o in f_saved.opset_import} == {o.domain: o.version for o in f_orig.opset_import}
        assert f_saved.doc_string == f_orig.doc_string


def _initializer_bytes(proto: onnx.ModelProto, base_dir: Path) -> dict[str, bytes]:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    onnx.external_data_helper.load_external_data_for_model(proto, str(base_dir))
    return {t.name: numpy_helper.to_array(t).tobytes() for t in proto.graph.initializer}


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
def test_load_save_preserves_everything(tmp_path, external):
    original = conv_bn_model()
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    save_with_external_data(original, src) if external else onnx.save(original, src)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    io.save(io.load(src), out)
    saved = onnx.load(out, load_external_data=False)
    _assert_preserved(original, saved, converted=False)
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in original.graph.node]
    before = _initializer_bytes(original, src.parent)
    after = _initializer_bytes(saved, out.parent)
    assert after == before
    if not external:  # untouched embedded initializers are stored byte for byte
        raw = {t.name: t.raw_data for t in saved.graph.initializer}
        assert raw == {t.name: t.raw_data for t in original.graph.initializer}


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
def test_convert_save_preserves_everything(tmp_path, external):
    original = conv_bn_model()
    src = tmp_path / "m.onnx"
    save_with_external_data(original, src) if external else onnx.save(original, src)
    model, report = normfold.convert(src, passes=["fold-batchnorm"], shapes=SHAPES)
    assert report.applied
    out = tmp_path / "m.out.onnx"
    io.save(model, out)
    saved = onnx.load(out, load_external_data=False)
    _assert_preserved(original, saved, converted=True)
    assert "BatchNormalization" not in [n.op_type for n in saved.graph.node]
    before = _initializer_bytes(original, tmp_path)
    after = _initializer_bytes(saved, tmp_path)
    assert after["offset"] == before["offset"]  # untouched by the fold
    assert normfold.verify(src, out, shapes=SHAPES).passed


def test_provenance_is_one_entry_even_when_converted_twice(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), src)
    model, _ = normfold.convert(src, passes=["fold-batchnorm"], shapes=SHAPES)
    io.save(model, tmp_path / "once.onnx")
    twice = conv_bn_model()
    twice.graph.node.insert(2, helper.make_node("BatchNormalization", ["b", "gamma", "beta", "mean", "var"], ["b2"]))
    twice.graph.node[3].input[0] = "b2"
    helper.set_model_props(twice, {io.PROVENANCE_KEY: "normfold 0.0.1: earlier", "author": "tests"})
    onnx.save(twice, tmp_path / "twice.onnx")
    model, _ = normfold.convert(tmp_path / "twice.onnx", passes=["fold-batchnorm"], shapes=SHAPES)
    io.save(model, tmp_path / "twice.out.onnx")
    keys = [p.key for p in onnx.load(tmp_path / "twice.out.onnx").metadata_props]
    assert keys.count(io.PROVENANCE_KEY) == 1


def test_initializer_that_is_a_graph_output_is_kept(tmp_path):
    original = conv_bn_model(weight_as_output=True)
    src = tmp_path / "m.onnx"
    onnx.save(original, src)
    model, report = normfold.convert(src, passes=["fold-batchnorm"], shapes=SHAPES)
    assert report.applied
    io.save(model, tmp_path / "out.onnx")
    saved = onnx.load(tmp_path / "out.onnx")
    assert [o.name for o in saved.graph.output] == ["y", "kid", "W"]
    w = {t.name: t for t in saved.graph.initializer}["W"]
    assert w.raw_data == {t.name: t for t in original.graph.initializer}["W"].raw_data


# --------------------------------------------------------------------------------------------------
# Atomic save


def _fail_halfway(monkeypatch, exc: OSError):
    """onnx_ir.save writes part of the file, then fails like a full disk."""

    def broken_save(model, path, *args, **kwargs):
        Path(path).write_bytes(b"\x08partial")
        if kwargs.get("external_data"):
            (Path(path).parent / kwargs["external_data"]).write_bytes(b"partial data")
        raise exc

    monkeypatch.setattr(ir, "save", broken_save)


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
def test_save_failure_leaves_nothing(tmp_path, monkeypatch, external):
    src = tmp_path / "m.onnx"
    save_with_external_data(conv_bn_model(), src) if external else onnx.save(conv_bn_model(), src)
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    model = io.load(src)
    _fail_halfway(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(InputError) as info:
        io.save(model, tmp_path / "out.onnx")
    message = str(info.value)
    assert "\n" not in message and "no space left on device" in message
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == before  # no partial output, no temp dir


def test_failed_replace_rolls_back_and_keeps_previous_output(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    save_with_external_data(conv_bn_model(), src)
    out = tmp_path / "out.onnx"
    (tmp_path / "out.onnx").write_bytes(b"old model")
    (tmp_path / "out.onnx.data").write_bytes(b"old data")
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    model = io.load(src)
    real_replace = os.replace

    def replace(src_path, dst_path, *args, **kwargs):
        if Path(dst_path) == out and not Path(src_path).name.startswith(".previous"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src_path, dst_path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(InputError) as info:
        io.save(model, out, force=True)
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == before


def test_failed_replace_without_previous_output_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    save_with_external_data(conv_bn_model(), src)
    out = tmp_path / "out.onnx"
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    model = io.load(src)
    real_replace = os.replace

    def replace(src_path, dst_path, *args, **kwargs):
        if Path(dst_path) == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src_path, dst_path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(InputError):
        io.save(model, out)
    monkeypatch.undo()
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == before  # the data file placed first is gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE behaviour is Linux's")
def test_cli_file_size_limit_mid_write_leaves_nothing(tmp_path):
    """A real write failure half-way: the output's data file exceeds RLIMIT_FSIZE (EFBIG)."""
    import resource

    src = tmp_path / "m.onnx"
    save_with_external_data(conv_bn_model(channels=512), src)  # ~55 KB of Conv weights
    before = listing(tmp_path)
    limit = 16 * 1024

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run_normfold("convert", src, "-o", tmp_path / "out.onnx", "--no-verify", *SHAPE_ARGS,
                          preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normfold: error:") and "cannot write" in lines[0]
    assert "Traceback" not in result.stderr
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------------------------------
# Never overwrite the input


@pytest.fixture
def external_model(tmp_path) -> Path:
    src = tmp_path / "model" / "m.onnx"
    src.parent.mkdir()
    return save_with_external_data(conv_bn_model(), src)


def _spellings(src: Path, tmp_path: Path) -> dict[str, Path]:
    link = tmp_path / "link.onnx"
    link.symlink_to(src)
    dirlink = tmp_path / "dirlink"
    dirlink.symlink_to(src.parent, target_is_directory=True)
    return {
        "same": src,
        "dot": src.parent / "." / src.name,
        "dotdot": src.parent / ".." / src.parent.name / src.name,
        "symlink": link,
        "symlinked-dir": dirlink / src.name,
        "relative": Path(os.path.relpath(src)),
    }


@pytest.mark.parametrize("spelling", ["same", "dot", "dotdot", "symlink", "symlinked-dir", "relative"])
@pytest.mark.parametrize("force", [False, True])
def test_save_refuses_the_input_model(external_model, tmp_path, spelling, force):
    target = _spellings(external_model, tmp_path)[spelling]
    before = listing(tmp_path)
    digest = sha(external_model), sha(external_model.with_name("m.onnx.data"))
    with pytest.raises(UnsafePathError, match="refusing to overwrite the input"):
        io.save(io.load(external_model), target, force=force)
    assert (sha(external_model), sha(external_model.with_name("m.onnx.data"))) == digest
    assert listing(tmp_path) == before


def test_save_refuses_a_hard_link_to_the_input(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), src)
    os.link(src, tmp_path / "alias.onnx")
    with pytest.raises(UnsafePathError):
        io.save(io.load(src), tmp_path / "alias.onnx", force=True)


@pytest.mark.parametrize("force", [False, True])
def test_save_refuses_the_inputs_data_file(tmp_path, force):
    """The output's data file (OUT.onnx.data) would be the input's data file."""
    src = tmp_path / "a.onnx"
    save_with_external_data(conv_bn_model(), src, location="b.onnx.data")
    digest = sha(tmp_path / "b.onnx.data")
    with pytest.raises(UnsafePathError, match="refusing to overwrite"):
        io.save(io.load(src), tmp_path / "b.onnx", force=force)
    assert sha(tmp_path / "b.onnx.data") == digest and not (tmp_path / "b.onnx").exists()


def test_save_refuses_an_output_named_like_the_inputs_data_file(tmp_path):
    src = tmp_path / "a.onnx"
    save_with_external_data(conv_bn_model(), src, location="weights.onnx")
    digest = sha(tmp_path / "weights.onnx")
    with pytest.raises(UnsafePathError):
        io.save(io.load(src), tmp_path / "weights.onnx", force=True)
    assert sha(tmp_path / "weights.onnx") == digest


def test_save_refuses_existing_output_without_force(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), src)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    model = io.load(src)
    with pytest.raises(InputError, match="already exists"):
        io.save(model, out)
    assert out.read_bytes() == b"keep me"
    io.save(model, out, force=True)
    assert onnx.load(out).graph.name == "conv_bn"
    assert not leftovers(tmp_path)


def test_save_refuses_existing_data_file_without_force(external_model, tmp_path):
    (tmp_path / "out.onnx.data").write_bytes(b"someone else's")
    with pytest.raises(InputError, match="already exists"):
        io.save(io.load(external_model), tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_save_refuses_a_directory_as_output(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), src)
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        io.save(io.load(src), tmp_path / "out.onnx", force=True)


@pytest.mark.parametrize("name", ["out.txt", "missing_dir/out.onnx"])
def test_save_refuses_bad_destinations(tmp_path, name):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), src)
    with pytest.raises(InputError):
        io.save(io.load(src), tmp_path / name)


def test_cli_convert_refuses_to_overwrite_its_input(external_model, tmp_path, capsys):
    before = listing(tmp_path)
    code = cli.main(["convert", str(external_model), "-o", str(external_model), "--force", *SHAPE_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("normfold: error:")
    assert listing(tmp_path) == before


def test_cli_convert_with_external_data_writes_its_own(external_model, tmp_path, capsys):
    out = tmp_path / "out" / "c.onnx"
    out.parent.mkdir()
    code = cli.main(["convert", str(external_model), "-o", str(out), *SHAPE_ARGS])
    assert code == 0, capsys.readouterr().err
    assert external_locations(out) == {"c.onnx.data"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.onnx", "c.onnx.data"]
    umask = os.umask(0o022)
    os.umask(umask)
    for p in out.parent.iterdir():  # ordinary permissions, not the temporary directory's 0700
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_cli_inspect_external_model_from_another_directory(external_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["inspect", str(external_model)]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# External data


def test_external_data_loads_lazily(external_model, monkeypatch):
    loads = []
    real_load = ir.ExternalTensor._load

    def spy(self):
        loads.append(self.name)
        return real_load(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", spy)
    model = io.load(external_model)
    tensors = {v.name: v.const_value for v in model.graph.initializers.values()}
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors.values())
    assert loads == [] and all(t.raw is None for t in tensors.values())
    assert all(os.path.isabs(t.base_dir) for t in tensors.values())
    np.testing.assert_array_equal(tensors["W"].numpy(), numpy_helper.to_array(conv_bn_model().graph.initializer[0]))
    assert loads == []  # read on demand with file I/O, never memory-mapped (normfold.io.StreamedExternalTensor)
    assert tensors["W"].raw is None  # and nothing kept: the caller owns the array it got


def test_converted_external_model_saves_its_own_data(external_model, tmp_path):
    model, report = normfold.convert(external_model, passes=["fold-batchnorm"], shapes=SHAPES)
    assert report.applied
    out = tmp_path / "elsewhere" / "out.onnx"
    out.parent.mkdir()
    io.save(model, out)
    assert external_locations(out) == {"out.onnx.data"}
    assert normfold.verify(external_model, out, shapes=SHAPES).passed
    # The output stands alone: without the input's directory it still loads and computes the same.
    reference = onnx.load(out)
    for p in external_model.parent.iterdir():
        p.rename(tmp_path / ("moved-" + p.name))
    again = onnx.load(out)
    assert [numpy_helper.to_array(t).tobytes() for t in again.graph.initializer] == [
        numpy_helper.to_array(t).tobytes() for t in reference.graph.initializer
    ]


def test_convert_in_memory_external_model(external_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # external data must not be resolved against the working directory
    model, report = normfold.convert(io.load(external_model), passes=["fold-batchnorm"], shapes=SHAPES)
    assert report.applied and report.verification["passed"]


def _constant_external_model(directory: Path, location: str, *, in_function: bool = False) -> Path:
    """A Constant node whose tensor attribute lives in external data (`location`), optionally inside a
    model-local function. The data file holds 4 float32 values when `location` is its own file."""
    values = np.arange(256, dtype=np.float32)
    tensor = numpy_helper.from_array(values, "cval")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": str(values.nbytes)}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    constant = helper.make_node("Constant", [], ["c"], value=tensor)
    if in_function:
        function = helper.make_function(CUSTOM_DOMAIN, "MakeC", [], ["c"], [constant],
                                        opset_imports=[helper.make_opsetid("", 17)])
        nodes = [helper.make_node("MakeC", [], ["c"], domain=CUSTOM_DOMAIN)]
        functions = [function]
    else:
        nodes, functions = [constant], []
    nodes.append(helper.make_node("Add", ["x", "c"], ["y"]))
    graph = helper.make_graph(nodes, "const", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CUSTOM_DOMAIN, 1)],
                              functions=functions, ir_version=8)
    path = directory / "const.onnx"
    onnx.save(model, path)
    if not os.path.isabs(location) and ".." not in location:
        (directory / location).write_bytes(values.tobytes())
    return path


@pytest.mark.parametrize("in_function", [False, True], ids=["graph", "function"])
def test_external_constant_attribute_is_copied_not_referenced(tmp_path, in_function):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = _constant_external_model(src_dir, "const.onnx.data", in_function=in_function)
    model = io.load(src)
    assert sum(1 for _ in io.external_tensors(model)) == 1
    out = src_dir / "out.onnx"
    io.save(model, out)
    assert external_locations(out) <= {"out.onnx.data"}
    (src_dir / "const.onnx.data").unlink()  # the output must not need the input's data
    reloaded = io.load(out)
    nodes = list(ir.traversal.RecursiveGraphIterator(reloaded.graph))
    for function in reloaded.functions.values():
        nodes += list(function)
    (const,) = [n for n in nodes if n.op_type == "Constant"]
    np.testing.assert_array_equal(const.attributes["value"].value.numpy(), np.arange(256, dtype=np.float32))
    # the in-memory model still refers to its original tensor after the save
    assert sum(1 for _ in io.external_tensors(model)) == 1


def test_from_proto_with_base_dir_checks_and_records_sources(external_model):
    proto = onnx.load(external_model, load_external_data=False)
    model = io.from_proto(proto, base_dir=external_model.parent)
    with pytest.raises(UnsafePathError):
        io.save(model, external_model.parent / "m.onnx", force=True)
    with pytest.raises(InputError, match="no base directory"):
        io.from_proto(proto)


@pytest.mark.slow
def test_model_over_2gb_round_trips(tmp_path):
    """Four 600 MB initializers written straight to external data, loaded lazily, saved, compared."""
    count, chunk = 150_000_000, 10_000_000  # float32 elements per tensor (600 MB), per write
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    inits, nodes, outputs, digests = [], [], [], []
    with open(src_dir / "big.onnx.data", "wb") as f:
        for i in range(4):
            offset = f.tell()
            digest = hashlib.sha256()
            for start in range(0, count, chunk):
                block = (np.arange(start, start + chunk, dtype=np.float32) * (i + 1)).tobytes()
                digest.update(block)
                f.write(block)
            digests.append(digest.hexdigest())
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[count])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in {"location": "big.onnx.data", "offset": str(offset), "length": str(count * 4)}.items():
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            inits.append(tensor)
            nodes.append(helper.make_node("Identity", [f"w{i}"], [f"y{i}"]))
            outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [count]))
    graph = helper.make_graph(nodes, "big", [], outputs, initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              src_dir / "big.onnx")
    assert (src_dir / "big.onnx.data").stat().st_size > 2**31

    model = io.load(src_dir / "big.onnx")
    assert all(isinstance(v.const_value, ir.ExternalTensor) and v.const_value.raw is None
               for v in model.graph.initializers.values())
    io.save(model, out_dir / "big.onnx")
    assert external_locations(out_dir / "big.onnx") == {"big.onnx.data"}
    assert (out_dir / "big.onnx").stat().st_size < 1_000_000
    del model
    (src_dir / "big.onnx.data").unlink()  # free the disk; the output must not need it

    reloaded = io.load(out_dir / "big.onnx")
    for i, value in enumerate(reloaded.graph.initializers.values()):
        data = np.asarray(value.const_value.numpy()).reshape(-1)
        digest = hashlib.sha256()
        for start in range(0, count, chunk):
            digest.update(data[start:start + chunk].tobytes())
        assert digest.hexdigest() == digests[i], value.name
    assert not leftovers(out_dir)
    del reloaded, data
    (out_dir / "big.onnx.data").unlink()  # pytest keeps recent tmp_paths: do not leave 2.4 GB behind


# --------------------------------------------------------------------------------------------------
# External-data path safety

_OPENED: list[str] = []
_WATCHING = [False]


def _audit(event, args):
    if _WATCHING[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)

SECRET = b"TOP-SECRET-" * 4  # 44 bytes outside the model's directory


def _unsafe_case(tmp_path: Path, case: str) -> tuple[Path, type, str]:
    """Builds model dir tmp_path/model with an external reference of kind `case`; returns the model
    path, the expected error type and a word of its message."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    outside = tmp_path / "secret.bin"
    outside.write_bytes(SECRET[:24])
    base = add_model()
    data = np.asarray(numpy_helper.to_array(base.graph.initializer[0])).tobytes()  # 24 bytes
    own = model_dir / "w.bin"
    location, offset, length = "w.bin", None, None
    if case == "dotdot":
        location = "../secret.bin"
    elif case == "inner-dotdot":
        (model_dir / "a").mkdir()
        own.write_bytes(data)
        location = "a/../w.bin"
    elif case == "a-dotdot-dotdot":
        (model_dir / "a").mkdir()
        location = "a/../../secret.bin"
    elif case == "absolute":
        location = str(outside)
    elif case == "symlink-out":
        own.symlink_to(outside)
    elif case == "symlinked-dir-out":
        (model_dir / "sub").symlink_to(tmp_path, target_is_directory=True)
        location = "sub/secret.bin"
    elif case == "hardlink-out":
        os.link(outside, own)
    elif case == "missing":
        pass
    elif case == "directory":
        own.mkdir()
    elif case == "fifo":
        os.mkfifo(own)
    elif case == "offset-past-end":
        own.write_bytes(data)
        offset, length = 100, 24
    elif case == "offset-plus-length-past-end":
        own.write_bytes(data)
        offset, length = 8, 24
    elif case == "file-too-short":
        own.write_bytes(data[:12])
    elif case == "length-mismatch":
        own.write_bytes(data)
        length = 20
    elif case == "negative-offset":
        own.write_bytes(data)
        offset = -8
    else:
        raise AssertionError(case)
    model = external_reference(base, "W", location, offset=offset, length=length)
    path = model_dir / "m.onnx"
    onnx.save(model, path)
    unsafe = case in {"dotdot", "inner-dotdot", "a-dotdot-dotdot", "absolute", "symlink-out",
                      "symlinked-dir-out", "hardlink-out"}
    words = {"dotdot": "'..'", "inner-dotdot": "'..'", "a-dotdot-dotdot": "'..'", "absolute": "absolute",
             "symlink-out": "outside", "symlinked-dir-out": "outside", "hardlink-out": "hard links",
             "missing": "no such file", "directory": "not a regular file", "fifo": "not a regular file",
             "offset-past-end": "too short", "offset-plus-length-past-end": "too short",
             "file-too-short": "too short", "length-mismatch": "does not match", "negative-offset": "non-negative integer"}
    return path, (UnsafePathError if unsafe else InputError), words[case]


UNSAFE_CASES = ["dotdot", "inner-dotdot", "a-dotdot-dotdot", "absolute", "symlink-out", "symlinked-dir-out",
                "hardlink-out", "missing", "directory", "fifo", "offset-past-end", "offset-plus-length-past-end",
                "file-too-short", "length-mismatch", "negative-offset"]


@pytest.mark.parametrize("case", UNSAFE_CASES)
def test_load_refuses_unsafe_external_data_before_reading(tmp_path, case):
    path, error, word = _unsafe_case(tmp_path, case)
    _OPENED.clear()
    _WATCHING[0] = True
    try:
        with pytest.raises(error) as info:
            io.load(path)
    finally:
        _WATCHING[0] = False
    message = str(info.value)
    assert "\n" not in message and word in message and "'W'" in message
    # Nothing but the model file itself was opened: not the data reference, not what it points at.
    root = tmp_path.resolve()
    touched = [p for p in map(Path, _OPENED) if p.is_absolute() and root in p.resolve().parents]
    assert [p.resolve() for p in touched] == [path.resolve()], touched


@pytest.mark.parametrize("case", UNSAFE_CASES)
@pytest.mark.parametrize("command", ["convert", "inspect", "verify-reference", "verify-candidate"])
def test_cli_refuses_unsafe_external_data(tmp_path, capsys, case, command):
    path, _, word = _unsafe_case(tmp_path, case)
    good = tmp_path / "good.onnx"
    onnx.save(add_model(), good)
    before = listing(tmp_path)
    argv = {
        "convert": ["convert", str(path)],
        "inspect": ["inspect", str(path)],
        "verify-reference": ["verify", str(path), str(good)],
        "verify-candidate": ["verify", str(good), str(path)],
    }[command]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("normfold: error:") and word in err[0]
    assert listing(tmp_path) == before


@pytest.mark.parametrize("in_function", [False, True], ids=["graph", "function"])
def test_unsafe_constant_attribute_is_refused(tmp_path, in_function):
    (tmp_path / "secret.bin").write_bytes(SECRET)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = _constant_external_model(model_dir, "../secret.bin", in_function=in_function)
    with pytest.raises(UnsafePathError, match="'..'"):
        io.load(path)


def test_unsafe_reference_in_subgraph_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(SECRET[:24])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    inner = external_reference(add_model(), "W", "../secret.bin").graph
    inner.ClearField("input")  # x comes from the outer scope
    node = helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([node], "outer", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                                helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              model_dir / "m.onnx")
    with pytest.raises(UnsafePathError):
        io.load(model_dir / "m.onnx")


def test_symlink_inside_the_model_directory_is_allowed(tmp_path):
    model_dir = tmp_path / "model"
    (model_dir / "blobs").mkdir(parents=True)
    base = add_model()
    (model_dir / "blobs" / "w.bin").write_bytes(numpy_helper.to_array(base.graph.initializer[0]).tobytes())
    (model_dir / "w.bin").symlink_to(model_dir / "blobs" / "w.bin")
    onnx.save(external_reference(base, "W", "w.bin"), model_dir / "m.onnx")
    model = io.load(model_dir / "m.onnx")
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(),
                                  numpy_helper.to_array(base.graph.initializer[0]))
