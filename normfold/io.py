"""Loading and saving ONNX models on onnx-ir, safely.

- `load` reads the protobuf without its external data; onnx-ir memory-maps external tensors lazily,
  so a model over 2 GB loads in little memory. External initializers are read from their file on
  each use (`StreamedExternalTensor`, no memory map kept), so memory holds only the arrays a pass is
  working on, and save streams untouched tensors from file to file through a reused buffer.
- Weights a pass recentres or scales are normfold.derived.DerivedTensors of the loaded ones: computed
  when saved, one block of rows at a time through reused buffers. Weights a pass computes outright, in
  a model that has external data, are spilled (`new_tensor`): each array of at least
  SPILL_THRESHOLD_BYTES is written to a temporary file as soon as a pass makes it and kept as a
  StreamedExternalTensor. Either way converting a model of several GB holds about one tensor at a time.
  The spill directory is created beside the model (else in the system temp directory) and removed
  when the model is garbage-collected or the process exits.
- Before anything reads a tensor, the protobuf is checked
  (normfold.validate) and so is every external-data reference, wherever it sits (initializers, node
  attributes, subgraphs, model-local functions): its location must be relative, without `..`, and
  resolve (symlinks followed) inside the model's directory; the file must exist, be a regular file
  with a single hard link, and hold exactly the bytes the tensor's shape needs at offset + length.
- `save` writes big tensors around the page cache where it can (normfold.direct_write; offsets aligned
  to its page) and writes atomically: everything goes to a temporary directory beside the destination and is
  renamed into place only once complete (an existing destination, with --force, is moved aside first
  and put back if anything fails), so a failure leaves no partial file. It never writes over the
  model's own source files (recorded at load time, compared by resolved path and by inode) and
  refuses an existing destination unless `force`. External data is used when the model had any or
  when it would exceed protobuf's 2 GB; it always goes to the output's own `OUT.onnx.data`, never
  to the input's file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath

import numpy as np
import onnx
import onnx_ir as ir

from normfold import __version__, direct_write
from normfold.derived import DerivedTensor, byte_blocks, is_plain_file_tensor
from normfold.errors import InputError, UnsafePathError
from normfold.validate import iter_tensor_protos, validate_model, validate_proto

SOURCE_FILES_KEY = "normfold.source_files"
"""Key in `model.meta` holding the resolved paths of the files a model was loaded from."""

SOURCE_INODES_KEY = "normfold.source_inodes"
"""Key in `model.meta` holding (st_dev, st_ino) of those files, so another spelling is caught too."""

SPILL_KEY = "normfold.spill"
"""Key in `model.meta` holding the model's spill store (set at load when the model has external data)."""

SPILL_THRESHOLD_BYTES = 1 << 20
"""New tensors of at least this size are spilled to disk when the model has external data."""

PROVENANCE_KEY = "normfold.provenance"
"""The metadata_props entry `save` adds to record what normfold did."""

PROTOBUF_LIMIT_BYTES = 2**31 - 1
_EMBED_LIMIT_BYTES = 1_800_000_000  # leave head-room under the protobuf limit for the graph itself
_EXTERNAL_THRESHOLD_BYTES = 1024
"""With external data, tensors above this size go to the data file; smaller ones stay in the proto."""

SAVE_WORKERS = min(4, os.cpu_count() or 1)
"""Threads writing external data: a derived weight is computed while another is written (numpy and file
writes release the GIL); each holds a few reused blocks (normfold.derived), never a whole tensor."""


def load(path: str | os.PathLike) -> ir.Model:
    """Loads and validates an ONNX model; external data stays on disk (memory-mapped on first use)."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({_reason(exc)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{path}: is a directory, not an ONNX model file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    if info.st_size > PROTOBUF_LIMIT_BYTES:
        raise InputError(
            f"{path}: {info.st_size} bytes is over protobuf's 2 GB limit, so it is not an ONNX model file "
            "(models that big keep their weights in external data)"
        )
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({_reason(exc)})") from None
    except Exception as exc:  # protobuf and onnx raise many types on bytes that are not a model
        raise InputError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    if not proto.HasField("graph"):
        raise InputError(f"{path}: not an ONNX model (it has no graph)")
    validate_proto(proto, name=str(path))
    model = _deserialize(proto, path)
    del proto
    model_dir = Path(os.path.abspath(path.parent))
    _set_base_dir(model, model_dir)
    check_external_data(model, model_dir)
    validate_model(model, name=str(path), check_tensors=False)
    _record_sources(model, [path])
    if _stream_external_initializers(model):
        model.meta[SPILL_KEY] = _Spill(model_dir)
    return model


def from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> ir.Model:
    """Validates and wraps an in-memory ModelProto (external data resolved against `base_dir`)."""
    name = "<in-memory model>"
    validate_proto(proto, name=name)
    model = _deserialize(proto, name)
    if base_dir is not None:
        model_dir = Path(os.path.abspath(base_dir))
        _set_base_dir(model, model_dir)
        check_external_data(model, model_dir)
        _record_sources(model, [])
    elif any(True for _ in external_tensors(model)):
        raise InputError("the model has external data but no base directory was given")
    validate_model(model, name=name, check_tensors=False)
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

    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".normfold-", dir=dest_dir))
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({_reason(exc)})") from None
    moved_aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        tmp_model = tmp_dir / path.name
        with _attribute_tensors_in_memory(model):
            if use_external:
                ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=_EXTERNAL_THRESHOLD_BYTES,
                        max_workers=SAVE_WORKERS, alignment=direct_write.ALIGN)
            else:
                ir.save(model, tmp_model)
        written = [p for p in destinations if (tmp_dir / p.name).exists()]
        if use_external:
            _check_written_locations(tmp_model, data_name)
        for dest in written:
            _make_durable(tmp_dir / dest.name)
        for dest in written:
            if os.path.lexists(dest):
                aside = tmp_dir / f".previous-{dest.name}"
                os.replace(dest, aside)
                moved_aside.append((dest, aside))
        # Data first, model last: a reader never sees a model whose data is missing.
        for dest in reversed(written):
            os.replace(tmp_dir / dest.name, dest)
            placed.append(dest)
        _fsync_dir(dest_dir)
    except BaseException as exc:
        _roll_back(placed, moved_aside)
        if isinstance(exc, OSError):
            raise InputError(f"{path}: cannot write ({_reason(exc)}); nothing written") from None
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def new_tensor(model: ir.Model, array: np.ndarray, name: str) -> ir.TensorProtocol:
    """A tensor holding `array` for a rewritten weight: spilled to disk (and so out of memory) when the
    model has external data and the array is big, else in memory."""
    spill = model.meta.get(SPILL_KEY)
    if spill is None or array.nbytes < SPILL_THRESHOLD_BYTES or array.dtype.kind not in "fiub":
        return ir.tensor(array, name=name)
    return spill.write(array, name)


class StreamedExternalTensor(ir.ExternalTensor):
    """An external tensor whose values are read out of the file (not memory-mapped) on every read: the
    array is the caller's to keep or drop, so reading every weight once does not leave the whole model
    resident (an mmap's touched pages would stay, and count as resident, until released)."""

    def numpy(self) -> np.ndarray:
        if self.dtype.bitwidth < 8:  # packed 4-bit types: onnx-ir unpacks them
            array = super().numpy().copy()
            self.release()
        else:  # read, not mapped: one copy in memory, never the file's pages as well
            with open(self.path, "rb") as file:
                file.seek(self.offset or 0)
                array = np.fromfile(file, dtype=self.dtype.numpy(), count=self.size)
            if array.size != self.size:
                raise InputError(f"external data of {self.name!r} in {self.location!r} ends before its {self.size} elements")
            array = array.reshape(self.shape.numpy())
        array.flags.writeable = False  # like onnx-ir's read-only map: passes never mutate a tensor
        return array

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def tofile(self, file) -> None:
        """Streams the bytes from this tensor's file to `file` through a reused buffer (normfold.direct_write)."""
        if not is_plain_file_tensor(self):
            super().tofile(file)
            return
        direct_write.write(file, byte_blocks(self), self.nbytes)

    def tobytes(self) -> bytes:
        data = super().tobytes()
        self.release()
        return data


class _Spill:
    """One append-only temporary file of spilled tensors, in a directory removed with the store."""

    def __init__(self, near: Path) -> None:
        self._near = near
        self._dir: str | None = None
        self._file = None
        self._finalizer = None

    def write(self, array: np.ndarray, name: str) -> ir.TensorProtocol:
        if self._file is None:
            try:
                self._open()
            except OSError:  # nowhere to spill: keep it in memory
                return ir.tensor(array, name=name)
        array = np.ascontiguousarray(array)
        offset = self._file.seek(0, os.SEEK_END)
        offset += -offset % 64
        self._file.seek(offset)
        array.tofile(self._file)
        self._file.flush()
        tensor = StreamedExternalTensor("spill.data", offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
                                        shape=ir.Shape(array.shape), name=name, base_dir=self._dir)
        tensor.spill = self  # the file lives as long as any tensor in it (a clone of the model included)
        return tensor

    def _open(self) -> None:
        try:
            self._dir = tempfile.mkdtemp(prefix=".normfold-spill-", dir=self._near)
        except OSError:
            self._dir = tempfile.mkdtemp(prefix="normfold-spill-")
        self._file = open(os.path.join(self._dir, "spill.data"), "w+b")  # noqa: SIM115  (closed by the finalizer)
        self._finalizer = weakref.finalize(self, _remove_spill, self._file, self._dir)


def _remove_spill(file, directory: str) -> None:
    file.close()
    shutil.rmtree(directory, ignore_errors=True)


def _stream_external_initializers(model: ir.Model) -> bool:
    """Replaces every external initializer by a StreamedExternalTensor; True when there was one."""
    found = False
    for graph in _all_graphs(model):
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.ExternalTensor) and not isinstance(t, StreamedExternalTensor):
                value.const_value = StreamedExternalTensor(
                    t.location, t.offset, t.length, t.dtype, shape=t.shape, name=t.name, doc_string=t.doc_string,
                    metadata_props=t.metadata_props, base_dir=t.base_dir)
                found = True
    return found


def add_provenance(model: ir.Model, summary: str) -> None:
    """Records one metadata_props entry saying which normfold version did what."""
    model.metadata_props[PROVENANCE_KEY] = f"normfold {__version__}: {summary}"


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every tensor of the model kept on disk: initializers and tensor attributes, in every graph,
    subgraph and model-local function."""
    for tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            yield tensor


def check_external_data(model: ir.Model, model_dir: Path) -> None:
    """Refuses external-data references that escape `model_dir`, are missing, or do not fit the tensor.

    Only path names and file metadata are looked at (no file is opened), so a refused reference is
    never read.
    """
    root_abs = os.path.abspath(model_dir)
    root = os.path.realpath(root_abs)
    for tensor in external_tensors(model):
        location = os.fspath(tensor.location)
        label = f"tensor {tensor.name!r}: external data location {location!r}"
        if not location:
            raise InputError(f"tensor {tensor.name!r}: external data has an empty location")
        if "\0" in location:
            raise UnsafePathError(f"{label} contains a NUL byte")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or PureWindowsPath(location).drive:
            raise UnsafePathError(f"{label} is absolute; it must be relative to the model's directory")
        if ".." in re.split(r"[\\/]", location):
            raise UnsafePathError(f"{label} contains '..'; it must stay inside the model's directory")
        resolved = os.path.realpath(os.path.join(root_abs, location))
        if not _is_within(resolved, root):
            raise UnsafePathError(
                f"{label} resolves (through a symbolic link) outside the model's directory"
            )
        try:
            info = os.stat(resolved)
        except FileNotFoundError:
            raise InputError(f"{label}: no such file beside the model") from None
        except OSError as exc:
            raise InputError(f"{label}: cannot access it ({_reason(exc)})") from None
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{label} is not a regular file")
        if info.st_nlink > 1:
            raise UnsafePathError(f"{label} is a file with several hard links; refusing to read it")
        try:
            expected = (tensor.size * tensor.dtype.bitwidth + 7) // 8  # exact, also for sub-byte types
        except TypeError:  # strings have no fixed size and cannot be stored externally
            raise InputError(f"tensor {tensor.name!r}: a {tensor.dtype.name} tensor cannot use external data") from None
        offset = tensor.offset or 0
        length = tensor.length if tensor.length is not None else expected
        if offset < 0 or length < 0:
            raise InputError(f"{label}: negative offset or length ({offset}, {length})")
        if length != expected:
            raise InputError(
                f"tensor {tensor.name!r}: external data length {length} does not match its shape "
                f"{list(tensor.shape)} of {tensor.dtype.name} ({expected} bytes)"
            )
        if offset + length > info.st_size:
            raise InputError(
                f"{label} is too short: the tensor needs bytes {offset} to {offset + length}, "
                f"the file has {info.st_size}"
            )


def _all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    yield from model.graphs()
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.GRAPH:
                    yield attr.value
                elif attr.type == ir.AttributeType.GRAPHS:
                    yield from attr.value


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    for graph in _all_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
    for node in _all_nodes(model):
        for attr in node.attributes.values():
            if attr.is_ref() or attr.value is None:
                continue
            if attr.type == ir.AttributeType.TENSOR:
                yield attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                yield from attr.value


def _set_base_dir(model: ir.Model, model_dir: Path) -> None:
    for tensor in external_tensors(model):
        tensor.base_dir = str(model_dir)


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


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


def _record_sources(model: ir.Model, files: list[Path]) -> None:
    """Remembers the files the model was read from, so `save` never writes over them."""
    paths = [Path(os.path.realpath(f)) for f in files]
    paths += [Path(os.path.realpath(t.path)) for t in external_tensors(model)]
    inodes = set()
    for p in paths:
        with contextlib.suppress(OSError):
            info = os.stat(p)
            inodes.add((info.st_dev, info.st_ino))
    model.meta[SOURCE_FILES_KEY] = frozenset(paths)
    model.meta[SOURCE_INODES_KEY] = frozenset(inodes)


def _needs_external_data(model: ir.Model) -> bool:
    total = 0
    for tensor in _all_tensors(model):
        while isinstance(tensor, DerivedTensor):  # a weight rewritten from an external one
            tensor = tensor.source
        if isinstance(tensor, ir.ExternalTensor):
            return True
        with contextlib.suppress(TypeError):  # strings: counted as nothing, they are never large here
            total += tensor.nbytes
    return total > _EMBED_LIMIT_BYTES


def _check_destinations(model: ir.Model, destinations: list[Path], *, force: bool) -> None:
    sources = set(model.meta.get(SOURCE_FILES_KEY, frozenset()))
    inodes = set(model.meta.get(SOURCE_INODES_KEY, frozenset()))
    for tensor in external_tensors(model):  # whatever the model still reads from is a source too
        sources.add(Path(os.path.realpath(tensor.path)))
    for dest in destinations:
        resolved = Path(os.path.realpath(dest))
        try:
            info = os.stat(dest)
        except OSError:
            info = None
        if resolved in sources or (info is not None and (info.st_dev, info.st_ino) in inodes):
            raise UnsafePathError(f"{dest}: refusing to overwrite the input model or its external data")
        if os.path.lexists(dest) and not force:
            raise InputError(f"{dest}: already exists (use --force to overwrite)")
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise InputError(f"{dest}: exists and is not a regular file")


@contextlib.contextmanager
def _attribute_tensors_in_memory(model: ir.Model) -> Iterator[None]:
    """Temporarily loads external tensors held in node attributes into memory.

    onnx-ir's save moves only initializers to the new data file; an external attribute tensor would
    be written with its old location, i.e. pointing at the input's data file.
    """
    replaced: list[tuple[ir.Node, str, ir.Attr]] = []
    try:
        for node in list(_all_nodes(model)):
            for key, attr in list(node.attributes.items()):
                if attr.is_ref() or attr.value is None:
                    continue
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    new = ir.AttrTensor(key, _in_memory(attr.value), doc_string=attr.doc_string)
                elif attr.type == ir.AttributeType.TENSORS and any(
                    isinstance(t, ir.ExternalTensor) for t in attr.value
                ):
                    tensors = [_in_memory(t) if isinstance(t, ir.ExternalTensor) else t for t in attr.value]
                    new = ir.AttrTensors(key, tensors, doc_string=attr.doc_string)
                else:
                    continue
                replaced.append((node, key, attr))
                node.attributes[key] = new
        yield
    finally:
        for node, key, attr in reversed(replaced):
            node.attributes[key] = attr


def _in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    return ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string)


def _check_written_locations(model_file: Path, data_name: str) -> None:
    """The written model may refer to no external file but its own (a last guard; a bug if it trips)."""
    proto = onnx.load(str(model_file), load_external_data=False)
    for label, tensor in iter_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location != data_name:
            raise UnsafePathError(
                f"{label}: the output would refer to external data {location!r} instead of its own "
                f"{data_name!r}; nothing written"
            )


def _make_durable(file: Path) -> None:
    """Flushes a written file to disk before it is renamed into place."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system can sync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _roll_back(placed: list[Path], moved_aside: list[tuple[Path, Path]]) -> None:
    """Undoes a half-finished save: removes what was placed, puts back what was moved aside."""
    for dest in placed:
        with contextlib.suppress(OSError):
            os.unlink(dest)
    for dest, aside in moved_aside:
        with contextlib.suppress(OSError):
            os.replace(aside, dest)


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    return exc.strerror or _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
