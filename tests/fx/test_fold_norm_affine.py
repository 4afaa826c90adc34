"""FX fold-norm-affine: gamma/beta of LayerNorm/RMSNorm into every linear reader, exact; refusals."""

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from normfold.fx import fold_norm_affine as fold  # noqa: E402
from normfold.fx import layernorm_to_rmsnorm as rms  # noqa: E402
from normfold.fx import ops  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import transformer_cases as tc  # noqa: E402


def _norm_params_read(gm) -> int:
    """get_attr nodes and norm modules that still carry a gamma or beta."""
    count = 0
    for node in gm.graph.nodes:
        norm = ops.as_norm(gm, node)
        count += norm is not None and (norm.weight is not None or norm.bias is not None)
    return count


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["llama", "gpt2_tied", "vit", "opt", "gpt_neox"])
def test_zoo_models(name, dtype):
    """llama: decomposed RMSNorm (x * rsqrt(..) * gamma) into q/k/v, gate/up, lm_head; gpt2: aten.addmm
    (Conv1D) readers and the tied LM head; vit: the classifier behind a select; opt/neox: aten.linear."""
    model = tc.build(name, dtype)
    args = tc.inputs(name, dtype)
    gm = tc.export(model, args)
    applied, report = tc.run_pass(fold, gm, args)
    assert applied == 5 and report.skipped == []
    assert _norm_params_read(gm) == 0
    if name == "llama":
        assert not [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("norm.weight")]
    tc.assert_equivalent(model, gm, args, tolerance_class="fold")


def test_tied_lm_head_untied():
    model = tc.build("gpt2_tied")
    args = tc.inputs("gpt2_tied")
    gm = tc.export(model, args)
    tc.run_pass(fold, gm, args)
    embedding = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    head = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert torch.equal(gm.get_parameter(embedding.args[0].target), model.model.transformer.wte.weight)
    gamma = model.model.transformer.ln_f.weight
    assert torch.allclose(gm.get_parameter(head.args[1].target), model.model.lm_head.weight * gamma, rtol=0, atol=1e-14)
    assert head.args[2] is not None  # beta became the head's new bias: W beta


def test_after_layernorm_to_rmsnorm():
    """The RMSNorm + bias that layernorm-to-rmsnorm emits folds away: affine-free RMSNorms remain."""
    model = tc.build("opt")
    args = tc.inputs("opt")
    gm = tc.export(model, args)
    assert tc.run_pass(rms, gm, args)[0] == 5
    applied, report = tc.run_pass(fold, gm, args)
    assert applied == 5 and report.skipped == []
    norms = tc.modules_of(gm, nn.RMSNorm)
    assert len(norms) == 5 and all(m.weight is None for m in norms)
    assert not any(n.target is torch.add for n in gm.graph.nodes)
    tc.assert_equivalent(model, gm, args)
    assert tc.run_pass(fold, gm, args)[0] == 0  # a fixed point


def test_post_ln_norms_read_by_residual_sums_refused():
    model = tc.build("bert_post_ln")
    args = tc.inputs("bert_post_ln")
    gm = tc.export(model, args)
    applied, report = tc.run_pass(fold, gm, args)
    assert applied == 2  # the last encoder LN (read by the head's dense only) and the head's LN
    assert len(report.skipped) == 4
    assert all("which is not a linear layer" in s.reason for s in report.skipped)
    tc.assert_equivalent(model, gm, args, tolerance_class="fold")


class _Readers(nn.Module):
    """LayerNorm read by two bias-free Linears, one of which is also called on another value."""

    def __init__(self, extra_reader: str | None = None):
        super().__init__()
        self.ln = nn.LayerNorm(6)
        self.a = nn.Linear(6, 4, bias=False)
        self.b = nn.Linear(6, 3)
        self.extra_reader = extra_reader
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.normal_()

    def forward(self, x):
        h = self.ln(x)
        out = self.a(h).sum(-1, keepdim=True) + self.b(h) + self.b(x)
        if self.extra_reader == "gelu":
            out = out + nn.functional.gelu(h)[..., :3]
        if self.extra_reader == "output":
            return out, h
        return out


def test_symbolic_trace_bias_added_and_shared_module_cloned():
    torch.manual_seed(0)
    model = _Readers().double()
    gm = tc.trace(model)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    applied, report = tc.run_pass(fold, gm, (x,))
    assert applied == 1 and report.skipped == []
    ln = gm.get_submodule("ln")
    assert ln.weight is None and ln.bias is None
    reading_b = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("b")]
    assert len({n.target for n in reading_b}) == 2  # b is called on x too: the folded copy is a clone
    assert gm.get_submodule("a").bias is not None  # a had no bias: W beta became one
    tc.assert_equivalent(model, gm, (x,), tolerance_class="fold")


@pytest.mark.parametrize(("reader", "reason"), [("gelu", "gelu"), ("output", "output of the module")])
def test_non_linear_reader_refused_unchanged(reader, reason):
    model = _Readers(reader).double()
    gm = tc.trace(model)
    code = gm.code
    applied, report = tc.run_pass(fold, gm, (torch.randn(2, 5, 6, dtype=torch.float64),))
    assert applied == 0 and gm.code == code
    assert len(report.skipped) == 1 and reason in report.skipped[0].reason


def test_functional_calls_on_bare_parameters():
    """F.layer_norm(weight=..., eps=...) keywords; F.linear readers, one without a bias."""
    model, gm, args = tc.functional_case()
    applied, report = tc.run_pass(fold, gm, args)
    assert applied == 2 and report.skipped == [] and _norm_params_read(gm) == 0
    tc.assert_equivalent(model, gm, args, tolerance_class="fold")
