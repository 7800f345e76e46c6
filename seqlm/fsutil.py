"""Durable file-system steps for checkpoints, each behind one fault-injection hook.

Every write, fsync and rename a checkpoint save performs goes through :func:`fs_step` first.
With ``SEQLM_FAULT_AT=n`` in the environment the process SIGKILLs itself right before the
n-th such step (counted over the life of the process), so a test can crash a save at each
step in turn; ``SEQLM_FAULT_TRACE=FILE`` appends one line per step (``n kind path``) so a
harness can count them. Without the variables the hook costs one dict lookup.

Files and directories are created with the modes a plain ``open`` / ``mkdir`` gives
(0666 / 0777 minus the umask), never owner-only, so checkpoints can live on group storage.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import signal
from pathlib import Path

FAULT_ENV, TRACE_ENV = "SEQLM_FAULT_AT", "SEQLM_FAULT_TRACE"
_count = 0


def fs_step(kind: str, path) -> None:
    """Call before each durable step of a save (kind: write, fsync, rename, remove)."""
    global _count
    at, trace = os.environ.get(FAULT_ENV), os.environ.get(TRACE_ENV)
    if not at and not trace:
        return
    _count += 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{_count} {kind} {path}\n")
    if at and _count == int(at):
        os.write(2, f"seqlm: fault injection: SIGKILL before {kind} {path} (step {_count})\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public(path) -> None:
    """Give a file written by a library that creates owner-only files (safetensors: 0600)
    the mode a plain open() would have: 0666 & ~umask."""
    os.chmod(path, 0o666 & ~umask())


def fsync_path(path) -> None:
    """fsync a file or a directory (directories: makes renames/creations inside durable)."""
    fs_step("fsync", path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path, data: bytes, sync: bool = True) -> None:
    """Create ``path`` (which must not exist) with ``data``; fsync it."""
    fs_step("write", path)
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        if sync:
            fs_step("fsync", path)
            os.fsync(f.fileno())


def rename(src, dst) -> None:
    fs_step("rename", f"{src} -> {dst}")
    os.rename(src, dst)


def replace_file(path, data: bytes) -> None:
    """Atomically make ``path`` hold ``data``: temp file, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    write_bytes(tmp, data)
    rename(tmp, path)
    fsync_path(path.parent)


def sha256_file(path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def owner_gone(pid: int) -> bool:
    """True when process ``pid`` no longer runs (or is this one): its temp files are leftovers."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def exchange(a, b) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fs_step("rename", f"{a} <-> {b}")
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: file system / kernel without it
        return False
    raise OSError(err, os.strerror(err), str(a))


def remove_tree(p) -> None:
    """Delete a directory: renamed to a hidden trash name first, so a half-deleted directory
    is never visible under its own name."""
    import shutil

    p = Path(p)
    trash = p.parent / f".{p.name}.trash-{os.getpid()}-{secrets.token_hex(4)}"
    rename(p, trash)
    fs_step("remove", trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(new, dst) -> None:
    """Put the complete directory ``new`` at ``dst`` (same parent), replacing what is there:
    an atomic exchange where the kernel has one (the old contents then leave with ``new``'s
    name), else remove + rename, a short window with nothing at ``dst``."""
    import shutil

    new, dst = Path(new), Path(dst)
    if dst.exists():
        if exchange(new, dst):
            fsync_path(dst.parent)
            shutil.rmtree(new, ignore_errors=True)
            return
        remove_tree(dst)
    rename(new, dst)
    fsync_path(dst.parent)
