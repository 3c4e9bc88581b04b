"""A full disk is one line: the path being written, the space free there and about how much the rest needs; the
same command resumes once there is space. Runs `asda prepare` into a small tmpfs mounted for the test (root
only: elsewhere the tmpfs tests are skipped, saying why)."""

import errno
import os
import pickle
import subprocess
import sys

import pytest

from pipelines import disk
from pipelines.cli import main
from pipelines.data.card import load_card
from pipelines.disk import DiskFull, disk_full_message, disk_guard


def test_a_prepare_that_fills_the_disk_says_so_in_one_line_and_resumes_once_there_is_space(
        ray_local, small_disk, tmp_path):
    """`asda prepare` of 96 synthetic clips (12 shards of ~0.5 MB) into a 3 MB tmpfs, in its own process as a
    user types it: exit status 1 and stderr is one line naming the file being written, the space free on the
    tmpfs and about what the rest needs, no traceback. Grown to 16 MB, the same command keeps the shards it
    reported written, makes the rest, and every shard matches its hash."""
    mnt, resize = small_disk
    out = mnt / "out"
    args = ["prepare", "--dataset", "synthetic", "--source", str(tmp_path / "src"), "--out", str(out),
            "--shard-mb", "0.5", "--option", "num_train=96", "--option", "num_valid=0", "--option", "num_test=0"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}

    def asda(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], env=env, capture_output=True,
                              text=True, timeout=240)

    full = asda(*args)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr and len(full.stderr.strip().splitlines()) == 1, full.stderr[-3000:]
    line = full.stderr.strip()
    assert line.startswith(f"asda prepare: error: no space left on device writing {mnt}/.out.staging-"), line
    assert f"free on {mnt}, about " in line and "MB needed for the " in line and "shards not yet written" in line
    assert "run the same command again to continue" in line
    kept = int(line.rsplit("; the ", 1)[1].split(" of 12 shards written are kept")[0])
    assert 0 < kept < 12 and not out.exists()

    resize("16m")
    again = asda(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    card = load_card(out)
    resumed = card["throughput"]["shards_resumed"]  # a task stopped with the run may still have finished its shard
    assert f"resuming: {resumed} of 12 shards are already written" in again.stdout and kept <= resumed < 12
    assert "12 of 12 shards written" in again.stdout and card["num_clips"] == 96
    assert main(["verify", str(out)]) == 0


def test_a_torch_save_that_fills_the_disk_becomes_one_line(small_disk):
    """torch.save's full disk is a RuntimeError without errno ("unexpected pos ..."): on a nearly full file
    system the guard still names it, with the file and the space free."""
    import torch

    mnt, _ = small_disk
    with pytest.raises(DiskFull) as caught, disk_guard(mnt / "checkpoint.pt", advice="free some space"):
        torch.save({"w": torch.zeros(2_000_000)}, mnt / "checkpoint.pt")  # 8 MB into 3 MB
    assert str(caught.value).startswith(f"no space left on device writing {mnt}/checkpoint.pt: ")
    assert f"free on {mnt}; free some space" in str(caught.value)


def test_pyarrows_error_with_its_errno_only_in_the_text_is_a_full_disk(tmp_path):
    """pyarrow may raise OSError("[Errno 28] Error writing bytes to file") with no errno set."""
    with pytest.raises(DiskFull) as caught, disk_guard(tmp_path / "x.parquet", needed=5 * disk.MB,
                                                       rest="the other shards", advice=""):
        raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert caught.value.errno == errno.ENOSPC and caught.value.path == str(tmp_path / "x.parquet")
    assert str(caught.value).endswith(f"free on {disk.mount_point(tmp_path)}, about 5.0 MB needed for the other "
                                      "shards")
    assert caught.value.needed == 5 * disk.MB and caught.value.free == disk.free_bytes(tmp_path)


def test_a_quota_is_named_and_other_errors_pass_through_untouched(tmp_path):
    with pytest.raises(DiskFull, match=r"^disk quota exceeded writing ") as caught, disk_guard(tmp_path):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert caught.value.errno == errno.EDQUOT and caught.value.quota
    with pytest.raises(PermissionError), disk_guard(tmp_path):
        raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(RuntimeError, match="unexpected pos"), disk_guard(tmp_path):
        raise RuntimeError("unexpected pos 640 vs 534")  # torch's failed write, with space free: not a full disk


def test_disk_full_crosses_processes_whole_and_main_prints_it_as_one_line_with_status_1(capsys, monkeypatch):
    """Pickled (a Ray task may raise it) with its path, sizes and errno; `asda` prints its message alone."""
    import pipelines.cli as cli

    error = DiskFull(disk_full_message("/data/out/x", free=3 * disk.MB, needed=disk.MB, rest="the rest"),
                     path="/data/out/x", free=3 * disk.MB, needed=disk.MB, quota=True)
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.path, again.free, again.needed, again.errno) == (
        str(error), "/data/out/x", 3 * disk.MB, disk.MB, errno.EDQUOT)

    def fails(args):
        raise error

    monkeypatch.setattr(cli, "_verify", fails)  # the parser is built at each call, with the function then there
    assert main(["verify", "/data/out"]) == 1
    assert capsys.readouterr().err == (
        "asda verify: error: no space left on device writing /data/out/x: 3.0 MB free on /, about 1.0 MB needed "
        "for the rest; free some space and run the same command again\n")
