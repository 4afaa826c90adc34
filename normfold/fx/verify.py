"""Equivalence of two torch modules on the same inputs, with the tolerances of normfold.verification.

Both modules run on copies cast to `dtype` (float64 by default: folding is exact up to rounding, so
any difference above float64 rounding is a bug); floating-point inputs are cast likewise, and so are
the dtypes an FX graph spells out (see cast_copy). Every
tensor leaf of the outputs (nested tuples, dicts, transformers ModelOutput) is compared with
normfold.verification.compare: |cand - ref| <= atol * max(1, rms(ref)) + rtol * |ref|, (rtol, atol)
from REFERENCE.md's table for `tolerance_class` ("fold" or "renorm") and the modules' precision
(their coarsest parameter dtype: a float16 model checked in float64 still has float16 weights).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.utils._pytree as pytree

from normfold.errors import InputError
from normfold.fx.capture import one_line
from normfold.verification import TOLERANCES, OutputCheck, VerificationResult, compare


def verify_module(
    original: torch.nn.Module,
    converted: torch.nn.Module,
    example_inputs: tuple,
    *,
    dtype: torch.dtype | None = torch.float64,
    tolerance_class: str = "fold",
    atol: float | None = None,
    rtol: float | None = None,
) -> VerificationResult:
    """Runs both modules on `example_inputs` and compares every output (see the module docstring).

    `dtype=None` runs them as they are. Neither module is changed (the runs use copies when casting).
    """
    if tolerance_class not in TOLERANCES:
        raise InputError(f"unknown tolerance class {tolerance_class!r}; choose one of: {', '.join(TOLERANCES)}")
    inputs = tuple(_cast(x, dtype) for x in example_inputs)
    ref_out = _run(original, inputs, dtype, "original")
    cand_out = _run(converted, inputs, dtype, "converted")
    ref_leaves, ref_spec = pytree.tree_flatten_with_path(ref_out)
    cand_leaves, cand_spec = pytree.tree_flatten_with_path(cand_out)
    if len(ref_leaves) != len(cand_leaves):
        raise InputError(f"the converted module returns {len(cand_leaves)} values, the original {len(ref_leaves)}")
    default_rtol, default_atol = TOLERANCES[tolerance_class][precision(original, converted, dtype)]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    checks = [
        _check(pytree.keystr(path) or "output", ref, cand, atol=atol, rtol=rtol, tolerance_class=tolerance_class)
        for (path, ref), (_, cand) in zip(ref_leaves, cand_leaves)
    ]
    return VerificationResult(
        passed=all(c.passed for c in checks),
        outputs=checks,
        provider=f"torch-{str(dtype).removeprefix('torch.') if dtype else 'native'}",
        seed=-1,
        input_shapes={f"input_{i}": list(x.shape) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)},
        tolerance_class=tolerance_class,
    )


_COARSENESS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def precision(original: torch.nn.Module, converted: torch.nn.Module, dtype: torch.dtype | None) -> str:
    """The dtype whose tolerances apply: the coarsest of the modules' floating parameters and buffers
    (folded weights are rounded to it, whatever dtype the check runs in) and of `dtype`."""
    dtypes = {t.dtype for m in (original, converted) for t in (*m.parameters(), *m.buffers())}
    dtypes.add(dtype or torch.float32)
    coarsest = max((d for d in dtypes if d in _COARSENESS), key=_COARSENESS.index)
    return str(coarsest).removeprefix("torch.")


def _cast(x, dtype):
    if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    return x


def cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `module` computing in `dtype`: floating parameters, buffers and tensor constants cast,
    and in FX graphs every floating dtype argument (a torch.export graph's `_to_copy(dtype=float32)`,
    `_assert_tensor_metadata`, `full(..., dtype=...)`) replaced by `dtype`: the same program, in `dtype`."""
    with warnings.catch_warnings():  # torch.export modules warn of a deprecated pytree spec when copied
        warnings.simplefilter("ignore", FutureWarning)
        module = copy.deepcopy(module).to(dtype)
    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(sub, name, value.to(dtype))
        if isinstance(sub, torch.fx.GraphModule):
            retarget = lambda a: dtype if isinstance(a, torch.dtype) and a.is_floating_point else a  # noqa: E731
            for node in sub.graph.nodes:
                node.args = torch.fx.node.map_aggregate(node.args, retarget)
                node.kwargs = torch.fx.node.map_aggregate(node.kwargs, retarget)
            sub.recompile()
    return module


def _run(module: torch.nn.Module, inputs: tuple, dtype, label: str):
    if dtype is not None:
        module = cast_copy(module, dtype)
    with torch.no_grad():
        try:
            return module(*inputs)
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise InputError(f"the {label} module fails on the example inputs"
                             f"{f' in {dtype}' if dtype else ''}: {one_line(exc)}") from None


def _check(name, ref, cand, **tolerances) -> OutputCheck:
    if isinstance(ref, torch.Tensor) and isinstance(cand, torch.Tensor):
        return compare(name, _numpy(ref), _numpy(cand), **tolerances)
    same = ref == cand
    return OutputCheck(name=name, dtype=type(ref).__name__, shape=[], passed=bool(same), max_abs_error=0.0 if same
                       else float("inf"), max_rel_error=0.0 if same else float("inf"), mean_abs_error=0.0,
                       cosine=1.0 if same else 0.0, rtol=0.0, atol=0.0,
                       message="" if same else f"non-tensor output differs: {cand!r} != {ref!r}")


def _numpy(t: torch.Tensor):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()
