"""Makes tests/toy_models.py importable from tests/passes (pytest puts only this folder on sys.path)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toy_models import conv_bn, decomposed_norm  # noqa: E402

__all__ = ["conv_bn", "decomposed_norm"]
