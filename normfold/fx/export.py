"""Exports a (converted) GraphModule to ONNX, atomically.

torch.onnx.export with the dynamo exporter at opset 18, onnxscript's optimizer off by default (so
the ONNX graph is the FX graph, op for op), shapes static as in the example inputs. The file is
written by normfold.io.save: all or nothing, never over an existing file unless `force`.
Inputs are named input (or input_0, input_1, ...) and outputs output (or output_0, ...), as
models/export.py names them, so the export of the original module and of the converted one can be
compared with normfold.verify.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from normfold import io
from normfold.errors import InputError
from normfold.fx.capture import one_line, quiet


def export(
    graph_module: torch.nn.Module,
    example_inputs: tuple | torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    optimize: bool = False,
    force: bool = False,
) -> Path:
    """Writes `graph_module` traced on `example_inputs` to `path` as ONNX; returns the path."""
    if Path(path).exists() and not force:
        raise InputError(f"{path}: exists; pass force=True to replace it")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    try:
        with torch.no_grad():
            outputs = len(pytree.tree_leaves(graph_module(*args)))
        with quiet():
            program = torch.onnx.export(graph_module, args, dynamo=True, optimize=optimize, opset_version=opset,
                                        input_names=_names("input", len(args)),
                                        output_names=_names("output", outputs), verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter's failures are many; one line for the user
        raise InputError(f"cannot export {type(graph_module).__name__} to ONNX: {one_line(exc)}") from None
    return io.save(program.model, path, force=force)


def _names(base: str, count: int) -> list[str]:
    return [base] if count == 1 else [f"{base}_{i}" for i in range(count)]
