"""Output folders and files that lose nothing: writability checks, a per-folder run lock, atomic writes.

* :func:`check_writable` -- before any work, a folder (or the nearest existing folder above a
  path that does not exist yet) must accept a new file; otherwise :class:`UserError`.
* :func:`refuse_earlier_result`, :func:`refuse_occupied` -- a fresh run does not write into a
  folder that holds an earlier result, or anything at all, unless told to (``--overwrite``).
* :func:`output_lock` -- one run at a time per output folder. The lock is a file,
  ``<folder>/.ipl.lock``, holding the owner's PID and host, locked with ``fcntl.flock``: the
  kernel drops the lock when its process dies (``kill -9`` included), so a lock left by a killed
  run is recognised as stale, reported and taken over, and a live one refuses the second run at
  once. Re-entrant within one process (the CLI holds it around the API call that holds it too).
* :func:`atomic_write_text`, :func:`atomic_save_image`, :func:`atomic_save_safetensors`,
  :func:`atomic_folder` -- write into a hidden temporary sibling, then ``os.replace`` it into
  place: a crash leaves the old result or the new one, never half of each.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

from ipl_diffusion.errors import UserError, UserFileExistsError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not serialised there
    fcntl = None

__all__ = [
    "LOCK_NAME", "check_writable", "refuse_earlier_result", "refuse_occupied", "output_lock", "atomic_write_text", "atomic_save_image",
    "atomic_save_safetensors", "atomic_folder", "listing",
]

LOCK_NAME = ".ipl.lock"

# resolved folder -> [open lock file, depth] for the locks this process holds (re-entrancy)
_HELD: dict[Path, list] = {}


def check_writable(path, what: str = "output") -> None:
    """Refuse an output location that cannot be written, before any work is done.

    Args:
        path: a folder (existing or to be created) or, with ``what`` naming a file, that file's
            folder. Nothing is created: the nearest existing folder at or above ``path`` is
            probed by creating and deleting one temporary file.
        what: how the message names the location (e.g. ``"--output"``).

    Raises:
        UserError: the location is an existing file or a broken symbolic link, or the probe
            fails (read-only folder or file system, no permission); the message names the path
            and the reason.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # mkdir(parents=True) would fail on it with FileExistsError
            raise UserError(f"{what} {path}: {probe} is a symbolic link to {os.readlink(probe)}, which does not exist")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {path}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".ipl-write-test-"):
            pass
    except OSError as err:
        raise UserError(f"{what} {path} is not writable ({err.strerror or err}); choose a folder you can write to") from None


def listing(names, at_most: int = 3) -> str:
    """``"a, b, c and 2 more"``: the first ``at_most`` of ``names`` for a one-line message."""
    names = list(names)
    return ", ".join(names[:at_most]) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def refuse_earlier_result(folder, names, what: str = "output", overwrite_hint: str = "pass --overwrite") -> None:
    """Refuse to replace an earlier run's result: ``UserFileExistsError`` (a ``UserError``) when
    any of ``names`` exists in ``folder``, listing them (at most 3) and how to proceed."""
    folder = Path(folder)
    found = [name for name in names if (folder / name).exists()]
    if found:
        raise UserFileExistsError(
            f"{what} {folder} already holds the result of an earlier run ({listing(found)}); "
            f"choose another folder or {overwrite_hint} to replace it"
        )


def refuse_occupied(folder, what: str = "output", overwrite_hint: str = "pass --overwrite") -> None:
    """Refuse a fresh run into a folder that holds anything but this package's lock file.

    A training run writes a dozen names into its folder (the result, ``losses.csv``, ``stage1/``,
    caches, samples), so a file of the user's under one of them would be replaced; only an empty
    or new folder is safe without consent. This is the rule of transformers' example scripts
    (a non-empty ``output_dir`` needs ``--overwrite_output_dir``). A folder that does not exist
    passes.

    Raises:
        UserFileExistsError: the folder holds files or folders; the message names up to 3 and
            how to proceed (another folder, or ``overwrite_hint``).
    """
    folder = Path(folder)
    found = sorted(entry.name for entry in folder.iterdir() if entry.name != LOCK_NAME) if folder.is_dir() else []
    if found:
        raise UserFileExistsError(
            f"{what} {folder} is not empty ({listing(found)}); a run would replace files of the names it writes there. "
            f"Choose a new or empty folder, or {overwrite_hint} to write there anyway"
        )


def _read_owner(handle) -> str:
    handle.seek(0)
    return handle.read().strip()


@contextlib.contextmanager
def output_lock(folder, what: str = "output folder") -> Iterator[Path]:
    """Hold ``<folder>/.ipl.lock`` for the ``with`` block (``folder`` is created, and removed
    again if the block leaves it empty).

    Raises:
        UserError: another live process holds the lock (the message names its PID and host).

    A lock file left by a process that no longer runs (killed, crashed machine) is reported with
    a ``UserWarning`` naming that PID and taken over. ``folder=None`` is a no-op, and so is every
    process but the first of a multi-process launch (``RANK`` > 0 under ``torchrun`` /
    ``accelerate launch``): the processes of one run share its folder.
    """
    if folder is None or fcntl is None or os.environ.get("RANK", "0") != "0":
        yield None
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield key / LOCK_NAME
        finally:
            _HELD[key][1] -= 1
        return
    handle = _acquire(key / LOCK_NAME, folder, what)
    _HELD[key] = [handle, 1]
    try:
        yield key / LOCK_NAME
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(key / LOCK_NAME)  # unlink first: a waiting opener then re-checks the inode
        handle.close()  # closing releases the flock
        if created:  # a run that failed before writing leaves no empty folder behind
            with contextlib.suppress(OSError):
                key.rmdir()


def _acquire(path: Path, folder: Path, what: str):
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read_owner(handle) or "another process"
            handle.close()
            raise UserError(
                f"{what} {folder} is in use by another run ({owner}); wait for it to finish or choose another folder"
            ) from None
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:  # the previous owner removed it between our open and flock
            same = False
        if same:
            break
        handle.close()
    stale = _read_owner(handle)
    if stale:
        warnings.warn(
            f"{what} {folder}: the run that held it ({stale}) is no longer running (killed?); taking its lock over",
            UserWarning,
            stacklevel=4,
        )
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def _default_mode(path, folder: bool = False) -> None:
    """Give a temporary file / folder the mode a plain ``open`` / ``mkdir`` would have:
    ``mkstemp`` / ``mkdtemp`` make them private (0600 / 0700), which would leave the results
    unreadable to anyone else once renamed into place."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def _temporary_sibling(path: Path, prefix: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary file name beside ``path``; when the block has written it, flush it to
    disk, give it a plain file's mode and move it onto ``path`` (on failure: remove it)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        _fsync(Path(tmp))
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``."""
    path = Path(path)
    with _temporary_sibling(path, prefix=f".tmp-{path.name}-") as tmp:
        with open(tmp, "w", newline="") as handle:  # the text exactly as given
            handle.write(text)
    return path


def atomic_save_safetensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file`` through a temporary sibling (with a plain file's mode)."""
    from safetensors.torch import save_file

    path = Path(path)
    with _temporary_sibling(path, prefix=f".tmp-{path.stem}-", suffix=path.suffix) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def atomic_save_image(image, path, **save_kwargs) -> Path:
    """``image.save(path)`` (a PIL image; format from ``path``'s suffix) through a temporary sibling."""
    path = Path(path)
    with _temporary_sibling(path, prefix=f".tmp-{path.stem}-", suffix=path.suffix) as tmp:
        image.save(tmp, **save_kwargs)
    return path


@contextlib.contextmanager
def atomic_folder(target) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block succeeds it replaces
    ``target`` (an existing ``target`` is moved aside first and deleted after the swap).
    On an error the temporary folder is removed and ``target`` is untouched.

    Between the two renames of a replacement, ``target`` is briefly absent, never half-written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    _default_mode(tmp, folder=True)
    try:
        yield tmp
        if target.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            trash = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            os.replace(target, trash / target.name)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
