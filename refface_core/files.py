"""Writing user-visible files safely."""

from __future__ import annotations

import glob
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RefFaceError


def write_atomic(path: Path, write: Callable[[str], Any], replace: bool = True) -> bool:
    """``write(tmp_path)`` beside ``path``, then rename: an existing file is never left half-written. The file gets
    the permissions a plain open() would give it (the umask's), or keeps those of the file it replaces. The
    temporary file is named after this process, so one left by a process that was killed is removed next time.
    With ``replace`` False, the name is taken only while free (a file made meanwhile is kept): False if it was not."""
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")  # 0600
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        if replace:
            os.replace(tmp, path)
        elif not _take_free_name(tmp, path):
            return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True


def _take_free_name(tmp: str, path: Path) -> bool:
    """Give ``tmp`` the name ``path`` if it is free; False if it is taken."""
    try:
        os.link(tmp, path)  # refuses an existing name, unlike a POSIX rename
    except FileExistsError:
        return False
    except OSError:
        if os.name != "nt":
            raise
        try:
            os.rename(tmp, path)  # a drive without hard links (FAT): Windows' rename refuses an existing name
        except FileExistsError:
            return False
    return True


def write_folder_atomic(folder: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp_folder)`` beside ``folder``, then rename: the folder appears whole or not at all (a model folder's
    weights and config belong together). ``folder`` must not exist yet."""
    remove_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.{os.getpid()}.", suffix=".tmp"))  # 0700
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        tmp.rename(folder)
    except OSError as e:
        raise RefFaceError(f"cannot write {folder}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def path_kind(path: Path) -> str:
    """ "folder", "file", "missing" or "other"; a path that cannot be looked at (a folder on the way that this user
    may not enter) is a RefFaceError, where pathlib's is_dir() and exists() would raise PermissionError."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as e:
        raise RefFaceError(f"cannot access {path}: {e.strerror}") from None
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def check_writable_folder(folder: Path) -> None:
    """``folder``, or the parent it would be made in, must be a folder this process can write in."""
    existing = next(p for p in (folder, *folder.parents) if path_kind(p) != "missing" or p == p.parent)
    if path_kind(existing) != "folder":
        raise RefFaceError(f"cannot write into {folder}: {existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # permissions, read-only disks and ACLs: only trying tells
    except OSError as e:
        raise RefFaceError(f"cannot write into {existing}: {e.strerror}") from None


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files (or folders) of ``path`` whose writer is no longer running."""
    for tmp in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*.tmp"):
        ours = re.fullmatch(r"(\d+)\.[a-z0-9_]{8}\.tmp", Path(tmp).name[len(path.name) + 2 :])  # mkstemp's 8
        if ours and not process_running(int(ours[1])):  # not another file's, such as .a.png.2.png.<pid>....tmp
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
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
