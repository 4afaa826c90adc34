"""Where two models start to differ (`normfold verify --bisect`).

Every value computed by a node of the reference's main graph that the candidate's main graph also
computes under the same name (graph inputs, initializers and values inside subgraphs excluded) is
marked as an extra graph output of both models. Both run on the same inputs, the reference on CPU
with graph optimizations off and the candidate as `verify` runs it, and each pair is compared with
the tolerance rule of normfold.verification. A pair whose shapes, dtypes or kinds (tensor or not)
differ cannot be compared: it is skipped and counted. Values are checked in chunks, so only one
chunk's arrays are in memory at a time.

A rewrite may change a value on purpose and keep its name: the Conv that absorbed a BatchNorm keeps
its output's name, though it now holds BN(conv); the difference disappears at the next compared
value. So the reported value is the first divergent one, in the reference's topological order, from
which a chain of divergent compared values reaches a failing graph output (uncompared values in
between are passed through). Other divergent values are listed as absorbed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from normfold import io, provider_tolerances, runtime
from normfold.errors import InputError
from normfold.verification import OutputCheck, compare, make_inputs

CHUNK_SIZE = 256
"""Values compared per pair of onnxruntime runs."""


@dataclass
class Divergence:
    """A compared value out of tolerance, and the nodes that produce it."""

    name: str
    position: int
    """Index of the value among the compared ones, in the reference's topological order."""
    op_type: str
    node: str
    candidate_op_type: str
    candidate_node: str
    absorbed: bool
    """True when every path from it to a failing graph output passes through an agreeing value."""
    check: OutputCheck


@dataclass
class BisectResult:
    """The first divergence that reaches the outputs, every divergence, and what could not be compared."""

    first: Divergence | None
    divergent: list[Divergence]
    compared: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    failing_outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self, max_listed: int = 5) -> list[str]:
        lines = [f"bisect: compared {self.compared} intermediate values present in both models"
                 + (f"; skipped {len(self.skipped)} whose shape, dtype or kind differs" if self.skipped else "")]
        if self.first is not None:
            d = self.first
            lines.append(f"  first divergence: {d.name!r}, output of {d.op_type} node {d.node!r} in the reference "
                         f"({d.candidate_op_type} node {d.candidate_node!r} in the candidate)")
            lines.append(f"    max_abs {d.check.max_abs_error:.3g}, max_rel {d.check.max_rel_error:.3g}, cosine "
                         f"{d.check.cosine:.6f}" + (f"; {d.check.message}" if d.check.message else ""))
        elif self.failing_outputs:
            lines.append("  no intermediate value diverges before the failing outputs "
                         f"{', '.join(map(repr, self.failing_outputs))}")
        else:
            lines.append("  every graph output agrees when intermediate values are compared too")
        absorbed = [d for d in self.divergent if d.absorbed]
        if absorbed:
            names = ", ".join(repr(d.name) for d in absorbed[:max_listed])
            more = f" and {len(absorbed) - max_listed} more" if len(absorbed) > max_listed else ""
            lines.append(f"  {len(absorbed)} value(s) differ but agree again downstream (changed on purpose by a "
                         f"rewrite that kept the name?): {names}{more}")
        return lines


def bisect(
    reference: ir.Model | str | os.PathLike,
    candidate: ir.Model | str | os.PathLike,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    tolerance_class: str = "fold",
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    provider: str = "cpu",
    chunk_size: int = CHUNK_SIZE,
) -> BisectResult:
    """Compares the intermediate values the two models share by name (see module docstring).

    In-memory models are modified only while they are saved for onnxruntime and restored after.
    """
    ref_model = reference if isinstance(reference, ir.Model) else io.load(reference)
    cand_model = candidate if isinstance(candidate, ir.Model) else io.load(candidate)
    ref_order = _topological_nodes(ref_model.graph)
    cand_producers = _producers(cand_model.graph)
    excluded = _inputs_and_initializers(ref_model.graph) | _inputs_and_initializers(cand_model.graph)
    names: list[str] = []
    ref_producers: dict[str, ir.Node] = {}
    for node in ref_order:
        for value in node.outputs:
            if value.name and value.name not in excluded and value.name not in ref_producers:
                ref_producers[value.name] = node
                if value.name in cand_producers:
                    names.append(value.name)
    per_output = dict(tolerances or {})
    choice = provider_tolerances.for_verification(runtime.select_provider(provider))
    precision = provider_tolerances.precision(choice)

    checks: dict[str, OutputCheck] = {}
    skipped: list[dict[str, str]] = []
    feeds: dict[str, np.ndarray] | None = None
    for start in range(0, len(names), max(1, chunk_size)):
        chunk = names[start:start + max(1, chunk_size)]
        with _marked_outputs(ref_model, chunk) as ref_path:
            ref_session = runtime.make_session(ref_path, provider="cpu", optimize=False)
            if feeds is None:
                feeds = make_inputs(ref_session, ref_model, user_inputs=inputs, shapes=shapes, seed=seed)
            ref_values = _run_named(ref_session, chunk, feeds, "reference")
        with _marked_outputs(cand_model, chunk) as cand_path:
            cand_session = runtime.make_session(cand_path, provider=choice, optimize=True)
            cand_values = _run_named(cand_session, chunk, feeds, "candidate")
        for name, ref, cand in zip(chunk, ref_values, cand_values):
            reason = _incomparable(ref, cand)
            if reason:
                skipped.append({"name": name, "reason": reason})
                continue
            a, r = per_output.get(name, (atol, rtol))
            checks[name] = compare(name, ref, cand, atol=a, rtol=r, tolerance_class=tolerance_class,
                                   precision=precision)
        del ref_values, cand_values

    output_names = [v.name for v in ref_model.graph.outputs]
    failing = [n for n in output_names if n in checks and not checks[n].passed]
    reaching = _reaching_failures(failing, ref_producers, checks)
    position = {name: i for i, name in enumerate(names)}
    divergent = [
        Divergence(
            name=name, position=position[name], op_type=ref_producers[name].op_type,
            node=ref_producers[name].name or "", candidate_op_type=cand_producers[name].op_type,
            candidate_node=cand_producers[name].name or "", absorbed=name not in reaching, check=check,
        )
        for name, check in checks.items() if not check.passed
    ]
    divergent.sort(key=lambda d: d.position)
    first = next((d for d in divergent if not d.absorbed), None)
    return BisectResult(first=first, divergent=divergent, compared=len(checks), skipped=skipped,
                        failing_outputs=failing)


def _topological_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The graph's nodes, producers before consumers (subgraph captures count), stable otherwise."""
    nodes = list(graph)
    in_graph = {id(n) for n in nodes}
    done: set[int] = set()
    order: list[ir.Node] = []
    for root in nodes:
        if id(root) in done:
            continue
        stack: list[tuple[ir.Node, bool]] = [(root, False)]
        on_stack: set[int] = set()
        while stack:
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if expanded:
                done.add(id(node))
                order.append(node)
                continue
            if id(node) in on_stack:  # a cycle (invalid graph): keep the file order
                continue
            on_stack.add(id(node))
            stack.append((node, True))
            for dep in reversed(_dependencies(node)):
                producer = dep.producer()
                if producer is not None and id(producer) in in_graph and id(producer) not in done:
                    stack.append((producer, False))
    return order


def _dependencies(node: ir.Node) -> list[ir.Value]:
    """The node's inputs plus the outer values its subgraphs read."""
    deps = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.is_ref() or attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            continue
        for subgraph in [attr.value] if attr.type == ir.AttributeType.GRAPH else attr.value:
            for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                for v in inner.inputs:
                    producer = v.producer() if v is not None else None
                    if producer is not None and producer.graph is node.graph:
                        deps.append(v)
    return deps


def _producers(graph: ir.Graph) -> dict[str, ir.Node]:
    return {v.name: node for node in graph for v in node.outputs if v.name}


def _inputs_and_initializers(graph: ir.Graph) -> set[str]:
    return {v.name for v in graph.inputs if v.name} | set(graph.initializers)


@contextlib.contextmanager
def _marked_outputs(model: ir.Model, names: list[str]) -> Iterator[Any]:
    """The model saved for onnxruntime with the named main-graph values as extra graph outputs."""
    by_name = {v.name: v for node in model.graph for v in node.outputs if v.name}
    present = {v.name for v in model.graph.outputs}
    added = [by_name[n] for n in names if n not in present]
    model.graph.outputs.extend(added)
    try:
        with runtime.model_file(model) as path:
            yield path
    finally:
        for value in added:
            model.graph.outputs.remove(value)


def _run_named(session, names: list[str], feeds, which: str) -> list:
    try:
        return session.run(names, feeds)
    except Exception as exc:  # onnxruntime's own exception types
        raise InputError(f"onnxruntime failed to run the {which} model with its intermediate values as outputs: "
                         f"{runtime.ort_error_message(exc)}") from None


def _incomparable(ref: Any, cand: Any) -> str:
    if not isinstance(ref, np.ndarray) or not isinstance(cand, np.ndarray):
        return "not a tensor in both models"
    if ref.shape != cand.shape:
        return f"shape differs: reference {list(ref.shape)}, candidate {list(cand.shape)}"
    if ref.dtype != cand.dtype:
        return f"dtype differs: reference {ref.dtype}, candidate {cand.dtype}"
    return ""


def _reaching_failures(failing: list[str], producers: dict[str, ir.Node], checks: dict[str, OutputCheck]) -> set[str]:
    """Divergent values from which a chain of divergent compared values reaches a failing output."""
    reaching = set(failing)
    stack = list(failing)
    seen = set(failing)
    while stack:
        producer = producers.get(stack.pop())
        if producer is None:
            continue
        for dep in _dependencies(producer):
            name = dep.name
            if not name or name in seen:
                continue
            seen.add(name)
            check = checks.get(name)
            if check is not None and check.passed:
                continue  # the divergence is absorbed here
            if check is not None:
                reaching.add(name)
            stack.append(name)
    return reaching
