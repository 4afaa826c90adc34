"""normfold: rewrites the normalization layers of neural-network graphs and proves the result equivalent.

Python API:
    model = normfold.load("model.onnx")
    model, report = normfold.convert(model, passes=["fold-batchnorm"])
    normfold.save(model, "model.normfold.onnx")
    result = normfold.verify("model.onnx", "model.normfold.onnx")
"""

__version__ = "0.1.0"

from normfold.errors import InputError, NormfoldError, VerificationError
from normfold.io import load, save
from normfold.pipeline import convert
from normfold.report import Report
from normfold.verification import VerificationResult, verify

__all__ = [
    "InputError",
    "NormfoldError",
    "Report",
    "VerificationError",
    "VerificationResult",
    "__version__",
    "convert",
    "load",
    "save",
    "verify",
]
