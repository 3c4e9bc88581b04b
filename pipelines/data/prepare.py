"""`asda prepare`: audio as users have it -> fbank Parquet shards and a dataset card, in parallel on Ray Data.

The adapter indexes the source (no decoding), Ray Data decodes, resamples and computes the log-mel features of
every clip, and the shards are written into a staging folder that is renamed into place only when everything,
the card included, is complete: an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from model.features import FEATURE_SETTINGS, NUM_MEL_BINS, SAMPLE_RATE

from ..runtime import code_version, ensure_ray
from .adapters import DatasetIndex, build_index
from .card import CARD_NAME, HASH, file_hash, load_card

SCHEMA_VERSION = 2  # 2: page checksums in every shard, a content hash per shard in the card
REJECTED_DIR = "_rejected"
BYTES_PER_FRAME = NUM_MEL_BINS * 2  # float16


class RejectedClip(Exception):
    """A clip that cannot become features; the message is the reason recorded in the card."""


def clip_features(path: str) -> tuple[np.ndarray, int, float]:
    """Decode one file and compute its raw log-mel features: (frames x 128 float32, sample rate, seconds).

    Raises RejectedClip with a reason for anything a data set should not contain.
    """
    import soundfile as sf
    import torch

    from model.features import log_mel

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
    try:
        feats = log_mel(torch.from_numpy(np.ascontiguousarray(data.T)), rate)
    except ValueError as exc:  # e.g. shorter than one 25 ms frame
        raise RejectedClip(str(exc)) from None
    if feats.shape[0] == 0:
        raise RejectedClip("no feature frames")
    feats = feats.numpy()
    if not np.isfinite(feats).all():
        raise RejectedClip("non-finite features")
    return feats, int(rate), data.shape[0] / rate


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


def extract_batch(batch: dict[str, np.ndarray], rejected_dir: str) -> dict[str, list]:
    """Ray Data batch function: index rows in, feature rows out. Rejected clips leave the batch and are written
    as a small JSON file into the staging folder (a side channel that works on every node of a shared store)."""
    out: dict[str, list] = {k: [] for k in (
        "id", "path", "split", "fold", "labels", "event_start", "event_end",
        "frames", "fbank", "sample_rate", "duration", "fbank_sum", "fbank_sumsq")}
    rejected = []
    for i, path in enumerate(batch["path"]):
        try:
            feats, rate, seconds = clip_features(str(path))
        except RejectedClip as exc:
            rejected.append({"path": str(path), "reason": str(exc)})
            continue
        for key in ("id", "path", "split", "fold", "event_start", "event_end"):
            out[key].append(_python(batch[key][i]))
        out["labels"].append([int(x) for x in batch["labels"][i]])
        half = feats.astype(np.float16)
        out["frames"].append(feats.shape[0])
        out["fbank"].append(half.tobytes())
        out["sample_rate"].append(rate)
        out["duration"].append(seconds)
        # Statistics of what the shards hold (float16), for the card's mean/std.
        stored = half.astype(np.float64)
        out["fbank_sum"].append(float(stored.sum()))
        out["fbank_sumsq"].append(float(np.square(stored).sum()))
    if rejected:
        Path(rejected_dir, f"{uuid.uuid4().hex}.json").write_text(json.dumps(rejected))
    return out


def _python(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _index_rows(index: DatasetIndex) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id, "path": c.path, "split": c.split, "fold": c.fold, "labels": list(c.labels),
            "event_start": c.event[0] if c.event else math.nan,
            "event_end": c.event[1] if c.event else math.nan,
        }
        for c in index.clips
    ]


def prepare(
    dataset: str,
    source: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    shard_mb: float = 128.0,
    max_rejected: float = 0.5,
    options: dict[str, Any] | None = None,
) -> dict:
    """Prepare ``source`` (a ``dataset`` layout) into ``out``; returns the dataset card."""
    out = Path(out).resolve()
    if (out / CARD_NAME).is_file() and not force:
        print(f"{out} is already prepared (use --force to redo it)")
        return load_card(out)
    if not 0.0 <= max_rejected <= 1.0:
        raise ValueError(f"max_rejected={max_rejected!r} is not allowed: expected a share in [0, 1]")
    if shard_mb <= 0:
        raise ValueError(f"shard_mb={shard_mb!r} is not allowed: expected a positive size in MB")
    started = time.time()
    index = build_index(dataset, source, **(options or {}))  # bad layouts fail here, before Ray starts
    if not index.clips:
        raise ValueError(f"{dataset} source {source} has no usable clips ({len(index.rejected)} rejected)")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    rejected_dir = staging / REJECTED_DIR
    rejected_dir.mkdir(parents=True)
    try:
        ray = ensure_ray()
        # ~1 s of audio per 100 frames; size shards from the data set's typical clip length.
        rows_per_shard = max(1, int(shard_mb * 2**20 // (index.target_length * BYTES_PER_FRAME)))
        ds = ray.data.from_items(_index_rows(index), override_num_blocks=min(len(index.clips), 200))
        ds = ds.map_batches(extract_batch, fn_kwargs={"rejected_dir": str(rejected_dir)},
                            batch_size=16, batch_format="numpy")
        # Page checksums: every read verifies each page (pyarrow's page_checksum_verification).
        ds.write_parquet(str(staging), min_rows_per_file=rows_per_shard, max_rows_per_file=rows_per_shard,
                         write_page_checksum=True)
        rejected = list(index.rejected)
        for part in sorted(rejected_dir.glob("*.json")):
            rejected.extend(json.loads(part.read_text()))
        shutil.rmtree(rejected_dir)
        card = _card(index, dataset, source, staging, rejected, time.time() - started)
        total = card["num_clips"] + len(rejected)
        share = len(rejected) / total if total else 1.0
        if card["num_clips"] == 0 or share > max_rejected:
            reasons = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:5])
            raise ValueError(
                f"{len(rejected)} of {total} clips rejected ({share:.0%} > allowed {max_rejected:.0%}); "
                f"first: {reasons}"
            )
        (staging / CARD_NAME).write_text(json.dumps(card, indent=2))
        _replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return card


def _replace(staging: Path, out: Path) -> None:
    """Swap the finished staging folder in; a previous result is removed only after the new one is in place."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def _card(index: DatasetIndex, dataset: str, source, folder: Path, rejected: list[dict], seconds: float) -> dict:
    import pyarrow.parquet as pq

    shards = sorted(folder.glob("*.parquet"))
    columns = ["split", "fold", "labels", "frames", "fbank_sum", "fbank_sumsq"]
    splits: dict[str, int] = {}
    class_counts: dict[str, list[int]] = {}
    folds: dict[str, dict[str, int]] = {}
    sums = {"n": 0.0, "sum": 0.0, "sumsq": 0.0}
    stats_split = "train" if any(c.split == "train" for c in index.clips) else None
    rows = []
    # Shard by shard, in batches, the per-clip sums only (never the fbank): memory does not grow with the data set.
    for shard in shards:
        reader = pq.ParquetFile(shard, page_checksum_verification=True)
        rows.append(reader.metadata.num_rows)
        for batch in reader.iter_batches(batch_size=4096, columns=columns):
            data = batch.to_pydict()
            for split, fold, labels, frames, s, s2 in zip(*(data[c] for c in columns), strict=True):
                splits[split] = splits.get(split, 0) + 1
                if fold:
                    per_split = folds.setdefault(split, {})
                    per_split[str(fold)] = per_split.get(str(fold), 0) + 1
                counts = class_counts.setdefault(split, [0] * len(index.class_names))
                for label in labels:
                    counts[label] += 1
                if stats_split is None or split == stats_split:
                    sums["n"] += frames * NUM_MEL_BINS
                    sums["sum"] += s
                    sums["sumsq"] += s2
    mean = sums["sum"] / sums["n"] if sums["n"] else 0.0
    std = math.sqrt(max(sums["sumsq"] / sums["n"] - mean**2, 0.0)) if sums["n"] else 1.0
    norm_mean, norm_std, norm_source = (*index.stats, "published") if index.stats else (
        mean, std, f"{stats_split or 'all'} split")
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
        "target_length": index.target_length,
        "stats": {"mean": mean, "std": std, "computed_from": f"{stats_split or 'all'} split, unpadded frames"},
        "normalisation": {"mean": norm_mean, "std": norm_std, "source": norm_source},
        "features": {**FEATURE_SETTINGS, "resample_to": SAMPLE_RATE, "dc_removal": True, "mono": "mean of channels",
                     "storage": "float16 bytes, row-major (frames, num_mel_bins)"},
        "shards": [{"file": s.name, "rows": n, "bytes": s.stat().st_size, HASH: file_hash(s)}
                   for s, n in zip(shards, rows, strict=True)],
        "rejected": rejected,
    }
