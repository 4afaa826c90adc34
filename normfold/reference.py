"""Reference files: a model's inputs and outputs saved once, so a candidate can be checked later
without the original model (`normfold verify MODEL.onnx --save-reference ref.npz`, then
`normfold verify CANDIDATE.onnx --reference ref.npz`).

Format (`normfold.reference/1`): an uncompressed .npz holding
- `input_<i>` and `output_<i>`: the arrays, in the model's input and output order (the names live in
  the metadata, so any ONNX name works); ml_dtypes types (bfloat16, float8) are stored as unsigned
  integer views of the same width and restored on load;
- `__normfold__`: a 0-d unicode array with JSON metadata: format, normfold/onnxruntime/numpy
  versions, source model, seed and `--shape` overrides of the generated inputs, which inputs were
  generated, each array's name, key, dtype, shape and onnxruntime type, and the tolerances to check
  with (class, atol, rtol, per-output).
Files are read with `allow_pickle=False` (an object array is refused) and checked against their
metadata before use; writes are atomic.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normfold import __version__
from normfold.atomic import write_atomic
from normfold.errors import InputError

FORMAT = "normfold.reference/1"
METADATA_KEY = "__normfold__"

ORT_TYPES = {
    "float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)",
    "bfloat16": "tensor(bfloat16)", "int64": "tensor(int64)", "int32": "tensor(int32)", "int16": "tensor(int16)",
    "int8": "tensor(int8)", "uint64": "tensor(uint64)", "uint32": "tensor(uint32)", "uint16": "tensor(uint16)",
    "uint8": "tensor(uint8)", "bool": "tensor(bool)", "str": "tensor(string)",
}
"""numpy dtype name -> onnxruntime's type string, for arrays whose type the file does not record."""


@dataclass
class ReferenceData:
    """A reference model's inputs and outputs, with how the inputs were made and how to compare."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    seed: int = 0
    generated: list[str] = field(default_factory=list)
    """Names of the inputs normfold generated (from `seed` and `shapes`); the others were given."""
    shapes: dict[str, list[int]] = field(default_factory=dict)
    input_types: dict[str, str] = field(default_factory=dict)
    """onnxruntime type of each input ("tensor(float)"); derived from the arrays when absent."""
    tolerance_class: str = "fold"
    atol: float | None = None
    rtol: float | None = None
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per-output (atol, rtol) overrides."""
    source: str | None = None
    normfold_version: str = __version__
    onnxruntime_version: str | None = None

    def input_type(self, name: str) -> str:
        if name in self.input_types:
            return self.input_types[name]
        return ORT_TYPES.get(_dtype_name(self.inputs[name].dtype), f"tensor({self.inputs[name].dtype})")


def save(data: ReferenceData, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Writes `data` to an .npz atomically; refuses an existing file unless `force`."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"{path}: a reference file name must end in .npz")
    if os.path.lexists(path) and not force:
        raise InputError(f"{path}: already exists (use --force to overwrite)")
    arrays: dict[str, np.ndarray] = {}
    meta_inputs, meta_outputs = [], []
    for kind, values, meta in (("input", data.inputs, meta_inputs), ("output", data.outputs, meta_outputs)):
        for index, (name, array) in enumerate(values.items()):
            key = f"{kind}_{index}"
            stored, dtype = _storable(np.asarray(array), f"{kind} {name!r}")
            arrays[key] = stored
            entry = {"name": name, "key": key, "dtype": dtype, "shape": list(stored.shape)}
            if kind == "input":
                entry["type"] = data.input_type(name)
                entry["generated"] = name in data.generated
            meta.append(entry)
    metadata = {
        "format": FORMAT,
        "normfold_version": data.normfold_version,
        "onnxruntime_version": data.onnxruntime_version,
        "numpy_version": np.__version__,
        "source": data.source,
        "seed": int(data.seed),
        "shapes": {k: [int(d) for d in v] for k, v in data.shapes.items()},
        "inputs": meta_inputs,
        "outputs": meta_outputs,
        "tolerance_class": data.tolerance_class,
        "atol": data.atol,
        "rtol": data.rtol,
        "tolerances": {k: [float(a), float(r)] for k, (a, r) in data.tolerances.items()},
    }
    arrays[METADATA_KEY] = np.array(json.dumps(metadata))
    return write_atomic(path, lambda f: np.savez(f, **arrays), what="reference file")


def load(path: str | os.PathLike) -> ReferenceData:
    """Reads a reference file written by `save` (never unpickles), checking it against its metadata."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such reference file" if not path.exists() else f"{path}: not a regular file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if METADATA_KEY not in npz.files:
                raise InputError(
                    f"{path}: not a normfold reference file (no {METADATA_KEY} metadata); to feed your own "
                    "input arrays use --inputs FILE.npz"
                )
            metadata = _parse_metadata(npz[METADATA_KEY], path)
            inputs = _read_arrays(npz, metadata["inputs"], path)
            outputs = _read_arrays(npz, metadata["outputs"], path)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot read the reference file ({_first_line(exc)})") from None
    return ReferenceData(
        inputs=inputs,
        outputs=outputs,
        seed=int(metadata.get("seed", 0)),
        generated=[e["name"] for e in metadata["inputs"] if e.get("generated")],
        shapes={k: [int(d) for d in v] for k, v in (metadata.get("shapes") or {}).items()},
        input_types={e["name"]: e["type"] for e in metadata["inputs"] if isinstance(e.get("type"), str)},
        tolerance_class=metadata.get("tolerance_class") or "fold",
        atol=metadata["atol"],
        rtol=metadata["rtol"],
        tolerances=metadata["tolerances"],
        source=metadata.get("source"),
        normfold_version=str(metadata.get("normfold_version")),
        onnxruntime_version=metadata.get("onnxruntime_version"),
    )


def _storable(array: np.ndarray, label: str) -> tuple[np.ndarray, str]:
    """The array as .npz can hold it without pickling, and the dtype name to restore it with."""
    if array.dtype.kind == "O":
        if all(isinstance(x, str) for x in array.reshape(-1)):
            return array.astype(str), "str"
        raise InputError(f"{label}: cannot store an array of Python objects in a reference file")
    if array.dtype.kind == "U":
        return array, "str"
    name = _dtype_name(array.dtype)
    if array.dtype.kind == "V":  # ml_dtypes (bfloat16, float8...): store the bits
        return array.view(np.dtype(f"u{array.dtype.itemsize}")), name
    return array, name


def _restore(array: np.ndarray, dtype: str, label: str) -> np.ndarray:
    if dtype == "str":
        if array.dtype.kind != "U":
            raise InputError(f"{label}: stored as {array.dtype}, the metadata says strings")
        return array
    try:
        target = np.dtype(dtype)
    except TypeError:
        import ml_dtypes

        if not hasattr(ml_dtypes, dtype):
            raise InputError(f"{label}: unknown dtype {dtype!r}") from None
        target = np.dtype(getattr(ml_dtypes, dtype))
    if target.kind == "V" or (target.kind not in "biufc"):
        if array.dtype != np.dtype(f"u{target.itemsize}"):
            raise InputError(f"{label}: stored as {array.dtype}, expected the bits of {dtype}")
        return array.view(target)
    if array.dtype != target:
        raise InputError(f"{label}: stored as {array.dtype}, the metadata says {dtype}")
    return array


def _parse_metadata(raw: np.ndarray, path: Path) -> dict[str, Any]:
    if raw.dtype.kind != "U" or raw.shape != ():
        raise InputError(f"{path}: the {METADATA_KEY} entry is not a JSON string")
    try:
        metadata = json.loads(str(raw[()]))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: the reference metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: the reference metadata is not a JSON object")
    if metadata.get("format") != FORMAT:
        raise InputError(f"{path}: reference format {metadata.get('format')!r} is not supported (expected {FORMAT})")
    for kind in ("inputs", "outputs"):
        entries = metadata.get(kind)
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("key"), str)
            and isinstance(e.get("dtype"), str) for e in entries
        ):
            raise InputError(f"{path}: the reference metadata's {kind!r} list is malformed")
        names = [e["name"] for e in entries]
        if len(set(names)) != len(names):
            raise InputError(f"{path}: the reference metadata names an {kind[:-1]} twice")
    if not metadata["outputs"]:
        raise InputError(f"{path}: the reference file holds no outputs")
    metadata["atol"] = _optional_float(metadata.get("atol"), "atol", path)
    metadata["rtol"] = _optional_float(metadata.get("rtol"), "rtol", path)
    tolerances = metadata.get("tolerances") or {}
    if not isinstance(tolerances, dict) or not all(isinstance(v, list) and len(v) == 2 for v in tolerances.values()):
        raise InputError(f"{path}: the reference metadata's per-output tolerances are malformed")
    metadata["tolerances"] = {k: (_optional_float(a, k, path), _optional_float(r, k, path))
                              for k, (a, r) in tolerances.items()}
    if any(None in pair for pair in metadata["tolerances"].values()):
        raise InputError(f"{path}: the reference metadata's per-output tolerances are malformed")
    return metadata


def _read_arrays(npz, entries: list[dict[str, Any]], path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for entry in entries:
        label = f"{path}: {entry['name']!r}"
        if entry["key"] not in npz.files:
            raise InputError(f"{label}: array {entry['key']!r} is missing from the file")
        array = _restore(npz[entry["key"]], entry["dtype"], label)
        if "shape" in entry and list(array.shape) != list(entry["shape"]):
            raise InputError(f"{label}: array shape {list(array.shape)} differs from the metadata's {entry['shape']}")
        arrays[entry["name"]] = array
    return arrays


def _optional_float(value: Any, label: str, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(f"{path}: tolerance {label!r} in the reference metadata is not a non-negative number")
    return float(value)


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    return "bfloat16" if "bfloat16" in name else name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]

