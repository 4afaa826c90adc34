"""Loading and saving ONNX models on onnx-ir, safely.

- `load` reads the protobuf without its external data; onnx-ir memory-maps external tensors lazily,
  so a model over 2 GB loads in little memory. Before anything reads a tensor, every external-data
  reference is checked: its location must resolve (symlinks followed) inside the model's directory,
  the file must exist, be a regular file with a single hard link, and hold offset + length bytes.
- `save` writes atomically: everything goes to a temporary directory beside the destination and is
  renamed into place only once complete, so a failure leaves no partial file. It never writes over
  the model's own source files (recorded at load time) and refuses an existing destination unless
  `force`. External data is used when the model had any or when it would exceed protobuf's 2 GB.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import google.protobuf.message
import onnx
import onnx_ir as ir

from normfold import __version__
from normfold.errors import InputError, UnsafePathError
from normfold.validate import validate_model

SOURCE_FILES_KEY = "normfold.source_files"
"""Key in `model.meta` holding the resolved paths of the files a model was loaded from."""

PROVENANCE_KEY = "normfold.provenance"
"""The metadata_props entry `save` adds to record what normfold did."""

PROTOBUF_LIMIT_BYTES = 2**31 - 1
_EMBED_LIMIT_BYTES = 1_800_000_000  # leave head-room under the protobuf limit for the graph itself


def load(path: str | os.PathLike) -> ir.Model:
    """Loads and validates an ONNX model; external data stays on disk (memory-mapped on first use)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    if not proto.HasField("graph"):
        raise InputError(f"{path}: not an ONNX model (it has no graph)")
    model = _deserialize(proto, path)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    check_external_data(model, path.parent)
    validate_model(model, name=str(path))
    model.meta[SOURCE_FILES_KEY] = frozenset(_source_files(model, path))
    return model


def from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> ir.Model:
    """Validates and wraps an in-memory ModelProto (external data resolved against `base_dir`)."""
    model = _deserialize(proto, "<in-memory model>")
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
        check_external_data(model, Path(base_dir))
    elif any(True for _ in external_tensors(model)):
        raise InputError("the model has external data but no base directory was given")
    validate_model(model, name="<in-memory model>")
    return model


def save(model: ir.Model, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Writes `model` to `path` atomically, with external data beside it when needed; returns the path."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise InputError(f"{path}: the output file name must end in .onnx")
    dest_dir = path.parent if str(path.parent) else Path(".")
    if not dest_dir.is_dir():
        raise InputError(f"{dest_dir}: output directory does not exist")
    data_name = path.name + ".data"
    use_external = _needs_external_data(model)
    destinations = [path] + ([dest_dir / data_name] if use_external else [])
    _check_destinations(model, destinations, force=force)

    tmp_dir = Path(tempfile.mkdtemp(prefix=".normfold-", dir=dest_dir))
    try:
        tmp_model = tmp_dir / path.name
        try:
            if use_external:
                ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=1024)
            else:
                ir.save(model, tmp_model)
        except OSError as exc:
            raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        # Data first, model last: a reader never sees a model whose data is missing.
        for dest in reversed(destinations):
            os.replace(tmp_dir / dest.name, dest)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def add_provenance(model: ir.Model, summary: str) -> None:
    """Records one metadata_props entry saying which normfold version did what."""
    model.metadata_props[PROVENANCE_KEY] = f"normfold {__version__}: {summary}"


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every tensor of the model (all graphs, initializers and constant attributes) kept on disk."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    yield attr.value


def check_external_data(model: ir.Model, model_dir: Path) -> None:
    """Refuses external-data references that escape `model_dir`, are missing, or are too short."""
    root = Path(os.path.realpath(model_dir))
    for tensor in external_tensors(model):
        location = tensor.location
        if os.path.isabs(location) or Path(location).drive:
            raise UnsafePathError(f"tensor {tensor.name!r}: external data location {location!r} is absolute")
        resolved = Path(os.path.realpath(root / location))
        if resolved != root and root not in resolved.parents:
            raise UnsafePathError(
                f"tensor {tensor.name!r}: external data location {location!r} resolves outside the model's directory"
            )
        if not resolved.is_file():
            raise InputError(f"tensor {tensor.name!r}: external data file {location!r} is missing")
        stat = resolved.stat()
        if stat.st_nlink > 1:
            raise UnsafePathError(
                f"tensor {tensor.name!r}: external data file {location!r} has several hard links; refusing to read it"
            )
        offset = tensor.offset or 0
        expected = tensor.dtype.itemsize * tensor.size if tensor.dtype.bitwidth >= 8 else None
        length = tensor.length if tensor.length is not None else (stat.st_size - offset)
        if expected is not None and length != expected:
            raise InputError(
                f"tensor {tensor.name!r}: external data length {length} does not match its shape "
                f"{list(tensor.shape)} of {tensor.dtype.name} ({expected} bytes)"
            )
        if offset < 0 or offset + length > stat.st_size:
            raise InputError(
                f"tensor {tensor.name!r}: external data {location!r} is too short "
                f"(needs {offset + length} bytes, has {stat.st_size})"
            )


def _deserialize(proto: onnx.ModelProto, name: object) -> ir.Model:
    """onnx-ir's deserializer, with its warnings about invalid models silenced (validation reports them)."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises several types on malformed protos
        raise InputError(f"{name}: malformed ONNX model ({_first_line(exc)})") from None
    finally:
        logger.setLevel(level)


def _source_files(model: ir.Model, path: Path) -> Iterator[Path]:
    yield Path(os.path.realpath(path))
    for tensor in external_tensors(model):
        yield Path(os.path.realpath(Path(tensor.base_dir) / tensor.location))


def _needs_external_data(model: ir.Model) -> bool:
    if any(True for _ in external_tensors(model)):
        return True
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total > _EMBED_LIMIT_BYTES


def _check_destinations(model: ir.Model, destinations: list[Path], *, force: bool) -> None:
    sources = model.meta.get(SOURCE_FILES_KEY, frozenset())
    for dest in destinations:
        resolved = Path(os.path.realpath(dest))
        if resolved in sources:
            raise UnsafePathError(f"{dest}: refusing to overwrite the input model or its external data")
        if dest.exists() and not force:
            raise InputError(f"{dest}: already exists (use --force to overwrite)")
        if dest.exists() and not dest.is_file():
            raise InputError(f"{dest}: exists and is not a regular file")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
