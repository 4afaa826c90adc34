"""Equivalence assertions for any test suite (pytest, unittest): `assert_equivalent(reference, candidate)`.

    from normfold.testing import assert_equivalent

    def test_export_is_faithful(tmp_path):
        assert_equivalent("model.onnx", "model.normfold.onnx")            # ONNX paths
        assert_equivalent("ref.npz", "model.normfold.onnx")               # a saved reference file
        assert_equivalent(torch_model, "model.onnx", inputs=(x,))         # torch module vs ONNX

Each side is an ONNX model (a path, an onnx.ModelProto or an onnx-ir Model), a reference file (an .npz
path written by `normfold verify --save-reference`, or a ReferenceData), or a torch.nn.Module. Both run
on the same inputs and every output is compared with normfold's tolerance rule (normfold.verification);
on failure an AssertionError lists each output's metrics and its worst element.

Inputs: a mapping of input names to arrays (numpy or torch), a sequence of arrays in the ONNX model's
input order, a single array, or None: then a reference file's inputs, or seeded inputs generated for
the ONNX side (the reference when it is ONNX). Torch modules need inputs unless an ONNX or reference
file side provides them.

A torch module runs in eval mode on a deep copy converted to float64 where it can be (floating inputs
are cast too), so only the other side's rounding shows; if float64 fails, it runs as it is. It is called
with the inputs as positional arguments (the ONNX model's input order, or the mapping's order); its
outputs (a tensor, or tuples, lists and dicts of them) are flattened in order and matched to the other
side's by position. torch is imported only when a torch module is given.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from normfold import io, provider_tolerances, runtime, verification
from normfold.errors import InputError
from normfold.reference import ReferenceData
from normfold.verification import VerificationResult, compare, make_inputs, resolve_tolerances

__all__ = ["assert_equivalent"]


def assert_equivalent(
    reference: Any,
    candidate: Any,
    inputs: Any = None,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str | None = None,
    *,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    tolerance_class: str | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
) -> VerificationResult:
    """Asserts that `candidate` computes the same outputs as `reference` within tolerance.

    Raises AssertionError with every output's metrics when it does not; returns the
    VerificationResult when it does. `atol`/`rtol` override the dtype defaults for every output,
    `tolerances` ({output: (atol, rtol)}) for single outputs; `provider` runs the candidate (default
    cpu). Problems with the arguments themselves (a missing file, mismatched interfaces) raise
    normfold.InputError.
    """
    __tracebackhide__ = True  # pytest: show the caller's line, not this helper's
    provider = provider or "cpu"
    if _is_torch_module(reference) or _is_torch_module(candidate):
        result = _check_with_torch(reference, candidate, inputs, atol=atol, rtol=rtol, provider=provider,
                                   tolerances=tolerances, tolerance_class=tolerance_class, shapes=shapes, seed=seed)
    else:
        ref = _as_reference(reference)
        cand = _as_model(candidate, "candidate")
        if inputs is not None and _is_reference_file(ref):
            raise InputError("a reference file brings its own inputs; inputs cannot be given with it")
        feeds = None if inputs is None else _feeds(inputs, _input_names(ref))
        result = verification.verify(ref, cand, inputs=feeds, shapes=shapes, atol=atol, rtol=rtol,
                                     tolerance_class=tolerance_class, provider=provider, seed=seed,
                                     tolerances=tolerances)
    if not result.passed:
        raise AssertionError(failure_message(result, _describe(reference), _describe(candidate)))
    return result


def failure_message(result: VerificationResult, reference: str = "reference", candidate: str = "candidate") -> str:
    """The assertion message: a headline, then each output's metrics and worst element."""
    failing = [o for o in result.outputs if not o.passed]
    lines = [f"{candidate} is not equivalent to {reference}: {len(failing)} of {len(result.outputs)} outputs out "
             f"of tolerance (provider {result.provider}, seed {result.seed}, tolerance class "
             f"{result.tolerance_class})"]
    for o in result.outputs:
        lines.append(
            f"  {'FAIL' if not o.passed else 'ok  '} {o.name} {o.dtype}{o.shape}: max_abs {o.max_abs_error:.3g}, "
            f"max_rel {o.max_rel_error:.3g}, mean_abs {o.mean_abs_error:.3g}, cosine {o.cosine:.6f} "
            f"(rtol {o.rtol:g}, atol {o.atol:.3g})" + (f"; {o.message}" if o.message else "")
        )
    return "\n".join(lines)


# --- ONNX and reference-file sides ---------------------------------------------------------------


def _as_reference(obj: Any) -> ir.Model | ReferenceData | str | os.PathLike:
    if isinstance(obj, ReferenceData):
        return obj
    if isinstance(obj, (str, os.PathLike)) and os.fspath(obj).endswith(".npz"):
        return obj
    return _as_model(obj, "reference")


def _as_model(obj: Any, which: str) -> ir.Model | str | os.PathLike:
    if isinstance(obj, ir.Model):
        return obj
    if isinstance(obj, onnx.ModelProto):
        return io.from_proto(obj)
    if isinstance(obj, (str, os.PathLike)):
        return obj
    raise InputError(f"the {which} must be an ONNX model (path, onnx.ModelProto or onnx_ir.Model), a reference "
                     f"file (.npz) or a torch.nn.Module, not {type(obj).__name__}")


def _input_names(model: Any) -> list[str]:
    """The inputs a caller feeds, in order: non-initializer graph inputs, or a reference file's inputs."""
    if isinstance(model, ReferenceData):
        return list(model.inputs)
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".npz"):
        return []
    loaded = model if isinstance(model, ir.Model) else io.load(model)
    return [v.name for v in loaded.graph.inputs if not v.is_initializer()]


def _feeds(inputs: Any, names: list[str]) -> dict[str, np.ndarray]:
    """Input arrays by name from a mapping, a sequence in `names` order, or a single array."""
    if isinstance(inputs, Mapping):
        return {str(k): _to_numpy(v) for k, v in inputs.items()}
    values = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if len(values) != len(names):
        raise InputError(f"{len(values)} input(s) given, the model takes {len(names)}: {', '.join(names)}")
    return {name: _to_numpy(v) for name, v in zip(names, values)}


def _to_numpy(value: Any) -> np.ndarray:
    if _is_torch_tensor(value):
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            import ml_dtypes

            return tensor.float().numpy().astype(ml_dtypes.bfloat16)
        return tensor.numpy()
    return np.asarray(value)


def _run_onnx(model: ir.Model | str | os.PathLike, feeds, *, reference: bool, provider):
    """(output names, outputs) of an ONNX model: as a reference (CPU, no optimizations) or a candidate
    (`provider`, a runtime.ProviderChoice)."""
    if not isinstance(model, ir.Model):
        io.load(model)
    with runtime.model_file(model) as path:
        session = runtime.make_session(path, provider="cpu" if reference else provider, optimize=not reference)
        try:
            outputs = session.run(None, feeds)
        except Exception as exc:  # onnxruntime's own exception types
            raise InputError(f"onnxruntime failed to run the {'reference' if reference else 'candidate'} model: "
                             f"{runtime.ort_error_message(exc)}") from None
    return [m.name for m in session.get_outputs()], outputs


def _generated_feeds(model: ir.Model | str | os.PathLike, shapes, seed) -> dict[str, np.ndarray]:
    loaded = model if isinstance(model, ir.Model) else io.load(model)
    with runtime.model_file(model) as path:
        session = runtime.make_session(path, provider="cpu", optimize=False)
        return make_inputs(session, loaded, shapes=shapes, seed=seed)


# --- torch sides ---------------------------------------------------------------------------------


def _check_with_torch(reference, candidate, inputs, *, atol, rtol, provider, tolerances, tolerance_class,
                      shapes, seed) -> VerificationResult:
    sides = [(reference, "reference"), (candidate, "candidate")]
    sides = [(obj if _is_torch_module(obj) else (_as_reference(obj) if which == "reference"
                                                 else _as_model(obj, which)), which) for obj, which in sides]
    stored = next((obj for obj, _ in sides if _is_reference_file(obj)), None)
    if stored is not None and not isinstance(stored, ReferenceData):
        stored = verification.reference_data(stored)
    onnx_side = next((obj for obj, _ in sides if not _is_torch_module(obj) and not _is_reference_file(obj)), None)
    names = list(stored.inputs) if stored is not None else (_input_names(onnx_side) if onnx_side is not None else [])

    if stored is not None:
        if inputs is not None or shapes:
            raise InputError("a reference file brings its own inputs; inputs and shapes cannot be given with it")
        feeds = dict(stored.inputs)
    elif inputs is not None:
        if isinstance(inputs, Mapping) or onnx_side is not None:
            feeds = _feeds(inputs, names)
        else:
            values = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            feeds = {f"input_{i}": _to_numpy(v) for i, v in enumerate(values)}
    elif onnx_side is not None:
        feeds = _generated_feeds(onnx_side, shapes, seed)
    else:
        raise InputError("comparing torch modules needs inputs: assert_equivalent(ref, cand, inputs=(x, ...))")
    if onnx_side is not None:
        order = [n for n in names if n in feeds] + [n for n in feeds if n not in names]
        feeds = {n: feeds[n] for n in order}

    choice = provider_tolerances.for_verification(runtime.select_provider(provider))
    results = []
    for obj, which in sides:
        if _is_torch_module(obj):
            results.append((None, _run_torch(obj, list(feeds.values()))))
        elif _is_reference_file(obj):
            results.append((list(stored.outputs), list(stored.outputs.values())))
        else:
            results.append(_run_onnx(obj, feeds, reference=which == "reference", provider=choice))
    (ref_names, ref_outputs), (cand_names, cand_outputs) = results
    if len(ref_outputs) != len(cand_outputs):
        raise AssertionError(f"the reference has {len(ref_outputs)} outputs, the candidate {len(cand_outputs)}")
    if ref_names and cand_names and ref_names != cand_names:
        raise InputError(f"the models' outputs differ: reference {ref_names}, candidate {cand_names}")
    out_names = ref_names or cand_names or [f"output_{i}" for i in range(len(ref_outputs))]
    spec = ReferenceData(inputs=feeds, outputs=dict(zip(out_names, ref_outputs)), seed=seed)
    tclass, atol, rtol, per_output = resolve_tolerances(
        stored or spec, atol=atol, rtol=rtol, tolerance_class=tolerance_class, tolerances=tolerances)
    checks = []
    for name, ref, cand in zip(out_names, ref_outputs, cand_outputs):
        a, r = per_output.get(name, (atol, rtol))
        checks.append(compare(name, ref, cand, atol=a, rtol=r, tolerance_class=tclass,
                              precision=provider_tolerances.precision(choice)))
    return VerificationResult(
        passed=all(c.passed for c in checks), outputs=checks, provider=choice.used,
        seed=stored.seed if stored is not None else seed,
        input_shapes={k: list(np.shape(v)) for k, v in feeds.items()}, tolerance_class=tclass,
    )


def _run_torch(module, args: list[np.ndarray]) -> list[np.ndarray]:
    """Runs a torch module in eval mode, in float64 on a copy when it can; returns its flattened outputs."""
    import torch

    device = next((t.device for t in list(module.parameters()) + list(module.buffers())), torch.device("cpu"))
    tensors = [_to_torch(a, device) for a in args]
    try:
        wide = copy.deepcopy(module).double().eval()
        wide_args = [t.double() if t.is_floating_point() else t for t in tensors]
        with torch.no_grad():
            return _flatten(wide(*wide_args))
    except Exception:  # float64 unsupported somewhere in the module: run it as it is
        pass
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return _flatten(module(*tensors))
    finally:
        module.train(training)


def _to_torch(array: np.ndarray, device):
    import torch

    if array.dtype.kind == "V":  # ml_dtypes (bfloat16): through float32
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16).to(device)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _flatten(output: Any) -> list[np.ndarray]:
    import torch

    if output is None:
        return []
    if isinstance(output, torch.Tensor):
        tensor = output.detach().cpu()
        return [tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()]
    if isinstance(output, Mapping):
        return [a for value in output.values() for a in _flatten(value)]
    if isinstance(output, (list, tuple)):
        return [a for value in output for a in _flatten(value)]
    if isinstance(output, (int, float, bool, np.ndarray, np.generic)):
        return [np.asarray(output)]
    raise InputError(f"cannot compare a torch output of type {type(output).__name__}")


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch module cannot exist unless torch was imported
    return torch is not None and isinstance(obj, torch.nn.Module)


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _is_reference_file(obj: Any) -> bool:
    return isinstance(obj, ReferenceData) or (isinstance(obj, (str, os.PathLike)) and os.fspath(obj).endswith(".npz"))


def _describe(obj: Any) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    if _is_torch_module(obj):
        return f"torch module {type(obj).__name__}"
    if isinstance(obj, ReferenceData):
        return f"reference data ({obj.source})" if obj.source else "reference data"
    return f"in-memory {type(obj).__name__}"
