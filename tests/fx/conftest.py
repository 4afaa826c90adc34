"""Shared fixtures of the torch.fx frontend tests (skipped without the torch extra)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from normfold.fx import verify_module  # noqa: E402
from normfold.fx.graph import op_counts  # noqa: E402

BATCHNORM_OPS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "aten.batch_norm",
                 "aten._native_batch_norm_legit_no_training", "batch_norm")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Two cores are shared by several test runs: keep torch to one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batchnorm_count(gm) -> int:
    """BatchNorm calls left in a graph: BN modules called and aten/functional batch_norm ops."""
    return sum(count for op, count in op_counts(gm).items() if op in BATCHNORM_OPS)


def state_snapshot(module) -> dict:
    """A deep copy of the module's state_dict, with the identities of its tensors."""
    return {name: (id(t), t.detach().clone()) for name, t in module.state_dict(keep_vars=True).items()}


def assert_state_unchanged(module, snapshot: dict) -> None:
    state = module.state_dict(keep_vars=True)
    assert list(state) == list(snapshot)
    for name, t in state.items():
        assert id(t) == snapshot[name][0], f"{name} was replaced"
        assert torch.equal(t.detach(), snapshot[name][1]), f"{name} was changed"


def assert_equivalent(original, converted, inputs, tolerance_class: str = "fold") -> None:
    """Equivalent in float64 and in float32, at REFERENCE.md's tolerances for `tolerance_class`."""
    for dtype in (torch.float64, torch.float32):
        result = verify_module(original, converted, inputs, dtype=dtype, tolerance_class=tolerance_class)
        assert result.passed, "\n".join(result.summary_lines())


def assert_unchanged_output(original, converted, inputs) -> None:
    """A graph the passes left alone computes bit for bit what the original does."""
    with torch.no_grad():
        assert torch.equal(original(*inputs), converted(*inputs))


@pytest.fixture
def fx_check():
    """The assertion helpers above, for test modules (conftest is not importable as a module)."""

    class Check:
        batchnorms = staticmethod(batchnorm_count)
        snapshot = staticmethod(state_snapshot)
        state_unchanged = staticmethod(assert_state_unchanged)
        equivalent = staticmethod(assert_equivalent)
        unchanged_output = staticmethod(assert_unchanged_output)

    return Check
