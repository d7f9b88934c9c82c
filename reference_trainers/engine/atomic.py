"""Files written whole or not at all: :func:`atomic_write_bytes` and the clean-up of what a killed write left."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from reference_trainers.errors import OutputError

__all__ = ["atomic_write_bytes", "json_bytes", "output_error", "remove_stale_temps"]


_TEMP_SUFFIX = ".tmp"


def _temp_pattern(path: Path) -> re.Pattern[str]:
    """The names :func:`atomic_write_bytes` gives its temp files for ``path`` (``.<name>.<8 random>.tmp``)."""
    return re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}{re.escape(_TEMP_SUFFIX)}$")


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files a killed :func:`atomic_write_bytes` of ``path`` left behind; return them.

    Only the exact pattern of this module's temp files for ``path`` is removed (``.<name>.XXXXXXXX.tmp``
    in the same directory); a missing directory is not an error.
    """
    path = Path(path)
    pattern = _temp_pattern(path)
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if pattern.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync, ``os.replace``.

    Either the old file (or none) or the complete new one is there, whatever happens. The file
    gets the mode a plain ``open()`` would give it (``0o666`` less the umask). A temp file that a
    killed earlier write of ``path`` left behind is removed first (:func:`remove_stale_temps`).

    Raises:
        OutputError: the directory or file cannot be written (a full disk, a read-only
            directory, a directory in the file's place...), with the path and the reason; the old
            file, if any, is kept and no temp file is left.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    except OSError as e:
        raise output_error(path, e) from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0o600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise output_error(path, e) from e
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not supported everywhere)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def output_error(path: Path, e: OSError) -> OutputError:
    reason = e.strerror or str(e) or type(e).__name__
    hint = {
        errno.ENOSPC: "free some space or choose another --out",
        errno.EDQUOT: "free some space or choose another --out",
        errno.EROFS: "the file system is read-only: choose another --out",
        errno.EACCES: "fix the permissions or choose another --out",
        errno.EPERM: "fix the permissions or choose another --out",
        errno.EISDIR: "a directory is in the file's place: remove it or choose another --out",
        errno.EFBIG: "a file-size limit was reached: free some space, raise the limit or choose another --out",
    }.get(e.errno or -1, "check the output directory or choose another --out")
    return OutputError(e.errno or 0, f"cannot write {str(path)!r}: {reason} ({hint}); then continue with --resume")


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented JSON (anything else by its ``str``), UTF-8, with a final newline."""
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()
