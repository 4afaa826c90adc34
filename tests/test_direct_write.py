"""normfold.direct_write: the same bytes as ordinary writes, direct where the file system allows it,
ordinary writes where it does not (or stops allowing it midway)."""

from __future__ import annotations

import errno
import fcntl
import io
import os

import numpy as np
import pytest

from normfold import direct_write

ODD_CHUNKS = (1, 4095, 4097, 3 * 2**20 + 17, direct_write.STAGE_BYTES, 5 * 2**20 - 3, 12345)


def _chunks(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in ODD_CHUNKS]


def _write_at(path, offset: int, chunks: list[np.ndarray], *, size: int) -> None:
    """Like onnx-ir's parallel writer: a preallocated file, `tofile` called at the tensor's offset."""
    with open(path, "wb") as file:
        file.truncate(size)
    with open(path, "r+b") as file:
        file.seek(offset)
        direct_write.write(file, iter(chunks), sum(c.size for c in chunks))
        assert file.tell() == offset + sum(c.size for c in chunks)


def _expected(offset: int, chunks: list[np.ndarray], size: int) -> bytes:
    data = bytearray(size)
    payload = np.concatenate(chunks).tobytes()
    data[offset : offset + len(payload)] = payload
    return bytes(data)


def _is_direct(descriptor: int) -> bool:
    return bool(fcntl.fcntl(descriptor, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


def _direct_supported(path) -> bool:
    with open(path, "wb") as file:
        descriptor = direct_write._open_direct(file)
    if descriptor is None:
        return False
    os.close(descriptor)
    return True


@pytest.mark.parametrize("offset", [0, 4096, 1, 4095, 12289])
def test_bytes_land_where_ordinary_writes_would_put_them(tmp_path, offset):
    chunks = _chunks(offset)
    size = offset + sum(c.size for c in chunks) + 5000
    path = tmp_path / "data.bin"
    _write_at(path, offset, chunks, size=size)
    assert path.read_bytes() == _expected(offset, chunks, size)


def test_whole_pages_go_direct_on_a_file_system_that_has_it(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path / "probe.bin"):
        pytest.skip(f"{tmp_path}: this file system takes no O_DIRECT writes (the fallback is tested below)")
    direct_bytes = []
    real_pwrite = os.pwrite

    def pwrite(descriptor, data, offset):
        if _is_direct(descriptor):
            assert offset % direct_write.ALIGN == 0 and len(data) % direct_write.ALIGN == 0
            direct_bytes.append(len(data))
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    chunks = _chunks(1)
    total = sum(c.size for c in chunks)
    _write_at(tmp_path / "data.bin", 1, chunks, size=total + 1)
    # all but the head (up to the first page boundary) and the tail (the last partial page) went direct
    assert sum(direct_bytes) == (total + 1) // direct_write.ALIGN * direct_write.ALIGN - direct_write.ALIGN


def test_a_direct_write_refused_midway_falls_back_to_ordinary_writes(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    calls = {"direct": 0}

    def pwrite(descriptor, data, offset):
        if _is_direct(descriptor):
            calls["direct"] += 1
            if calls["direct"] > 1:  # the first direct write works, the rest are refused
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(descriptor, data, offset)

    if not _direct_supported(tmp_path / "probe.bin"):
        pytest.skip(f"{tmp_path}: this file system takes no O_DIRECT writes")
    monkeypatch.setattr(os, "pwrite", pwrite)
    chunks = _chunks(2)
    size = sum(c.size for c in chunks)
    _write_at(tmp_path / "data.bin", 0, chunks, size=size)
    assert calls["direct"] == 2
    assert (tmp_path / "data.bin").read_bytes() == _expected(0, chunks, size)


def test_other_errors_of_a_direct_write_are_raised(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path / "probe.bin"):
        pytest.skip(f"{tmp_path}: this file system takes no O_DIRECT writes")
    real_pwrite = os.pwrite

    def pwrite(descriptor, data, offset):
        if _is_direct(descriptor):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError) as caught:
        _write_at(tmp_path / "data.bin", 0, _chunks(3), size=sum(c.size for c in _chunks(3)))
    assert caught.value.errno == errno.ENOSPC


def test_no_descriptor_or_no_direct_io_means_ordinary_writes(tmp_path, monkeypatch):
    chunks = _chunks(4)
    sink = io.BytesIO()
    direct_write.write(sink, iter(chunks), sum(c.size for c in chunks))
    assert sink.getvalue() == np.concatenate(chunks).tobytes()

    monkeypatch.delattr(os, "O_DIRECT", raising=False)  # a platform without it (macOS, Windows)
    size = sum(c.size for c in chunks) + 3
    _write_at(tmp_path / "data.bin", 3, chunks, size=size)
    assert (tmp_path / "data.bin").read_bytes() == _expected(3, chunks, size)


def test_a_small_tensor_is_written_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_write, "_open_direct", lambda file: pytest.fail("opened a direct descriptor"))
    chunk = np.arange(100, dtype=np.uint8)
    with open(tmp_path / "small.bin", "wb") as file:
        direct_write.write(file, iter([chunk]), chunk.size)
    assert (tmp_path / "small.bin").read_bytes() == chunk.tobytes()


def test_aligned_chunks_go_direct_as_they_are_and_the_rest_through_the_stage(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path / "probe.bin"):
        pytest.skip(f"{tmp_path}: this file system takes no O_DIRECT writes")
    monkeypatch.setattr(direct_write, "DIRECT_MIN_BYTES", 0)
    rng = np.random.default_rng(5)
    chunks = []
    for n in (3 * 4096, 2 * 4096 + 100, 5 * 4096, 7):  # aligned; aligned with a tail; after a tail; a tail
        chunk = direct_write.aligned_buffer(n)
        chunk[:] = rng.integers(0, 256, n, dtype=np.uint8)
        chunks.append(chunk)
    stage = direct_write._stage()
    written = {"chunk": 0, "stage": 0, "buffered": 0}
    real_pwrite = os.pwrite

    def pwrite(descriptor, data, offset):
        if not _is_direct(descriptor):
            written["buffered"] += len(data)
        elif np.shares_memory(data, stage):
            written["stage"] += len(data)
        else:
            written["chunk"] += len(data)
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    size = sum(c.size for c in chunks)
    _write_at(tmp_path / "data.bin", 0, chunks, size=size)
    assert (tmp_path / "data.bin").read_bytes() == _expected(0, chunks, size)
    # the first two chunks' whole pages straight from them; then 100 + 5 * 4096 + 7 bytes staged, whose
    # 5 whole pages go direct and the last 107 bytes buffered
    assert written == {"chunk": 5 * 4096, "stage": 5 * 4096, "buffered": 107}
