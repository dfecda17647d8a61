"""Files that appear complete or not at all, a failed write that says what to do, and the leftovers of killed writes.

* **Atomic writes** (``write_atomic``): a LoraLoader, a file browser or a crash must never see half a file. The bytes
  go to a hidden temp file ``.<name>.<pid>.<hex>.tmp`` in the same folder (an extension ComfyUI does not list), are
  fsynced and published with one rename (or a hard link when replacing is not allowed, so two runs racing for one
  name cannot clobber each other). ComfyUI's filename-list cache is invalidated only when a folder's
  ``os.path.getmtime`` changes; on coarse-timestamp filesystems a rename in the same clock tick as an earlier change
  leaves it equal, so every folder we changed gets a newer mtime afterwards (the file shows up without a restart).
* **A failed write** (disk full, quota, permissions) raises ``WriteFailed``: an OSError (same errno) whose message
  names the file and its folder, the bytes it needed and the bytes free there, and what to do. Python's own file
  I/O writes the bytes, so a full disk is an ``OSError(ENOSPC)`` and never a library's opaque serialization error.
* **Killed writes** leave their temp file behind; ``sweep_stale_temp_files`` removes those whose writer is gone
  (its pid is not alive, or the pid now belongs to a process started after the file was written).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from pathlib import Path

TEMP_SUFFIX = ".tmp"  # not in ComfyUI's supported_pt_extensions, so a temp file is never listed as a LoRA
#: ``.<name>.<pid>.<hex>.tmp``: what this pack names a file (or folder) while it is being written
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]+)" + re.escape(TEMP_SUFFIX) + "$")
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


# ---------------------------------------------------------------------------------------------------------------
# the failure message
# ---------------------------------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk holding ``folder`` (its nearest existing parent), None when unknown."""
    d = Path(folder)
    while not d.exists() and d.parent != d:
        d = d.parent
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return None


class WriteFailed(OSError):
    """A file could not be written; the message says which, where, how much space it needed and what to do.

    ``errno`` is the original one (``ENOSPC`` for a full disk), so callers can still tell the causes apart.
    """

    def __init__(self, path: Path, needed: int, error: OSError) -> None:
        self.path = Path(path)
        self.needed = needed
        self.original = error
        self.free = free_bytes(self.path.parent)
        super().__init__(error.errno, write_failure_message(self.path, needed, self.free, error))

    def shown_as(self, path: Path, needed: int | None = None) -> WriteFailed:
        """The same failure told about ``path`` (e.g. the folder a hidden staging folder was to become)."""
        return WriteFailed(path, self.needed if needed is None else needed, self.original)

    def __str__(self) -> str:
        return self.strerror


def write_failure_message(path: Path, needed: int, free: int | None, error: OSError) -> str:
    folder, name = path.parent, path.name
    reason = error.strerror or str(error)
    if error.errno in _NO_SPACE:
        free_text = "unknown" if free is None else human_bytes(free)
        short = max(0, needed - (free or 0))
        space = f"free at least {human_bytes(short)} there" if short else "free some space there"
        return (
            f"could not write {name} in {folder}: the disk is full ({reason}); it needs {human_bytes(needed)} and "
            f"{free_text} is free. Fix: {space}, or choose a folder on another disk."
        )
    return (
        f"could not write {name} in {folder} ({reason}; {human_bytes(needed)} to write). Fix: make that folder "
        "writable, or choose another folder."
    )


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------


def temp_path(path: Path) -> Path:
    """The hidden temp name next to ``path`` (cut so that it stays within 255 bytes)."""
    short = path.name.encode("utf-8")[:96].decode("utf-8", errors="ignore")
    return path.parent / f".{short}.{os.getpid()}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime  # the same float os.path.getmtime gives ComfyUI
    except OSError:
        return None


def make_dirs(directory: Path, touched: dict[Path, float]) -> None:
    """``mkdir -p`` that records, for each folder whose entries it changes, its mtime before the change."""
    missing: list[Path] = []
    d = directory
    while not d.is_dir():
        if os.path.lexists(d):
            raise NotADirectoryError(f"{d} exists and is not a folder")
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for m in reversed(missing):
        before = _mtime(m.parent)
        if before is not None:
            touched.setdefault(m.parent, before)
        m.mkdir(exist_ok=True)


def advance_mtime(directory: Path, before: float) -> None:
    """Make ``os.path.getmtime(directory)`` differ from ``before`` so ComfyUI's cached file list is rebuilt.

    Needed only when the file system's timestamp did not move (same clock tick, coarse granularity): any listing
    ComfyUI cached earlier saw an mtime <= ``before``, so a strictly newer one always invalidates it.
    """
    now = _mtime(directory)
    if now is None or now > before:
        return
    try:
        atime = os.stat(directory).st_atime
        for step in (1e-3, 1.0, 2.0):  # 2 s covers FAT-like granularity
            os.utime(directory, (atime, before + step))
            after = _mtime(directory)
            if after is not None and after > before:
                return
    except OSError:
        pass  # not ours to change (e.g. read-only mount): the file is still written, a refresh will list it


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask() sets it process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_temp(tmp: Path, data: bytes | memoryview) -> None:
    """The low-level write: every byte through ``os.write``, then fsync. A full disk raises OSError(ENOSPC) here."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)  # the umask applies: the mode a plain open() gives
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); folders cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temp file to its name in one step; without ``overwrite`` never replace an existing file."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and fails if the name exists, even when another run just took it
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)") from None
    except OSError:
        # file systems without hard links (FAT, some network mounts): check then rename
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_atomic(path: Path | str, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` so that the file appears complete or not at all.

    Missing parent folders are created. On any error the temp file is removed and ``path`` is untouched; a write
    that fails (disk full, permissions) raises ``WriteFailed``. Without ``overwrite`` an existing ``path`` raises
    FileExistsError (checked again at publish time).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)")
    directory = path.parent
    touched: dict[Path, float] = {}
    before: float | None = None
    tmp = temp_path(path)
    try:
        make_dirs(directory, touched)
        write_temp(tmp, data)
        if os.name == "posix":
            # a file is shared like any model file (ComfyUI in another account or container): the mode a plain
            # open() gives, whatever created the temp file
            os.chmod(tmp, 0o666 & ~_current_umask())
        before = _mtime(directory)
        publish(tmp, path, overwrite)
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        raise
    except OSError as e:
        raise WriteFailed(path, len(data), e) from e
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    fsync_dir(directory)
    if before is not None:
        touched[directory] = before  # compare with the moment just before the rename, not before the temp file
    for d, t in touched.items():
        advance_mtime(d, t)


# ---------------------------------------------------------------------------------------------------------------
# leftovers of killed writes
# ---------------------------------------------------------------------------------------------------------------


def _process_start(pid: int) -> float | None:
    """When the process now holding ``pid`` started (epoch seconds); None when no process has that pid."""
    try:
        import psutil  # ComfyUI requires it

        return psutil.Process(pid).create_time()
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess / AccessDenied / ZombieProcess
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0.0  # alive, start unknown: treat it as older than any file, i.e. possibly the writer


def is_stale_temp(path: Path) -> bool:
    """True for a temp file (or folder) of this pack whose writer is gone: no process holds its pid, or the one
    that does started after the temp was last written (the pid was reused)."""
    m = TEMP_NAME.match(path.name)
    if m is None:
        return False
    try:
        mtime = os.lstat(path).st_mtime
    except OSError:
        return False
    started = _process_start(int(m.group("pid")))
    return started is None or started > mtime + 1.0  # 1 s: file systems with coarse timestamps


def sweep_stale_temp_files(folder: Path | str, depth: int = 0) -> list[Path]:
    """Remove the stale temp files/folders of this pack in ``folder`` (and ``depth`` levels of subfolders below it).

    Returns what was removed. Nothing else is touched; a missing folder is not an error.
    """
    removed: list[Path] = []
    root = Path(folder)
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if is_stale_temp(path):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
            except OSError:
                pass
        elif depth > 0 and entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
            removed += sweep_stale_temp_files(path, depth - 1)
    return removed
