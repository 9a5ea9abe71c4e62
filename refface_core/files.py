"""Writing user-visible files safely."""

from __future__ import annotations

import glob
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RefFaceError


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp_path)`` beside ``path``, then rename: an existing file is never left half-written. The file gets
    the permissions a plain open() would give it (the umask's), or keeps those of the file it replaces. The
    temporary file is named after this process, so one left by a process that was killed is removed next time."""
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")  # 0600
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_folder(folder: Path) -> None:
    """``folder``, or the parent it would be made in, must be a folder this process can write in."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise RefFaceError(f"cannot write into {folder}: {existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # permissions, read-only disks and ACLs: only trying tells
    except OSError as e:
        raise RefFaceError(f"cannot write into {existing}: {e.strerror}") from None


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` whose writer is no longer running."""
    for tmp in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*.tmp"):
        pid = Path(tmp).name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not process_running(int(pid)):
            Path(tmp).unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    if os.name == "nt":  # signal 0 would be CTRL_C_EVENT there: leave the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)  # reading it means setting it
    os.umask(mask)
    return mask
