"""Writing user-visible files safely."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp_path)`` beside ``path``, then rename: an existing file is never left half-written. The file gets
    the permissions a plain open() would give it (the umask's), or keeps those of the file it replaces."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp makes it 0600
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading it means setting it
    os.umask(mask)
    return mask
