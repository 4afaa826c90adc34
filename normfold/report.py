"""The conversion report: what each pass did and skipped, op counts, verification, timings.

`Report.to_dict()` is the stable JSON schema of `normfold convert --report`:

    {"schema": "normfold.report/1", "input": str|null, "output": str|null,
     "passes": [{"name", "applied", "iterations", "seconds", "skipped": [{"node", "reason"}],
                 "notes": [{"node", "reason"}]}],
     "ops_before": {op: count}, "ops_after": {op: count},
     "verification": {...} | null, "timings": {stage: seconds},
     "untouched_initializers": {name: sha256 hex of the bytes}}
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from normfold import derived

SCHEMA = "normfold.report/1"


@dataclass
class Skip:
    """A candidate a pass looked at and left unchanged, and why."""

    node: str
    reason: str


@dataclass
class PassReport:
    """What one pass did over all pipeline iterations."""

    name: str
    applied: int = 0
    iterations: int = 0
    seconds: float = 0.0
    skipped: list[Skip] = field(default_factory=list)
    notes: list[Skip] = field(default_factory=list)
    """Candidates rewritten differently from the pass's first choice, and why (e.g. RMSNorm instead of
    CRMSNorm)."""


@dataclass
class Report:
    """Everything `convert` did to one model."""

    passes: list[PassReport] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    untouched_initializers: dict[str, str] = field(default_factory=dict)
    """Initializers the passes left as they were (name -> sha256 of their bytes), when any pass applied."""
    input: str | None = None
    output: str | None = None

    @property
    def applied(self) -> int:
        """Total number of rewrites applied by all passes."""
        return sum(p.applied for p in self.passes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema": SCHEMA, **data}

    def summary_lines(self) -> list[str]:
        """A short human summary: one line per pass, then one per skipped candidate."""
        lines = []
        for p in self.passes:
            lines.append(f"{p.name}: applied {p.applied}, skipped {len(p.skipped)}")
            lines.extend(f"  skipped {s.node}: {s.reason}" for s in p.skipped)
            lines.extend(f"  note {s.node}: {s.reason}" for s in p.notes)
        changed = {
            op: (self.ops_before.get(op, 0), self.ops_after.get(op, 0))
            for op in sorted(set(self.ops_before) | set(self.ops_after))
            if self.ops_before.get(op, 0) != self.ops_after.get(op, 0)
        }
        if changed:
            lines.append("ops: " + ", ".join(f"{op} {a} -> {b}" for op, (a, b) in changed.items()))
        return lines


def node_label(node: ir.Node) -> str:
    """A name a user can find the node by: its name, else its op type and first output."""
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type}({output})"


def op_counts(model: ir.Model) -> dict[str, int]:
    """Op type -> number of nodes, over the main graph and all subgraphs (domain-qualified if custom)."""
    counts: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[op] += 1
    return dict(sorted(counts.items()))


def tensor_sha256(tensor: ir.TensorProtocol) -> str:
    """sha256 of a tensor's raw bytes; external data is read from its file a block at a time, never whole."""
    if not derived.is_plain_file_tensor(tensor):
        return hashlib.sha256(tensor.tobytes()).hexdigest()
    digest = hashlib.sha256()
    for _, block in derived.blocks(tensor):
        digest.update(block.reshape(-1).view(np.uint8))
    return digest.hexdigest()
