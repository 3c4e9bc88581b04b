"""`asda prepare`: audio as users have it -> fbank Parquet shards and a dataset card, in parallel on Ray Data.

The adapter indexes the source (no decoding) and the index is cut into shards of consecutive clips: which clips
a shard holds depends only on the data and ``shard_mb``, never on the cluster. Ray Data runs one task per shard
on whichever node has a free core; the task decodes, resamples and computes the log-mel features of its clips and
writes its Parquet file straight to the output's storage (a local or network-mounted folder, or a URI pyarrow
knows: ``file://``, ``s3://``, ...), hashing the bytes as they are written. A shard is finished when its record
(``_progress/shard-NNNNN.json``: rows, bytes, hash, rejected clips, counts, timings) exists; the record is written
after the shard is complete, so a shard cut short never counts.

Completeness, two ways:
- On a filesystem that renames atomically (local and POSIX network mounts, ``file://``), everything is written
  into a staging folder next to the output, named after the run's fingerprint (data set, source, options, clip
  index, shard size, code version), and the staging folder is renamed into place when everything, the card
  included, is complete: an interrupted run never leaves something that looks finished.
- An object store has no rename: shards are written in place and the card is written last. Readers require the
  card (``load_card``), so an unfinished output is refused as "not a prepared data set".
Either way, running the same command again after an interruption keeps every finished shard and makes only the
others, and the card is the same as an uninterrupted run's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from model.features import FEATURE_SETTINGS, NUM_MEL_BINS, SAMPLE_RATE

from ..disk import DiskFull, disk_full, disk_guard
from ..runtime import code_version, ensure_ray
from . import storage
from .adapters import GENERIC_TARGET_LENGTH, DatasetIndex, build_index
from .card import (
    CARD_NAME,
    CROP_QUANTILE,
    HASH,
    LONGEST,
    MAX_PADDING,
    cropped_share,
    fit_split,
    fitted_length,
    frames_quantile,
    length_limits,
    padded_share,
    split_frames,
)

# 3: shards cut from the index (resumable), the card's throughput per node; 4: the clips' frame counts per split
# (a shard record of 3 lacks them, so a run of 4 does not resume from it). Cards of 3 still load.
SCHEMA_VERSION = 4
PROGRESS_DIR = "_progress"  # one record per finished shard, and the plan they belong to
TMP_DIR = "_tmp"  # shards being written, where the filesystem renames atomically
PLAN_NAME = "plan.json"
BYTES_PER_FRAME = NUM_MEL_BINS * 2  # float16
# A small data set is still cut into this many shards, so that it is made in parallel; never below MIN_SHARD_ROWS.
MIN_SHARDS, MIN_SHARD_ROWS = 32, 64
CLIP_ORDER_SEED = 0  # the shuffled order clips are stored in (see clip_order)
ROW_GROUP_ROWS = 64  # rows per Parquet row group: ~16 MB of 10 s clips
STAGES = ("decode", "resample", "fbank", "float16", "parquet")
RESUME = "free some space and run the same command again to continue"


class RejectedClip(Exception):
    """A clip that cannot become features; the message is the reason recorded in the card."""


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("path", pa.string()), ("split", pa.string()), ("fold", pa.int64()),
        ("labels", pa.list_(pa.int64())), ("event_start", pa.float64()), ("event_end", pa.float64()),
        ("frames", pa.int64()), ("fbank", pa.binary()), ("sample_rate", pa.int64()), ("duration", pa.float64()),
        ("fbank_sum", pa.float64()), ("fbank_sumsq", pa.float64()),
    ])


def clip_features(path: str, timings: dict[str, float] | None = None) -> tuple[np.ndarray, int, float]:
    """Decode one file and compute its raw log-mel features: (frames x 128 float32, sample rate, seconds).

    Raises RejectedClip with a reason for anything a data set should not contain. ``timings`` (stage -> seconds)
    accumulates the time spent decoding, resampling and computing the filterbank.
    """
    from model.features import kaldi_log_mel

    timings = timings if timings is not None else defaultdict(float)
    wav, rate, seconds = decode(path, timings)
    started = time.perf_counter()
    try:
        feats = kaldi_log_mel(wav)
    except ValueError as exc:  # e.g. shorter than one 25 ms frame
        raise RejectedClip(str(exc)) from None
    finally:
        timings["fbank"] += time.perf_counter() - started
    if feats.shape[0] == 0:
        raise RejectedClip("no feature frames")
    feats = feats.numpy()
    if not np.isfinite(feats).all():
        raise RejectedClip("non-finite features")
    return feats, rate, seconds


def decode(path: str, timings: dict[str, float] | None = None):
    """One file's audio as (1, samples) mono 16 kHz float32 torch, its sample rate and its seconds; RejectedClip
    with the reason for a file that cannot be opened or decoded, is empty or holds NaN or inf."""
    import soundfile as sf
    import torch

    from model.features import mono_16k

    timings = timings if timings is not None else defaultdict(float)
    start = time.perf_counter()
    problem = _unopenable(path)
    if problem:
        raise RejectedClip(problem)
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise RejectedClip(f"cannot decode: {exc}") from None
    if data.size == 0:
        raise RejectedClip("empty: no audio samples")
    if not np.isfinite(data).all():
        raise RejectedClip("non-finite samples (NaN or inf)")
    decoded = time.perf_counter()
    timings["decode"] += decoded - start
    wav = mono_16k(torch.from_numpy(np.ascontiguousarray(data.T)), rate)
    timings["resample"] += time.perf_counter() - decoded
    return wav, int(rate), data.shape[0] / rate


def _unopenable(path: str) -> str | None:
    """Why a file cannot even be opened (soundfile would only say "System error"), or None."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if os.path.islink(path):
            return f"a dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        return f"cannot open: {exc.strerror}"
    if not os.access(path, os.R_OK):
        return "cannot open: permission denied"
    return None


# --- one shard: the Ray Data task ----------------------------------------------------------------------------

class _HashingSink:
    """A write-only file that hashes every byte on its way to ``raw``: the card's content hash without reading
    the finished shard again."""

    def __init__(self, raw) -> None:
        self.raw, self.digest, self.size, self.closed = raw, hashlib.new(HASH), 0, False

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        self.raw.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _record_name(index: int) -> str:
    return f"{PROGRESS_DIR}/shard-{index:05d}.json"


def write_shard(table, fs, path: str) -> tuple[int, str]:
    """Write ``table`` as one Parquet file with page checksums; returns (bytes, content hash), hashed while
    writing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open_output_stream(path) as raw:
        sink = _HashingSink(raw)
        # Page checksums: every read verifies each page (pyarrow's page_checksum_verification).
        with pq.ParquetWriter(pa.PythonFile(sink, mode="w"), table.schema, write_page_checksum=True) as writer:
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    return sink.size, sink.digest.hexdigest()


def stored_features(feats: np.ndarray) -> tuple[bytes, int, float, float]:
    """(float16 bytes, frames, sum, sum of squares) of a clip's features as the shard stores them; the sums are
    of the float16 values, for the card's mean/std. In torch on this thread: numpy's float16 cast is slower, and
    its dot product goes through a multi-threaded BLAS that stalls when the cores are busy."""
    import torch

    half = torch.from_numpy(feats).half()
    wide = half.double()
    return half.numpy().tobytes(), half.shape[0], float(wide.sum()), float((wide * wide).sum())


def make_shard(spec: dict[str, Any], *, fs, work: str, atomic: bool, run: str) -> dict[str, Any]:
    """Ray Data task: one shard's clips in, the shard written to ``work`` and its record out (also written, last,
    to ``work/_progress``). Rejected clips leave the shard and are listed in the record."""
    import pyarrow as pa
    import ray
    import torch

    began, cpu = time.time(), time.process_time()
    torch.set_num_threads(1)  # one task per core; intra-op threads only fight the other tasks
    clips = json.loads(spec["clips"])
    timings: dict[str, float] = defaultdict(float)
    columns: dict[str, list] = {name: [] for name in _schema().names}
    rejected: list[dict] = []
    summary = _Summary()
    audio_seconds = 0.0
    for clip in clips:
        try:
            feats, rate, seconds = clip_features(clip["path"], timings)
        except RejectedClip as exc:
            rejected.append({"path": clip["path"], "reason": str(exc)})
            continue
        start = time.perf_counter()
        fbank, frames, total, total_sq = stored_features(feats)
        timings["float16"] += time.perf_counter() - start
        for key in ("id", "path", "split", "fold", "labels", "event_start", "event_end"):
            columns[key].append(clip[key])
        columns["frames"].append(frames)
        columns["fbank"].append(fbank)
        columns["sample_rate"].append(rate)
        columns["duration"].append(seconds)
        columns["fbank_sum"].append(total)
        columns["fbank_sumsq"].append(total_sq)
        summary.add(clip["split"], clip["fold"], clip["labels"], frames, total, total_sq)
        audio_seconds += seconds
    start = time.perf_counter()
    record = {"shard": int(spec["shard"]), "file": None, "rows": len(columns["id"]), "bytes": 0, HASH: None}
    if record["rows"]:
        record["file"] = shard_name(record["shard"])
    table = pa.table(columns, schema=_schema()) if record["rows"] else None
    try:
        if table is not None:
            _write_table(table, record, fs=fs, work=work, atomic=atomic)
        timings["parquet"] += time.perf_counter() - start
        context = ray.get_runtime_context()
        record.update(
            rejected=rejected, summary=summary.to_json(), clips=record["rows"], audio_seconds=audio_seconds,
            run=run, node_id=context.get_node_id(), node_ip=ray.util.get_node_ip_address(), pid=os.getpid(),
            started=began, finished=time.time(), cpu_seconds=round(time.process_time() - cpu, 4),
            stages={k: round(timings[k], 4) for k in STAGES},
        )
        path = f"{work}/{_record_name(record['shard'])}"
        with disk_guard(path):
            storage.write_text(fs, path, json.dumps(record))
    except DiskFull as exc:
        return _out_of_space(exc, record, table, fs=fs, work=work)
    return {"record": json.dumps(record), "disk_full": ""}


def _write_table(table, record: dict, *, fs, work: str, atomic: bool) -> None:
    """Write the shard's file (its size and hash into ``record``). Where the filesystem renames, it is written
    under a temporary name and renamed, so a half-written file never has the shard's name; an object store shows
    an object only once it is complete. A write that fails or is cancelled leaves no partial file behind: on a
    full disk that space is the user's again."""
    target = f"{work}/{record['file']}"
    path = f"{work}/{TMP_DIR}/{record['file']}.{uuid.uuid4().hex[:8]}" if atomic else target
    try:
        with disk_guard(path):
            record["bytes"], record[HASH] = write_shard(table, fs, path)
    except BaseException:  # also Ray's cancel (KeyboardInterrupt) once another task found the disk full
        _remove(fs, path)
        raise
    if atomic:
        fs.move(path, target)


def _out_of_space(exc: DiskFull, record: dict, table, *, fs, work: str) -> dict[str, str]:
    """The task's row for a shard that did not fit (the path, whether it was a quota, the shard's clips and
    about its bytes: the table's): a shard whose record could not be written does not count, so its file goes
    too (its space is free for the next run, which makes it again). The driver stops the run on this row and says
    so in one line (``_no_space``); raising instead would reach it as Ray's wrapped traceback."""
    if record["file"]:
        _remove(fs, f"{work}/{record['file']}")
    return {"record": "", "disk_full": json.dumps({
        "path": exc.path, "quota": exc.errno == errno.EDQUOT, "clips": record["rows"],
        "bytes": table.nbytes if table is not None else 0})}


def _remove(fs, path: str) -> None:
    """Delete ``path`` if it is there; cleaning up after a failed write must not hide that failure."""
    try:
        fs.delete_file(path)
    except OSError:
        pass


class _Summary:
    """What the card counts, per shard: clips per split, fold and class, clips per split and frame count, and the
    float16 sums of each split."""

    def __init__(self, data: dict | None = None) -> None:
        data = data or {}
        self.splits: dict[str, int] = data.get("splits", {})
        self.folds: dict[str, dict[str, int]] = data.get("folds", {})
        self.classes: dict[str, dict[str, int]] = data.get("classes", {})
        self.sums: dict[str, list[float]] = data.get("sums", {})  # split -> [values, sum, sum of squares]
        self.frames: dict[str, dict[str, int]] = data.get("frame_counts", {})  # split -> {str(frames): clips}

    def add(self, split: str, fold: int, labels: list[int], frames: int, total: float, total_sq: float) -> None:
        self.splits[split] = self.splits.get(split, 0) + 1
        if fold:
            per_split = self.folds.setdefault(split, {})
            per_split[str(fold)] = per_split.get(str(fold), 0) + 1
        counts = self.classes.setdefault(split, {})
        for label in labels:
            counts[str(label)] = counts.get(str(label), 0) + 1
        lengths = self.frames.setdefault(split, {})
        lengths[str(frames)] = lengths.get(str(frames), 0) + 1
        sums = self.sums.setdefault(split, [0.0, 0.0, 0.0])
        sums[0] += frames * NUM_MEL_BINS
        sums[1] += total
        sums[2] += total_sq

    def to_json(self) -> dict:
        return {"splits": self.splits, "folds": self.folds, "classes": self.classes, "sums": self.sums,
                "frame_counts": self.frames}


# --- the plan: shards cut from the index ---------------------------------------------------------------------

def _clip_rows(index: DatasetIndex) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id, "path": c.path, "split": c.split, "fold": c.fold, "labels": list(c.labels),
            "event_start": c.event[0] if c.event else math.nan,
            "event_end": c.event[1] if c.event else math.nan,
        }
        for c in index.clips
    ]


def clip_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The index in a fixed shuffled order (seed CLIP_ORDER_SEED), the order shards are cut in: a layout sorted by
    class (Speech Commands' folder per keyword) would otherwise give shards of one class, which no shard-order
    shuffle or local shuffle buffer mixes back. Fixed, so a resumed run cuts the same shards."""
    order = np.random.default_rng(CLIP_ORDER_SEED).permutation(len(rows))
    return [rows[i] for i in order]


def shard_rows(num_clips: int, target_length: int, shard_mb: float) -> int:
    """Clips per shard: about ``shard_mb`` of float16 features at the data set's typical length (~1 s of audio per
    100 frames), and a small data set cut into at least MIN_SHARDS shards (of at least MIN_SHARD_ROWS clips) so
    that it is made in parallel. Depends on the data only, so a resumed run cuts the same shards."""
    by_size = max(1, int(shard_mb * 2**20 // (target_length * BYTES_PER_FRAME)))
    return min(by_size, max(MIN_SHARD_ROWS, -(-num_clips // MIN_SHARDS)))


def _fingerprint(dataset: str, source: str, options: dict, rows: list[dict], per_shard: int) -> str:
    """What makes two runs the same run: a resumed run reuses shards only under the same fingerprint."""
    digest = hashlib.sha256()
    head = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "source": source, "options": options,
            "rows_per_shard": per_shard, "features": FEATURE_SETTINGS, "code_version": code_version()}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()


def _read_record(fs, work: str, index: int) -> dict | None:
    """A shard's record, if the shard is finished: the record is complete and its file has the recorded size."""
    import pyarrow.fs as pafs

    try:
        text = storage.read_text(fs, f"{work}/{_record_name(index)}")
        record = json.loads(text) if text is not None else None
    except (OSError, ValueError):
        return None
    if record is None or record.get("shard") != index:
        return None
    if record["rows"]:
        info = fs.get_file_info(f"{work}/{record['file']}")
        if info.type != pafs.FileType.File or info.size != record["bytes"]:
            return None
    return record


# --- the run -------------------------------------------------------------------------------------------------

def prepare(
    dataset: str,
    source: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    shard_mb: float = 128.0,
    max_rejected: float = 0.5,
    options: dict[str, Any] | None = None,
    in_place: bool | None = None,
    target_length: int | None = None,
) -> dict:
    """Prepare ``source`` (a ``dataset`` layout) into ``out`` (a folder or a URI); returns the dataset card.

    ``in_place``: write the shards straight into ``out`` and the card last, instead of staging and renaming;
    default: only where the filesystem cannot rename atomically (object stores).
    ``target_length``: the frames per clip the card tells readers to feed (a positive multiple of 16); default:
    the data set's own, or for a folder or manifest fitted to its clips (``card.fitted_length``). It changes the
    card only, never the shards, so it is not in the run's fingerprint: a resumed run keeps its shards.
    """
    from .card import read_card

    _check_arguments(target_length, max_rejected, shard_mb)
    out = storage.normalise(out)
    fs, out_path = storage.filesystem(out)
    existing = read_card(fs, out_path)
    if existing is not None and not force:
        kept = (f"; it is fed at {existing['target_length']} frames"
                if target_length not in (None, existing["target_length"]) else "")
        print(f"{out} is already prepared{kept} (use --force to redo it)")
        return existing
    started = time.time()
    with disk_guard(source):  # the synthetic set is generated into its source
        index = build_index(dataset, source, **(options or {}))  # bad layouts fail here, before Ray starts
    if not index.clips:
        raise ValueError(f"{dataset} source {source} has no usable clips: "
                         f"{rejection_report(index.rejected, fs, out_path)}")

    rows = clip_order(_clip_rows(index))
    # A length fitted later, or given, never changes the shards: they are sized for the layout's own length.
    per_shard = shard_rows(len(rows), index.target_length or GENERIC_TARGET_LENGTH, shard_mb)
    plan = [rows[i:i + per_shard] for i in range(0, len(rows), per_shard)]
    fingerprint = _fingerprint(dataset, str(Path(source).resolve()), options or {}, rows, per_shard)
    in_place = not storage.renames_atomically(fs) if in_place is None else in_place
    parent, name = out_path.rstrip("/").rsplit("/", 1) if "/" in out_path.rstrip("/") else ("", out_path)
    work = out_path if in_place else f"{parent}/.{name}.staging-{fingerprint[:12]}"
    with disk_guard(work, advice=RESUME):  # the driver's own writes: the plan, the card, the rejected list
        _start_work(fs, work, fingerprint, len(plan), in_place=in_place, existing=existing is not None, out=out)
        run = uuid.uuid4().hex[:12]
        records = _all_shards(fs, work, plan, in_place=in_place, run=run)
        card = _card(index, dataset, source, records, time.time() - started, run, target_length)
        _finish(card, max_rejected, fs, work, out_path, in_place)
    _report(card)
    return card


def _finish(card: dict, max_rejected: float, fs, work: str, out_path: str, in_place: bool) -> None:
    """Check the rejections, write the card (the last thing written: its presence marks a finished output) and,
    where the output was staged, rename it into place."""
    _check_rejected(card, max_rejected, fs, work, in_place, out_path)
    if not in_place:
        fs.delete_dir(f"{work}/{TMP_DIR}")
    storage.write_text(fs, f"{work}/{CARD_NAME}", json.dumps(card, indent=2))
    if not in_place:
        _replace(fs, work, out_path)
    fs.delete_dir(f"{out_path}/{PROGRESS_DIR}")


def _check_arguments(target_length: int | None, max_rejected: float, shard_mb: float) -> None:
    """prepare's settings, checked before anything is read or started."""
    if target_length is not None and (isinstance(target_length, bool) or not isinstance(target_length, int)
                                      or target_length < 16 or target_length % 16):
        raise ValueError(f"target_length={target_length!r} is not allowed: expected a positive multiple of 16 "
                         "frames (whole patches; 100 frames = 1 s)")
    if not 0.0 <= max_rejected <= 1.0:
        raise ValueError(f"max_rejected={max_rejected!r} is not allowed: expected a share in [0, 1]")
    if shard_mb <= 0:
        raise ValueError(f"shard_mb={shard_mb!r} is not allowed: expected a positive size in MB")


def _all_shards(fs, work: str, plan: list[list[dict]], *, in_place: bool, run: str) -> list[dict]:
    """Every shard's record, in plan order: the ones an interrupted run finished are kept, the rest made now."""
    done = {i: r for i in range(len(plan)) if (r := _read_record(fs, work, i)) is not None}
    todo = [i for i in range(len(plan)) if i not in done]
    if done:
        print(f"resuming: {len(done)} of {len(plan)} shards are already written ({work}); making the other "
              f"{len(todo)}")
    full = None
    try:
        if todo:
            made, full = _make_shards(fs, work, plan, todo, atomic=not in_place, run=run)
            done.update(made)
    except (Exception, KeyboardInterrupt):
        print(f"interrupted: the finished shards stay in {work}; run the same command again to continue")
        raise
    if full is not None:
        raise _no_space(full, fs, work, plan)
    return [done[i] for i in range(len(plan))]


def _no_space(full: dict, fs, work: str, plan: list[list[dict]]) -> DiskFull:
    """The error for a run that stopped because a shard task found no space (``full``: its row): the path, the
    space free there now, about how much the shards not yet written need (at the written shards' bytes per clip,
    or before any is written the failed shard's) and that the same command resumes, keeping the shards written."""
    written = {i: r for i in range(len(plan)) if (r := _read_record(fs, work, i)) is not None}
    rest = [i for i in range(len(plan)) if i not in written]
    clips = sum(r["clips"] for r in written.values())
    size = sum(r["bytes"] for r in written.values())
    if not clips:
        clips, size = full["clips"], full["bytes"]
    needed = round(size / clips * sum(len(plan[i]) for i in rest)) if clips else None
    cause = OSError(errno.EDQUOT if full["quota"] else errno.ENOSPC, "")
    kept = f"; the {len(written)} of {len(plan)} shards written are kept" if written else ""
    return disk_full(full["path"], cause, needed=needed, rest=f"the {len(rest)} shards not yet written",
                     advice=RESUME + kept)


def _check_rejected(card: dict, max_rejected: float, fs, work: str, in_place: bool, out_path: str) -> None:
    """Too many rejected clips: the work is discarded (the same data would fail the same way) and an error says
    how many and why (``rejection_report``)."""
    rejected = card["rejected"]
    total = card["num_clips"] + len(rejected)
    share = len(rejected) / total if total else 1.0
    if card["num_clips"] == 0 or share > max_rejected:
        _discard(fs, work, in_place)
        raise ValueError(f"{len(rejected)} of {total} clips rejected ({share:.0%} > allowed {max_rejected:.0%}, "
                         f"--max-rejected): {rejection_report(rejected, fs, out_path)}")


def reason_kind(reason: str) -> str:
    """A rejection's reason without what names one clip (its line, ids, numbers, quoted values, details after a
    colon), so that reasons can be counted: "line 7: unknown split 'dev'" -> "unknown split …"."""
    text = re.sub(r"^line \d+: ", "", reason).split(": ")[0]
    text = re.sub(r"\(.*?\)|'[^']*'|\S*\d\S*", "…", text)
    return " ".join(text.split())


def rejection_report(rejected: list[dict], fs, out_path: str, first: int = 5) -> str:
    """Why clips were rejected, for an error: counts by reason, the first few paths with theirs, and the file
    (written here, next to the output: ``<out>.rejected.json``) that holds every one."""
    listing = f"{out_path.rstrip('/')}.rejected.json"
    storage.write_text(fs, listing, json.dumps(rejected, indent=1))
    kinds: dict[str, int] = {}
    for r in rejected:
        kinds[reason_kind(r["reason"])] = kinds.get(reason_kind(r["reason"]), 0) + 1
    by_reason = "; ".join(f"{n} x {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    shown = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:first])
    return f"{len(rejected)} rejected ({by_reason}); first: {shown}; every one with its reason: {listing}"


def _start_work(fs, work: str, fingerprint: str, shards: int, *, in_place: bool, existing: bool, out) -> None:
    """Make the working folder ready: keep what an interrupted run of the same plan wrote, clear anything else."""
    import pyarrow.fs as pafs

    plan_path = f"{work}/{PROGRESS_DIR}/{PLAN_NAME}"
    text = storage.read_text(fs, plan_path) if fs.get_file_info(work).type != pafs.FileType.NotFound else None
    same = text is not None and json.loads(text).get("fingerprint") == fingerprint
    if in_place:
        if existing:  # --force: from now on the output no longer looks finished
            fs.delete_file(f"{work}/{CARD_NAME}")
        if not same and fs.get_file_info(work).type != pafs.FileType.NotFound:
            if text is None and not existing and fs.get_file_info(pafs.FileSelector(work, recursive=False)):
                raise ValueError(f"{out} holds files but no prepared data set: choose an empty location")
            fs.delete_dir_contents(work, missing_dir_ok=True)
    elif not same:
        fs.delete_dir_contents(work, missing_dir_ok=True)
    fs.create_dir(f"{work}/{PROGRESS_DIR}")
    if not in_place:
        fs.delete_dir_contents(f"{work}/{TMP_DIR}", missing_dir_ok=True)  # partial shards of a killed run
        fs.create_dir(f"{work}/{TMP_DIR}")
    if not same:
        storage.write_text(fs, plan_path, json.dumps({"fingerprint": fingerprint, "shards": shards}))


def _discard(fs, work: str, in_place: bool) -> None:
    if in_place:
        fs.delete_dir_contents(work, missing_dir_ok=True)
    else:
        fs.delete_dir(work)


def task_cpus(ray) -> float:
    """Ray CPUs per shard task, so that one task runs per core: a local instance advertises more logical CPUs
    than the machine has cores (``runtime.local_num_cpus``); a cluster's nodes advertise their cores."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1:
        logical = nodes[0].get("Resources", {}).get("CPU", 1.0)
        return max(1.0, logical / (os.cpu_count() or 1))
    return 1.0


def _make_shards(fs, work: str, plan: list[list[dict]], todo: list[int], *, atomic: bool,
                 run: str) -> tuple[dict, dict | None]:
    """Run one Ray Data task per shard in ``todo``; returns their records by shard and, where a task found no
    space for its shard, that task's report (the run stops there). Prints progress: the shards of the plan whose
    record is written, counted in ``_progress`` (the rows reach this loop later than the tasks finish)."""
    ray = ensure_ray()
    specs = [{"shard": i, "clips": json.dumps(plan[i])} for i in todo]
    ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    ds = ds.map(make_shard, fn_kwargs=dict(fs=fs, work=work, atomic=atomic, run=run), num_cpus=task_cpus(ray))
    records: dict[int, dict] = {}
    full = None
    shown = time.time()
    for row in ds.iter_rows():
        if row["disk_full"]:
            full = json.loads(row["disk_full"])
            break
        record = json.loads(row["record"])
        records[record["shard"]] = record
        if time.time() - shown > 30 or len(records) == len(todo):
            shown = time.time()
            print(f"  {_written(fs, work)} of {len(plan)} shards written")
    del ds  # stopped early: dropping the dataset shuts its executor down, which cancels the tasks still running
    return records, full


def _written(fs, work: str) -> int:
    """How many shards have their record in ``work/_progress``: the shards finished, by this run or before."""
    import pyarrow.fs as pafs

    listing = fs.get_file_info(pafs.FileSelector(f"{work}/{PROGRESS_DIR}"))
    return sum(bool(re.fullmatch(r"shard-\d+\.json", info.base_name)) for info in listing)


def _replace(fs, staging: str, out: str) -> None:
    """Swap the finished staging folder in; a previous result is removed only after the new one is in place."""
    import pyarrow.fs as pafs

    if fs.get_file_info(out).type != pafs.FileType.NotFound:
        parent, name = out.rsplit("/", 1)
        old = f"{parent}/.{name}.old-{uuid.uuid4().hex[:8]}"
        fs.move(out, old)
        fs.move(staging, out)
        fs.delete_dir(old)
    else:
        fs.move(staging, out)


def throughput(records: list[dict], run: str) -> dict:
    """Clips/s and audio-seconds/s per node: each node's clips over the time it spent on them (its first task's
    start to its last task's end, per run that made shards there). ``this_run`` counts only ``run``'s shards."""
    spans: dict[tuple[str, str], list[float]] = {}
    nodes: dict[str, dict[str, Any]] = {}
    stages = dict.fromkeys(STAGES, 0.0)
    for r in records:
        node = nodes.setdefault(r["node_id"], {"node_ip": r["node_ip"], "node_id": r["node_id"], "shards": 0,
                                               "clips": 0, "audio_seconds": 0.0, "task_seconds": 0.0,
                                               "task_cpu_seconds": 0.0})
        node["shards"] += 1
        node["clips"] += r["clips"]
        node["audio_seconds"] += r["audio_seconds"]
        node["task_seconds"] += r["finished"] - r["started"]
        node["task_cpu_seconds"] += r["cpu_seconds"]
        span = spans.setdefault((r["run"], r["node_id"]), [r["started"], r["finished"]])
        span[0], span[1] = min(span[0], r["started"]), max(span[1], r["finished"])
        for stage in STAGES:
            stages[stage] += r["stages"][stage]
    for (_, node_id), (first, last) in spans.items():
        nodes[node_id]["seconds"] = nodes[node_id].get("seconds", 0.0) + (last - first)
    listed = []
    for node in sorted(nodes.values(), key=lambda n: (n["node_ip"], n["node_id"])):
        seconds = max(node["seconds"], 1e-9)
        listed.append({**node, "seconds": round(seconds, 3), "audio_seconds": round(node["audio_seconds"], 3),
                       "task_seconds": round(node["task_seconds"], 3),
                       "task_cpu_seconds": round(node["task_cpu_seconds"], 3),
                       "clips_per_s": round(node["clips"] / seconds, 2),
                       "audio_seconds_per_s": round(node["audio_seconds"] / seconds, 2)})
    return {"nodes": listed, "shards_this_run": sum(r["run"] == run for r in records),
            "shards_resumed": sum(r["run"] != run for r in records),
            "stage_seconds": {k: round(v, 3) for k, v in stages.items()}}


def _merged_summaries(records: list[dict], num_classes: int) -> tuple[dict, dict, dict, dict, dict]:
    """The shards' summaries added up: (clips per split, frame counts per split, clips per split and class, clips
    per split and fold, the float16 sums per split)."""
    splits: dict[str, int] = {}
    frame_counts: dict[str, dict[str, int]] = {}
    class_counts: dict[str, list[int]] = {}
    folds: dict[str, dict[str, int]] = {}
    sums: dict[str, list[float]] = {}
    for record in records:
        summary = _Summary(record["summary"])
        for split, n in summary.splits.items():
            splits[split] = splits.get(split, 0) + n
        for split, per_fold in summary.folds.items():
            for fold, n in per_fold.items():
                folds.setdefault(split, {})[fold] = folds.setdefault(split, {}).get(fold, 0) + n
        for split, per_class in summary.classes.items():
            counts = class_counts.setdefault(split, [0] * num_classes)
            for label, n in per_class.items():
                counts[int(label)] += n
        for split, values in summary.sums.items():
            acc = sums.setdefault(split, [0.0, 0.0, 0.0])
            for k in range(3):
                acc[k] += values[k]
        for split, per_length in summary.frames.items():
            counts = frame_counts.setdefault(split, {})
            for frames, n in per_length.items():
                counts[frames] = counts.get(frames, 0) + n
    return splits, frame_counts, class_counts, folds, sums


def _card(index: DatasetIndex, dataset: str, source, records: list[dict], seconds: float, run: str,
          target_length: int | None = None) -> dict:
    """The dataset card, from the shards' records alone (no shard is read again). ``target_length``: the one
    given to prepare; None: the data set's, or fitted to the frame counts."""
    splits, frame_counts, class_counts, folds, sums = _merged_summaries(records, len(index.class_names))
    frame_counts = {k: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for k, v in sorted(frame_counts.items())}
    length, length_from = _fed_length(target_length, index.target_length, frame_counts)
    stats_split = "train" if any(c.split == "train" for c in index.clips) else None
    chosen = [sums[stats_split]] if stats_split in sums else ([] if stats_split else list(sums.values()))
    n, total, total_sq = (sum(v[k] for v in chosen) for k in range(3))
    mean = total / n if n else 0.0
    std = math.sqrt(max(total_sq / n - mean**2, 0.0)) if n else 1.0
    norm_mean, norm_std, norm_source = (*index.stats, "published") if index.stats else (
        mean, std, f"{stats_split or 'all'} split")
    rejected = list(index.rejected) + [r for record in records for r in record["rejected"]]
    return {
        "schema_version": SCHEMA_VERSION,
        "name": index.name,
        "dataset": dataset,
        "source": str(Path(source).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "prepare_seconds": round(seconds, 2),
        "num_clips": sum(splits.values()),
        "splits": dict(sorted(splits.items())),
        "class_names": index.class_names,
        "class_counts": dict(sorted(class_counts.items())),
        "folds": {k: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for k, v in sorted(folds.items())},
        "multilabel": index.multilabel,
        "target_length": length,
        "target_length_from": length_from,
        "frame_counts": frame_counts,
        "stats": {"mean": mean, "std": std, "computed_from": f"{stats_split or 'all'} split, unpadded frames"},
        "normalisation": {"mean": norm_mean, "std": norm_std, "source": norm_source},
        "features": {**FEATURE_SETTINGS, "resample_to": SAMPLE_RATE, "dc_removal": True, "mono": "mean of channels",
                     "storage": "float16 bytes, row-major (frames, num_mel_bins)"},
        "clip_order": f"shuffled with seed {CLIP_ORDER_SEED}: every shard is a random sample of the data set",
        "shards": [{"file": r["file"], "rows": r["rows"], "bytes": r["bytes"], HASH: r[HASH]}
                   for r in records if r["rows"]],
        "throughput": throughput(records, run),
        "rejected": rejected,
    }


def _fed_length(given: int | None, own: int | None, frame_counts: dict) -> tuple[int, str]:
    """(the card's target_length, where it comes from): "given" (prepare's target_length), "dataset" (the
    layout's own), or "fitted" (card.fitted_length over the train split's frame counts, every split's where
    there is no train)."""
    if given is not None:
        return given, "given"
    if own is not None:
        return own, "dataset"
    lengths = {"frame_counts": frame_counts}  # as the card will hold them
    return fitted_length(split_frames(lengths, fit_split(lengths))), "fitted"


def _report(card: dict) -> None:
    """Per node: clips/s and audio-seconds/s of the shards it made; the clips' lengths and the one they are fed
    at."""
    t = card["throughput"]
    resumed = f", {t['shards_resumed']} kept from an interrupted run" if t["shards_resumed"] else ""
    print(f"prepared {card['num_clips']} clips in {len(card['shards'])} shard(s) in {card['prepare_seconds']:.1f} s"
          f"{resumed}")
    for node in t["nodes"]:
        print(f"  node {node['node_ip']} ({node['node_id'][:8]}): {node['shards']} shards, {node['clips']} clips "
              f"in {node['seconds']:.1f} s = {node['clips_per_s']:.1f} clips/s, "
              f"{node['audio_seconds_per_s']:.1f} audio-s/s")
    split = fit_split(card)
    counts = split_frames(card, split)
    if not counts:
        return
    length = card["target_length"]
    q = {p: frames_quantile(counts, p) for p in (0.25, 0.5, 0.75, CROP_QUANTILE)}
    print(f"clip length ({split or 'all splits'}, frames): min {min(counts)}, 25 % {q[0.25]}, median {q[0.5]}, "
          f"75 % {q[0.75]}, 90 % {q[CROP_QUANTILE]}, max {max(counts)}")
    why = {"given": "--target-length", "dataset": "the data set's"}.get(card.get("target_length_from"))
    print(f"fed at {length} frames ({why or _why_fitted(counts, length)}; {_percent(padded_share(counts, length))} "
          f"of fed frames are padding, {_percent(cropped_share(counts, length))} of clips cropped)")


def _percent(share: float) -> str:
    return f"{100 * share:.0f} %"


def _why_fitted(counts: dict[int, int], length: int) -> str:
    """Which limit of ``card.fitted_length`` chose ``length``, in words."""
    cut, pad = length_limits(counts)
    p90 = f"the 90th percentile, {frames_quantile(counts, CROP_QUANTILE)}"
    if length == cut:
        return f"derived: {p90}, rounded up to whole patches"
    if length == LONGEST:
        return f"derived: the longest allowed, AudioSet's 10 s; {p90}, is longer"
    if length == pad and padded_share(counts, pad) <= MAX_PADDING:
        return f"derived: the longest that pads at most {_percent(MAX_PADDING)} of fed frames; {p90}, pads more"
    if cut < length:
        return f"derived: the shortest allowed, 8 patch columns; {p90}, is shorter"
    return f"derived: the shortest allowed, 8 patch columns, though it pads more than {_percent(MAX_PADDING)}"
