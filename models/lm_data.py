"""A byte-level language-modelling data set that is on every machine: the Python standard library's source.

Files: every *.py under sysconfig's stdlib directory (site-packages excluded), sorted by path;
file i is validation when i % val_every == 0, training otherwise (split by file, so no validation
text is ever trained on). Tokens are bytes (vocab 256).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

VOCAB = 256


def stdlib_files(*, include_tests: bool = False) -> list[Path]:
    """The standard library's *.py files, sorted; test packages only when `include_tests`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if not include_tests and ("test" in parts or "tests" in parts):
            continue
        files.append(path)
    return files


def stdlib_bytes(*, val_every: int = 10, include_tests: bool = False):
    """normfold.finetune.data.TokenData of uint8 byte ids: training and validation files concatenated."""
    from normfold.finetune.data import TokenData

    train, val = [], []
    for i, path in enumerate(stdlib_files(include_tests=include_tests)):
        (val if i % val_every == 0 else train).append(np.frombuffer(path.read_bytes(), dtype=np.uint8))
    if not train or not val:
        raise RuntimeError("the standard library's source files were not found")
    return TokenData(np.concatenate(train), np.concatenate(val))
