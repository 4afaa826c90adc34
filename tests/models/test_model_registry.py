"""The model registry and its example inputs work without torch."""

import subprocess
import sys

import numpy as np

from normfold.models import CNN_FACTORIES, example_inputs


def test_importing_models_does_not_import_torch():
    code = "import sys, normfold.models; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_lists_every_factory():
    assert set(CNN_FACTORIES) == {
        "resnet_like",
        "resnet50",
        "mobilenet_like",
        "convtranspose_decoder",
        "mlp_bn",
        "conv1d_bn",
        "conv3d_bn",
    }


def test_example_inputs_are_seeded_float32_normal():
    a, b, c = example_inputs("resnet50", 0), example_inputs("resnet50", 0), example_inputs("resnet50", 1)
    assert [x.shape for x in a] == [(1, 3, 224, 224)]
    assert a[0].dtype == np.float32
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    assert abs(a[0].mean()) < 0.01 and abs(a[0].std() - 1) < 0.01


def test_example_inputs_batch_override():
    (x,) = example_inputs("mlp_bn", batch=7)
    assert x.shape == (7, 32)
