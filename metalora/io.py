"""Atomic file and directory writes: a crash leaves the old version or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, then rename.

    Args:
        path: destination file (its parent is created).
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, then rename.

    Args:
        path: destination file (its parent is created).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp creates 0600; a file written in place would get 0666 less the umask, so give it that.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON atomically (see `atomic_write_text`)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path`.

    An existing `path` is moved aside as `.<name>.old` and the new one renamed into place: a crash between those two
    renames leaves the previous version under that name, and the next call for `path` restores it before anything
    else.

    Args:
        path: the final directory. An existing one is replaced only after the new one is complete.

    Yields:
        The temporary directory to write into.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)  # a swap cut between its two renames: the previous version comes back first
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the directory from collaborators
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


CHECKSUMS = "checksums.json"


class ChecksumError(ValueError):
    """A file no longer has the content its directory's checksum record says it was written with."""


def write_checksums(directory: str | Path) -> None:
    """Record the SHA-256 of every file under `directory` (relative paths) in its checksums.json."""
    directory = Path(directory)
    sums = {
        f.relative_to(directory).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.name != CHECKSUMS
    }
    atomic_write_json(directory / CHECKSUMS, sums)


def verify_checksums(directory: str | Path) -> None:
    """Check every file listed in `directory`'s checksums.json (a directory without one passes).

    Raises:
        ChecksumError: a listed file is missing or its content changed, naming the file.
    """
    directory = Path(directory)
    record = directory / CHECKSUMS
    if not record.is_file():
        return
    for name, expected in json.loads(record.read_text()).items():
        path = directory / name
        if not path.is_file():
            raise ChecksumError(f"{path}: missing (listed in {record})")
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise ChecksumError(f"{path}: content does not match its checksum in {record} (the file was changed)")
