"""Remember that a dataset tree passed its check, so that the next start on the same, unchanged tree is instant.

A pass is stored per (kind, resolved root) with two digests, and reused only while both still match:
- the checker's: the source of datakit/check.py and datakit/files.py and the label spaces it checks against (a
  changed check re-checks);
- the tree's manifest: every entry below the root, sorted, with each file's size, mtime and ctime (ns).
  Names catch added, removed and renamed files; size and mtime catch a rewrite; ctime catches a rewrite whose
  mtime was set back (``cp -p``, ``rsync -a``, ``tar -x`` of an older archive), since no user call sets it.
  Building it stats every file (about a second per 100 k files on a local disk) and opens none.

Where: ``$DATA_CHECK_CACHE``, else ``$XDG_CACHE_HOME/bot-toolkit/data-checks``, else
``~/.cache/bot-toolkit/data-checks`` (beside the mmcv wheel cache). Not inside the dataset: it is often read-only
or shared between users. Not in the run's work dir: one pass must serve every arm, seed and restart, each of
which has its own. ``DATA_CHECK_CACHE=off`` turns it off. Only one process reads and writes it per check (rank 0,
see transfer/data_gate.py), so it need not be on shared storage. A cache that cannot be written costs the next
start a check, never the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from datakit import check as _check
from datakit import files as _files
from datakit.render import ADE20K_NUM_CLASSES, VOC_CLASSES

CACHE_ENV = "DATA_CHECK_CACHE"
FORMAT = 1  # of the manifest and the entry; bump to invalidate every stored pass
# The kinds whose pass is ever looked up: a detection or segmentation stage's start (transfer/data_gate.py). The
# classification trainer checks nothing at its start, so an ImageNet pass would cost a stat of 1.33 M files for nothing.
LOOKED_UP = ("voc", "ade20k")


def cache_dir() -> Path | None:
    """The directory of stored passes, or None when turned off (``DATA_CHECK_CACHE=off``)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bot-toolkit" / "data-checks"


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, a Slurm or container CPU set), not all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def checker_digest() -> str:
    h = hashlib.sha256(f"format {FORMAT}\n{VOC_CLASSES!r}\n{ADE20K_NUM_CLASSES}\n".encode())
    h.update(Path(_check.__file__).read_bytes())
    h.update(Path(_files.__file__).read_bytes())  # what a dataset file is: a changed rule re-checks too
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Manifest:
    digest: str
    entries: int  # files and folders below the root

    @classmethod
    def of(cls, root: str | Path) -> Manifest:
        """Walk ``root`` (following folder links like the loaders do, each folder once: a link loop ends)."""
        h = hashlib.blake2b(digest_size=20)
        entries = 0
        seen: set[tuple[int, int]] = set()
        stack = [("", os.fspath(root))]
        while stack:
            rel, path = stack.pop()
            try:
                st = os.stat(path)
                listing = sorted(os.scandir(path), key=lambda e: e.name)
            except OSError as e:  # missing root, unreadable folder: part of the state, so part of the digest
                h.update(f"{rel}/\t!{e.errno}\n".encode())
                continue
            if (st.st_dev, st.st_ino) in seen:
                h.update(f"{rel}/\tseen\n".encode())
                continue
            seen.add((st.st_dev, st.st_ino))
            lines, subdirs = [], []
            for e in listing:
                name = f"{rel}/{e.name}" if rel else e.name
                try:
                    if e.is_dir():
                        lines.append(f"{name}/")
                        subdirs.append((name, e.path))
                    else:
                        s = e.stat()
                        lines.append(f"{name}\t{s.st_size}\t{s.st_mtime_ns}\t{s.st_ctime_ns}")
                except OSError:  # a dangling link: the checkers will say so
                    lines.append(f"{name}\t?")
            entries += len(lines)
            h.update(("\n".join(lines) + "\n").encode(errors="surrogateescape"))
            stack.extend(reversed(subdirs))
        return cls(h.hexdigest(), entries)


def _entry_path(kind: str, root: str | Path) -> Path | None:
    base = cache_dir()
    if base is None:
        return None
    key = hashlib.sha256(f"{kind}\0{Path(root).resolve()}".encode(errors="surrogateescape")).hexdigest()[:24]
    return base / f"{kind}-{key}.json"


def lookup(kind: str, root: str | Path, manifest: Manifest) -> dict | None:
    """The stored pass of this tree if its checker and manifest still match, else None."""
    path = _entry_path(kind, root)
    if path is None:
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: check again
        return None
    if entry.get("checker") == checker_digest() and entry.get("manifest") == manifest.digest:
        return entry
    return None


def remembered(kind: str) -> bool:
    """Whether a pass of ``kind`` is worth a manifest: it is looked up, and the cache is on."""
    return kind in LOOKED_UP and cache_dir() is not None


def forget(kind: str, root: str | Path) -> None:
    """Drop the stored pass of this tree: a later, deeper check (``--full``) found a problem in the same unchanged
    tree, so the next start must not skip its check on the strength of the earlier pass."""
    path = _entry_path(kind, root)
    if path is not None:
        try:
            path.unlink(missing_ok=True)
        except OSError:  # a cache that cannot be written: nothing to forget that could be read back either
            pass


def record(kind: str, root: str | Path, manifest: Manifest, report: _check.Report, seconds: float) -> Path | None:
    """Store a pass (atomically: a reader sees the old entry or the new one). Returns where, or None if it could
    not be written (read-only home, full disk): the run goes on, the next start checks again."""
    if report.problems:
        return None
    path = _entry_path(kind, root)
    if path is None:
        return None
    entry = dict(kind=kind, root=str(Path(root).resolve()), checker=checker_digest(), manifest=manifest.digest,
                 entries=manifest.entries, files=report.files, depth="full" if report.full else "headers",
                 seconds=round(seconds, 3), checked_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return None
    return path


@dataclass(frozen=True)
class Outcome:
    problems: list[str]
    files: int
    cached: bool  # True: the tree is unchanged since a stored pass, nothing was opened
    seconds: float
    note: str  # one line for the log


def check_once(kind: str, root: str | Path, *, jobs: int | None = None) -> Outcome:
    """Structure and headers of ``root``, unless an unchanged tree already passed (a stage start calls this)."""
    t0 = time.perf_counter()
    manifest = Manifest.of(root)
    hit = lookup(kind, root, manifest)
    if hit is not None:
        seconds = time.perf_counter() - t0
        note = (f"data check: {root} unchanged since it passed on {hit['checked_at']} ({hit['files']} files, "
                f"{hit['depth']}): skipped in {seconds:.1f} s")
        return Outcome([], hit["files"], True, seconds, note)
    jobs = jobs if jobs is not None else min(8, usable_cpus())
    rep = _check.check(kind, root, jobs=jobs)
    seconds = time.perf_counter() - t0
    stored = record(kind, root, manifest, rep, seconds)
    if rep.problems:
        forget(kind, root)
    note = f"data check: {root}: {rep.files} files, structure and headers, in {seconds:.1f} s"
    if not rep.problems:
        note += (f"; remembered in {stored}" if stored else "; could not be remembered (cache dir not writable)")
        note += f" (tools/check_data.py {kind} {root} --full decodes every image)"
    return Outcome(rep.problems, rep.files, False, seconds, note)
