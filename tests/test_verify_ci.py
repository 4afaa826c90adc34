"""Verification in CI: reference files, JUnit/JSON output, per-output tolerances, the pytest helper, --bisect."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfold
from normfold import io, reference
from normfold.bisect import bisect
from normfold.cli import main
from normfold.errors import InputError
from normfold.junit import junit_xml
from normfold.testing import assert_equivalent
from normfold.verification import VerificationResult, compare
from toy_models import conv_bn

FLOAT = TensorProto.FLOAT
LAYERS = 4


def mlp_chain(seed: int = 0, *, perturb: int | None = None, delta: float = 5e-2) -> onnx.ModelProto:
    """x(2,8) -> LAYERS x [MatMul "mm_i" -> Add "add_i" -> Tanh "act_i"] -> y; aux = 2 * act_1.

    `perturb=i` adds `delta` to one row of layer i's weight, so values from mm_i on diverge
    (aux only when i <= 1).
    """
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(1, LAYERS + 1):
        w = (rng.standard_normal((8, 8)) / np.sqrt(8)).astype(np.float32)
        if perturb == i:
            w[3, :] += delta
        inits += [numpy_helper.from_array(w, f"w_{i}"),
                  numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), f"b_{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w_{i}"], [f"mm_{i}"], name=f"matmul_{i}"),
                  helper.make_node("Add", [f"mm_{i}", f"b_{i}"], [f"add_{i}"], name=f"bias_{i}"),
                  helper.make_node("Tanh", [f"add_{i}"], [f"act_{i}"], name=f"tanh_{i}")]
        x = f"act_{i}"
    inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    nodes += [helper.make_node("Identity", [x], ["y"], name="out"),
              helper.make_node("Mul", ["act_1", "two"], ["aux"], name="aux_mul")]
    graph = helper.make_graph(nodes, "mlp_chain", [helper.make_tensor_value_info("x", FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, 8]),
                               helper.make_tensor_value_info("aux", FLOAT, [2, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.fixture
def chain(tmp_path):
    """(reference path, candidate path with layer 2's weight perturbed)."""
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(mlp_chain(), ref)
    onnx.save(mlp_chain(perturb=2), cand)
    return ref, cand


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["verify", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- reference files -----------------------------------------------------------------------------


def test_saved_reference_round_trips_inputs_outputs_and_metadata(chain, tmp_path, capsys):
    ref, cand = chain
    npz = tmp_path / "ref.npz"
    code, out, _ = run_cli(capsys, ref, "--save-reference", npz, "--seed", 7, "--tolerance", "aux=1e-3,1e-3")
    assert code == 0 and "saved reference" in out and "seed 7" in out
    data = reference.load(npz)
    direct = normfold.verification.run_reference(ref, seed=7)
    assert list(data.inputs) == ["x"] and list(data.outputs) == ["y", "aux"]
    np.testing.assert_array_equal(data.inputs["x"], direct.inputs["x"])
    for name in ("y", "aux"):
        np.testing.assert_array_equal(data.outputs[name], direct.outputs[name])
    assert data.seed == 7 and data.generated == ["x"] and data.input_types == {"x": "tensor(float)"}
    assert data.tolerance_class == "fold" and data.tolerances == {"aux": (1e-3, 1e-3)}
    assert data.source == str(ref) and data.normfold_version == normfold.__version__
    with np.load(npz, allow_pickle=False) as raw:  # plain arrays and a JSON string, nothing pickled
        assert json.loads(str(raw["__normfold__"][()]))["format"] == "normfold.reference/1"

    # The candidate is checked without the original model, against the same numbers a two-model check sees.
    code, out, _ = run_cli(capsys, ref, "--reference", npz)
    assert code == 0 and "passed" in out
    code, out, _ = run_cli(capsys, cand, "--reference", npz, "--json")
    from_file = json.loads(out)
    code2, out2, _ = run_cli(capsys, ref, cand, "--seed", 7, "--json")
    assert code == code2 == 1
    assert from_file["reference_file"] == str(npz) and from_file["reference"] is None and from_file["seed"] == 7
    two_models = json.loads(out2)
    assert [o["max_abs_error"] for o in from_file["outputs"]] == [o["max_abs_error"] for o in two_models["outputs"]]


def test_input_generation_is_seeded_so_a_failure_reproduces(chain, tmp_path, capsys):
    ref, _ = chain
    paths = [tmp_path / f"{name}.npz" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (3, 3, 4)):
        assert run_cli(capsys, ref, "--save-reference", path, "--seed", seed)[0] == 0
    a, b, c = (reference.load(p).inputs["x"] for p in paths)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_two_models_save_the_reference_runs_data_even_when_the_check_fails(chain, tmp_path, capsys):
    ref, cand = chain
    npz = tmp_path / "ref.npz"
    code, out, _ = run_cli(capsys, ref, cand, "--save-reference", npz)
    assert code == 1 and "FAIL y" in out and f"saved reference {npz}" in out
    assert "reproduce: normfold verify" in out and "--seed 0" in out
    assert run_cli(capsys, cand, "--reference", npz)[0] == 1
    assert run_cli(capsys, ref, "--reference", npz)[0] == 0


def test_reference_file_api_round_trips_odd_names_and_dtypes(tmp_path):
    data = reference.ReferenceData(
        inputs={"a/b c": np.arange(6, dtype=np.int64).reshape(2, 3), "mask\n": np.array([True, False])},
        outputs={"bf": np.linspace(-2, 2, 5).astype(ml_dtypes.bfloat16), "f16": np.ones((1, 2), np.float16),
                 "tokens": np.array(["ab", "c"])},
        seed=11, generated=["a/b c"], shapes={"a/b c": [2, 3]}, tolerance_class="renorm", atol=1e-3,
    )
    path = tmp_path / "r.npz"
    reference.save(data, path)
    back = reference.load(path)
    assert list(back.inputs) == list(data.inputs) and list(back.outputs) == list(data.outputs)
    for name in data.inputs:
        np.testing.assert_array_equal(back.inputs[name], data.inputs[name])
    assert back.outputs["bf"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(back.outputs["bf"].astype(np.float32), data.outputs["bf"].astype(np.float32))
    assert back.outputs["f16"].dtype == np.float16 and back.outputs["tokens"].tolist() == ["ab", "c"]
    assert (back.seed, back.generated, back.shapes, back.tolerance_class, back.atol, back.rtol) == (
        11, ["a/b c"], {"a/b c": [2, 3]}, "renorm", 1e-3, None)
    assert back.input_types == {"a/b c": "tensor(int64)", "mask\n": "tensor(bool)"}
    with pytest.raises(InputError, match="already exists"):
        reference.save(data, path)
    with pytest.raises(InputError, match="must end in .npz"):
        reference.save(data, tmp_path / "r.bin")


def test_reference_files_are_read_without_unpickling_and_checked(tmp_path):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, __normfold__=np.array("{}"), input_0=np.array([object()], dtype=object))
    with pytest.raises(InputError, match="reference"):
        reference.load(pickled)
    plain = tmp_path / "plain.npz"
    np.savez(plain, x=np.zeros(3))
    with pytest.raises(InputError, match="not a normfold reference file.*--inputs"):
        reference.load(plain)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read the reference file"):
        reference.load(garbage)
    meta = {"format": "normfold.reference/1", "inputs": [], "outputs": [{"name": "y", "key": "output_0",
                                                                          "dtype": "float32", "shape": [2]}]}
    lying = tmp_path / "lying.npz"
    np.savez(lying, __normfold__=np.array(json.dumps(meta)), output_0=np.zeros(3, np.float32))
    with pytest.raises(InputError, match=r"shape \[3\] differs from the metadata's \[2\]"):
        reference.load(lying)
    with pytest.raises(InputError, match="no such reference file"):
        reference.load(tmp_path / "missing.npz")


def test_save_reference_refuses_to_overwrite_without_force_and_writes_atomically(chain, tmp_path, capsys):
    ref, _ = chain
    npz = tmp_path / "ref.npz"
    npz.write_bytes(b"golden")
    code, _, err = run_cli(capsys, ref, "--save-reference", npz)
    assert code == 2 and "already exists (use --force to overwrite)" in err and npz.read_bytes() == b"golden"
    assert run_cli(capsys, ref, "--save-reference", npz, "--force")[0] == 0
    assert reference.load(npz).outputs["y"].shape == (2, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cand.onnx", "ref.npz", "ref.onnx"]  # no temp files


def test_reference_file_tolerances_apply_and_flags_override_them(chain, tmp_path, capsys):
    ref, cand = chain
    npz = tmp_path / "loose.npz"
    assert run_cli(capsys, ref, "--save-reference", npz, "--tolerance", "y=10,0")[0] == 0
    code, out, _ = run_cli(capsys, cand, "--reference", npz, "--json")
    assert code == 0 and json.loads(out)["outputs"][0]["atol"] > 1.0
    assert run_cli(capsys, cand, "--reference", npz, "--tolerance", "y=0,0")[0] == 1
    code, out, _ = run_cli(capsys, ref, "--reference", npz, "--tolerance-class", "renorm", "--json")
    assert code == 0 and json.loads(out)["tolerance_class"] == "renorm"


# --- CI output: JUnit, JSON, exit codes ----------------------------------------------------------


def test_junit_has_one_case_per_output_and_failures_carry_the_metrics(chain, tmp_path, capsys):
    ref, cand = chain
    xml_path = tmp_path / "junit.xml"
    code, out, _ = run_cli(capsys, ref, cand, "--junit", xml_path, "--seed", 5)
    assert code == 1
    root = ET.parse(xml_path).getroot()
    assert root.tag == "testsuites" and (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "1", "0")
    (suite,) = root.findall("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["seed"] == "5" and props["reference"] == str(ref) and props["candidate"] == str(cand)
    assert json.loads(props["input_shapes"]) == {"x": [2, 8]}
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert set(cases) == {"output y", "output aux"}
    assert cases["output aux"].find("failure") is None and "max_abs_error" in cases["output aux"].find("system-out").text
    failure = cases["output y"].find("failure")
    assert failure.get("type") == "NotEquivalent"
    assert "max_abs" in failure.get("message") and "worst at [" in failure.get("message")
    metrics = dict(line.split(": ", 1) for line in failure.text.strip().splitlines())
    assert {"max_abs_error", "max_rel_error", "mean_abs_error", "cosine", "rtol", "atol", "worst_index",
            "worst_reference", "worst_candidate"} <= set(metrics)
    assert "verification FAILED" in suite.find("system-out").text

    assert run_cli(capsys, ref, ref, "--junit", xml_path)[0] == 0  # replaced atomically, now all passing
    root = ET.parse(xml_path).getroot()
    assert root.get("failures") == "0" and not root.findall(".//failure")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cand.onnx", "junit.xml", "ref.onnx"]


def test_junit_escapes_names_xml_cannot_hold():
    check = compare('a<b>&"c\x01', np.zeros(3, np.float32), np.ones(3, np.float32))
    result = VerificationResult(passed=False, outputs=[check], provider="cpu", seed=0)
    root = ET.fromstring(junit_xml(result, reference="r.onnx", candidate="odd & <name>.onnx"))
    case = root.find(".//testcase")
    assert case.get("name") == 'output a<b>&"c\\x01' and case.find("failure") is not None
    assert root.find("testsuite").get("name") == "normfold verify odd & <name>.onnx"


def test_json_on_stdout_and_report_file_share_a_stable_schema(chain, tmp_path, capsys):
    ref, cand = chain
    report = tmp_path / "verify.json"
    code, out, _ = run_cli(capsys, ref, cand, "--json", "--report", report)
    assert code == 1
    doc = json.loads(out)
    assert doc == {**json.loads(report.read_text()), "seconds": doc["seconds"]}
    assert doc["schema"] == "normfold.verify/1" and doc["passed"] is False and doc["bisect"] is None
    y = next(o for o in doc["outputs"] if o["name"] == "y")
    assert not y["passed"] and y["worst_index"] is not None
    assert {"max_abs_error", "max_rel_error", "mean_abs_error", "cosine", "worst_reference", "worst_candidate"} <= set(y)


def test_human_summary_is_short_and_names_the_worst_element(chain, capsys):
    ref, cand = chain
    code, out, err = run_cli(capsys, ref, cand)
    assert code == 1 and err == ""
    lines = out.splitlines()
    assert lines[0] == "verification FAILED on cpu (seed 0): 1 of 2 outputs out of tolerance"
    fail = next(line for line in lines if "FAIL y" in line)
    assert "worst at [" in fail and "reference " in fail and "candidate " in fail
    many = VerificationResult(True, [compare(f"o{i}", np.ones(2), np.ones(2)) for i in range(30)], "cpu", 0)
    assert len(many.summary_lines()) == 2


# --- per-output tolerances -----------------------------------------------------------------------


def test_per_output_tolerance_overrides_only_that_output(tmp_path, capsys):
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(mlp_chain(), ref)
    onnx.save(mlp_chain(perturb=1), cand)  # both outputs diverge
    code, out, _ = run_cli(capsys, ref, cand, "--json", "--tolerance", "y=10,0")
    doc = json.loads(out)
    by_name = {o["name"]: o for o in doc["outputs"]}
    assert code == 1 and by_name["y"]["passed"] and not by_name["aux"]["passed"]
    assert by_name["y"]["rtol"] == 0 and by_name["aux"]["rtol"] == 1e-4
    assert run_cli(capsys, ref, cand, "--tolerance", "y=10,0", "--tolerance", "aux=10,0")[0] == 0
    result = normfold.verify(ref, cand, tolerances={"aux": (10.0, 0.0)})
    assert [o.passed for o in result.outputs] == [False, True]


@pytest.mark.parametrize("item", ["y", "y=1", "y=a,b", "y=-1,0", "=1,2", "y=1,2,3", "y=nan,0", "y=inf,0"])
def test_malformed_tolerances_exit_2_with_one_line(chain, capsys, item):
    ref, cand = chain
    code, _, err = run_cli(capsys, ref, cand, "--tolerance", item)
    assert code == 2 and err.count("\n") == 1 and "--tolerance" in err


def test_unknown_or_repeated_tolerance_names_exit_2(chain, capsys):
    ref, cand = chain
    code, _, err = run_cli(capsys, ref, cand, "--tolerance", "nope=1,1")
    assert code == 2 and "no output named 'nope' (outputs: y, aux)" in err
    code, _, err = run_cli(capsys, ref, cand, "--tolerance", "y=1,1", "--tolerance", "y=2,2")
    assert code == 2 and "given twice" in err
    with pytest.raises(InputError, match="no output named 'nope'"):
        normfold.verify(ref, cand, tolerances={"nope": (1.0, 1.0)})


# --- bad combinations ----------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["{ref}"], "give REFERENCE.onnx CANDIDATE.onnx"),
    (["{ref}", "{cand}", "{ref}"], "at most two models"),
    (["{ref}", "--reference", "{npz}", "--save-reference", "{tmp}/new.npz"], "use one of them"),
    (["{ref}", "{cand}", "--reference", "{npz}"], "give only CANDIDATE.onnx"),
    (["{cand}", "--reference", "{npz}", "--seed", "1"], "--seed cannot be combined with --reference"),
    (["{cand}", "--reference", "{npz}", "--shape", "x=2,8"], "--shape cannot be combined"),
    (["{cand}", "--reference", "{npz}", "--bisect"], "--bisect needs both models"),
    (["{ref}", "--save-reference", "{tmp}/new.npz", "--junit", "{tmp}/j.xml"], "--junit need a candidate"),
    (["{ref}", "{cand}", "--junit", "{cand}"], "would overwrite"),
    (["{ref}", "{cand}", "--junit", "{tmp}/same", "--report", "{tmp}/same"], "would overwrite"),
    (["{cand}", "--reference", "{tmp}/missing.npz"], "no such reference file"),
    (["{npz}", "{cand}"], "a reference file goes after --reference"),
    (["{ref}", "--save-reference", "{tmp}/out.bin"], "must end in .npz"),
])
def test_bad_combinations_exit_2_with_one_line(chain, tmp_path, capsys, args, message):
    ref, cand = chain
    npz = tmp_path / "ref.npz"
    assert run_cli(capsys, ref, "--save-reference", npz)[0] == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    values = {"ref": ref, "cand": cand, "npz": npz, "tmp": tmp_path}
    code, out, err = run_cli(capsys, *[a.format(**values) for a in args])
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_reference_file_from_another_model_is_refused(chain, tmp_path, capsys):
    ref, _ = chain
    npz = tmp_path / "conv.npz"
    conv = tmp_path / "conv.onnx"
    onnx.save(conv_bn(), conv)
    assert run_cli(capsys, conv, "--save-reference", npz)[0] == 0
    code, _, err = run_cli(capsys, ref, "--reference", npz)
    assert code == 2 and "the models' outputs differ: reference ['y'], candidate ['y', 'aux']" in err


# --- the pytest helper ---------------------------------------------------------------------------


def test_assert_equivalent_passes_for_paths_protos_models_and_reference_files(chain, tmp_path):
    ref, _ = chain
    result = assert_equivalent(ref, ref)
    assert result.passed and [o.name for o in result.outputs] == ["y", "aux"]
    assert assert_equivalent(mlp_chain(), io.load(ref)).passed
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    assert assert_equivalent(str(ref), mlp_chain(), inputs={"x": x}).input_shapes == {"x": [2, 8]}
    assert assert_equivalent(ref, ref, inputs=[x]).passed
    npz = tmp_path / "ref.npz"
    reference.save(normfold.verification.run_reference(ref, seed=3), npz)
    assert assert_equivalent(npz, ref).seed == 3
    with pytest.raises(InputError, match=r"2 input\(s\) given, the model takes 1: x"):
        assert_equivalent(conv_bn(), conv_bn(), inputs=[x, x])


def test_assert_equivalent_failure_message_has_the_metrics(chain):
    ref, cand = chain
    with pytest.raises(AssertionError) as info:
        assert_equivalent(ref, cand)
    message = str(info.value)
    assert message.splitlines()[0].startswith(f"{cand} is not equivalent to {ref}: 1 of 2 outputs out of tolerance")
    fail = next(line for line in message.splitlines() if "FAIL y" in line)
    for field in ("max_abs", "max_rel", "mean_abs", "cosine", "rtol", "atol", "worst at [", "reference ", "candidate "):
        assert field in fail
    assert "ok   aux" in message
    assert assert_equivalent(ref, cand, atol=10.0).passed
    assert assert_equivalent(ref, cand, tolerances={"y": (10.0, 0.0)}).passed


def test_normfold_and_its_helpers_import_without_torch(chain):
    ref, _ = chain
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import normfold, normfold.testing, normfold.bisect, normfold.junit, normfold.cli\n"
        f"print(normfold.testing.assert_equivalent({str(ref)!r}, {str(ref)!r}).passed)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def _linear_onnx(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "linear",
        [helper.make_tensor_value_info("x", FLOAT, [3, weight.shape[1]])],
        [helper.make_tensor_value_info("y", FLOAT, [3, weight.shape[0]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w"), numpy_helper.from_array(bias.astype(np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.torch
def test_assert_equivalent_on_torch_modules_runs_float64():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    x = torch.randn(3, 6)
    result = assert_equivalent(module, module, inputs=(x,))
    assert result.outputs[0].dtype == "float64" and result.outputs[0].max_abs_error == 0.0
    assert module[0].weight.dtype == torch.float32 and module.training  # the caller's module is untouched
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    other.load_state_dict(module.state_dict())
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-2
    with pytest.raises(AssertionError, match=r"FAIL output_0 float64\[3, 5\].*worst at \["):
        assert_equivalent(module, other, inputs=[x])
    with pytest.raises(InputError, match="needs inputs"):
        assert_equivalent(module, other)


@pytest.mark.torch
def test_assert_equivalent_torch_module_against_onnx():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 2)
    weight, bias = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    result = assert_equivalent(linear, _linear_onnx(weight, bias))  # inputs generated from the ONNX side
    assert [o.name for o in result.outputs] == ["y"] and result.input_shapes == {"x": [3, 4]}
    assert result.outputs[0].rtol == 1e-4  # float32 tolerances: the coarser of float64 and float32
    assert assert_equivalent(_linear_onnx(weight, bias), linear, inputs={"x": torch.ones(3, 4)}).passed
    shifted = bias + np.array([0.0, 1e-2], np.float32)
    with pytest.raises(AssertionError, match="FAIL y"):
        assert_equivalent(linear, _linear_onnx(weight, shifted))


@pytest.mark.torch
def test_torch_module_that_cannot_run_in_float64_runs_as_it_is():
    torch = pytest.importorskip("torch")

    class Float32Only(torch.nn.Module):
        def forward(self, x):
            assert x.dtype == torch.float32
            return x * 2

    result = assert_equivalent(Float32Only(), Float32Only(), inputs=(torch.ones(2),))
    assert result.passed and result.outputs[0].dtype == "float32"


# --- bisect --------------------------------------------------------------------------------------


def test_bisect_finds_the_first_divergent_value_of_a_perturbed_weight(chain, capsys):
    ref, cand = chain
    result = bisect(ref, cand)
    assert result.first is not None
    assert (result.first.name, result.first.op_type, result.first.node) == ("mm_2", "MatMul", "matmul_2")
    assert result.first.candidate_node == "matmul_2" and not result.first.check.passed
    assert result.failing_outputs == ["y"] and not result.skipped
    assert result.compared == 3 * LAYERS + 2  # every node output; inputs and initializers excluded
    diverging = [d.name for d in result.divergent]
    assert diverging[0] == "mm_2" and "act_1" not in diverging and "aux" not in diverging
    chunked = bisect(ref, cand, chunk_size=3)  # several onnxruntime runs, same answer
    assert [d.name for d in chunked.divergent] == diverging and chunked.first.name == "mm_2"

    code, out, _ = run_cli(capsys, ref, cand, "--bisect")
    assert code == 1 and "first divergence: 'mm_2', output of MatMul node 'matmul_2'" in out
    code, out, _ = run_cli(capsys, ref, cand, "--bisect", "--json")
    doc = json.loads(out)["bisect"]
    assert doc["first"]["name"] == "mm_2" and doc["first"]["check"]["worst_index"] is not None
    assert run_cli(capsys, ref, ref, "--bisect")[1].splitlines()[-1] == (
        "bisect: not needed, every output is within tolerance")


def _conv_bn_conv() -> onnx.ModelProto:
    """x -> Conv "c" -> BatchNormalization -> Relu "r" -> Conv "c2" -> y."""
    proto = conv_bn()
    rng = np.random.default_rng(5)
    proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2"))
    proto.graph.node[2].output[0] = "r"
    proto.graph.node.append(helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", FLOAT, [1, 2, 8, 8]))
    return proto


def test_bisect_looks_past_values_a_rewrite_changed_on_purpose():
    reference_model = io.from_proto(_conv_bn_conv())
    folded, _ = normfold.convert(io.from_proto(_conv_bn_conv()), passes=["fold-batchnorm"])
    assert [n.op_type for n in folded.graph] == ["Conv", "Relu", "Conv"]  # "c" now holds BN(conv)
    w2 = folded.graph.initializers["w2"]
    perturbed = w2.const_value.numpy().copy()
    perturbed[1, 2, 0, 0] += 0.05
    w2.const_value = ir.tensor(perturbed, name="w2")
    outputs_before = [v.name for v in reference_model.graph.outputs]
    result = bisect(reference_model, folded)
    assert [v.name for v in reference_model.graph.outputs] == outputs_before  # in-memory models restored
    assert [v.name for v in folded.graph.outputs] == ["y"]
    assert [(d.name, d.absorbed) for d in result.divergent] == [("c", True), ("y", False)]
    assert (result.first.name, result.first.op_type, result.first.node) == ("y", "Conv", "conv2")
    assert any("agree again downstream" in line and "'c'" in line for line in result.summary_lines())


def test_bisect_skips_values_whose_shape_or_dtype_differs_and_ignores_subgraphs(tmp_path):
    def model(candidate: bool) -> onnx.ModelProto:
        branch = helper.make_graph([helper.make_node("Neg", ["h"], ["inner"], name="neg")], "branch", [],
                                   [helper.make_tensor_value_info("inner", FLOAT, [2, 8])])
        if candidate:  # "h" is flat, "d" is double
            nodes = [helper.make_node("Reshape", ["x", "flat"], ["h"], name="flatten"),
                     helper.make_node("Reshape", ["h", "square"], ["h2"], name="unflatten"),
                     helper.make_node("Cast", ["h2"], ["d"], name="widen", to=TensorProto.DOUBLE),
                     helper.make_node("Cast", ["d"], ["e"], name="narrow", to=FLOAT)]
            branch = helper.make_graph([helper.make_node("Reshape", ["h", "square"], ["inner"], name="neg")],
                                       "branch", [], [helper.make_tensor_value_info("inner", FLOAT, [2, 8])])
        else:
            nodes = [helper.make_node("Identity", ["x"], ["h"], name="copy"),
                     helper.make_node("Identity", ["h"], ["d"], name="copy2"),
                     helper.make_node("Identity", ["d"], ["e"], name="copy3")]
        nodes += [helper.make_node("If", ["cond"], ["branch_out"], name="if", then_branch=branch, else_branch=branch),
                  helper.make_node("Add", ["e", "branch_out"], ["y"], name="add")]
        inits = [numpy_helper.from_array(np.array([16], np.int64), "flat"),
                 numpy_helper.from_array(np.array([2, 8], np.int64), "square"),
                 numpy_helper.from_array(np.array(True), "cond")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [2, 8])],
                                  [helper.make_tensor_value_info("y", FLOAT, [2, 8])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)

    result = bisect(io.from_proto(model(False)), io.from_proto(model(True)))
    skipped = {s["name"]: s["reason"] for s in result.skipped}
    assert skipped == {"h": "shape differs: reference [2, 8], candidate [16]",
                       "d": "dtype differs: reference float32, candidate float64"}
    assert result.compared == 3  # e, branch_out, y; "inner" lives in a subgraph
    assert result.first is not None and result.first.name == "branch_out"  # -x vs x
    assert "skipped 2" in result.summary_lines()[0]


def test_a_reference_file_carries_dynamic_dims_and_integer_ids(tmp_path, capsys):
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["y"], name="embed")], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", FLOAT, None)], [table])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), model)
    npz = tmp_path / "golden.npz"
    assert run_cli(capsys, model, "--save-reference", npz, "--shape", "input_ids=1,12")[0] == 0
    data = reference.load(npz)
    assert data.shapes == {"input_ids": [1, 12]} and data.inputs["input_ids"].dtype == np.int64
    assert data.inputs["input_ids"].max() < 7
    junit = tmp_path / "junit.xml"
    code, out, _ = run_cli(capsys, model, "--reference", npz, "--junit", junit)  # no --shape needed
    assert code == 0 and ET.parse(junit).getroot().get("tests") == "1"
