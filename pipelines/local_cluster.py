"""`make ray-down`: stop exactly the Ray cluster `make ray-up` started on this machine, and no other Ray process.

`ray stop` stops every Ray process of the machine, other users' local instances included. `make ray-up` starts its
nodes with a mark in their environment (``ASDA_RAY_UP=<temp dir>/ray-up-<port>``), which every process of that
cluster inherits (GCS, raylets of the head and the extra nodes, dashboard and its helpers, agents, workers), and
writes the mark to ``<mark>.record``; only the processes that carry it are stopped: SIGTERM, then SIGKILL for what
is left after a grace period.

    python -m pipelines.local_cluster stop /tmp/ray/ray-up-6379.record
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

GRACE_S = 10.0
MARK = "ASDA_RAY_UP"


def marked_processes(mark: str) -> list[int]:
    """The pids (not this process) started with ``ASDA_RAY_UP=<mark>`` in their environment (only this user's
    processes can be read, so only this user's are found), and their descendants: a child that renames itself
    (the dashboard's modules set their process title, which overwrites the environment /proc shows) is still the
    cluster's."""
    wanted = f"{MARK}={mark}".encode()
    marked, parents = set(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                marked.add(pid)
        except (OSError, ValueError, IndexError):
            continue
    found = set(marked)
    grew = True
    while grew:  # every process whose parent is the cluster's
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def stop(record: Path) -> list[int]:
    """Stop the cluster whose mark ``record`` holds (``make ray-up`` wrote it); returns the pids stopped. A missing
    record is a clear error: nothing of this machine is stopped on a guess."""
    if not record.is_file():
        raise FileNotFoundError(f"{record} is not there: no cluster that `make ray-up` started with these RAY_PORT "
                                f"and RAY_TEMP_DIR is running (nothing stopped)")
    pids = marked_processes(record.read_text().strip())
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in (p for p in pids if _alive(p)):
        _signal(pid, signal.SIGKILL)
    current = record.parent / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(":" + record.stem.rsplit("-", 1)[-1]):
        current.unlink(missing_ok=True)  # the file names this cluster's GCS port: it is gone now
    record.unlink(missing_ok=True)
    return pids


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"  # a zombie has exited; its parent has not reaped it yet


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "stop":
        sys.exit("usage: python -m pipelines.local_cluster stop RECORD")
    try:
        stopped = stop(Path(sys.argv[2]))
    except FileNotFoundError as exc:
        sys.exit(f"make ray-down: {exc}")
    print(f"stopped the cluster of {sys.argv[2]}: {len(stopped)} process(es); other Ray processes left running")
