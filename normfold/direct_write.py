"""Writing a saved model's big tensors around the page cache (O_DIRECT, Linux).

A conversion writes gigabytes once and does not read them back. A buffered write must first find that
many fresh pages of page cache, then flush them all for the fsync that makes the output durable before
its rename. On this project's VMs a fresh page can cost a fault on the host (writing 2.3 GB from one
reused buffer took 0.5 to 6.7 s run to run, plus 0.8 s of fsync); a direct write sends each block from
one reused, aligned buffer straight to the disk (0.7 to 1.0 s, steady, nothing left to flush).

`write(file, chunks, nbytes)` writes byte chunks one after the other at `file`'s position: whole
ALIGN-byte pages go through a second descriptor opened with O_DIRECT on the same file, straight from a
chunk that starts at an ALIGN boundary (normfold.derived's buffers do), else from a per-thread staging
buffer; the unaligned head and tail, and everything where O_DIRECT is not to be
had (not Linux, tmpfs, a file object without a descriptor, a tensor under DIRECT_MIN_BYTES), go through
`file` as ordinary writes. Either way the bytes are the same, and `file` is left positioned after them.
"""

from __future__ import annotations

import errno
import io
import os
import threading
from collections.abc import Iterable

import numpy as np

ALIGN = 4096
"""Offset, length and buffer alignment of a direct write (a page; covers 512- and 4096-byte sectors)."""

STAGE_BYTES = 8 * 2**20
"""Bytes collected before one direct write (a multiple of ALIGN)."""

DIRECT_MIN_BYTES = 2**20
"""Smaller tensors are written through `file` as they are: a second descriptor is not worth opening."""

_local = threading.local()


def write(file, chunks: Iterable[np.ndarray], nbytes: int) -> None:
    """Writes `chunks` (uint8 arrays, `nbytes` in all) to `file` at its position, direct where possible."""
    direct = _open_direct(file) if nbytes >= DIRECT_MIN_BYTES else None
    if direct is None:
        for chunk in chunks:
            file.write(chunk)
        return
    try:
        _Stream(file, direct).write(chunks)
    finally:
        os.close(direct)


def _open_direct(file) -> int | None:
    """A second, O_DIRECT descriptor on `file`'s regular file, or None where there can be none."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    try:
        file.flush()
        descriptor = file.fileno()
        file.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    try:
        return os.open(f"/proc/self/fd/{descriptor}", os.O_WRONLY | flag)
    except OSError:  # no /proc, or a file system without direct I/O (tmpfs): EINVAL
        return None


class _Stream:
    """One tensor's bytes: head buffered up to the first page boundary, whole pages direct, tail buffered."""

    def __init__(self, file, direct: int) -> None:
        self.file, self.direct = file, direct
        self.position = file.tell()
        self.stage = _stage()
        self.staged = 0
        self.head = -self.position % ALIGN

    def write(self, chunks: Iterable[np.ndarray]) -> None:
        for chunk in chunks:
            chunk = chunk.reshape(-1)
            if self.head:
                taken = min(self.head, chunk.size)
                self._buffered(chunk[:taken])
                self.head -= taken
                chunk = chunk[taken:]
            pages = chunk.size - chunk.size % ALIGN
            if not self.staged and pages and chunk.ctypes.data % ALIGN == 0 and self._direct(chunk[:pages]):
                chunk = chunk[pages:]  # an aligned chunk went direct as it is, not copied to the stage
            while chunk.size:
                taken = min(STAGE_BYTES - self.staged, chunk.size)
                self.stage[self.staged : self.staged + taken] = chunk[:taken]
                self.staged += taken
                chunk = chunk[taken:]
                if self.staged == STAGE_BYTES:
                    self._flush_stage()
        self._flush_stage()
        self.file.seek(self.position)

    def _flush_stage(self) -> None:
        pages = self.staged - self.staged % ALIGN
        if not (pages and self._direct(self.stage[:pages])):
            pages = 0
        self._buffered(self.stage[pages : self.staged])
        self.staged = 0

    def _direct(self, pages: np.ndarray) -> bool:
        """Writes whole pages direct; False, with nothing written, once the file refuses direct writes."""
        if self.direct is None:
            return False
        try:
            self._pwrite(self.direct, pages)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file or device takes no direct write after all
                raise
            self.direct = None
            return False
        return True

    def _buffered(self, data: np.ndarray) -> None:
        if data.size:
            self._pwrite(self.file.fileno(), data)

    def _pwrite(self, descriptor: int, data: np.ndarray) -> None:
        done = 0
        while done < data.size:
            done += os.pwrite(descriptor, data[done:], self.position + done)
        self.position += data.size


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A new uint8 buffer of `nbytes` starting at an ALIGN boundary."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes]


def _stage() -> np.ndarray:
    """This thread's staging buffer, STAGE_BYTES aligned to ALIGN."""
    stage = getattr(_local, "stage", None)
    if stage is None:
        stage = _local.stage = aligned_buffer(STAGE_BYTES)
    return stage
