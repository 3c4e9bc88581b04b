"""A full disk, said in one line: which path was being written, how much space its file system has free and,
where the writer knows it, about how much the rest of the work needs.

Any writer can use it: wrap the writing in ``disk_guard(path)`` and an out-of-space error (ENOSPC, or EDQUOT
for a quota) becomes ``DiskFull`` with that line as its message, which ``asda``'s ``main`` prints as
``asda <command>: error: <line>`` with exit status 1 (not 2: nothing in the command is wrong; the same command
succeeds once there is space, and `asda prepare` resumes where it stopped). Other errors pass through untouched.
Light on purpose (standard library only): Ray tasks import it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# pyarrow's OSError may carry the errno only in its text ("[Errno 28] Error writing bytes to file"), e.g. when a
# write through a Python file object fails inside Parquet's C++ writer.
_NO_SPACE_TEXT = re.compile(rf"\[errno ({errno.ENOSPC}|{errno.EDQUOT})\]|no space left on device|"
                            r"disk quota exceeded", re.IGNORECASE)
# torch.save says only that its write failed ("unexpected pos 640 vs 534"), with no errno: taken as a full disk
# where the file system it wrote to has (next to) nothing free.
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing|file write failed")
NEARLY_FULL = 16 * 2**20
MB = 2**20  # as --shard-mb counts, and as `df -h` shows sizes


class DiskFull(OSError):
    """Writing ``path`` failed for want of space (``quota``: of the user's quota; errno EDQUOT, else ENOSPC); the
    message is the whole story in one line. ``free``: bytes free on its file system, where that is known;
    ``needed``: about how many bytes the unfinished work needs, where the writer knows."""

    def __init__(self, message: str, path: str | None = None, free: int | None = None,
                 needed: int | None = None, quota: bool = False) -> None:
        super().__init__(message)
        self.errno = errno.EDQUOT if quota else errno.ENOSPC
        self.path, self.free, self.needed, self.quota = path, free, needed, quota

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # pickled whole (a Ray task may raise it), errno included
        return type(self), (self.args[0], self.path, self.free, self.needed, self.quota)


def nearly_full(path: str | Path) -> bool:
    """Whether the file system holding ``path`` has less than NEARLY_FULL free (False where that is unknown)."""
    free = free_bytes(path)
    return free is not None and free < NEARLY_FULL


def says_disk_full(text: str, path: str | Path | None = None) -> bool:
    """Whether an error known only by its text (a Tune trial's error file) is an out-of-space error, as
    ``is_disk_full`` judges an exception: by its errno's words, or torch.save's failed write where ``path`` is
    nearly full."""
    return bool(_NO_SPACE_TEXT.search(text)) or (
        path is not None and bool(_TORCH_WRITE_FAILED.search(text)) and nearly_full(path))


def is_disk_full(exc: BaseException | None, path: str | Path | None = None) -> bool:
    """Whether ``exc``, or an error it was raised from, is an out-of-space (or out-of-quota) error: an OSError by
    its errno or, for pyarrow's, by its text; torch.save's failed write where ``path``'s file system has less than
    NEARLY_FULL free."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and (exc.errno in NO_SPACE or _NO_SPACE_TEXT.search(str(exc))):
            return True
        if path is not None and isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILED.search(str(exc)) \
                and nearly_full(path):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _existing(path: str | Path) -> Path:
    """The nearest folder of ``path`` that exists (the file being written may not exist yet)."""
    here = Path(path).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system that holds ``path``; None where that cannot be known (an object
    store's URI, a path on no mounted file system)."""
    if "://" in str(path):
        return None
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def mount_point(path: str | Path) -> Path:
    """The folder the file system that holds ``path`` is mounted at: what `df` calls it."""
    here = _existing(path)
    while not os.path.ismount(here) and here != here.parent:
        here = here.parent
    return here


def size_text(n: float) -> str:
    """Bytes as a person reads them: "512 KB", "3.9 MB", "1.2 GB" (binary units, as `df -h`)."""
    if n < MB:
        return f"{n / 1024:.0f} KB"
    if n < 1024 * MB:
        return f"{n / MB:.1f} MB"
    return f"{n / (1024 * MB):.1f} GB"


def disk_full_message(path: str | Path, exc: BaseException | None = None, *, needed: int | None = None,
                      rest: str = "the rest", advice: str = "free some space and run the same command again",
                      free: int | None = None) -> str:
    """The one line for a write to ``path`` that ran out of space: what ran out (space, or the quota, from
    ``exc``'s errno), the space free on its file system (``free``, measured now when not given), about how much
    ``rest`` needs (``needed`` bytes, where the writer knows), and what to do (``advice``)."""
    what = "disk quota exceeded" if _is_quota(exc) else "no space left on device"
    line = f"{what} writing {path}"
    free = free_bytes(path) if free is None else free
    if free is not None:
        line += f": {size_text(free)} free on {mount_point(path)}"
    if needed is not None:
        line += f"{',' if free is not None else ':'} about {size_text(needed)} needed for {rest}"
    return f"{line}; {advice}" if advice else line


def _is_quota(exc: BaseException | None) -> bool:
    """Whether an out-of-space error is the user's quota (EDQUOT) rather than the file system's space."""
    return exc is not None and (getattr(exc, "errno", None) == errno.EDQUOT or "quota" in str(exc).lower())


def disk_full(path: str | Path, exc: BaseException | None = None, **message) -> DiskFull:
    """``DiskFull`` for a write to ``path`` that failed with ``exc``, its message from
    ``disk_full_message(path, exc, **message)``."""
    free = message.pop("free", None)
    free = free_bytes(path) if free is None else free
    return DiskFull(disk_full_message(path, exc, free=free, **message), path=str(path), free=free,
                    needed=message.get("needed"), quota=_is_quota(exc))


@contextlib.contextmanager
def disk_guard(path: str | Path, **message) -> Iterator[None]:
    """Within it, an out-of-space error (``is_disk_full``) becomes ``DiskFull`` naming ``path`` (the file or
    folder being written) and the space free there; ``message``: ``disk_full_message``'s keywords (``needed``,
    ``rest``, ``advice``). A ``DiskFull`` from an inner guard passes through as it is, and so does any other
    error."""
    try:
        yield
    except DiskFull:
        raise
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch.save's failed write
        if not is_disk_full(exc, path):
            raise
        raise disk_full(path, exc, **message) from exc
