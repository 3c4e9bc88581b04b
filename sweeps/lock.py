"""One sweep at a time in a sweep's folder: the second run of a grid (same checkout, same storage) refuses at once,
naming the first's pid and command, instead of training every trial twice and interleaving the two sweeps'
records. The lock is an OS file lock (``flock``), so it goes with its process: a sweep killed outright leaves a
folder the next run takes over, saying whose it was."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOCK_SUFFIX = ".lock"  # beside the sweep's folder: it is taken before the folder exists


class SweepBusy(ValueError):
    """Another running sweep holds the folder (a ValueError: the command refuses it with exit status 2)."""


@contextlib.contextmanager
def sweep_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock (``<folder>.lock`` beside it) for the life of the block; SweepBusy, naming the holder,
    if a live process has it."""
    folder = Path(folder)
    path = folder.with_name(folder.name + LOCK_SUFFIX)
    made = [d for d in [path.parent, *path.parent.parents] if not d.exists()]  # removed again if left unused
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    fh = open(path, "r+")  # noqa: SIM115  held open for the lock's life
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = fh.read().strip() or "a process that has not written its name yet"
        fh.close()
        raise SweepBusy(f"sweep folder {folder} is in use by a running sweep ({holder}): wait for it to finish, "
                        f"stop it (Ctrl-C; it can be resumed), or run this grid as a new sweep with --fresh") from None
    previous = fh.read().strip()
    if previous:
        print(f"  lock       taking over {path.name} from {previous}, which is no longer running", flush=True)
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}: {' '.join(sys.argv)}")
    fh.flush()
    try:
        yield
    finally:
        fh.seek(0)
        fh.truncate()
        fh.flush()
        if not folder.exists():  # refused before the sweep began (bad data): leave no trace of it
            path.unlink(missing_ok=True)
            for d in made:
                with contextlib.suppress(OSError):
                    d.rmdir()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
