"""Outputs written whole or not at all: a temporary sibling, renamed into place.

Every file or directory neuronmap writes (atlas, plot, token index, caches)
goes through here, so an interrupted or failed write never leaves something
half-written under the name the user asked for, and an unwritable path gives
one line instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from neuronmap.core.errors import NeuronmapError


# Temporary outputs not yet renamed into place: what a signal handler removes before the process exits.
_PENDING: set[Path] = set()
# What an interrupted command says instead of "nothing was written" (a map that keeps its finished parts).
_NOTE: list = []


def _prefix(out: Path) -> str:
    # The writer's pid is in every temporary name, so a later run can tell a dead run's leftover from a live one's.
    return f".{out.name}.{os.getpid()}-"


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporaries beside ``out`` (``.NAME.PID-xxxx.tmp``) left by runs that were killed (their PID is gone).

    A SIGKILL gives no process the chance to clean up; the next run writing the same output does it instead.
    Temporaries of a process that is still running are left alone.

    Returns:
        The paths removed, for the caller to report.
    """
    removed = []
    try:
        siblings = list(out.parent.glob(f".{out.name}.*-*.tmp")) if out.parent.is_dir() else []
    except OSError:
        return removed
    for p in siblings:
        pid = p.name[len(out.name) + 2:].split("-", 1)[0]
        # "²".isdigit(), but int("²") fails; os.kill() overflows past a C int. Neither is a pid neuronmap wrote.
        if not (pid.isascii() and pid.isdigit() and len(pid) <= 9) or _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def interrupt_note(note) -> Iterator[None]:
    """While the block runs, Ctrl-C and SIGTERM print ``note()`` (a callable, evaluated then) instead of "nothing was written"."""
    _NOTE.append(note)
    try:
        yield
    finally:
        _NOTE.remove(note)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: Path | str, directory: bool = False) -> None:
    """Give a mkstemp/mkdtemp path the mode an ordinary file or directory gets (they are created private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_error(out: Path | str, e: OSError, what: str = "output") -> NeuronmapError:
    """One line for an OSError met while writing ``out``: what failed, and what to do.

    Example:
        >>> str(write_error("/proc/x", PermissionError(13, "Permission denied")))
        'cannot write /proc/x: Permission denied; choose a writable output path'
    """
    reason = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space (or raise the file-size limit) and run it again"
    elif e.errno == errno.ENOTDIR:
        fix = f"a part of the path is a file, not a directory; choose another {what} path"
    else:
        fix = f"choose a writable {what} path"
    return NeuronmapError(f"cannot write {out}: {reason}; {fix}")


def ensure_parent(out: Path, what: str) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise NeuronmapError(f"cannot write {out}: {blocker} is a file, not a directory; choose another {what} path") from e
        raise write_error(out, e, what) from e
    return out.parent


@contextmanager
def atomic_file(out: Path | str, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``out``; rename it to ``out`` when the block ends without error.

    Args:
        out: the file to create or replace.
        what: how the error message names it ("plot", "output").

    Yields:
        The temporary path to write (it exists, empty).

    Raises:
        NeuronmapError: ``out``'s directory cannot be created or written (the OSError is the cause).

    Example:
        >>> with atomic_file("plot.png", "plot") as tmp:  # doctest: +SKIP
        ...     fig.savefig(tmp, format="png")
    """
    out = Path(out)
    parent = ensure_parent(out, what)
    try:
        fd, name = tempfile.mkstemp(prefix=_prefix(out), suffix=".tmp", dir=parent)
    except OSError as e:
        raise write_error(out, e, what) from e
    os.close(fd)
    tmp = Path(name)
    _PENDING.add(tmp)
    try:
        make_readable(tmp)
        yield tmp
        os.replace(tmp, out)
    except OSError as e:
        raise write_error(out, e, what) from e
    finally:
        tmp.unlink(missing_ok=True)
        _PENDING.discard(tmp)


def check_png(out: Path | str) -> Path:
    """Check a plot's path before any work: a .png name in an existing directory.

    Raises:
        NeuronmapError: not a .png name, or its directory is missing or is a file.

    Example:
        >>> check_png("plots/x.svg")
        Traceback (most recent call last):
        neuronmap.core.errors.NeuronmapError: plot=plots/x.svg: the plot is a PNG; give a file name ending in .png
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise NeuronmapError(f"plot={out}: the plot is a PNG; give a file name ending in .png")
    if out.parent.exists() and not out.parent.is_dir():
        raise NeuronmapError(f"plot={out}: {out.parent} is a file, not a directory; choose another path")
    if not out.parent.is_dir():
        raise NeuronmapError(f"plot={out}: directory {out.parent} does not exist; create it or choose another path")
    return out


def temp_dir_beside(out: Path, what: str = "output") -> Path:
    """A new empty directory ``.NAME.PID-xxxx.tmp`` beside ``out``, with an ordinary directory's mode.

    Raises:
        NeuronmapError: the parent cannot be created or written.
    """
    parent = ensure_parent(out, what)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out), suffix=".tmp", dir=parent))
        _PENDING.add(tmp)
        make_readable(tmp, directory=True)
    except OSError as e:
        raise write_error(out, e, what) from e
    return tmp


def remove_tree(path: Path) -> None:
    """Remove a directory neuronmap created (a temporary one), ignoring what is already gone."""
    shutil.rmtree(path, ignore_errors=True)
    _PENDING.discard(path)


def _remove_pending() -> None:
    for p in list(_PENDING):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    _PENDING.clear()


def _exit_on_signal(signum, frame) -> None:
    # Exit from the handler rather than raise KeyboardInterrupt: an exception raised in the middle of an import or
    # of a C extension's callback surfaces later as some other error (a half-imported numpy), or as a traceback.
    _remove_pending()
    what = "terminated" if signum == signal.SIGTERM else "interrupted"
    try:
        note = "nothing was written"
        if _NOTE:
            try:
                note = _NOTE[-1]()
            except Exception:  # the note is a courtesy; the exit must happen whatever it does
                pass
        # The process's own stderr: sys.stderr may be a StringIO just now (a model load hides a converter's bar).
        stream = sys.__stderr__ or sys.stderr
        stream.write(f"{what}: {note}\n")
        stream.flush()
    finally:
        os._exit(128 + signum)


def exit_on_signals() -> dict:
    """Make Ctrl-C and SIGTERM remove every pending temporary output, print one line and exit (130 / 143).

    For the command line only (a library must not take over its host's signals).

    Returns:
        The previous handlers, for ``restore_signals``; empty when not called from the main thread.
    """
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _exit_on_signal)
    except ValueError:  # not the main thread: leave signals to the host
        pass
    return previous


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for a few renames that must happen together; they are delivered after."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
