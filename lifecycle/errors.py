"""One error path for every tool: a problem the user can fix is one line on stderr, exit status 1.

Every entry point wraps its ``main(argv)`` once with :func:`cli`. The wrapper turns what it knows into the one line
``error: <file, key or value>: <what is wrong>; <the fix>`` and shows Python's traceback only when asked: ``--debug``
anywhere on the command line, or ``BOT_DEBUG=1`` in the environment (the flag sets the variable, so the processes a
tool starts, e.g. torchrun's workers, inherit it).

What it knows:

- :class:`UserError` and its subclasses (``ConfigError``, ``DataError``, ``ExportError``, ...): the message is the
  whole report;
- an exception re-raised by torch's DataLoader from a worker process: torch rebuilds it with the worker's whole
  traceback as its message ("Caught DataError in DataLoader worker process 0 ..."); the line is the original's;
- ``OSError``: a full disk or quota ("disk full: <path>"), permissions, a read-only or failing disk, a missing
  file; :func:`writing` attaches the path a bare ``write()`` error lacks;
- Pillow's DecompressionBombError and unreadable images, torch's damaged-checkpoint errors, out of memory.

Anything else is a bug or a case nobody foresaw: one line naming the exception type, and how to get the traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_ENV = "BOT_DEBUG"
EXIT_ERROR = 1  # the same status as before this module: scripts and the study runner test for non-zero


class UserError(Exception):
    """A problem the user fixes. The message is the whole report: ``<file, key or value>: <what>; <fix>``.
    A subclass (or a registered class) may set ``exit_status`` (default 1), e.g. 2 for a usage error."""

    exit_status = 1


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, UserError)


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------------------------- one line per exception

_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.", re.M)
_ERRNO = re.compile(r"\[Errno (\d+)\] ([^:]+)(?:: '(.*)')?")
_MIB = 2**20
# What torch.save raises when its zip writer cannot write (no errno, no path): a full disk, most often.
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "inline_container", "basic_ios::clear")
# A worker's batch that does not fit in /dev/shm: torch's allocation error, or the Bus error its pages raise after.
_SHM_FULL = ("unable to allocate shared memory", "out of shared memory", "insufficient shared memory")


def _worker_original(exc: BaseException) -> str | None:
    """The ``message`` of the original exception in a DataLoader worker, from the traceback torch put in ``exc``:
    after the frames (indented lines), the lines ``module.Type: message``."""
    text = str(exc.args[0]) if exc.args else ""
    if not _WORKER.search(text) or "Original Traceback" not in text:
        return None
    lines = text.rstrip().splitlines()
    tail = len(lines)
    while tail > 0 and not lines[tail - 1].startswith(" "):
        tail -= 1
    original = " ".join(line.strip() for line in lines[tail:]) or lines[-1].strip()
    head, sep, message = original.partition(": ")
    return message if sep and re.fullmatch(r"[\w.]+", head) else original


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


def _free_space(path: str | None) -> str:
    """' (N MiB free on its disk)' for the nearest existing folder of ``path``, or '' when unknown."""
    if not path:
        return ""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f" ({shutil.disk_usage(p).free // _MIB} MiB free on its disk)"
    except OSError:
        return ""


def _oserror(code: int | None, strerror: str, filename: str | None) -> str | None:
    where = filename or "a file"
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        return (f"{what}: {where}{_free_space(filename)}; free space there or write elsewhere (--work-dir, --out), "
                f"then rerun the same command")
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}; fix its permissions or use another path"
    if code == errno.EROFS:
        return f"read-only file system: {where}; write elsewhere (--work-dir, --out)"
    if code == errno.EIO:
        return f"input/output error on {where}: the disk or network storage failed; check it and rerun"
    if code == errno.ENOENT:
        return f"{where}: no such file or folder; check the path"
    if code == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a folder; check the path"
    if code == errno.EISDIR:
        return f"{where}: is a folder, a file was expected; check the path"
    if code == errno.EEXIST:
        return f"{where}: already exists (a file where a folder is wanted?); remove it or choose another path"
    if code == errno.ELOOP:
        return f"{where}: too many levels of symbolic links (a link loop); remove the loop"
    if code == errno.EMFILE or code == errno.ENFILE:
        return f"too many open files ({where}); raise the limit (ulimit -n) or lower workers"
    if filename:
        return f"{filename}: {strerror}; check the path"
    return None


_PATH_LOCALS = ("filepath", "filename", "file_path", "path", "f", "fname")


def _frames(exc: BaseException) -> list:
    """The frames of ``exc``'s traceback, outermost first."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _path_from_frames(exc: BaseException) -> str | None:
    """The file a write was for, from the innermost frame that holds one: ``f.write`` raises ENOSPC without a name,
    e.g. inside mmengine's LocalBackend.put(obj, filepath) while a Runner saves its checkpoint."""
    for frame in reversed(_frames(exc)):
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and os.fspath(value):
                return str(os.fspath(value))
            if isinstance(getattr(value, "name", None), str) and hasattr(value, "write"):
                return value.name
    return None


def _torch_load_path(exc: BaseException) -> str | None:
    """The file torch.load was reading when ``exc`` was raised (its ``f`` argument, from the traceback's frames):
    mmengine loads a backbone's checkpoint deep inside the Runner, and torch's message names no file."""
    path = None
    for frame in _frames(exc):
        if frame.f_code.co_name == "load" and frame.f_globals.get("__name__") == "torch.serialization":
            f = frame.f_locals.get("f")
            path = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", path)
    return str(path) if path else None


def _line_of(exc: BaseException) -> str | None:
    """The one line for ``exc`` alone (not its chain), or None when it is not a known kind."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}  # classes of modules not imported here
    worker = _worker_original(exc)
    message = worker if worker is not None else str(exc)
    if is_user_error(exc):
        return _first_line(message, limit=2000)
    if isinstance(exc, OSError):
        if worker is not None:  # torch rebuilt it from text: errno and filename are only in the message
            m = _ERRNO.search(message)
            code, strerror, filename = (int(m[1]), m[2], m[3]) if m else (None, message, None)
        else:
            code, strerror, filename = exc.errno, exc.strerror or str(exc), exc.filename
            if code == errno.ENOSPC and filename is None and _raised_in_multiprocessing(exc):
                return _shm_full()  # its queues' semaphores live in /dev/shm too
            if filename is None and code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS):
                filename = _path_from_frames(exc)
        line = _oserror(code, strerror, None if filename is None else str(filename))
        if line is not None:
            return line
        if code is None and message:  # raised with a message only, e.g. mmengine's 'file "x" does not exist'
            return f"{_first_line(message)}; check the path"
    if isinstance(exc, SyntaxError) and exc.filename and not str(exc.filename).startswith("<"):
        return f"{exc.filename}:{exc.lineno}: Python syntax error ({exc.msg}); fix the file"
    if "PIL.Image.DecompressionBombError" in names:
        return (f"image too large: {_first_line(message)}; Pillow refuses it as a possible decompression bomb: "
                f"downscale or remove the image (or raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine)")
    if "PIL.UnidentifiedImageError" in names:
        return f"{_first_line(message)}; replace or remove the file"
    if "torch.OutOfMemoryError" in names or (isinstance(exc, RuntimeError) and "out of memory" in message.lower()):
        return (f"out of accelerator memory ({_first_line(message, 120)}); lower the per-device batch "
                f"(device_batch, or the config's batch_size)")
    if isinstance(exc, MemoryError):
        return "out of host memory; lower workers or the batch size, or free memory"
    if isinstance(exc, RuntimeError) and "PytorchStreamReader failed" in message:
        what = _first_line(message).split(". ")[0]  # torch adds three sentences of advice after the reason
        path = _torch_load_path(exc)
        return (f"{path or 'a torch file'}: cannot be read ({what}): truncated or not a torch file; regenerate it"
                + ("" if path else " (the lines above name the file being loaded)"))
    if isinstance(exc, RuntimeError) and any(m in message for m in _TORCH_WRITE_FAILED):
        return (f"could not write a torch file: {_first_line(message)}; the disk is probably full: free space or "
                f"write elsewhere (--work-dir)")
    if isinstance(exc, RuntimeError) and any(m in message for m in _SHM_FULL):
        return _shm_full()
    if worker is not None:
        return f"{_first_line(message)} (in a data loader worker)"
    return None


def _shm_full() -> str:
    from lifecycle.shared_memory import shm_bytes  # torch: loaded already wherever a loader ran

    total = shm_bytes()
    size = "/dev/shm" if total is None else (f"/dev/shm: {total // _MIB:,} MiB" if total >= _MIB else
                                             f"/dev/shm: {total // 1024} KiB")
    return (f"the data loader's workers ran out of shared memory ({size}, where they hand over their batches): "
            f"enlarge it (a container's --shm-size; tools/doctor.py says how much) or lower workers")


def _raised_in_multiprocessing(exc: BaseException) -> bool:
    return any(str(f.f_globals.get("__name__", "")).startswith("multiprocessing.") for f in _frames(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def known_line(exc: BaseException) -> str | None:
    """The one line for ``exc``, or None when nothing in it is known. The outermost user error wins (it names the
    file or key); else a full disk anywhere in the chain (a save fails with torch's opaque writer error on top of
    the OSError that says why); else the outermost known exception."""
    chain = list(_chain(exc))
    for e in chain:
        if is_user_error(e):
            return _line_of(e)
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _line_of(e)
    for e in chain:
        line = _line_of(e)
        if line is not None:
            return line
    return None


def report(exc: BaseException) -> str:
    """What the wrapper prints (without 'error: '): the known line, or the unexpected exception in one line."""
    line = known_line(exc)
    if line is not None:
        return line
    if isinstance(exc, ModuleNotFoundError):  # a tool run with another Python than the set-up's (python, not .venv's)
        return (f"{exc}: {sys.executable} is not the toolkit's environment; run `. .venv/bin/activate` (made by "
                f"tools/setup_env.sh) or .venv/bin/python")
    return (f"unexpected {type(exc).__name__}: {_first_line(str(exc), 200)} (rerun with {DEBUG_FLAG} or "
            f"{DEBUG_ENV}=1 for the traceback, and report it if the input was valid)")


# --------------------------------------------------------------------------------------------------- the wrapper


def quiet_exit_of_loader_workers() -> None:
    """Leaving on an error (or a stop raised through a loop we do not own) skips the DataLoaders' shutdown: at exit
    multiprocessing ends their workers with SIGTERM, and torch's SIGCHLD handler reports each as "killed by signal",
    a traceback after the one line. Nothing is left for that handler to watch."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def cli(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a tool's ``main(argv=None, ...) -> exit status``: strips ``--debug`` from argv (setting BOT_DEBUG=1),
    and turns any exception into ``error: <one line>`` on stderr and exit status 1, unless debugging (then the
    exception propagates with its traceback). SystemExit (argparse, sys.exit) and KeyboardInterrupt pass."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None, *args, **kwargs) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        if DEBUG_FLAG in argv:
            argv = [a for a in argv if a != DEBUG_FLAG]
            os.environ[DEBUG_ENV] = "1"
        try:
            return main(argv, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the one place that decides how every failure is shown
            if debug_requested():
                raise
            print(f"error: {report(e)}", file=sys.stderr, flush=True)
            quiet_exit_of_loader_workers()
            status = getattr(e, "exit_status", EXIT_ERROR) if is_user_error(e) else EXIT_ERROR
            return status if isinstance(status, int) and status > 0 else EXIT_ERROR

    return wrapper


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Name ``path`` in a write failure that lacks it: ``f.write`` raises OSError(ENOSPC) without a filename, and
    torch.save only 'unexpected pos' from its zip writer (then the free space says whether the disk is full)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    except RuntimeError as e:
        if not any(m in str(e) for m in _TORCH_WRITE_FAILED):
            raise
        if (cause := next((c for c in _chain(e) if isinstance(c, OSError) and c.errno), None)) is not None:
            # The OS's reason, kept by a torch.save into a file object: a quota is not a disk that looks full.
            raise OSError(cause.errno, cause.strerror, cause.filename or str(path)) from e
        free = shutil.disk_usage(Path(path).parent if Path(path).parent.exists() else ".").free
        if free < 64 * _MIB:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise UserError(f"{path}: could not write it ({_first_line(str(e))}, {free // _MIB} MiB free on its disk); "
                        f"check the disk and rerun") from e
