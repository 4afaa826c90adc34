"""JUnit XML for a verification (`normfold verify --junit FILE.xml`), read by CI systems.

One <testsuite> per verification, one <testcase> per model output (name "output NAME", classname
"normfold.verify.<candidate stem>"); a failing output carries a <failure> whose message names the
worst element and whose text lists every metric; a passing output's <system-out> lists them.
Suite properties record what reproduces the run: reference, candidate, provider, seed, input shapes,
tolerance class, normfold version. A bisection, when run, goes to the suite's <system-out>.
Characters XML 1.0 cannot hold (control characters in an ONNX name) are written as \\xNN.
"""

from __future__ import annotations

import json
import os
import re
import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from normfold import __version__
from normfold.atomic import write_atomic

if TYPE_CHECKING:
    from normfold.bisect import BisectResult
    from normfold.verification import OutputCheck, VerificationResult

_XML_ILLEGAL = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def junit_xml(
    result: VerificationResult,
    *,
    reference: str,
    candidate: str,
    seconds: float = 0.0,
    bisect: BisectResult | None = None,
) -> bytes:
    """The JUnit XML document (UTF-8) for `result`."""
    tests, failures = len(result.outputs), sum(not o.passed for o in result.outputs)
    counts = {"tests": str(tests), "failures": str(failures), "errors": "0", "skipped": "0",
              "time": f"{seconds:.3f}"}
    root = ET.Element("testsuites", {"name": "normfold verify", **counts})
    suite = ET.SubElement(root, "testsuite", {
        "name": _text(f"normfold verify {candidate}"), **counts,
        "timestamp": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "hostname": _text(socket.gethostname()),
    })
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("reference", reference), ("candidate", candidate), ("provider", result.provider),
        ("seed", str(result.seed)), ("input_shapes", json.dumps(result.input_shapes)),
        ("tolerance_class", result.tolerance_class), ("normfold_version", __version__),
    ):
        ET.SubElement(properties, "property", {"name": name, "value": _text(value)})
    classname = _text("normfold.verify." + Path(candidate).stem.replace(".", "_"))
    for output in result.outputs:
        case = ET.SubElement(suite, "testcase", {"name": _text(f"output {output.name}"), "classname": classname,
                                                  "time": "0"})
        metrics = _metrics(output)
        if not output.passed:
            failure = ET.SubElement(case, "failure", {"message": _text(_failure_message(output)),
                                                      "type": "NotEquivalent"})
            failure.text = _text(metrics)
        else:
            ET.SubElement(case, "system-out").text = _text(metrics)
    lines = result.summary_lines() + (bisect.summary_lines() if bisect is not None else [])
    ET.SubElement(suite, "system-out").text = _text("\n".join(lines) + "\n")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: str | os.PathLike, result: VerificationResult, **kwargs) -> Path:
    """Writes `junit_xml(result, **kwargs)` to `path` atomically."""
    document = junit_xml(result, **kwargs)
    return write_atomic(path, lambda f: f.write(document), what="JUnit report")


def _failure_message(o: OutputCheck) -> str:
    text = (f"{o.name}: max_abs {o.max_abs_error:.3g}, max_rel {o.max_rel_error:.3g}, cosine {o.cosine:.6f} "
            f"(rtol {o.rtol:g}, atol {o.atol:.3g})")
    return text + (f"; {o.message}" if o.message else "")


def _metrics(o: OutputCheck) -> str:
    fields = [
        ("output", o.name), ("dtype", o.dtype), ("shape", o.shape), ("passed", o.passed),
        ("max_abs_error", o.max_abs_error), ("max_rel_error", o.max_rel_error),
        ("mean_abs_error", o.mean_abs_error), ("cosine", o.cosine), ("rtol", o.rtol), ("atol", o.atol),
        ("nonfinite", o.nonfinite),
    ]
    if o.worst_index is not None:
        fields += [("worst_index", o.worst_index), ("worst_reference", o.worst_reference),
                   ("worst_candidate", o.worst_candidate)]
    if o.message:
        fields.append(("message", o.message))
    return "".join(f"{key}: {value}\n" for key, value in fields)


def _text(value: str) -> str:
    return _XML_ILLEGAL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
