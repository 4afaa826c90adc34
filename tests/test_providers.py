"""Execution providers: options, fallback, onnxruntime's own availability, provider tolerances.

Availability always comes from onnxruntime. Tests of the selection *logic* for GPU builds patch the
Python-level `onnxruntime.get_available_providers` list; each such logic is also exercised on the real
CPU-only path (`test_*_on_this_onnxruntime`), where onnxruntime itself refuses or drops the provider.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import normfold
from normfold import provider_tolerances, runtime
from normfold.cli import main
from normfold.errors import InputError, RuntimeUnavailableError
from normfold.runtime import ProviderChoice, ProviderFallbackWarning
from normfold.verification import compare
from toy_models import conv_bn

CPU, CUDA, TRT = runtime.PROVIDERS["cpu"], runtime.PROVIDERS["cuda"], runtime.PROVIDERS["tensorrt"]
REAL = ort.get_available_providers()
GPU_BUILD = CUDA in REAL


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), path)
    return path


@pytest.fixture
def gpu_build(monkeypatch):
    """Makes onnxruntime's Python-level availability list report the given providers (logic tests only)."""
    def make(*names):
        monkeypatch.setattr(ort, "get_available_providers", lambda: list(names))
    return make


# -- options ---------------------------------------------------------------------------------------

def test_options_become_the_strings_onnxruntime_parses():
    options = runtime.normalize_options({"device_id": 1, "trt_fp16_enable": True, "trt_engine_cache_enable": "1",
                                         "use_tf32": "false", "trt_engine_cache_path": " /tmp/cache "})
    assert options == {"device_id": "1", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                       "use_tf32": "False", "trt_engine_cache_path": "/tmp/cache"}


@pytest.mark.parametrize("options, message", [
    ({"device id": 1}, "expected a name"),
    ({"device_id": [1]}, "not a string, number or boolean"),
    ({"device_id": " "}, "empty value"),
])
def test_malformed_options_are_input_errors(options, message):
    with pytest.raises(InputError, match=message):
        runtime.normalize_options(options)


@pytest.mark.parametrize("items, message", [
    (["device_id"], "expected KEY=VALUE"),
    (["=1"], "expected KEY=VALUE"),
    (["device_id="], "expected KEY=VALUE"),
    (["device_id=0", "device_id=1"], "device_id is given twice"),
])
def test_cli_option_syntax(items, message):
    with pytest.raises(InputError, match=message):
        runtime.parse_options(items)


def test_cpu_takes_no_options_and_cuda_no_tensorrt_options():
    with pytest.raises(InputError, match="provider option device_id: the CPU provider takes no provider options"):
        runtime.select_provider("cpu", {"device_id": 0})
    # checked before availability: the same usage error on any machine
    with pytest.raises(InputError, match="trt_fp16_enable: a TensorRT option, not for CUDAExecutionProvider"):
        runtime.select_provider("cuda", {"trt_fp16_enable": True})


# -- selection and fallback, on this onnxruntime -----------------------------------------------------

@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_a_missing_provider_says_how_to_install_it_on_this_onnxruntime(name):
    if runtime.PROVIDERS[name] in REAL:
        assert runtime.select_provider(name).used == name
        return
    with pytest.raises(RuntimeUnavailableError) as error:
        runtime.select_provider(name)
    text = str(error.value)
    assert f"{runtime.PROVIDERS[name]} is not available" in text and "pip install 'normfold[gpu]'" in text
    assert "--allow-fallback" in text and "\n" not in text


@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_fallback_is_visible_and_recorded_on_this_onnxruntime(name):
    if runtime.PROVIDERS[name] in REAL:
        pytest.skip(f"{runtime.PROVIDERS[name]} is available here: nothing to fall back from")
    expected = next(n for n in runtime.AUTO_ORDER[runtime.AUTO_ORDER.index(name) + 1:] if runtime.PROVIDERS[n] in REAL)
    with pytest.warns(ProviderFallbackWarning, match=f"{runtime.PROVIDERS[name]} is not available.*running on"):
        choice = runtime.select_provider(name, {"device_id": 0}, allow_fallback=True)
    assert (choice.requested, choice.used) == (name, expected)
    assert choice.fallback and choice.to_dict()["fallback"] == choice.fallback
    if expected == "cpu":
        assert choice.options == {} and "dropped: device_id" in choice.fallback


def test_auto_names_what_it_picked_on_this_onnxruntime():
    choice = runtime.select_provider("auto")
    best = next(n for n in runtime.AUTO_ORDER if runtime.PROVIDERS[n] in REAL)
    assert (choice.requested, choice.used, choice.fallback) == ("auto", best, None)
    assert choice.describe().startswith(f"{runtime.PROVIDERS[best]} (the best of ")


# -- selection logic for GPU builds (availability list patched) ---------------------------------------

def test_auto_prefers_tensorrt_then_cuda_then_cpu(gpu_build):
    gpu_build(CUDA, TRT, CPU)
    assert runtime.select_provider("auto").used == "tensorrt"
    gpu_build(CPU, CUDA)
    assert runtime.select_provider("auto").used == "cuda"
    gpu_build("AzureExecutionProvider", CPU)
    assert runtime.select_provider("auto").used == "cpu"


def test_tensorrt_sessions_list_cuda_and_cpu_after_it_and_split_the_options(gpu_build):
    gpu_build(TRT, CUDA, CPU)
    choice = runtime.select_provider("tensorrt", {"device_id": 1, "trt_fp16_enable": True,
                                                  "cudnn_conv_algo_search": "HEURISTIC"})
    assert choice.session_providers() == [
        (TRT, {"device_id": "1", "trt_fp16_enable": "True"}),
        (CUDA, {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"}),
        (CPU, {}),
    ]
    gpu_build(TRT, CPU)  # a TensorRT build without the CUDA provider: CPU takes what TensorRT cannot
    assert [name for name, _ in choice.session_providers()] == [TRT, CPU]


def test_tensorrt_falls_back_to_cuda_keeping_the_options_cuda_takes(gpu_build):
    gpu_build(CUDA, CPU)
    with pytest.raises(RuntimeUnavailableError, match="TensorrtExecutionProvider is not available"):
        runtime.select_provider("tensorrt", {"trt_fp16_enable": True})
    with pytest.warns(ProviderFallbackWarning, match="running on CUDAExecutionProvider instead.*dropped: trt_fp16_enable"):
        choice = runtime.select_provider("tensorrt", {"trt_fp16_enable": True, "device_id": 0}, allow_fallback=True)
    assert (choice.used, choice.options) == ("cuda", {"device_id": "0"})


def test_auto_checks_options_against_the_provider_it_picked(gpu_build):
    gpu_build(CUDA, CPU)
    with pytest.raises(InputError, match="trt_fp16_enable: a TensorRT option.*auto picked CUDAExecutionProvider"):
        runtime.select_provider("auto", {"trt_fp16_enable": True})
    assert runtime.select_provider("auto", {"device_id": 0}).options == {"device_id": "0"}


def test_a_provider_onnxruntime_lists_but_drops_is_caught(gpu_build, model_path):
    """The Python list says CUDA, the C++ runtime has none: onnxruntime drops it from the session,
    exactly as it does when a GPU build's CUDA libraries are missing; normfold notices."""
    gpu_build(CUDA, CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # onnxruntime's own "not in available provider names"
        with pytest.raises(RuntimeUnavailableError, match="lists CUDAExecutionProvider but could not start it"):
            runtime.open_session(model_path, provider="cuda")
        with pytest.warns(ProviderFallbackWarning, match="could not start it.*running on CPUExecutionProvider"):
            session, choice = runtime.open_session(model_path, provider="cuda", allow_fallback=True)
    assert session.get_providers() == [CPU] and (choice.requested, choice.used) == ("cuda", "cpu")


def test_provider_not_started_reads_what_the_session_runs_on():
    choice = ProviderChoice("tensorrt", "tensorrt")
    assert runtime.provider_not_started([TRT, CUDA, CPU], choice) is None
    assert "could not start it" in runtime.provider_not_started([CUDA, CPU], choice)


def test_a_broken_model_is_an_input_error_with_no_onnxruntime_chatter(tmp_path, capsys):
    path = tmp_path / "broken.onnx"
    proto = conv_bn()
    proto.graph.node[0].op_type = "NoSuchOp"
    onnx.save(proto, path)
    with pytest.raises(InputError, match="onnxruntime cannot load the model"):
        runtime.make_session(path)
    assert capsys.readouterr().out == ""  # onnxruntime's "EP Error ... falling back" retry is off


# -- provider tolerances ---------------------------------------------------------------------------

@pytest.mark.parametrize("used, options, env, expected", [
    ("cpu", {}, None, "fp32"),
    ("cuda", {}, None, "tf32"),  # onnxruntime's CUDA default: TF32 on
    ("cuda", {"use_tf32": "False"}, None, "fp32-gpu"),
    ("cuda", {}, "0", "fp32-gpu"),
    ("tensorrt", {}, None, "tf32"),
    ("tensorrt", {}, "0", "fp32-gpu"),
    ("tensorrt", {"trt_fp16_enable": "True"}, None, "fp16"),
    ("tensorrt", {"trt_bf16_enable": "True", "trt_fp16_enable": "True"}, None, "bf16"),
    ("tensorrt", {"trt_int8_enable": "True", "trt_fp16_enable": "True"}, None, "int8"),
])
def test_precision_of_each_provider_setting(monkeypatch, used, options, env, expected):
    if env is None:
        monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    else:
        monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", env)
    assert provider_tolerances.precision(ProviderChoice(used, used, options)) == expected


def test_verification_turns_cuda_tf32_off_unless_the_user_set_it():
    assert provider_tolerances.for_verification(ProviderChoice("cuda", "cuda")).options == {"use_tf32": "False"}
    assert provider_tolerances.for_verification(ProviderChoice("tensorrt", "tensorrt")).options == {"use_tf32": "False"}
    mine = ProviderChoice("cuda", "cuda", {"use_tf32": "True"})
    assert provider_tolerances.for_verification(mine) is mine
    assert provider_tolerances.for_verification(ProviderChoice("cpu", "cpu")).options == {}


def test_a_provider_widens_the_default_tolerances_to_its_arithmetic():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((64, 64)).astype(np.float32)
    tf32_like = reference * (1 + 3e-3 * rng.standard_normal(reference.shape)).astype(np.float32)
    assert not compare("y", reference, tf32_like).passed
    assert not compare("y", reference, tf32_like, precision="fp32-gpu").passed
    widened = compare("y", reference, tf32_like, precision="tf32")
    assert widened.passed and widened.rtol == 1e-2
    assert compare("y", reference, reference * np.float32(1 + 2e-2), precision="tf32").passed is False
    # the floor never tightens a coarser dtype's row, and given tolerances win over both
    assert provider_tolerances.widen((3e-2, 3e-2), "fp32-gpu") == (3e-2, 3e-2)
    assert compare("y", reference, tf32_like, precision="tf32", atol=1e-6, rtol=1e-6).passed is False


def test_int8_has_no_default_tolerance():
    x = np.ones((2, 2), np.float32)
    with pytest.raises(InputError, match="int8.*give --atol and --rtol"):
        compare("y", x, x, precision="int8")
    assert compare("y", x, x * np.float32(1.01), precision="int8", atol=0.1, rtol=0.1).passed


# -- verify / convert through the providers ----------------------------------------------------------

def test_verify_records_requested_and_used_provider(model_path):
    if GPU_BUILD:
        result = normfold.verify(model_path, model_path, provider="cuda")
        assert result.provider == "cuda" and result.precision == "fp32-gpu" and result.passed
        return
    with pytest.warns(ProviderFallbackWarning):
        result = normfold.verify(model_path, model_path, provider="cuda", allow_fallback=True,
                                 provider_options={"device_id": 0})
    assert result.passed and (result.provider, result.requested_provider) == ("cpu", "cuda")
    assert result.precision == "fp32" and "not available" in result.fallback
    assert result.summary_lines()[0].startswith("verification passed on cpu (requested cuda)")


def test_convert_passes_provider_options_to_its_verification(model_path):
    if TRT in REAL:
        pytest.skip("TensorRT is available: no fallback to record")
    with pytest.warns(ProviderFallbackWarning, match="dropped: trt_fp16_enable"):
        _, report = normfold.convert(model_path, provider="tensorrt", provider_options={"trt_fp16_enable": True},
                                     allow_fallback=True)
    verification = report.verification
    assert verification["passed"] and verification["requested_provider"] == "tensorrt"
    assert verification["provider"] != "tensorrt" and "trt_fp16_enable" not in verification["provider_options"]


def test_cli_unavailable_provider_is_one_line_exit_2(model_path, capsys):
    if GPU_BUILD:
        pytest.skip("CUDA is available here")
    assert main(["verify", str(model_path), str(model_path), "--provider", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'normfold[gpu]'" in err and "--allow-fallback" in err


def test_cli_fallback_warns_once_and_the_json_records_it(model_path, capsys):
    if GPU_BUILD:
        pytest.skip("CUDA is available here")
    argv = ["verify", str(model_path), str(model_path), "--provider", "cuda", "--allow-fallback", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert (data["provider"], data["requested_provider"]) == ("cpu", "cuda") and data["fallback"]
    assert captured.err.count("normfold: warning:") == 1 and "running on CPUExecutionProvider" in captured.err
    assert main(argv) == 0 and capsys.readouterr().err.count("normfold: warning:") == 1  # again, not swallowed


def test_cli_convert_report_records_the_fallback(model_path, tmp_path, capsys):
    if GPU_BUILD:
        pytest.skip("CUDA is available here")
    report = tmp_path / "r.json"
    assert main(["convert", str(model_path), "-o", str(tmp_path / "o.onnx"), "--provider", "cuda",
                 "--allow-fallback", "--report", str(report)]) == 0
    verification = json.loads(report.read_text())["verification"]
    assert (verification["provider"], verification["requested_provider"]) == ("cpu", "cuda")
    assert "normfold: warning:" in capsys.readouterr().err
    # without verification the provider is not needed, so not checked
    assert main(["convert", str(model_path), "-o", str(tmp_path / "p.onnx"), "--no-verify",
                 "--provider", "cuda"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--provider", "cuda", "--fp16"], "trt_fp16_enable: a TensorRT option"),
    (["--provider-option", "device_id=0"], "the CPU provider takes no provider options"),
    (["--provider-option", "nonsense"], "expected KEY=VALUE"),
    (["--provider", "tensorrt", "--fp16", "--provider-option", "trt_fp16_enable=False"], "--fp16 contradicts"),
])
def test_cli_bad_provider_options_are_one_line_usage_errors(model_path, argv, message, capsys):
    assert main(["verify", str(model_path), str(model_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_auto_says_what_it_picked(model_path, capsys):
    assert main(["verify", str(model_path), str(model_path), "--provider", "auto"]) == 0
    best = next(runtime.PROVIDERS[n] for n in runtime.AUTO_ORDER if runtime.PROVIDERS[n] in REAL)
    assert f"--provider auto picked {best} (the best of " in capsys.readouterr().err


def test_auto_walks_down_when_its_pick_cannot_start(gpu_build, model_path):
    """onnxruntime-gpu lists TensorRT even without TensorRT's libraries: auto must still run."""
    gpu_build(TRT, CUDA, CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # onnxruntime's own "not in available provider names"
        with pytest.warns(ProviderFallbackWarning) as caught:
            session, choice = runtime.open_session(model_path, provider="auto")
    assert session.get_providers() == [CPU] and (choice.requested, choice.used) == ("auto", "cpu")
    assert [str(w.message).split(";")[0] for w in caught if w.category is ProviderFallbackWarning] == [
        f"onnxruntime lists {TRT} but could not start it (its CUDA, cuDNN or TensorRT libraries are missing or "
        f"do not match this onnxruntime", f"onnxruntime lists {CUDA} but could not start it (its CUDA, cuDNN or "
        f"TensorRT libraries are missing or do not match this onnxruntime"]
