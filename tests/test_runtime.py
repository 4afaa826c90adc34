"""normfold.runtime: provider names, availability from onnxruntime itself, clear errors."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from normfold import runtime
from normfold.cli import main
from normfold.errors import InputError, RuntimeUnavailableError
from toy_models import conv_bn


def test_auto_picks_the_best_provider_onnxruntime_reports():
    available = ort.get_available_providers()
    expected = next(runtime.PROVIDERS[n] for n in runtime.AUTO_ORDER if runtime.PROVIDERS[n] in available)
    assert runtime.resolve_provider("auto") == expected


def test_cpu_is_always_available():
    assert runtime.resolve_provider("cpu") == "CPUExecutionProvider"


@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_an_unavailable_provider_is_an_error_naming_what_is_available(name):
    provider = runtime.PROVIDERS[name]
    if provider in ort.get_available_providers():
        assert runtime.resolve_provider(name) == provider
        return
    with pytest.raises(RuntimeUnavailableError, match=f"{provider} is not available.*available: .*CPUExecutionProvider"):
        runtime.resolve_provider(name)


def test_an_unknown_provider_name_is_a_usage_error():
    with pytest.raises(InputError, match="unknown provider 'gpu'; choose one of: auto, cpu, cuda, tensorrt"):
        runtime.resolve_provider("gpu")


def test_cli_reports_a_missing_provider_in_one_line(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), path)
    if "CUDAExecutionProvider" in ort.get_available_providers():  # a GPU machine: the provider just works
        assert main(["verify", str(path), str(path), "--provider", "cuda"]) == 0
        return
    assert main(["verify", str(path), str(path), "--provider", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDAExecutionProvider is not available" in err
