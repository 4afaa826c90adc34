"""normfold.fx capture, pass registry and convert: which capture, why, errors, fixed point, report."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import normfold.fx as nfx  # noqa: E402
from normfold.errors import InputError, VerificationError  # noqa: E402
from normfold.fx import registry  # noqa: E402
from normfold.fx.capture import capture  # noqa: E402
from normfold.report import Skip  # noqa: E402


class ShapeBranch(nn.Module):
    """Control flow on a shape: symbolic tracing fails, torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.shape[0] > 1:
            return self.conv(x)
        return x


class DataBranch(ShapeBranch):
    """Control flow on data: neither capture works."""

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


def test_symbolic_trace_first():
    captured = capture(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), (torch.randn(1, 3, 2, 2),))
    assert captured.method == "symbolic_trace" and captured.reason is None
    assert [n.op for n in captured.gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]


def test_torch_export_when_symbolic_trace_fails_says_why():
    captured = capture(ShapeBranch(), (torch.randn(2, 3, 2, 2),))
    assert captured.method == "torch.export"
    assert captured.reason.startswith("symbolic_trace failed: TraceError")
    targets = [str(n.target) for n in captured.gm.graph.nodes if n.op == "call_function"]
    assert "aten.conv2d.default" in targets


def test_forced_capture_methods():
    inputs = (torch.randn(2, 3, 2, 2),)
    assert capture(nn.Conv2d(3, 4, 1), inputs, "export").method == "torch.export"
    with pytest.raises(InputError, match="cannot capture ShapeBranch: symbolic_trace failed"):
        capture(ShapeBranch(), inputs, "symbolic_trace")
    with pytest.raises(InputError, match="unknown capture method 'jit'"):
        capture(ShapeBranch(), inputs, "jit")


def test_uncapturable_module_is_one_clear_line():
    with pytest.raises(InputError) as info:
        nfx.convert(DataBranch(), (torch.randn(2, 3, 2, 2),))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot capture DataBranch: symbolic_trace failed: TraceError")
    assert "torch.export failed" in message


def test_graph_module_is_used_as_given():
    gm = torch.fx.symbolic_trace(nn.Linear(3, 2))
    assert capture(gm, (torch.randn(1, 3),)).gm is gm


def test_registry_names_and_defaults(monkeypatch):
    assert set(registry.PASSES) == {"fold-batchnorm", "layernorm-to-rmsnorm", "layernorm-to-crmsnorm",
                                    "fold-norm-affine"}
    assert registry.DEFAULT_PASSES == ("fold-batchnorm", "layernorm-to-rmsnorm", "fold-norm-affine")
    assert registry.resolve(["fold-batchnorm"])[0].NAME == "fold-batchnorm"
    with pytest.raises(InputError, match=r"unknown FX pass 'emit-rmsnorm'; known passes: fold-batchnorm"):
        registry.resolve(["emit-rmsnorm"])
    monkeypatch.setitem(registry.PASSES, "not-written-yet", "normfold.fx.not_written_yet")
    assert registry.load("not-written-yet") is None and "not-written-yet" not in registry.available()
    with pytest.raises(InputError, match="unknown FX pass 'not-written-yet'"):
        registry.resolve(["not-written-yet"])
    with pytest.raises(InputError, match="no passes selected"):
        registry.resolve([])
    with pytest.raises(InputError, match="is not an FX pass"):
        registry.resolve([object()])


def test_every_registered_module_follows_the_contract():
    for name in registry.available():
        module = registry.load(name)
        assert module.NAME == name and callable(module.run)
        assert getattr(module, "TOLERANCE_CLASS", "fold") in ("fold", "renorm")


def _counting_pass(limit: int):
    """A pass that applies once per call until it has applied `limit` times, then skips a node."""
    state = {"calls": 0}

    def run(gm, example_inputs, report):
        state["calls"] += 1
        if state["calls"] <= limit:
            return 1
        report.skipped.append(Skip("somewhere", "nothing left"))
        return 0

    return types.SimpleNamespace(NAME="counting", run=run), state


def test_fixed_point_is_bounded_and_reports_the_last_skips():
    module = nn.Linear(3, 2)
    inputs = (torch.randn(1, 3),)
    counting, state = _counting_pass(2)
    _, report = nfx.convert(module, inputs, [counting])
    entry = report.passes[0]
    assert (entry.applied, entry.iterations, state["calls"]) == (2, 3, 3)
    assert entry.skipped == [Skip("somewhere", "nothing left")]
    endless, state = _counting_pass(10**6)
    _, report = nfx.convert(module, inputs, [endless])
    assert report.passes[0].iterations == state["calls"] == nfx.MAX_ITERATIONS


def _breaking_pass():
    def run(gm, example_inputs, report):
        with torch.no_grad():
            gm.get_submodule("0").weight.mul_(1.001)
        return 1

    return types.SimpleNamespace(NAME="breaks-things", run=run)


def test_wrong_rewrite_raises_verification_error_with_report():
    module = nn.Sequential(nn.Linear(3, 2))
    before = module[0].weight.detach().clone()
    with pytest.raises(VerificationError, match="not equivalent") as info:
        nfx.convert(module, (torch.randn(4, 3),), [_breaking_pass()])
    assert info.value.report.verification["passed"] is False
    assert torch.equal(module[0].weight, before)  # the pass changed convert's copy only
    gm, report = nfx.convert(module, (torch.randn(4, 3),), [_breaking_pass()], verify=False)
    assert report.verification is None and not torch.equal(gm.get_submodule("0").weight, before)


def test_verify_module_detects_a_difference():
    module = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))
    inputs = (torch.randn(5, 3),)
    result = nfx.verify_module(module, gm, inputs)
    assert not result.passed and result.outputs[0].max_abs_error > 0
    gm.load_state_dict(module.state_dict())
    assert nfx.verify_module(module, gm, inputs).passed


def test_report_counts_ops_and_serialises(fx_check):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        module[1].running_var.uniform_(0.5, 2.0)
    gm, report = nfx.convert(module, torch.randn(1, 3, 5, 5), ["fold-batchnorm"])
    assert report.ops_before == {"BatchNorm2d": 1, "Conv2d": 1, "ReLU": 1}
    assert report.ops_after == {"Conv2d": 1, "ReLU": 1}
    assert set(report.timings) == {"capture", "passes", "verify"}
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["capture"] == "symbolic_trace" and data["capture_reason"] is None
    assert data["passes"][0]["name"] == "fold-batchnorm" and data["passes"][0]["applied"] == 1
    assert report.summary_lines()[0] == "captured with symbolic_trace"
    assert fx_check.batchnorms(gm) == 0


def test_importing_normfold_does_not_import_torch():
    code = "import sys, normfold, normfold.cli, normfold.pipeline; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


class ExplicitFloat32(nn.Module):
    """Spells float32 out: a torch.export graph then bakes it in (_to_copy, full)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        h = self.linear(x).to(torch.float32)
        return h + torch.full((3,), 0.5, dtype=torch.float32)


def test_verify_module_runs_an_exported_graph_in_float64():
    module = ExplicitFloat32()
    inputs = (torch.randn(2, 3),)
    gm = capture(module, inputs, "export").gm
    cast = nfx.verify.cast_copy(gm, torch.float64)
    with torch.no_grad():
        assert cast(inputs[0].double()).dtype == torch.float64
    assert gm.linear.weight.dtype == torch.float32  # the copy is cast, not gm
    assert nfx.verify_module(module, gm, inputs).passed  # the original module's own .to(float32) stays
    result = nfx.verify_module(gm, copy.deepcopy(gm), inputs)
    assert result.passed and result.outputs[0].dtype == "float64"


def test_dynamic_export_capture_accepts_other_batch_sizes():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2)).eval()
    with torch.no_grad():
        module[1].running_var.uniform_(0.5, 2.0)
    inputs = (torch.randn(2, 3, 5, 5),)
    static, _ = nfx.convert(module, inputs, ["fold-batchnorm"], capture="export")
    dynamic, report = nfx.convert(module, inputs, ["fold-batchnorm"], capture="export", dynamic=True)
    assert report.passes[0].applied == 1
    bigger = (torch.randn(5, 3, 5, 5),)
    with pytest.raises(InputError, match="fails on the example inputs"):
        nfx.verify_module(module, static, bigger)
    assert nfx.verify_module(module, dynamic, bigger).passed
