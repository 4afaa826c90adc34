"""ONNX export of an LN-free GPT-2 and its checks: no normalization op, same function as the torch model.

The export uses torch.onnx.export(dynamo=True), opset 18 (models.export.to_onnx), static shapes.
"No normalization" means: normfold.detect finds no norm site (fused or decomposed) and none of the ops
a norm is spelled with appears (LayerNormalization, RMSNormalization, ReduceMean, Sqrt, ...).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import torch
from torch import nn

from normfold.verification import OutputCheck, compare

NORM_OPS = frozenset({
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "MeanVarianceNormalization", "LpNormalization", "ReduceMean", "ReduceL2", "Sqrt", "Reciprocal",
})
"""Ops that spell a normalization (ReduceMean/Sqrt/Reciprocal: the decomposed forms)."""


def export_onnx(model: nn.Module, path: str | os.PathLike, *, batch: int, seq: int,
                dtype: str = "float32") -> onnx.ModelProto:
    """Exports `model` (token ids (batch, seq) -> logits) to `path`; input "input", output "output".

    dtype "float16" exports a half-precision copy (the model itself is left alone).
    """
    from normfold.models.export import to_onnx
    from normfold.models.transformer_zoo import TokenLogits

    ids = torch.zeros(batch, seq, dtype=torch.int64)
    return to_onnx(TokenLogits(model).eval(), [ids], path, opset=18, dtype=dtype)


def norm_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Normalization sites (key "sites", normfold.detect) and every op of NORM_OPS present, with counts."""
    import onnx_ir as ir

    from normfold.detect import find_sites

    counts = Counter(node.op_type for node in model.graph.node if node.op_type in NORM_OPS)
    for function in model.functions:
        counts.update(node.op_type for node in function.node if node.op_type in NORM_OPS)
    sites = len(find_sites(ir.serde.deserialize_model(model)))
    return {**({"sites": sites} if sites else {}), **dict(counts)}


@torch.no_grad()
def verify_onnx(reference: nn.Module, path: str | os.PathLike, ids: torch.Tensor, *,
                rtol: float = 1e-4, atol: float = 1e-5) -> OutputCheck:
    """Compares onnxruntime (graph optimizations off) on `path` with `reference(ids).logits`.

    Default tolerances: REFERENCE.md's fp32 fold class (rtol 1e-4, atol 1e-5 * max(1, rms(reference))).
    """
    from normfold.runtime import make_session

    expected = reference.eval()(ids).logits.float().numpy()
    session = make_session(path, optimize=False)
    actual = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    return compare("logits", expected, actual, rtol=rtol, atol=atol)


def onnx_cross_entropy(path: str | os.PathLike, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy (nats) of the ONNX model over (inputs, targets) batches, on onnxruntime."""
    from normfold.runtime import make_session

    session = make_session(path, optimize=True)
    name = session.get_inputs()[0].name
    total = 0.0
    for inputs, targets in batches:
        logits = session.run(None, {name: inputs.numpy()})[0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total += float(-np.take_along_axis(logp, targets.numpy()[..., None], axis=-1).mean())
    return total / len(batches)
