"""Example counts of the property tests: the CI count, or the long mode.

NORMFOLD_LONG=1 runs LONG_EXAMPLES (10,000) examples per property. NORMFOLD_LONG=N (N > 1) runs N, so a
long run can be split into chunks that each report when done, e.g. ten chunks of 1000:
    for s in $(seq 1 10); do NORMFOLD_LONG=1000 pytest tests/passes/test_metamorphic.py -k emit_rmsnorm \
        --hypothesis-seed=$s --hypothesis-show-statistics; done
"""

from __future__ import annotations

import os

LONG_EXAMPLES = 10_000


def examples(ci: int) -> int:
    """How many examples a property runs: `ci` unless NORMFOLD_LONG is set (see the module docstring)."""
    value = os.environ.get("NORMFOLD_LONG", "").strip()
    if value in ("", "0"):
        return ci
    if not value.isdigit():
        raise ValueError(f"NORMFOLD_LONG must be 1 (for {LONG_EXAMPLES} examples) or a number of examples, not {value!r}")
    count = int(value)
    return LONG_EXAMPLES if count == 1 else count
