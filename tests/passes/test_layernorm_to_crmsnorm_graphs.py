"""layernorm-to-crmsnorm on hand-built graphs: a linear that both reads a norm and writes the stream.

A branch made of one projection, x + (LN(x) W + b), has a linear that is an input projection (its rows
absorb the norm's affine and the implied last element) and an output projection (its columns are
recentred and the last dropped) at once: both edits must compose into one (d-1) x (d-1) weight.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfold
from normfold.detect import find_sites

pytest.importorskip("onnxruntime")

D, VOCAB, SEQ = 8, 20, 5


def single_projection_model(seed: int = 0, *, offset: float = 100.0) -> onnx.ModelProto:
    """ids -> embedding (+offset) -> 2 blocks of x + (LN(x) W + b) -> final LN -> head."""
    rng = np.random.default_rng(seed)
    inits = {"embed": rng.standard_normal((VOCAB, D)) + offset, "head": rng.standard_normal((D, VOCAB))}
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["x0"])]
    x = "x0"
    for i in range(2):
        inits |= {f"g{i}": rng.uniform(0.5, 1.5, D), f"b{i}": rng.normal(0, 0.1, D),
                  f"w{i}": rng.standard_normal((D, D)) / np.sqrt(D), f"c{i}": rng.normal(0, 0.1, D)}
        nodes += [helper.make_node("LayerNormalization", [x, f"g{i}", f"b{i}"], [f"n{i}"], axis=-1),
                  helper.make_node("MatMul", [f"n{i}", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"c{i}"], [f"p{i}"]),
                  helper.make_node("Add", [x, f"p{i}"], [f"x{i + 1}"])]
        x = f"x{i + 1}"
    inits |= {"gf": rng.uniform(0.5, 1.5, D), "bf": rng.normal(0, 0.1, D)}
    nodes += [helper.make_node("LayerNormalization", [x, "gf", "bf"], ["nf"], axis=-1),
              helper.make_node("MatMul", ["nf", "head"], ["logits"])]
    graph = helper.make_graph(
        nodes, "single_projection",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, SEQ, VOCAB])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_a_projection_that_reads_a_norm_and_writes_the_stream_gets_both_edits(target):
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, SEQ))
    model, report = normfold.convert(single_projection_model(), ["layernorm-to-crmsnorm"], target=target,
                                     inputs={"ids": ids})
    assert report.passes[0].applied == 3 and report.verification["passed"], report.summary_lines()
    assert [s for s in find_sites(model) if s.kind == "LayerNorm"] == []
    shapes = sorted(tuple(v.const_value.shape) for v in model.graph.initializers.values()
                    if v.const_value is not None and len(v.const_value.shape) == 2)
    assert shapes.count((D - 1, D - 1)) == 2, shapes  # both block projections: rows and columns dropped
    # the stored table; the bias-less head reads the final norm restored to width D and keeps its weight
    assert (VOCAB, D - 1) in shapes and (D, VOCAB) in shapes
