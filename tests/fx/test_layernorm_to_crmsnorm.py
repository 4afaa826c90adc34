"""FX layernorm-to-crmsnorm: the stream stored in d-1 dims, CRMSNorm, equivalent; fallbacks noted."""

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from normfold.fx import layernorm_to_crmsnorm as crms  # noqa: E402
from normfold.fx import ops  # noqa: E402
from normfold.fx.modules import CRMSNorm  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import transformer_cases as tc  # noqa: E402

MODELS = {"gpt2_tied": 5, "vit": 5, "opt": 5, "gpt_neox": 5, "tiny_gpt": 5}


def test_crmsnorm_is_rmsnorm_of_the_implied_full_vector():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 16, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    full = nn.RMSNorm(16, eps=1e-5, elementwise_affine=False, dtype=torch.float64)(x)
    assert torch.allclose(CRMSNorm(16, 1e-5)(x[..., :15]), full[..., :15], rtol=0, atol=1e-14)


CASES = [(torch.float64, 0.0), (torch.float32, 100.0)]


@pytest.mark.parametrize(("dtype", "shift"), CASES, ids=["f64", "f32-shift100"])
@pytest.mark.parametrize("name", MODELS)
def test_pre_ln_models_become_crmsnorm(name, dtype, shift):
    model = tc.build(name, dtype, shift=0.0 if name == "vit" else shift)
    args = tc.inputs(name, dtype, shift=shift if name == "vit" else 0.0)
    gm = tc.export(model, args)
    applied, report = tc.run_pass(crms, gm, args)
    assert applied == MODELS[name]
    assert report.skipped == [] and report.notes == []
    assert tc.norm_count(gm, "LayerNorm") == 0
    assert len(tc.modules_of(gm, CRMSNorm)) == MODELS[name]
    ops.refresh_shapes(gm, args)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), CRMSNorm)]
    assert len(calls) == MODELS[name]
    for call in calls:
        assert ops.shape(call.args[0])[-1] == 31  # the stream is 32 wide, stored in 31
    tc.assert_equivalent(model, gm, args)


def test_bloom_embedding_norm_falls_back_to_rmsnorm_with_a_note():
    """BLOOM's embedding LayerNorm output is the stream itself (not read by linear layers only):
    that norm becomes RMSNorm (noted); the residual stream after it is stored in d-1 dims."""
    model = tc.build("bloom")
    args = tc.inputs("bloom")
    gm = tc.export(model, args)
    applied, report = tc.run_pass(crms, gm, args)
    assert applied == 6 and report.skipped == []
    fallbacks = [n for n in report.notes if n.reason.startswith("RMSNorm instead of CRMSNorm")]
    assert [n.node.split(" ")[0] for n in fallbacks] == ["model.transformer.word_embeddings_layernorm"]
    assert len(report.notes) == 2 and "explicit x - mean(x)" in report.notes[1].reason
    assert len(tc.modules_of(gm, CRMSNorm)) == 5 and len(tc.modules_of(gm, nn.RMSNorm)) == 1
    tc.assert_equivalent(model, gm, args)


def test_post_ln_refused_unchanged():
    model = tc.build("bert_post_ln")
    args = tc.inputs("bert_post_ln")
    gm = tc.export(model, args)
    code = gm.code
    applied, report = tc.run_pass(crms, gm, args)
    assert applied == 0 and gm.code == code and len(report.skipped) == 6
    assert sum(s.reason.startswith("Post-LN") for s in report.skipped) == 5


def test_symbolic_trace_tied():
    model, gm, args = tc.traced_case()
    applied, report = tc.run_pass(crms, gm, args)
    assert applied == 3 and report.notes == []
    assert gm.get_submodule("wte").weight.shape == (23, 7)
    assert gm.get_submodule("fcs.0").weight.shape == (16, 7)
    assert gm.get_submodule("projs.1").weight.shape == (7, 16)
    assert gm.get_submodule("head").weight.shape == (23, 7)
    tc.assert_equivalent(model, gm, args)


class _NonLinearReader(tc.TracedPreLN):
    """The final norm's output also goes through a GELU: CRMS cannot fold it; RMSNorm instead."""

    def forward(self, ids):
        h = self.ln_f(self._stream(ids))
        return self.head(h) + torch.nn.functional.gelu(h).sum(-1, keepdim=True)

    def _stream(self, ids):
        x = self.wte(ids) + self.wpe
        for ln, fc, proj in zip(self.lns, self.fcs, self.projs):
            x = x + proj(torch.nn.functional.gelu(fc(ln(x))))
        return x


def test_non_linear_reader_falls_back_to_rmsnorm():
    model = _NonLinearReader(tied=False).double()
    gm = tc.trace(model)
    args = tc.traced_case()[2]
    applied, report = tc.run_pass(crms, gm, args)
    assert applied == 3
    assert len(report.notes) == 3 and all("gelu" in n.reason for n in report.notes)
    assert tc.modules_of(gm, CRMSNorm) == [] and len(tc.modules_of(gm, nn.RMSNorm)) == 3
    tc.assert_equivalent(model, gm, args)


def test_vit_crmsnorm_onnx_export_verified_on_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    import normfold
    import normfold.fx as nfx

    model = tc.build("vit", torch.float32)
    args = tc.inputs("vit", torch.float32)
    gm, report = nfx.convert(model, args, ["layernorm-to-crmsnorm"])
    assert report.passes[0].applied == 5 and report.verification["passed"]
    reference = nfx.export(model, args, tmp_path / "reference.onnx")
    candidate = nfx.export(gm, args, tmp_path / "candidate.onnx")
    result = normfold.verify(reference, candidate, inputs={"input": args[0].numpy()}, tolerance_class="renorm")
    assert result.passed, result


def test_functional_calls_on_bare_parameters():
    model, gm, args = tc.functional_case()
    applied, report = tc.run_pass(crms, gm, args)
    assert applied == 2 and report.notes == [] and len(tc.modules_of(gm, CRMSNorm)) == 2
    tc.assert_equivalent(model, gm, args)


@pytest.mark.parametrize("variant", [
    {"parallel": True, "shared_ln": True},
    {"parallel": True, "width": 24, "heads": 3},
    {"bias": False, "tied": False, "mlp": "swiglu", "depth": 3},
], ids=["parallel-shared-ln", "parallel", "swiglu-nobias-untied"])
def test_tiny_gpt_architecture_variants(variant):
    model = tc.build("tiny_gpt", shift=7.0, **variant)
    args = tc.inputs("tiny_gpt")
    gm = tc.export(model, args)
    norms = tc.norm_count(gm, "LayerNorm")
    applied, report = tc.run_pass(crms, gm, args)
    assert applied == norms and report.notes == [] and report.skipped == []
    assert len(tc.modules_of(gm, CRMSNorm)) == norms
    tc.assert_equivalent(model, gm, args)
