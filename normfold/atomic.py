"""Atomic file writes for normfold's small outputs (reference files, JUnit and JSON reports).

The content goes to a temporary file in the destination's directory, is flushed to disk, and is
renamed over the destination with `os.replace`; a reader sees the old file or the new one, never a
partial one, and a failure leaves nothing behind. (Models are saved by normfold.io.save, which also
handles external data.)
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from normfold.errors import InputError


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, what: str = "file") -> Path:
    """Calls `write(f)` on a temporary binary file beside `path`, then renames it to `path`."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"{path}: cannot write the {what}: directory {directory} does not exist")
    if path.is_dir():
        raise InputError(f"{path}: cannot write the {what}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
    try:
        os.chmod(tmp, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write the {what} ({exc.strerror or exc}); nothing written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _mode_for(path: Path) -> int:
    """The replaced file's permissions, or what a plain open() would give (mkstemp's are 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json(path: str | os.PathLike, data: Any, *, what: str = "JSON report") -> Path:
    """Writes `data` as indented, strict JSON (an infinite or NaN number becomes null), atomically."""
    text = (json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n").encode()
    return write_atomic(path, lambda f: f.write(text), what=what)


def strict_json(data: Any) -> Any:
    """`data` with every non-finite float replaced by None, so strict JSON parsers accept it."""
    if isinstance(data, float):
        return data if data == data and data not in (float("inf"), float("-inf")) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data
