"""Weights derived from another tensor by a map that works on a block of rows (axis 0) at a time.

A pass that rewrites a weight (recentres it, scales its channels) records the map instead of the
result: `DerivedTensor(source, map)`. Saving streams it: read a block of the source's rows into a
reused buffer, apply the map in float64 into a second reused buffer cast to the weight's dtype, write
that block; so a rewritten model of several GB is never in memory, and no page of memory is touched
twice for the next tensor (fresh large allocations are what cost most here: first-touch page faults).
`numpy()` materializes the whole result for whoever needs it (verification, a later pass); a derived
tensor can itself be the source of another one (a recentred embedding, scaled again as a head).

The maps (foldmath's arithmetic, float64, one cast):
    Recentre(axis):       a - mean_axis(a); along axis 0 the mean is summed over every row first
                          (one streaming pass), otherwise it is local to each row.
    Scale(axis, s):       a * s along `axis`.
    CrmsReader(axis, g):  A[:d-1] - A[d-1] along `axis`, A = a * g (a CRMSNorm reader, 2-D).
Recentre and Scale may `keep` only the first k entries along the axis (the stream stored in d-1
dimensions).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normfold import direct_write

BLOCK_BYTES = 8 * 2**20
"""Bytes of source rows read, mapped and written at a time."""

SCAN_WORKERS = min(4, os.cpu_count() or 1)
"""Threads reading a weight's blocks in `scan_linear`."""

_scratch = threading.local()


def scratch(key: str, nbytes: int) -> np.ndarray:
    """A per-thread reusable byte buffer of at least `nbytes` for `key` (grown, never shrunk), aligned for
    a direct write."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(key)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = buffers[key] = direct_write.aligned_buffer(max(nbytes, BLOCK_BYTES))
    return buffer[:nbytes]


def block_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows (entries along axis 0) per block of about BLOCK_BYTES."""
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    return max(1, BLOCK_BYTES // max(1, row_bytes))


def read_rows(tensor: ir.TensorProtocol, start: int, stop: int, *, depth: int = 0) -> np.ndarray:
    """Rows [start, stop) of `tensor` as an array; a view of a reused buffer for a file-backed or derived
    tensor (valid until the next read at the same depth on this thread)."""
    dtype, shape = tensor.dtype.numpy(), tuple(tensor.shape.numpy())
    out_shape = (stop - start, *shape[1:])
    if isinstance(tensor, DerivedTensor):
        out = _view(scratch(f"out{depth}", int(np.prod(out_shape)) * dtype.itemsize), dtype, out_shape)
        tensor.map_rows(start, stop, out, depth=depth + 1)
        return out
    if is_plain_file_tensor(tensor):
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        out = _view(scratch(f"in{depth}", (stop - start) * row_bytes), dtype, out_shape)
        with open(tensor.path, "rb", buffering=0) as file:
            file.seek((tensor.offset or 0) + start * row_bytes)
            if file.readinto(_bytes(out)) != out.nbytes:
                raise ValueError(f"external data of {tensor.name!r} ends before its {tensor.size} elements")
        return out
    return tensor.numpy()[start:stop]


def row_blocks(rows: int, per_block: int):
    """(start, stop) pairs covering range(rows) in blocks of `per_block`."""
    for start in range(0, rows, per_block):
        yield start, min(rows, start + per_block)


def blocks(tensor: ir.TensorProtocol):
    """(start, rows) over `tensor` one block of rows at a time (each block valid until the next)."""
    shape = tuple(tensor.shape.numpy())
    for start, stop in row_blocks(shape[0], block_rows(shape, tensor.dtype.numpy().itemsize)):
        yield start, read_rows(tensor, start, stop)


def byte_blocks(tensor: ir.TensorProtocol):
    """The bytes of `tensor`, a file-backed or derived tensor, one block of rows at a time."""
    return (_bytes(block) for _, block in blocks(tensor))


def scan_linear(weight: ir.TensorProtocol, shift: np.ndarray | None, *, axis: int,
                largest: bool) -> tuple[float | None, np.ndarray | None]:
    """One read of a 2-D linear weight W, rows in blocks scanned on SCAN_WORKERS threads: (max |W| if
    `largest`, else None; and the bias a constant input `shift` adds through W read along `axis` (its
    input features), shift W for axis 0, W shift for axis 1, summed in float64 in block order (the same
    sum whatever the threads), or None without a shift)."""
    rows, columns = tuple(weight.shape.numpy())
    shift = None if shift is None else np.asarray(shift, dtype=np.float64)

    def scan(span: tuple[int, int]) -> tuple[tuple[float, float] | None, np.ndarray | None]:
        start, stop = span
        block = read_rows(weight, start, stop)
        extremes = (float(block.max()), float(block.min())) if largest and block.size else None
        if shift is None:
            return extremes, None
        if axis == 0:
            return extremes, np.einsum("i,ij->j", shift[start:stop], block, dtype=np.float64)
        return extremes, np.einsum("ij,j->i", block, shift, dtype=np.float64)

    spans = list(row_blocks(rows, block_rows((rows, columns), weight.dtype.numpy().itemsize)))
    biggest = 0.0 if largest else None
    total = None if shift is None else np.zeros(columns if axis == 0 else rows, dtype=np.float64)
    for (start, stop), (extremes, part) in zip(spans, _scan_pool().map(scan, spans)):
        if extremes is not None:
            biggest = max(biggest, abs(extremes[0]), abs(extremes[1]))
        if part is not None and axis == 0:
            total += part
        elif part is not None:
            total[start:stop] = part
    return biggest, total


@functools.cache
def _scan_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that scan weights (numpy and file reads release the GIL), made on first use."""
    return concurrent.futures.ThreadPoolExecutor(SCAN_WORKERS, thread_name_prefix="normfold-scan")


@dataclass
class Recentre:
    """a - mean_axis(a) (float64), keeping the first `keep` entries along `axis` (all when None)."""

    axis: int
    keep: int | None = None
    _mean: np.ndarray | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return _kept(shape, self.axis, self.keep)

    def prepare(self, source: ir.TensorProtocol, depth: int) -> None:
        """Along axis 0, the mean over every row of the source: summed in float64 one block at a time,
        once."""
        if self.axis != 0:
            return
        with self._lock:
            if self._mean is None:
                shape = tuple(source.shape.numpy())
                total = np.zeros(shape[1:], dtype=np.float64)
                for start, stop in row_blocks(shape[0], block_rows(shape, source.dtype.numpy().itemsize)):
                    total += np.add.reduce(read_rows(source, start, stop, depth=depth), axis=0, dtype=np.float64)
                self._mean = total / np.float64(shape[0])

    def apply(self, block: np.ndarray, start: int, out: np.ndarray) -> None:
        if self.axis == 0:
            np.subtract(block, self._mean, out=out, dtype=np.float64, casting="unsafe")
            return
        mean = block.mean(axis=self.axis, keepdims=True, dtype=np.float64)
        np.subtract(_take(block, self.axis, self.keep), mean, out=out, dtype=np.float64, casting="unsafe")


@dataclass
class Scale:
    """a * factors along `axis` (float64 factors), keeping the first `keep` entries along `axis`."""

    axis: int
    factors: np.ndarray
    keep: int | None = None

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return _kept(shape, self.axis, self.keep)

    def prepare(self, source: ir.TensorProtocol, depth: int) -> None:
        """Nothing to compute ahead."""

    def apply(self, block: np.ndarray, start: int, out: np.ndarray) -> None:
        factors = np.asarray(self.factors, dtype=np.float64)[: self.keep]
        shape = [1] * block.ndim
        shape[self.axis] = -1
        factors = factors.reshape(shape)
        if self.axis == 0:
            factors = factors[start : start + block.shape[0]]
        compute = _compute_dtype(factors, block.dtype)
        with np.errstate(over="ignore"):
            np.multiply(_take(block, self.axis, self.keep), factors.astype(compute, copy=False), out=out,
                        dtype=compute, casting="unsafe")


def _compute_dtype(factors: np.ndarray, dtype: np.dtype) -> np.dtype:
    """float64, or the weight's own float32/float16 when every factor is exact in it: the product of two
    such numbers is exact in float64, so one rounding to the weight's dtype is the same result."""
    if dtype in (np.float32, np.float16) and np.array_equal(factors.astype(dtype), factors):
        return dtype
    return np.dtype(np.float64)


@dataclass
class CrmsReader:
    """A' = A[:d-1] - A[d-1] along `axis`, A = a * gamma along it (float64, d = gamma.size): a linear
    reader of a CRMSNorm output with the norm's gamma folded in, as foldmath.crms_input_weight. 2-D."""

    axis: int
    gamma: np.ndarray
    _last: np.ndarray | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return _kept(shape, self.axis, self.gamma.size - 1)

    def prepare(self, source: ir.TensorProtocol, depth: int) -> None:
        """Along axis 0, the scaled last row A[d-1], read once."""
        if self.axis != 0:
            return
        with self._lock:
            if self._last is None:
                d = self.gamma.size
                row = read_rows(source, d - 1, d, depth=depth)[0].astype(np.float64)
                self._last = row * np.float64(self.gamma[d - 1])

    def apply(self, block: np.ndarray, start: int, out: np.ndarray) -> None:
        scaled = _view(scratch("float64", block.size * 8), np.float64, block.shape)
        np.copyto(scaled, block, casting="unsafe")
        gamma = np.asarray(self.gamma, dtype=np.float64)
        d = gamma.size
        with np.errstate(over="ignore", invalid="ignore"):
            if self.axis == 0:
                scaled *= gamma[start : start + block.shape[0], None]
                np.subtract(scaled, self._last, out=out, casting="unsafe")
            else:
                scaled *= gamma
                np.subtract(scaled[:, : d - 1], scaled[:, d - 1 :], out=out, casting="unsafe")


class DerivedTensor(ir.LazyTensor):
    """`mapping` applied to `source`, computed when read or saved, one block of rows at a time."""

    def __init__(self, source: ir.TensorProtocol, mapping: Recentre | Scale | CrmsReader, *,
                 name: str | None = None) -> None:
        source_shape = tuple(source.shape.numpy())
        if not source_shape:
            raise ValueError("a derived tensor needs at least one axis")
        mapping = dataclasses.replace(mapping, axis=mapping.axis % len(source_shape))
        shape = mapping.out_shape(source_shape)
        super().__init__(self._materialize, dtype=source.dtype, shape=ir.Shape(shape), name=name)
        self.source = source
        self.mapping = mapping

    def map_rows(self, start: int, stop: int, out: np.ndarray, *, depth: int = 0) -> None:
        """Writes rows [start, stop) of the result into `out`."""
        self.mapping.prepare(self.source, depth)
        self.mapping.apply(read_rows(self.source, start, stop, depth=depth), start, out)

    def _materialize(self) -> ir.Tensor:
        shape = tuple(self.shape.numpy())
        out = np.empty(shape, dtype=self.dtype.numpy())
        for start, stop in self._blocks():
            self.map_rows(start, stop, out[start:stop])
        return ir.Tensor(out, name=self.name)

    def _blocks(self):
        shape = tuple(self.shape.numpy())
        return row_blocks(shape[0], block_rows(shape, self.dtype.numpy().itemsize))

    def tofile(self, file) -> None:
        """Streams the result to `file` one block at a time through a reused buffer (normfold.direct_write)."""
        direct_write.write(file, byte_blocks(self), self.nbytes)


def stays_finite(tensor: DerivedTensor, bound: float) -> bool:
    """Whether the derived values fit their dtype: `bound`, an upper bound on their magnitude (NaN when
    unknown), settles it when below the dtype's largest value; otherwise they are computed and checked."""
    return bound < float(np.finfo(tensor.dtype.numpy()).max) or bool(np.all(np.isfinite(tensor.numpy())))


def is_plain_file_tensor(tensor: ir.TensorProtocol) -> bool:
    """An external tensor whose rows can be read straight from its file (whole bytes, at least one axis)."""
    return isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth >= 8 and len(tensor.shape) >= 1


def _bytes(array: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array, as a writable uint8 view (any dtype, ml_dtypes' included)."""
    return array.reshape(-1).view(np.uint8)


def _view(buffer: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    return buffer.view(dtype).reshape(shape)


def _kept(shape: tuple[int, ...], axis: int, keep: int | None) -> tuple[int, ...]:
    if keep is None:
        return shape
    return tuple(keep if i == axis % len(shape) else d for i, d in enumerate(shape))


def _take(block: np.ndarray, axis: int, keep: int | None) -> np.ndarray:
    if keep is None:
        return block
    index = [slice(None)] * block.ndim
    index[axis] = slice(0, keep)
    return block[tuple(index)]
