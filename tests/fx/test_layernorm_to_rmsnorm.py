"""FX layernorm-to-rmsnorm: Pre-LN zoo models become Pre-RMSNorm, equivalent; Post-LN is refused."""

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from normfold.fx import layernorm_to_rmsnorm as rms  # noqa: E402
sys.path.insert(0, os.path.dirname(__file__))
import transformer_cases as tc  # noqa: E402

PRE_LN = ["gpt2_tied", "vit", "opt", "bloom", "gpt_neox", "tiny_gpt"]
LAYERNORMS = {"gpt2_tied": 5, "vit": 5, "opt": 5, "bloom": 6, "gpt_neox": 5, "tiny_gpt": 5}


CASES = [(torch.float64, 0.0), (torch.float32, 100.0)]


def _shifted(name, dtype, shift):
    """The model and inputs with the stream moved by `shift`: embedding tables (ViT: the images) + shift."""
    model = tc.build(name, dtype, shift=0.0 if name == "vit" else shift)
    return model, tc.inputs(name, dtype, shift=shift if name == "vit" else 0.0)


@pytest.mark.parametrize(("dtype", "shift"), CASES, ids=["f64", "f32-shift100"])
@pytest.mark.parametrize("name", PRE_LN)
def test_pre_ln_models_become_rmsnorm(name, dtype, shift):
    model, args = _shifted(name, dtype, shift)
    before = tc.state(model)
    gm = tc.export(model, args)
    applied, report = tc.run_pass(rms, gm, args)
    assert applied == LAYERNORMS[name]
    assert report.skipped == []
    assert tc.norm_count(gm, "LayerNorm") == 0
    assert len(tc.modules_of(gm, nn.RMSNorm)) == LAYERNORMS[name]
    tc.assert_equivalent(model, gm, args)
    after = tc.state(model)  # the captured module is rewritten, never the original
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["gpt2_tied", "vit"])
def test_stream_shifted_by_100_float64(name):
    model, args = _shifted(name, torch.float64, 100.0)
    gm = tc.export(model, args)
    assert tc.run_pass(rms, gm, args)[0] == LAYERNORMS[name]
    tc.assert_equivalent(model, gm, args)


def test_writers_recentred_and_tied_head_untied():
    model = tc.build("gpt2_tied")
    args = tc.inputs("gpt2_tied")
    gm = tc.export(model, args)
    tc.run_pass(rms, gm, args)
    embeddings = [n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default]
    head = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    for node in embeddings:
        table = gm.get_parameter(node.args[0].target)
        assert table.mean(dim=-1).abs().max() < 1e-12
    head_weight = gm.get_parameter(head.args[1].target)
    assert torch.equal(head_weight, model.model.lm_head.weight)  # the logits still see the original table
    assert head.args[1] is not embeddings[0].args[0]
    gamma_paths = [n for n, m in gm.named_modules() if isinstance(m, nn.RMSNorm)]
    assert "model.transformer.ln_f" in gamma_paths  # state-dict names kept: ln_f.weight, ln_f.bias
    assert torch.equal(gm.get_parameter("model.transformer.ln_f.bias"), model.model.transformer.ln_f.bias)


def test_bloom_embedding_norm_output_centred_explicitly():
    """BLOOM's word_embeddings_layernorm output starts the residual stream: it becomes an RMSNorm
    of the recentred table, followed by an explicit x - mean(x) (its gamma/beta make it non-zero-mean)."""
    model = tc.build("bloom")
    args = tc.inputs("bloom")
    gm = tc.export(model, args)
    applied, report = tc.run_pass(rms, gm, args)
    assert applied == 6
    means = [n for n in gm.graph.nodes if n.target is torch.mean]
    assert len(means) == 1
    assert len(report.notes) == 1 and report.notes[0].node.startswith("model.transformer.word_embeddings_layernorm")
    assert "explicit x - mean(x)" in report.notes[0].reason
    tc.assert_equivalent(model, gm, args)


def test_post_ln_bert_refused_unchanged():
    model = tc.build("bert_post_ln")
    args = tc.inputs("bert_post_ln")
    gm = tc.export(model, args)
    code = gm.code
    applied, report = tc.run_pass(rms, gm, args)
    assert applied == 0
    assert gm.code == code
    reasons = {s.node.split(" ")[0]: s.reason for s in report.skipped}
    assert len(reasons) == 6
    for node, reason in reasons.items():
        if node.startswith("model.bert"):
            assert reason.startswith("Post-LN"), (node, reason)
    assert "explicit op" in reasons["model.cls.predictions.transform.LayerNorm"]
    with torch.no_grad():
        assert torch.equal(model(*args), gm(*args))


def test_rmsnorm_model_has_nothing_to_convert():
    model = tc.build("llama")
    args = tc.inputs("llama")
    gm = tc.export(model, args)
    applied, report = tc.run_pass(rms, gm, args)
    assert applied == 0 and report.skipped == []


@pytest.mark.parametrize("tied", [True, False])
def test_symbolic_trace_graph(tied):
    model, gm, args = tc.traced_case(tied=tied)
    applied, report = tc.run_pass(rms, gm, args)
    assert applied == 3 and report.skipped == []
    assert [type(gm.get_submodule(p)) for p in ("lns.0", "lns.1", "ln_f")] == [nn.RMSNorm] * 3
    assert gm.get_submodule("ln_f").eps == 1e-6
    assert gm.get_submodule("wte").weight.mean(-1).abs().max() < 1e-12
    assert torch.equal(gm.get_submodule("head").weight, model.head.weight)
    assert gm.get_submodule("wte").weight is not gm.get_submodule("head").weight
    tc.assert_equivalent(model, gm, args)


def test_stream_read_by_a_mean_sensitive_op_is_refused():
    """The stream is also returned by the module: its mean is observable, nothing changes."""

    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tc.TracedPreLN(tied=False)

        def forward(self, ids):
            x = self.inner.wte(ids) + self.inner.wpe
            return self.inner.head(self.inner.ln_f(x)), x * 2.0

    model = Leaky().double()
    args = tc.traced_case()[2]
    gm = tc.trace(model)
    code = gm.code
    applied, report = tc.run_pass(rms, gm, args)
    assert applied == 0 and gm.code == code
    assert len(report.skipped) == 1
    assert "also read by mul" in report.skipped[0].reason


def test_an_explicitly_centred_chain_is_refused():
    """Every block's output is a LayerNorm output written into the next residual sum (Post-LN
    spelled by hand): no exact conversion without a centring op per layer, model unchanged."""

    class PostLN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fcs = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.lns = nn.ModuleList(nn.LayerNorm(8) for _ in range(3))

        def forward(self, x):
            for fc, ln in zip(self.fcs, self.lns):
                x = ln(x + fc(x))
            return x

    model = PostLN().double()
    gm = tc.trace(model)
    args = (torch.randn(2, 4, 8, dtype=torch.float64),)
    code = gm.code
    applied, report = tc.run_pass(rms, gm, args)
    assert applied == 0 and gm.code == code
    assert len(report.skipped) == 3
    assert all(s.reason.startswith("Post-LN") or "module output" in s.reason for s in report.skipped)


def test_convert_then_onnx_export_verified_on_onnxruntime(tmp_path):
    """normfold.fx.convert with the default LN passes, exported to ONNX (normfold.fx.export) and
    verified against the original's export on onnxruntime: no LayerNormalization is left."""
    pytest.importorskip("onnxruntime")
    import onnx

    import normfold
    import normfold.fx as nfx

    model = tc.build("gpt2_tied", torch.float32)
    args = tc.inputs("gpt2_tied", torch.float32)
    gm, report = nfx.convert(model, args, ["layernorm-to-rmsnorm", "fold-norm-affine"])
    assert [p.applied for p in report.passes] == [5, 5] and report.verification["passed"]
    reference = nfx.export(model, args, tmp_path / "reference.onnx")
    candidate = nfx.export(gm, args, tmp_path / "candidate.onnx")
    result = normfold.verify(reference, candidate, inputs={"input": args[0].numpy()}, tolerance_class="renorm")
    assert result.passed, result
    op_types = {n.op_type for n in onnx.load(str(candidate)).graph.node}
    assert "LayerNormalization" not in op_types
    assert "LayerNormalization" in {n.op_type for n in onnx.load(str(reference)).graph.node}


def test_functional_calls_on_bare_parameters():
    model, gm, args = tc.functional_case()
    applied, report = tc.run_pass(rms, gm, args)
    assert applied == 2 and report.skipped == [] and tc.norm_count(gm, "LayerNorm") == 0
    tc.assert_equivalent(model, gm, args)


def test_layernorm_over_two_axes_is_reported_not_converted():
    class TwoAxes(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm((4, 8))
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.ln(x + 1.0))

    model = TwoAxes().double()
    gm = tc.trace(model)
    applied, report = tc.run_pass(rms, gm, (torch.randn(2, 4, 8, dtype=torch.float64),))
    assert applied == 0
    assert [s.reason for s in report.skipped] == ["it normalizes over 2 axes, not the last one only"]
