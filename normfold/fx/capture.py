"""Captures a torch module as a torch.fx.GraphModule.

torch.fx.symbolic_trace first (its graph calls the module's own submodules: call_module nodes);
when it fails (data-dependent control flow, unsupported Python), torch.export.export(...).module()
(call_function aten ops reading parameters through get_attr nodes, shapes specialised to the
example inputs). A GraphModule is used as given. The module passed in is captured as it is:
callers copy it first.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from normfold.errors import InputError

METHODS = ("auto", "symbolic_trace", "export")
_LOGGERS = ("torch._dynamo", "torch.fx", "torch._export", "torch.export", "torch.onnx")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Captured:
    """A captured graph, how it was captured, and why symbolic tracing was not used (if it was not)."""

    gm: torch.fx.GraphModule
    method: str
    reason: str | None = None


def capture(module: torch.nn.Module, example_inputs: tuple, how: str = "auto", *, dynamic: bool = False) -> Captured:
    """The module's graph: by symbolic tracing, else by torch.export (`how` may force one of them).

    torch.export specialises the graph to the example inputs' shapes unless `dynamic`, which lets
    it keep every dim it can symbolic (torch.export.Dim.AUTO; a dim of size 1 stays static).
    """
    if how not in METHODS:
        raise InputError(f"unknown capture method {how!r}; choose one of: {', '.join(METHODS)}")
    if isinstance(module, torch.fx.GraphModule) and how == "auto":
        return Captured(module, "given")
    name = type(module).__name__
    trace_error = None
    if how in ("auto", "symbolic_trace"):
        try:
            with quiet():
                return Captured(torch.fx.symbolic_trace(module), "symbolic_trace")
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "try torch.export"
            trace_error = f"symbolic_trace failed: {one_line(exc)}"
            if how == "symbolic_trace":
                raise InputError(f"cannot capture {name}: {trace_error}") from None
    try:
        with quiet():
            gm = torch.export.export(module, tuple(example_inputs), dynamic_shapes=_auto_dims(example_inputs)
                                     if dynamic else None).module()
    except Exception as exc:  # noqa: BLE001 - reported as one line
        reasons = [r for r in (trace_error, f"torch.export failed: {one_line(exc)}") if r]
        raise InputError(f"cannot capture {name}: {'; '.join(reasons)}") from None
    return Captured(gm, "torch.export", trace_error)


def _auto_dims(example_inputs: tuple) -> tuple:
    return tuple({i: torch.export.Dim.AUTO for i in range(x.ndim)} if isinstance(x, torch.Tensor) else None
                 for x in example_inputs)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, the message being the root cause's when the exception wraps
    another; without terminal colour codes, cut to `limit` characters."""
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = _first_line(exc) if root is exc else f"{type(exc).__name__}: {_first_line(root)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    message = _ANSI.sub("", str(exc))
    text = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def quiet() -> Any:
    """Silence torch's warnings, log records below ERROR and prints while capturing or exporting."""
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
