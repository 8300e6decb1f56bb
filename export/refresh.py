"""Keep an export dir current: redo it only when its source changed or its files were damaged, never
leave it invalid.

``refresh_export(src, out)`` is what tools/export_backbone.py and export/resolve.py ("export beside the run dir")
both do:
- meta.json records what the export came from (for a trained run the checkpoint's path, its sha256, which checkpoint
  and which weights; for a weights file its path and sha256; for published weights the library's name of them).
  When ``out`` holds an export of exactly that, and its files pass load_export's checks, nothing is written ("up to
  date"); when its files are damaged it is exported again ("re-exported: WHY"); when the checkpoint changed (the
  run trained further) or other weights were asked for, it is exported again. An option that does not apply to
  the source's kind is refused either way (export/source.py), never ignored because an export exists.
- A finished run whose checkpoints were removed to save space (its summary.json says it finished, last.pth is
  gone) cannot be hashed or exported again: its export is up to date when meta.json agrees with the summary
  (``export_matches_summary``: the checkpoint's path, final epoch, config and top-1) and its files pass the same
  checks; anything else is an error of one line.
- The new export is written into a sibling ``.NAME.new-PID`` and swapped in by two renames, so ``out`` holds the
  previous valid export until the new one is complete (other files in ``out`` then move from the old one into it).
  A kill between the two renames leaves the previous export in ``.NAME.old-PID``: ``recover`` (run first, every
  time) puts it back; a kill while the other files move leaves some in ``.NAME.old-PID``, which ``recover`` moves
  into ``out`` before removing it; a kill during the export leaves the sibling, which ``recover`` removes with the
  temporary files of interrupted writes.
- One process at a time per export dir (a lock file ``.NAME.lock`` beside it): two started at once (two studies'
  jobs, a detection and a segmentation stage exporting one run) export once; the second waits, then finds it up to
  date. Unlocked, the second's ``recover`` removed the first's sibling mid-write and the first failed.
- SIGTERM, SIGUSR1 and SIGINT during the export stop it at once (there is nothing to save; a signal during the swap
  waits for its two renames), remove the half-written sibling and exit with EXIT_INTERRUPTED (75).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from classification.checkpoint import LAST
from lifecycle.artifacts import fsync_dir, remove_stale_temporaries
from lifecycle.preemption import SIGNALS
from lifecycle.run_lock import waiting_lock
from lifecycle.stop_flag import Preempted

from . import source as sources  # export_source looked up per call: a test replaces it
from .files import EXPORT_FILES, META, verify_export
from .layout import ExportError
from .source import Source, as_source, export_dir_state
from .trained import WEIGHTS, export_matches_summary, finished_summary


def read_meta_quietly(out: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _siblings(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{kind}-*"))


def _move_other_files(src: Path, dst: Path) -> list[str]:
    """Move every entry of ``src`` but an export's own files into ``dst``, unless ``dst`` has that name already.
    Returns the names moved."""
    moved = []
    for entry in sorted(src.iterdir()):
        if entry.name not in EXPORT_FILES and not os.path.lexists(dst / entry.name):
            os.replace(entry, dst / entry.name)
            moved.append(entry.name)
    return moved


def recover(out: Path) -> list[str]:
    """Undo what a killed export left: the previous export back in place if the swap was cut between its two
    renames, other files that had not yet moved from it into the new export moved, half-written siblings and
    temporary files removed. Returns what was done, one line each."""
    done = []
    if not out.exists():
        # An old sibling and no ``out``: the swap was cut between its two renames, and the sibling is the whole
        # previous ``out``, with or without an export in it (a run dir given as --out), so it goes back either way.
        olds = sorted(_siblings(out, "old"), key=lambda old: not (old / META).is_file())  # an export first
        if olds:
            os.replace(olds[0], out)
            done.append(f"restored {out} from {olds[0].name} (an export swap was interrupted)")
    for stale in _siblings(out, "new"):  # only ever export files: the swap moves nothing into it
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"removed {stale}, left by an interrupted export")
    for stale in _siblings(out, "old"):  # may still hold other files of ``out``: they move back before it goes
        if stale.is_dir() and out.is_dir():
            moved = _move_other_files(stale, out)
            if moved:
                done.append(f"moved {', '.join(moved)} from {stale.name} back into {out} (an export swap was "
                            "interrupted)")
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"removed {stale}, left by an interrupted export")
    if out.is_dir():
        done += [f"removed {tmp}, left by an interrupted write" for tmp in remove_stale_temporaries(out)]
    return done


def export_and_swap(source: Source, out: Path, check: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """Export into a sibling dir, ``check`` it there (it raises when the export is wrong), then rename it over
    ``out`` (a directory cannot atomically replace a non-empty one: for the microseconds between the two renames
    ``out`` is absent, and ``recover`` repairs a kill there). Checked before the swap: an export that fails its
    check never becomes ``out``, whose meta.json would make a rerun call it up to date."""
    new, old = out.with_name(f".{out.name}.new-{os.getpid()}"), out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    deferred: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}  # refresh_export's interrupt
    try:
        try:
            meta = sources.export_source(source, new)
            if check is not None:
                check(new)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        for sig in SIGNALS:  # the swap is short and must not be cut: a signal now waits until it is done
            signal.signal(sig, lambda signum, frame: deferred.append(signum))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            # Whatever else lives in ``out`` (a study's stage.log, still being written through an open descriptor,
            # which a rename keeps valid) moves into the new export; only the old export's own files are dropped.
            # It moves after the two renames, from old into the new out, so that at every point where a SIGKILL
            # (which no deferral stops) can land each such file is in ``out`` or in ``old``, the one sibling that
            # ``recover`` empties into ``out`` rather than deletes. Moved first into ``new``, a kill before the
            # second rename lost them with the stale ``new`` that ``recover`` deletes.
            os.replace(out, old)
            os.replace(new, out)
            _move_other_files(old, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(new, out)
        fsync_dir(out.parent)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return meta  # a signal during the swap: the export is complete, nothing is left to redo


def refresh_export(src: Source | str, out: str | Path, *, check: Callable[[Path], Any] | None = None,
                   **options: Any) -> tuple[str, dict[str, Any], list[str]]:
    """Make ``out`` an export of ``src`` (a Source, or a spec and ``identify``'s options: checkpoint, weights,
    variant): (what happened: "up to date" | "exported" | "re-exported" (the source changed) | "re-exported: WHY"
    (the export of this source was damaged), its meta, the repairs ``recover`` made).
    ``check(dir)`` runs on a new export before it replaces ``out``."""
    out = Path(out)

    def interrupt(signum, frame):  # the preemption contract: nothing to save mid-export, the old export stays
        raise Preempted(f"{signal.Signals(signum).name}: export interrupted, {out} unchanged; rerun to export")

    previous = {sig: signal.signal(sig, interrupt) for sig in SIGNALS}  # from the start: hashing takes seconds too
    try:
        return _refresh(src, out, check, options)
    except Preempted as e:
        print(e.message, file=sys.stderr)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_without_checkpoint(src: Source | str, options: dict[str, Any]) -> Path | None:
    """The run dir ``src`` names when it finished (its summary.json says so) and its last.pth was removed to save
    space, and the options ask for its final epoch; else None (identify decides, and names what is wrong)."""
    if isinstance(src, Source) or options.get("variant") is not None or options.get("checkpoint") not in (None, "last"):
        return None
    run_dir = Path(src)
    if (not run_dir.is_dir() or export_dir_state(run_dir) is not None or (run_dir / LAST).exists()
            or options.get("weights") not in (None, *WEIGHTS)):
        return None
    return run_dir if finished_summary(run_dir) is not None else None


def _kept_export(run_dir: Path, out: Path, meta: dict[str, Any] | None, weights: str) -> dict[str, Any]:
    """``out``'s meta where it is an intact export of ``run_dir``'s final ``weights``: with the checkpoint gone it
    cannot be exported again, so anything else is an error (one line), never a silent pass."""
    last = run_dir / LAST
    if meta is None or not export_matches_summary(meta, run_dir, weights):
        what = (f"holds no export of its final {weights} weights" if meta is None else f"holds an export that does "
                f"not match its summary.json (of another run, or not of its final {weights} weights)")
        raise ExportError(f"{last}: no such checkpoint: the run finished (its summary.json says so) but its "
                          f"checkpoints were removed, and {out} {what}; restore {LAST}, or train the run again in "
                          f"another --work-dir")
    try:
        verify_export(out)  # its files too, as for any export called up to date (_refresh_locked)
    except ExportError as e:
        raise ExportError(f"{str(e).split('; ')[0]}; it cannot be exported again since {last} was removed: restore "
                          f"{LAST}, or train the run again in another --work-dir") from None
    return meta


def _refresh(src: Source | str, out: Path, check, options: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    # One process at a time per export dir: another's recover() would delete this one's sibling mid-write. The
    # second waits, then finds the export up to date.
    with waiting_lock(out.with_name(f".{out.name}.lock"), f"{out}: another process is exporting here; waiting for it"):
        return _refresh_locked(src, out, check, options)


def _refresh_locked(src, out: Path, check, options: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    repairs = recover(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; give another --out")
    meta = read_meta_quietly(out)
    if (run_dir := _run_without_checkpoint(src, options)) is not None:
        return "up to date", _kept_export(run_dir, out, meta, options.get("weights") or "raw"), repairs
    source = as_source(src, **options)  # within refresh_export's signal handlers, like the hashing below
    what = "exported" if meta is None else "re-exported"  # no meta.json: nothing, or an incomplete export
    if meta is not None and all(meta.get(k) == v for k, v in source.identity().items()):
        # Its files too, not only meta.json: a damaged file taken for up to date fails every stage that reads it,
        # and their "rerun tools/export_backbone.py" would find it up to date again.
        try:
            verify_export(out)
            return "up to date", meta, repairs
        except ExportError as e:
            what = f"re-exported: {str(e).split('; ')[0]}"  # the file and what is wrong with it, without its fix
    return what, export_and_swap(source, out, check), repairs
