"""The feed: a prepared folder's split as a Ray Dataset of model-ready batches, for Ray Train workers.

    ds = feed_dataset(prepared, "train", target_length=256, labels="none")
    TorchTrainer(..., datasets={"train": ds})
    # in the worker:
    for batch in iter_torch(ray.train.get_dataset_shard("train"), batch_size=16, seed=epoch):
        batch["fbank"]  # (B, target_length, 128) float32, normalised with the card's statistics

``read_clips`` gives the same arrays without Ray, for figures and small checks; evaluation computes its outputs
on Ray Data (``pipelines.inference``), so no process holds a whole split.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import storage
from .card import HASH, file_hash, load_card

LabelMode = Literal["index", "multihot", "none"]
_READ_COLUMNS = ["id", "split", "fold", "labels", "frames", "fbank", "event_start", "event_end"]
DATA_TASK_CPUS = 0.25  # decoding float16 rows is light; whole CPUs would starve beside Train workers and trials
# At most this many read or decode tasks of one feed per Train worker run at once. One task turns a block of 64
# float16 clips into model rows far faster than a worker trains on them, and every concurrent task is a Ray worker
# process to start (~3 s of CPU each): left unbounded, a small run spends more CPU starting processes than training.
DATA_TASKS_PER_WORKER = 2


def verify_shards(prepared: str | Path, card: dict | None = None) -> list[Path | str]:
    """Every shard the card lists exists, has its recorded size, a readable Parquet footer, its row count and
    (cards since schema 2) its content hash; else an error that names the shard. Reading is verified again page by
    page (Parquet page checksums), so a shard that changes after this check cannot be read silently either.
    ``prepared``: a folder or a URI (``file://``, ``s3://``, ...); returns the shards as paths or URIs."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    prepared = storage.normalise(prepared)
    fs, base = storage.filesystem(prepared)
    card = card or load_card(prepared)
    paths = []
    for shard in card["shards"]:
        path = storage.join(prepared, shard["file"])
        inside = f"{base}/{shard['file']}"
        redo = f"; re-run `asda prepare --force` for {prepared}"
        info = fs.get_file_info(inside)
        if info.type != pafs.FileType.File:
            raise ValueError(f"shard {path} is missing{redo}")
        if info.size != shard["bytes"]:
            raise ValueError(f"corrupt shard {path}: {info.size} bytes, card says {shard['bytes']}{redo}")
        try:
            with fs.open_input_file(inside) as fh:
                rows = pq.ParquetFile(fh).metadata.num_rows
        except Exception as exc:
            raise ValueError(f"corrupt shard {path}: {exc}{redo}") from None
        if rows != shard["rows"]:
            raise ValueError(f"corrupt shard {path}: {rows} rows, card says {shard['rows']}{redo}")
        if HASH in shard and _content_hash(fs, inside, info) != shard[HASH]:
            raise ValueError(f"corrupt shard {path}: its {HASH} differs from the card's (same size, changed "
                             f"content){redo}")
        paths.append(path)
    return paths


_hashed: dict[tuple[str, str, int, int], str] = {}  # (filesystem, path, size, mtime_ns) -> hash, for this process


def _content_hash(fs, path: str, info) -> str:
    """A shard's content hash, read once per process while the file is unchanged: a run checks its data before
    it starts, again when its feed is built and once per split it evaluates on."""
    key = (fs.type_name, path, info.size, info.mtime_ns or 0)
    if key not in _hashed:
        _hashed[key] = file_hash(path, fs=fs)
    return _hashed[key]


def check_splits(card: dict, split: str | Sequence[str]) -> list[str]:
    """``split`` (one name or several) as a list, every name one the card has; else an error naming those it has."""
    splits = [split] if isinstance(split, str) else list(split)
    unknown = [s for s in splits if s not in card["splits"]]
    if unknown:
        raise ValueError(f"split {unknown} not in the prepared data set; it has {sorted(card['splits'])}")
    return splits


def check_labels(card: dict, labels: str) -> None:
    """``labels`` is a mode this data set can give (``index`` only for single-label sets)."""
    if labels not in ("index", "multihot", "none"):
        raise ValueError(f"labels={labels!r} is not allowed: expected 'index', 'multihot' or 'none'")
    if labels == "index" and card["multilabel"]:
        raise ValueError(f"{card['name']} is multi-label: use labels='multihot'")


# Class-balanced sampling (AudioSet-2M fine-tuning). The release draws each epoch's clips from a weights file: a
# class weighs 1000 / (its clip count + 0.01), a clip the sum of its classes' weights, and each epoch takes
# num_samples (200,000) clips in proportion to those weights, without replacement. Here a pass keeps clip i with
# probability min(1, c * w_i), c set so that a pass keeps ``per_pass`` clips on average: at most once per pass, rare
# classes nearly always, as in the release's draw. Each pass reads the whole split and decodes only what it keeps.
BALANCE_NUMERATOR, BALANCE_EPS = 1000.0, 0.01


@dataclass(frozen=True)
class BalancedDraw:
    """Class-balanced passes over a split: ``passes`` passes of about ``per_pass`` clips each."""

    per_pass: int
    passes: int

    def __post_init__(self) -> None:
        if self.per_pass < 1 or self.passes < 1:
            raise ValueError(f"{self} is not allowed: per_pass and passes must be >= 1")


def class_weights(class_counts: Sequence[int]) -> np.ndarray:
    """(C,) the weight of one label of each class: 1000 / (count + 0.01)."""
    return BALANCE_NUMERATOR / (np.asarray(class_counts, dtype=np.float64) + BALANCE_EPS)


def clip_weights(labels: Sequence[Sequence[int]], weights: np.ndarray) -> np.ndarray:
    """(N,) a clip's sampling weight: the sum of its labels' class weights."""
    return np.array([weights[np.asarray(ls, dtype=np.int64)].sum() for ls in labels], dtype=np.float64)


def inclusion_scale(weights: np.ndarray, per_pass: int) -> float:
    """The c with sum_i min(1, c * w_i) = per_pass (every clip, c = inf, once per_pass >= N)."""
    if per_pass >= len(weights):
        return float("inf")
    low, high = 0.0, per_pass / weights.min()  # at high every clip is kept: the sum is N > per_pass
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if np.minimum(1.0, mid * weights).sum() < per_pass else (low, mid)
    return high


def balanced_keep(ids: Sequence[str], labels: Sequence[Sequence[int]], *, weights: np.ndarray, scale: float,
                  seed: int, pass_index: int) -> np.ndarray:
    """(n,) bool: the clips pass ``pass_index`` keeps. Seeded per clip, pass and run seed, so a pass keeps the same
    clips whatever order rows arrive in."""
    keep_prob = np.minimum(1.0, scale * clip_weights(labels, weights))
    draws = np.array([np.random.default_rng([seed, pass_index, zlib.crc32(str(i).encode())]).random() for i in ids])
    return draws < keep_prob


def split_labels(prepared: str | Path, split: str | Sequence[str], folds: Iterable[int] | None = None) -> list:
    """The labels of every clip of ``split`` (and ``folds``), read on this process (labels column only)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    prepared = storage.normalise(prepared)
    card = load_card(prepared)
    splits = check_splits(card, split)
    labels = []
    for shard in verify_shards(prepared, card):
        table = pq.read_table(shard, columns=["split", "fold", "labels"], page_checksum_verification=True)
        keep = pc.is_in(table["split"], value_set=pa.array(splits))
        if folds is not None:
            keep = pc.and_(keep, pc.is_in(table["fold"], value_set=pa.array([int(f) for f in folds])))
        labels.extend(table.filter(keep)["labels"].to_pylist())
    return labels


def _keep_balanced(batch: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    keep = balanced_keep(batch["id"], batch["labels"], **kwargs)
    return {k: v[keep] for k, v in batch.items()}


def to_model_batch(
    batch: dict[str, np.ndarray],
    *,
    mean: float,
    std: float,
    target_length: int,
    num_classes: int,
    num_mel_bins: int = 128,
    labels: LabelMode = "index",
    random_crop: bool = False,
    seed: int = 0,
    noise_snrs: Sequence[float] = (),
) -> dict[str, np.ndarray]:
    """Decode float16 fbank rows, crop (random or from the start) or zero-pad to ``target_length``, normalise.

    Returns "fbank" (n, target_length, 128) float32, plus "label" (n,) int64 or (n, C) float32 unless
    labels="none", plus "event" (n, 2) seconds (NaN where unknown), "frames" (n,) int64 (the clip's own frames at
    the start of its row, the rest padding) and "id". With ``noise_snrs``, also "noisy" (L, n, target_length, 128):
    each clip with seeded white noise added at each SNR in dB (``add_noise``), cropped, padded and normalised alike.
    """
    n = len(batch["id"])
    fbank = np.zeros((n, target_length, num_mel_bins), dtype=np.float32)  # zeros = padding, before normalising
    noisy = np.zeros((len(noise_snrs), n, target_length, num_mel_bins), dtype=np.float32)
    own = np.zeros(n, dtype=np.int64)
    for i in range(n):
        frames = int(batch["frames"][i])
        raw = batch["fbank"][i]
        if len(raw) != frames * num_mel_bins * 2:
            where = f" in shard {batch['path'][i]}" if "path" in batch else ""
            raise ValueError(f"corrupt row {batch['id'][i]!r}{where}: {len(raw)} bytes for {frames} frames")
        feats = np.frombuffer(raw, dtype=np.float16).reshape(frames, num_mel_bins)
        start = 0
        if random_crop and frames > target_length:
            # Seeded per clip so that a run is reproducible whatever the order rows arrive in.
            rng = np.random.default_rng([seed, zlib.crc32(str(batch["id"][i]).encode())])
            start = int(rng.integers(0, frames - target_length + 1))
        crop = feats[start:start + target_length]
        fbank[i, : crop.shape[0]] = crop
        own[i] = crop.shape[0]
        if len(noise_snrs):
            noise = noise_log_mel(frames, str(batch["id"][i]), seed)
            for level, snr in enumerate(noise_snrs):
                noisy[level, i, : crop.shape[0]] = add_noise(feats, noise, snr)[start:start + target_length]
    out: dict[str, Any] = {"fbank": (fbank - mean) / (2 * std), "id": np.asarray(batch["id"], dtype=object),
                           "frames": own,
                           **({"noisy": (noisy - mean) / (2 * std)} if len(noise_snrs) else {}),
                           "event": np.stack([np.asarray(batch["event_start"], dtype=np.float32),
                                              np.asarray(batch["event_end"], dtype=np.float32)], axis=1)}
    if labels == "index":
        out["label"] = np.array([int(ls[0]) for ls in batch["labels"]], dtype=np.int64)
    elif labels == "multihot":
        hot = np.zeros((n, num_classes), dtype=np.float32)
        for i, ls in enumerate(batch["labels"]):
            hot[i, np.asarray(ls, dtype=np.int64)] = 1.0
        out["label"] = hot
    return out


def noise_log_mel(frames: int, key: str, seed: int = 0) -> np.ndarray:
    """(frames, 128) raw log-mel of white Gaussian noise just long enough for ``frames`` Kaldi frames, seeded by
    ``seed`` and ``key`` (the clip's id): the same noise for a clip at every SNR and in every run."""
    import torch

    from model.features import kaldi_log_mel

    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    samples = 160 * (frames - 1) + 400  # Kaldi's frame count: 1 + (samples − 400) // 160
    return kaldi_log_mel(torch.from_numpy(rng.standard_normal(samples).astype(np.float32)).unsqueeze(0)).numpy()


def add_noise(feats: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """The raw log-mel of a clip with noise added at ``snr_db``, in the mel power domain where independent sounds
    add (in expectation, as their waveforms would): log(P_clip + g·P_noise), g setting the clip's total mel power
    over the noise's to 10^(snr/10)."""
    clip, other = np.exp(feats.astype(np.float64)), np.exp(noise.astype(np.float64))
    gain = clip.sum() / (other.sum() * 10 ** (snr_db / 10))
    return np.log(clip + gain * other).astype(np.float32)


def feed_dataset(
    prepared: str | Path,
    split: str | Sequence[str],
    *,
    target_length: int | None = None,
    labels: LabelMode = "index",
    random_crop: bool = True,
    seed: int = 0,
    folds: Iterable[int] | None = None,
    workers: int = 1,
    balanced: BalancedDraw | None = None,
    clips: int | None = None,
):
    """A Ray Dataset of model-ready rows for ``split`` (one name or several) of a prepared folder.

    target_length defaults to the card's; ``folds`` keeps only those folds (ESC-50 cross-validation);
    ``workers`` (the Train workers it feeds) bounds the concurrent tasks to ``DATA_TASKS_PER_WORKER`` each;
    ``clips``: how many clips the run draws (updates x batch x workers): the dataset is then enough passes over
    the split for them, one after the other, each reading the shards in its own seeded order (see
    ``shard_order``); ``balanced`` makes it that many class-balanced passes instead (see ``BalancedDraw``).
    """
    import ray.data

    from ..runtime import ensure_ray

    prepared = storage.normalise(prepared)
    card = load_card(prepared)
    splits = check_splits(card, split)
    check_labels(card, labels)
    shards = verify_shards(prepared, card)
    ensure_ray()  # before Ray Data starts a default instance whose CPU count would starve the reads
    tasks = DATA_TASKS_PER_WORKER * max(1, workers)

    read = dict(card=card, shards=shards, splits=splits, folds=folds, seed=seed, tasks=tasks)
    ds = (_plain_passes(clips=clips, **read) if balanced is None else
          _balanced_passes(balanced, prepared=prepared, **read))
    norm = card["normalisation"]
    ds = ds.map_batches(
        _feed_batch, batch_format="numpy", batch_size=64, num_cpus=DATA_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=tasks),
        fn_kwargs=dict(mean=norm["mean"], std=norm["std"], target_length=target_length or card["target_length"],
                       num_classes=len(card["class_names"]), num_mel_bins=card["features"]["num_mel_bins"],
                       labels=labels, random_crop=random_crop, seed=seed),
    )
    # Rows arrive in each pass's shard order whatever task finishes first: with the seeded local shuffle and
    # seeded crops, a run is reproducible.
    ds.context.execution_options.preserve_order = True
    return ds


def shard_order(count: int, seed: int, pass_index: int) -> list[int]:
    """The order in which pass ``pass_index`` of a run seeded ``seed`` reads a data set's ``count`` shards: a
    seeded permutation, a different one every pass. Together with clips stored in a shuffled order (``asda
    prepare`` writes them so: every shard is a random sample of the data set) and the local shuffle buffer, each
    pass mixes clips across the whole data set, not only within the few shards the buffer spans."""
    return np.random.default_rng([seed, pass_index, count]).permutation(count).tolist()


def split_rows(card: dict, splits: Sequence[str], folds: Iterable[int] | None = None) -> int:
    """Clips in ``splits`` (and ``folds``), from the card's counts."""
    return sum(card["splits"][s] if folds is None else
               sum(card.get("folds", {}).get(s, {}).get(str(f), 0) for f in folds) for s in splits)


def passes_for(clips: int | None, rows: int) -> int:
    """Passes over a split of ``rows`` clips that a run drawing ``clips`` needs: one more than they fill, for the
    batches a pass drops at its end and a split that folds make smaller (a run that still runs out reads the
    passes again, with the next epoch's local shuffle)."""
    if clips is None or rows <= 0:
        return 1
    return math.ceil(clips / rows) + 1


def _pass_rows(shards: list, seed: int, passes: Iterable[int], **read):
    """Every shard once per pass, each pass in its own order (``shard_order``), one pass after the other."""
    return read_rows(shards=[shards[i] for k in passes for i in shard_order(len(shards), seed, k)], **read)


def _plain_passes(*, card: dict, shards: list, splits: list[str], folds, seed: int, tasks: int,
                  clips: int | None):
    """Enough passes for ``clips`` in one read, so they come in sequence (a union would interleave them)."""
    rows = split_rows(card, splits, folds)
    return _pass_rows(shards, seed, range(passes_for(clips, rows)), splits=splits, folds=folds, tasks=tasks)


def _balanced_passes(balanced: BalancedDraw, *, prepared, card: dict, shards: list, splits: list[str], folds,
                     seed: int, tasks: int):
    """``balanced.passes`` class-balanced passes, each drawn with its own pass index."""
    clip_labels = split_labels(prepared, splits, folds)
    counts = np.bincount(np.concatenate([np.asarray(ls, dtype=np.int64) for ls in clip_labels]),
                         minlength=len(card["class_names"]))
    weights = class_weights(counts)
    keep = dict(weights=weights, scale=inclusion_scale(clip_weights(clip_labels, weights), balanced.per_pass),
                seed=seed)
    passes = [_pass_rows(shards, seed, [k], splits=splits, folds=folds, tasks=tasks)
              .map_batches(_keep_balanced, batch_format="numpy", num_cpus=DATA_TASK_CPUS,
                           fn_kwargs={**keep, "pass_index": k})
              for k in range(balanced.passes)]
    # With order preserved, a union takes a block from each pass in turn: deterministic, the passes interleaved.
    return passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]


def read_rows(*, shards: list[Path], splits: list[str], folds: Iterable[int] | None, tasks: int,
              columns: Sequence[str] = tuple(_READ_COLUMNS)):
    """The raw rows (``columns``, and "split") of ``splits`` (and ``folds``), read from the shards in the order given
    by ``tasks`` tasks; without a "path" column of the shard's own, each row's "path" is its shard's."""
    import ray.data
    from ray.data.expressions import col

    # ``tasks`` read tasks, each reading its run of the shards in order: a count the run's settings fix, never one
    # Ray Data derives from the CPUs it expects (that count sets where blocks split, and so what the seeded local
    # shuffle buffer draws from, and would differ between machines). Fewer, longer tasks also feed faster than
    # one per shard: 300 batches of 8 in 2.0 s, against 7.4 s one task per shard and 4.3 s as Ray Data sizes it.
    count = min(tasks, len(shards))
    with _classic_parquet_path():
        ds = ray.data.read_parquet([str(s) for s in shards], columns=list(dict.fromkeys([*columns, "split"])),
                                   include_paths="path" not in columns,
                                   num_cpus=DATA_TASK_CPUS, concurrency=count, override_num_blocks=count,
                                   dataset_kwargs={"page_checksum_verification": True})
    ds = ds.filter(expr=col("split").is_in(splits))
    if folds is not None:
        ds = ds.filter(expr=col("fold").is_in([int(f) for f in folds]))
    return ds


@contextlib.contextmanager
def _classic_parquet_path():
    """Plan this read on Ray Data's classic Parquet path, leaving the process-wide setting as it was.

    The newer path lists files in a task that needs a whole CPU and reads footers in a pool of actors: four more
    processes for every feed. verify_shards has already read every footer on this process, so the classic path,
    which plans from the file list here, costs nothing more. ``read_parquet`` chooses the path when it is called.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = previous


def _feed_batch(batch: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    out = to_model_batch(batch, **kwargs)
    del out["id"]  # strings do not become tensors; read_clips keeps them
    return out


def iter_torch(dataset, batch_size: int, *, seed: int | None = None, shuffle_buffer: int = 256,
               drop_last: bool = True, device: str = "cpu"):
    """Torch batches from a Dataset or a Train worker's shard, locally shuffled with a seed."""
    return dataset.iter_torch_batches(
        batch_size=batch_size, local_shuffle_buffer_size=shuffle_buffer if shuffle_buffer else None,
        local_shuffle_seed=seed, drop_last=drop_last, device=device,
    )


def read_clips(
    prepared: str | Path,
    split: str | Sequence[str],
    *,
    target_length: int | None = None,
    labels: LabelMode = "index",
    limit: int | None = None,
    folds: Iterable[int] | None = None,
) -> dict[str, np.ndarray]:
    """The same arrays as the feed (first crop, no shuffle), read on this process with pyarrow: for a few clips
    (``limit``: read in small batches, stopping there) or small sets; evaluation runs on Ray Data instead."""
    import pyarrow as pa

    prepared = storage.normalise(prepared)
    card = load_card(prepared)
    check_labels(card, labels)
    batches = list(raw_batches(prepared, split, limit=limit, folds=folds, card=card))
    data = pa.Table.from_batches(batches).to_pydict() if batches else {c: [] for c in _READ_COLUMNS}
    norm = card["normalisation"]
    return to_model_batch(
        {k: np.asarray(v, dtype=object) for k, v in data.items()},
        mean=norm["mean"], std=norm["std"], target_length=target_length or card["target_length"],
        num_classes=len(card["class_names"]), num_mel_bins=card["features"]["num_mel_bins"], labels=labels,
    )


def raw_batches(prepared: str | Path, split: str | Sequence[str], *, limit: int | None = None,
                folds: Iterable[int] | None = None, columns: Sequence[str] = tuple(_READ_COLUMNS),
                card: dict | None = None):
    """The stored rows (pyarrow record batches of ``columns``) of ``split`` (and ``folds``) in shard order, read
    on this process, at most ``limit`` rows; a shard whose page checksums fail is named with the fix."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    prepared = storage.normalise(prepared)
    card = card or load_card(prepared)
    splits = check_splits(card, split)
    remaining = limit
    wanted = list(dict.fromkeys([*columns, "split", "fold"]))
    for shard in verify_shards(prepared, card):
        try:
            for batch in pq.ParquetFile(shard, page_checksum_verification=True).iter_batches(
                    batch_size=64, columns=wanted):
                keep = pc.is_in(batch["split"], value_set=pa.array(splits))
                if folds is not None:
                    keep = pc.and_(keep, pc.is_in(batch["fold"], value_set=pa.array([int(f) for f in folds])))
                batch = batch.filter(keep)
                if remaining is not None:
                    batch = batch.slice(0, remaining)
                    remaining -= batch.num_rows
                yield batch.select(list(columns))
                if remaining == 0:
                    return
        except OSError as exc:  # a page whose checksum does not match
            raise ValueError(f"corrupt shard {shard}: {exc}; re-run `asda prepare --force` for {prepared}") from None
