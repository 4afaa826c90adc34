"""Shared helpers of the FX LayerNorm tests: seeded zoo models, capture, one pass run, equivalence.

Models are built in the dtype under test before capture (torch.export records dtypes in the graph).
Equivalence uses normfold.verification.compare at REFERENCE.md's tolerances for the dtype; in
float64 it also demands agreement to 1e-9 * max(1, rms), since the rewrites are exact up to rounding.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import torch
from torch import fx, nn

from normfold import models
from normfold.fx import ops
from normfold.report import PassReport
from normfold.verification import compare


def build(name: str, dtype: torch.dtype = torch.float64, *, shift: float = 0.0, **size) -> nn.Module:
    """The zoo model `name` in `dtype`; `shift` is added to every embedding table (a stream mean of ~shift)."""
    model = models.build(name, **size).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.weight.add_(shift)
    return model


def inputs(name: str, dtype: torch.dtype = torch.float64, *, shift: float = 0.0, seed: int = 0, **kw) -> tuple:
    """Seeded example inputs of `name`; float inputs cast to `dtype` and shifted by `shift`."""
    arrays = models.example_inputs(name, seed, **kw)
    tensors = [torch.from_numpy(a) for a in arrays]
    return tuple(t.to(dtype) + shift if t.is_floating_point() else t for t in tensors)


def export(module: nn.Module, args: tuple) -> fx.GraphModule:
    """torch.export.export(module, args).module(), quietly."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.export.export(module, args).module()


def run_pass(pass_module, gm: fx.GraphModule, args: tuple, **options) -> tuple[int, PassReport]:
    """Runs one pass module on `gm` in place; (applied, report)."""
    report = PassReport(pass_module.NAME)
    applied = pass_module.run(gm, args, report, **options)
    return applied, report


def outputs(module: nn.Module, args: tuple) -> np.ndarray:
    with torch.no_grad():
        return module(*args).detach().cpu().to(torch.float64).numpy()


def assert_equivalent(reference: nn.Module, candidate: nn.Module, args: tuple, tolerance_class: str = "renorm"):
    """Same outputs within REFERENCE.md's tolerances (and 1e-9 * scale in float64)."""
    ref, cand = outputs(reference, args), outputs(candidate, args)
    dtype = next(t.dtype for t in (*args, *reference.parameters()) if t.is_floating_point())
    check = compare("logits", ref.astype(_np(dtype)), cand.astype(_np(dtype)), tolerance_class=tolerance_class)
    if not check.passed and dtype != torch.float64:
        # an ill-conditioned original (a stream mean of 100 in float32) is judged by its float64 self
        exact = outputs(copy.deepcopy(reference).double(), tuple(_double(a) for a in args))
        check = compare("logits", exact.astype(_np(dtype)), cand.astype(_np(dtype)), tolerance_class=tolerance_class)
    assert check.passed, check
    if dtype == torch.float64:
        scale = max(1.0, float(np.sqrt(np.mean(ref ** 2))))
        assert np.max(np.abs(ref - cand)) <= 1e-9 * scale


def _double(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double() if tensor.is_floating_point() else tensor


def _np(dtype: torch.dtype):
    return {torch.float64: np.float64, torch.float32: np.float32}[dtype]


def norm_count(gm: fx.GraphModule, kind: str = "LayerNorm") -> int:
    """LayerNorm (or RMSNorm) calls left: modules and aten ops."""
    return sum(1 for n in gm.graph.nodes if (norm := ops.as_norm(gm, n)) is not None and norm.kind == kind)


def modules_of(gm: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in gm.modules() if type(m) is cls]


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class TracedPreLN(nn.Module):
    """A Pre-LN model that torch.fx.symbolic_trace captures (call_module LayerNorm/Linear/Embedding):
    token + position embedding, `depth` blocks x += proj(gelu(fc(ln(x)))), final LN, LM head (tied)."""

    def __init__(self, vocab: int = 23, width: int = 8, depth: int = 2, seq: int = 5, tied: bool = True) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Parameter(torch.randn(seq, width, generator=gen) + 3.0)
        self.lns = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.fcs = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.projs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 else 0.2))
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe
        for ln, fc, proj in zip(self.lns, self.fcs, self.projs):
            x = x + proj(torch.nn.functional.gelu(fc(ln(x))))
        return self.head(self.ln_f(x))


def traced_case(dtype: torch.dtype = torch.float64, **kw) -> tuple[nn.Module, fx.GraphModule, tuple]:
    """(TracedPreLN, the symbolic trace of a copy of it, ids): a trace shares the traced module's
    submodules, so the original would change with it."""
    model = TracedPreLN(**kw).to(dtype)
    ids = torch.randint(0, 23, (3, 5), generator=torch.Generator().manual_seed(1))
    return model, trace(model), (ids,)


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx.symbolic_trace of a deep copy of `model` (the passes rewrite the trace's submodules)."""
    return fx.symbolic_trace(copy.deepcopy(model))


class FunctionalPreLN(nn.Module):
    """Pre-LN written with torch.nn.functional on bare parameters (symbolic_trace: get_attr nodes,
    F.embedding/F.layer_norm/F.linear calls, keyword arguments): embedding + one MLP block + final
    LN without beta + bias-free head."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(11, 6, generator=g) + 2)
        self.g1 = nn.Parameter(torch.rand(6, generator=g) + 0.5)
        self.b1 = nn.Parameter(torch.randn(6, generator=g))
        self.w_in = nn.Parameter(torch.randn(12, 6, generator=g))
        self.b_in = nn.Parameter(torch.randn(12, generator=g))
        self.w_out = nn.Parameter(torch.randn(6, 12, generator=g))
        self.b_out = nn.Parameter(torch.randn(6, generator=g))
        self.g2 = nn.Parameter(torch.rand(6, generator=g) + 0.5)
        self.head = nn.Parameter(torch.randn(11, 6, generator=g))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        F = torch.nn.functional
        x = F.embedding(ids, self.table)
        h = F.layer_norm(x, (6,), self.g1, self.b1, 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, self.w_in, self.b_in)), self.w_out, self.b_out)
        return F.linear(F.layer_norm(x, (6,), weight=self.g2, eps=1e-6), self.head)


def functional_case() -> tuple[nn.Module, fx.GraphModule, tuple]:
    model = FunctionalPreLN().double()
    return model, trace(model), (torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(2)),)
