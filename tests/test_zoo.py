"""fold-batchnorm end to end on the model-zoo graphs shipped in the onnx wheel.

These "light" graphs store most weights as ConstantOfShape (every element 0.02), which makes their
outputs nearly input-independent; each model is therefore also checked with those weights replaced
by seeded random initializers, so that equivalence is tested on outputs that actually vary.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import normfold

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
ZOO = ["light_resnet50.onnx", "light_inception_v2.onnx", "light_shufflenet.onnx", "light_densenet121.onnx"]


def foldable_bn_count(proto: onnx.ModelProto) -> int:
    """BNs that read the only output of a Conv (what fold-batchnorm must fold, at least)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    readers = collections.Counter(name for node in proto.graph.node for name in node.input)
    return sum(
        1
        for node in proto.graph.node
        if node.op_type == "BatchNormalization"
        and producers.get(node.input[0]) is not None
        and producers[node.input[0]].op_type == "Conv"
        and readers[node.input[0]] == 1
    )


def randomize_weights(proto: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replaces every ConstantOfShape weight by a seeded initializer (also a graph input, IR 3):
    N(0, 1/fan_in), except BN variances, drawn from U(0.5, 2)."""
    rng = np.random.default_rng(seed)
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    inits = {i.name: i for i in model.graph.initializer}
    variances = {n.input[4] for n in model.graph.node if n.op_type == "BatchNormalization"}
    kept = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            kept.append(node)
            continue
        shape = numpy_helper.to_array(inits[node.input[0]]).astype(int).tolist()
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if node.output[0] in variances:
            array = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            array = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        model.graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, shape))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


@pytest.mark.parametrize("name", ZOO)
def test_zoo_graph_folds_every_conv_bn_and_stays_equivalent(name, tmp_path):
    path = os.path.join(LIGHT_DIR, name)
    proto = onnx.load(path)
    expected = foldable_bn_count(proto)
    model, report = normfold.convert(path, passes=["fold-batchnorm"])

    bn_before = report.ops_before["BatchNormalization"]
    assert report.passes[0].applied >= expected > 0
    assert report.ops_after.get("BatchNormalization", 0) == bn_before - report.passes[0].applied
    assert len(report.passes[0].skipped) == report.ops_after.get("BatchNormalization", 0)
    assert all(skip.reason for skip in report.passes[0].skipped)
    assert report.verification["passed"]
    out = tmp_path / "out.onnx"
    normfold.save(model, out)
    assert normfold.verify(path, out).passed


@pytest.mark.parametrize("name", ZOO)
def test_zoo_graph_with_random_weights_stays_equivalent(name, tmp_path):
    src = tmp_path / name
    onnx.save(randomize_weights(onnx.load(os.path.join(LIGHT_DIR, name))), src)
    model, report = normfold.convert(src, passes=["fold-batchnorm"])
    assert report.passes[0].applied >= foldable_bn_count(onnx.load(src))
    outputs = report.verification["outputs"]
    assert report.verification["passed"], outputs
    assert all(o["cosine"] > 0.999999 and o["nonfinite"] == 0 for o in outputs)


def test_densenet_reports_why_pre_activation_bns_stay():
    """DenseNet's BN-Mul-Add-Relu-Conv blocks read Concat outputs: no linear neighbour to fold into."""
    _, report = normfold.convert(os.path.join(LIGHT_DIR, "light_densenet121.onnx"), verify=False)
    reasons = {skip.reason for skip in report.passes[0].skipped}
    assert any("Concat" in r and "feeds Mul" in r for r in reasons), reasons
