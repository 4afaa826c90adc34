"""FX pass registry: pass name -> module, imported lazily.

Pass module contract: a module defines `NAME: str` and
`run(gm: torch.fx.GraphModule, example_inputs: tuple, report: PassReport) -> int`, which rewrites `gm`
in place (graph, submodules, attributes, then `gm.recompile()`), appends a `normfold.report.Skip`
for every candidate it left unchanged (and `report.notes` for a candidate rewritten differently
from the first choice, e.g. a cloned module), and returns the number of rewrites applied. It may
define `TOLERANCE_CLASS` ("fold", the default, or "renorm": normfold.verification.TOLERANCES).

The names are the ONNX side's; a pass module that is not installed counts as unknown.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

from normfold.errors import InputError

PASSES: dict[str, str] = {
    "fold-batchnorm": "normfold.fx.fold_batchnorm",
    "layernorm-to-rmsnorm": "normfold.fx.layernorm_to_rmsnorm",
    "layernorm-to-crmsnorm": "normfold.fx.layernorm_to_crmsnorm",
    "fold-norm-affine": "normfold.fx.fold_norm_affine",
}
DEFAULT_PASSES: tuple[str, ...] = ("fold-batchnorm", "layernorm-to-rmsnorm", "fold-norm-affine")


def load(name: str) -> ModuleType | None:
    """The pass module for `name`, or None when the name is unknown or its module is not installed."""
    path = PASSES.get(name)
    if path is None:
        return None
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name == path:
            return None
        raise


def available() -> list[str]:
    """The names of the passes whose modules can be imported, in registry order."""
    return [name for name in PASSES if load(name) is not None]


def resolve(passes: Sequence[str | ModuleType] | None, *, trainable: bool = False) -> list[ModuleType]:
    """Pass modules for names (or pass modules given directly); None means the default passes.

    With `trainable`, each named pass is its `TRAINABLE` form (a result that keeps training like the
    original); a pass without one is refused, and None means the default passes that have one.
    """
    if passes is None:
        defaults = [module for name in DEFAULT_PASSES if (module := load(name)) is not None]
        return [m.TRAINABLE for m in defaults if hasattr(m, "TRAINABLE")] if trainable else defaults
    if isinstance(passes, str):
        passes = [passes]
    resolved = []
    for item in passes:
        if not isinstance(item, str):
            if not (isinstance(getattr(item, "NAME", None), str) and callable(getattr(item, "run", None))):
                raise InputError(f"{item!r} is not an FX pass: it needs NAME and run(gm, example_inputs, report)")
            resolved.append(item)
            continue
        module = load(item)
        if module is None:
            raise InputError(f"unknown FX pass {item!r}; known passes: {', '.join(available())}")
        if trainable and not hasattr(module, "TRAINABLE"):
            trainable_names = [n for n in available() if hasattr(load(n), "TRAINABLE")]
            raise InputError(f"FX pass {item!r} has no trainable form (its result would train differently); "
                             f"trainable passes: {', '.join(trainable_names)}")
        resolved.append(module.TRAINABLE if trainable else module)
    if not resolved:
        raise InputError("no passes selected")
    return resolved
