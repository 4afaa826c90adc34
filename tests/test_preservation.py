"""Nothing lost: `normfold convert` on every model of normfold.models keeps what it did not rewrite.

Each factory (CNN_FACTORIES and TRANSFORMER_FACTORIES) is exported once per session (TorchScript exporter,
opset 18; two transformers also with the dynamo exporter, a CNN and a transformer also in float16), given
metadata a user's model carries (producer name and version, model and graph doc strings, domain,
model_version, metadata_props, an extra opset import), saved with all its tensors in an external data file
of its own name (`weights.bin`), and converted by the CLI with the default passes and output
(`MODEL.normfold.onnx` beside the input). Then:

- metadata: producer, doc strings, domain, model_version, opset imports and IR version are unchanged;
  metadata_props are the input's plus the one `normfold.provenance` entry;
- the graph's inputs and outputs: same names, element types and shapes, in order;
- node names: unique and non-empty; a name that survives keeps its op type and domain; every node the
  rewrite may not remove (neither part of a normalization site nor constant-only weight preparation, e.g.
  a Transpose of a weight that fold-norm-affine folded) survives under its name;
- initializers: every entry of the report's `untouched_initializers` is in the output with the input's
  bytes (same sha256, byte-identical), and every output initializer with the input's name and bytes
  is listed there;
- external data: the output's tensors live in `MODEL.normfold.onnx.data` (never `weights.bin` or another
  input file), inside the output's directory; the input files are byte-identical afterwards;
- the output verifies against the input (the CLI's own verification passed: exit 0).

A full disk while writing the small outputs (JSON reports, reference files, JUnit: normfold.atomic; the model
itself is covered in test_io.py): a write that fails half-way leaves no partial file, an existing file as it
was, and the input untouched, with one error line (simulated ENOSPC; a real EFBIG from RLIMIT_FSIZE in a child).
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("torch")
pytest.importorskip("transformers")

from normfold import cli, models  # noqa: E402
from normfold.atomic import write_atomic, write_json  # noqa: E402
from normfold.errors import InputError  # noqa: E402
from normfold.detect import find_sites  # noqa: E402
from normfold.io import PROVENANCE_KEY, from_proto  # noqa: E402

from io_builders import add_model, all_tensor_protos, external_locations, listing, run_normfold  # noqa: E402

CASES = [(n, "torchscript", "float32") for n in list(models.CNN_FACTORIES) + list(models.TRANSFORMER_FACTORIES)]
CASES += [("tiny_gpt", "dynamo", "float32"), ("vit", "dynamo", "float32")]  # fused LayerNorm, dynamo's names
CASES += [("llama", "torchscript", "float16"), ("resnet_like", "torchscript", "float16")]
EXTRA_OPSET = ("com.example.preservation", 1)
PROPS = {"author": "preservation test", "license": "Apache-2.0", "zz.last": "kept in order"}


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[tuple[str, str, str], onnx.ModelProto]:
    """(name, exporter, dtype) -> the exported model (with its tensors embedded), exported once per session."""
    import torch

    from normfold.models.export import build_onnx

    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("exports")
    return {case: build_onnx(case[0], seed=0, path=directory / ("-".join(case) + ".onnx"), exporter=case[1],
                             dtype=case[2])
            for case in CASES}


def decorated(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with the metadata a user's model carries (also a fresh copy to save: saving with external data
    moves the tensors out of the proto it is given)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.producer_name, out.producer_version = "preservation-producer", "9.8.7"
    out.doc_string, out.graph.doc_string = "model doc string", "graph doc string"
    out.domain, out.model_version = "org.example.models", 42
    out.opset_import.append(helper.make_opsetid(*EXTRA_OPSET))
    del out.metadata_props[:]
    helper.set_model_props(out, PROPS)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def io_signature(values) -> list:
    return [(v.name, v.type.SerializeToString()) for v in values]


def removable(model: onnx.ModelProto) -> set[str]:
    """Names of the input nodes a rewrite may remove: the nodes of every normalization site and the
    constant-only nodes (every input an initializer or another constant-only node's output)."""
    names = {n.name for s in find_sites(from_proto(model)) for n in s.nodes}
    constant = {t.name for t in model.graph.initializer}
    for node in model.graph.node:  # topological order
        if all(not i or i in constant for i in node.input):
            names.add(node.name)
            constant.update(node.output)
    return names


@pytest.mark.parametrize("name,exporter,dtype", CASES)
def test_convert_preserves_what_it_does_not_rewrite(name, exporter, dtype, exports, tmp_path, capsys):
    original = decorated(exports[name, exporter, dtype])
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    src = src_dir / f"{name}.onnx"
    onnx.save_model(decorated(original), src, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert external_locations(src) == {"weights.bin"}
    inputs_before = {p.name: sha(p) for p in src_dir.iterdir()}
    report_path = tmp_path / "report.json"

    code = cli.main(["convert", str(src), "--report", str(report_path)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    out = src_dir / f"{name}.normfold.onnx"
    assert report["output"] == str(out) and report["verification"]["passed"], report
    assert sum(p["applied"] for p in report["passes"]) > 0, report  # every model has a rewrite

    # the input's files are untouched; the output has its own data file, beside it; the spill directory of
    # rewritten weights (normfold.io) is gone once the converted model is
    gc.collect()
    after = {p.name: sha(p) for p in src_dir.iterdir()}
    assert {k: after[k] for k in inputs_before} == inputs_before
    assert external_locations(out) <= {out.name + ".data"}
    assert set(after) - set(inputs_before) <= {out.name, out.name + ".data"}

    converted = onnx.load(out)  # loads its external data: the locations above are the only ones read
    for field in ("ir_version", "producer_name", "producer_version", "doc_string", "domain", "model_version"):
        assert getattr(converted, field) == getattr(original, field), field
    assert converted.graph.doc_string == original.graph.doc_string
    opsets = [[(o.domain, o.version) for o in m.opset_import] for m in (converted, original)]
    assert opsets[0] == opsets[1]
    props = [(p.key, p.value) for p in converted.metadata_props]
    assert [p for p in props if p[0] != PROVENANCE_KEY] == list(PROPS.items())
    assert [k for k, _ in props].count(PROVENANCE_KEY) == 1

    assert io_signature(converted.graph.input) == io_signature(original.graph.input)
    assert io_signature(converted.graph.output) == io_signature(original.graph.output)

    new_nodes = {n.name: (n.op_type, n.domain) for n in converted.graph.node}
    assert len(new_nodes) == len(converted.graph.node) and "" not in new_nodes, "node names not unique"
    old_nodes = {n.name: (n.op_type, n.domain) for n in original.graph.node}
    assert {k: v for k, v in new_nodes.items() if k in old_nodes} == {k: old_nodes[k] for k in new_nodes
                                                                      if k in old_nodes}
    lost = set(old_nodes) - set(new_nodes) - removable(original)
    assert not lost, sorted(lost)

    old_inits = {t.name: numpy_helper.to_array(t).tobytes() for t in original.graph.initializer}
    new_inits = {t.name: numpy_helper.to_array(t).tobytes() for t in converted.graph.initializer}
    untouched = report["untouched_initializers"]
    for init_name, digest in untouched.items():
        assert new_inits[init_name] == old_inits[init_name], init_name
        assert hashlib.sha256(old_inits[init_name]).hexdigest() == digest, init_name
    same = {k for k, v in new_inits.items() if old_inits.get(k) == v}
    assert same == set(untouched), sorted(same ^ set(untouched))
    assert all(t.data_location != onnx.TensorProto.EXTERNAL or
               {e.key: e.value for e in t.external_data}["location"] == out.name + ".data"
               for t in all_tensor_protos(onnx.load(out, load_external_data=False)))
    assert np.isfinite([np.asarray(numpy_helper.to_array(t), np.float64).sum() for t in converted.graph.initializer
                        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]).all()


def test_folded_graph_output_keeps_its_type(tmp_path):
    """x -> Conv -> BatchNormalization -> y (declared float[1, 4, 6]): after folding, y is the Conv's output and
    must keep the declared type and shape (the minimal reproducer of the models above; no torch needed). Lost
    only when a pass that needs shapes runs (the default passes), which makes the pipeline infer them."""
    import normfold

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w", rng.standard_normal((4, 3, 3))), ("g", rng.standard_normal(4)), ("b", rng.standard_normal(4)),
        ("m", rng.standard_normal(4)), ("v", rng.uniform(0.5, 2, 4))]]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 6])], inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model, report = normfold.convert(from_proto(original))  # default passes: some infer shapes
    assert report.applied == 1
    normfold.save(model, tmp_path / "out.onnx")
    assert io_signature(onnx.load(tmp_path / "out.onnx").graph.output) == io_signature(original.graph.output)


# -- a full disk while writing reports and reference files -------------------------------------------------
def _half_then_enospc(f):
    f.write(b'{"partial": ')
    f.flush()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("previous", [False, True], ids=["new", "replacing"])
def test_a_write_failing_half_way_leaves_no_partial_file(tmp_path, previous):
    path = tmp_path / "report.json"
    if previous:
        write_json(path, {"old": True})
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    with pytest.raises(InputError) as info:
        write_atomic(path, _half_then_enospc, what="JSON report")
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "nothing written" in message
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == before  # no temporary file left either
    if previous:
        assert json.loads(path.read_text()) == {"old": True}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE behaviour is Linux's")
@pytest.mark.parametrize("output", ["--save-reference", "--junit", "--report"])
def test_cli_outputs_past_the_file_size_limit_leave_nothing(tmp_path, output):
    """A real write failure half-way (EFBIG): `verify` writing a reference file, a JUnit or a JSON report
    bigger than the process may write."""
    import resource

    model = tmp_path / "m.onnx"
    onnx.save(add_model(shape=(64, 64)), model)  # inputs and outputs: 2 x 16 KB
    name = {"--save-reference": "ref.npz", "--junit": "junit.xml", "--report": "report.json"}[output]
    args = ["verify", model] + ([] if output == "--save-reference" else [model]) + [output, tmp_path / name]
    limit = {"--save-reference": 8192, "--junit": 64, "--report": 64}[output]
    before = listing(tmp_path)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run_normfold(*args, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normfold: error:") and "cannot write" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert listing(tmp_path) == before
