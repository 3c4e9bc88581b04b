"""`asda embed`: audio files, folders or a prepared set -> embeddings of a checkpoint, in Parquet or .npy.

    embed(EmbedSettings(inputs=["recordings/"], checkpoint="results/pretrain-default", out="emb.parquet"))

Each clip gets a scene embedding (the ``readout``: "cls", the utterance vector; "mean"; or "cls+mean") and, with
``timestamps``, one embedding per 160 ms patch column with its time in ms (``model.embedding``: any length, cut
into chunks of the frames the encoder was fed; any sample rate and channel count, made mono 16 kHz as
``asda prepare`` does). Files that cannot be decoded are skipped and listed (``<out>.rejected.json``), as
``asda prepare`` lists them. A few inputs are embedded in this process; more than ``IN_PROCESS_MAX`` run on Ray
Data, on an actor pool (a GPU per actor where the cluster has them), in input order either way.

Parquet columns: id, path, frames (log-mel frames), embedding (fixed-size list of float32) and, with timestamps,
timestamp_embedding (list of lists of float32) and timestamps_ms; the schema's metadata records the checkpoint,
the read-out and the feeding. ``.npy``: the (N, W) scene embeddings, with ``<out>.ids.tsv`` (id, path per row).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data.prepare import RejectedClip, decode

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au", ".opus")
IN_PROCESS_MAX = 64  # more inputs than this run on Ray Data (an actor pool), unless told otherwise
OUTPUT_SUFFIXES = (".parquet", ".npy")


@dataclass(frozen=True)
class EmbedSettings:
    inputs: tuple[str, ...]  # audio files and folders, or one prepared folder (with dataset.json)
    checkpoint: str  # a checkpoint file, a run folder (its final.pt) or an exported folder (asda export)
    out: str  # .parquet or .npy
    readout: str = "cls"  # the scene embedding (model.embedding.SCENE_READOUTS)
    timestamps: bool = False  # also one embedding per patch column, with its time (Parquet only)
    batch_size: int = 8  # chunks per forward pass
    device: str = "auto"  # in process: cpu, cuda or auto (cuda where there is one)
    which: str = "student"  # a pretraining checkpoint's student or EMA teacher
    ray: bool | None = None  # None: Ray Data for more than IN_PROCESS_MAX inputs
    split: str | None = None  # a prepared set's split (default: every clip)
    force: bool = False  # replace an existing output

    def check(self) -> None:
        from model.embedding import SCENE_READOUTS

        out = Path(self.out)
        if out.suffix not in OUTPUT_SUFFIXES:
            raise ValueError(f"--out {out}: expected a file ending in {' or '.join(OUTPUT_SUFFIXES)}")
        if out.exists() and not self.force:
            raise ValueError(f"--out {out} exists; pass --force to replace it")
        if self.timestamps and out.suffix == ".npy":
            raise ValueError("--timestamps: timestamp embeddings have one length per clip; write Parquet "
                             f"(--out {out.with_suffix('.parquet')})")
        if self.readout not in SCENE_READOUTS:
            raise ValueError(f"--readout {self.readout!r} is not allowed: expected one of {list(SCENE_READOUTS)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} is not allowed: expected >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device!r} is not allowed: expected auto, cpu or cuda")


def collect_inputs(inputs: Iterable[str]) -> tuple[list[dict[str, str]], Path | None]:
    """(items {"id", "path"} of every audio file the inputs name, in a stable order; None) or ([], the prepared
    folder) when the one input is a prepared set. A folder is searched recursively for AUDIO_EXTENSIONS files
    (hidden ones skipped); an item's id is its path relative to the folder, or the file's name."""
    inputs = [Path(i).expanduser() for i in inputs]
    if not inputs:
        raise ValueError("no input: name audio files, folders of audio or a prepared folder")
    for path in inputs:
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
    prepared = [p for p in inputs if (p / "dataset.json").is_file()]
    if prepared:
        if len(inputs) > 1:
            raise ValueError(f"{prepared[0]} is a prepared set: embed it alone, not with other inputs")
        return [], prepared[0].resolve()
    items = []
    for path in inputs:
        if path.is_file():
            items.append({"id": path.name, "path": str(path.resolve())})
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        items += [{"id": str(p.relative_to(path)), "path": str(p.resolve())} for p in found]
    if not items:
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return items, None


def embed(settings: EmbedSettings) -> dict[str, Any]:
    """Embed every input clip (see the module); returns {"out", "clips", "rejected", "engine", "seconds",
    "feeding"}. Nothing is written under ``out`` until every clip is done."""
    from model.embedding import load_embedder

    from .worker import resolve_checkpoint

    settings.check()
    items, prepared = collect_inputs(settings.inputs)
    source = Path(settings.checkpoint)
    checkpoint = source if source.is_dir() and (source / "config.json").is_file() else \
        Path(resolve_checkpoint(settings.checkpoint))
    encoder, feeding, origin = load_embedder(checkpoint, settings.which)
    count = _count(prepared, settings.split) if prepared else len(items)
    on_ray = settings.ray if settings.ray is not None else count > IN_PROCESS_MAX
    print(f"embedding {count} clip(s){' of ' + str(prepared) if prepared else ''} with {checkpoint} "
          f"({settings.readout}{' + timestamps' if settings.timestamps else ''}, {feeding.chunk_frames} frames "
          f"per chunk; feeding from {origin}), {'on Ray Data' if on_ray else 'in this process'}", flush=True)
    started = time.perf_counter()
    meta = {"checkpoint": str(checkpoint), "readout": settings.readout, "feeding": asdict(feeding)}
    writer = Writer(Path(settings.out), settings.timestamps, meta)
    if on_ray:
        rows = embed_on_ray(encoder, feeding, settings, items, prepared, count)
    else:
        rows = _embed_here(encoder, feeding, settings, items, prepared)
    rejected = writer.write_all(rows, count)
    return {"out": str(settings.out), "clips": writer.written, "rejected": rejected,
            "engine": "ray" if on_ray else "process", "seconds": time.perf_counter() - started,
            "feeding": asdict(feeding)}


def _count(prepared: Path, split: str | None) -> int:
    from .data.card import load_card
    from .data.feed import check_splits, split_rows

    card = load_card(prepared)
    return split_rows(card, check_splits(card, split or list(card["splits"])))


def _embed_here(encoder, feeding, settings: EmbedSettings, items: list[dict], prepared: Path | None
                ) -> Iterator[dict[str, Any]]:
    """Rows (see ``row``) of every clip, or {"id", "path", "error"} for a rejected file, embedded here."""
    import torch

    from model.embedding import embed_log_mels

    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder.to(device)
    accepted: deque[dict] = deque()
    failed: list[dict] = []
    clips = prepared_clips(stored_rows(prepared, settings.split)) if prepared else audio_clips(items, failed)

    def blocks():
        for item, feats in clips:
            accepted.append(item)
            yield feats

    for found in embed_log_mels(encoder, blocks(), feeding, batch_size=settings.batch_size,
                                readouts=(settings.readout,)):
        while failed:
            yield failed.pop(0)
        yield row(accepted.popleft(), found, settings.readout, settings.timestamps)
    yield from failed


def audio_clips(items: Iterable[dict], failed: list[dict]) -> Iterator[tuple[dict, Iterator]]:
    """(item, its raw log-mel in blocks) of each decodable file; each file that is not goes to ``failed`` with
    its reason."""
    from model.embedding import log_mel_blocks

    for item in items:
        try:
            wav, _, _ = decode(item["path"])
        except RejectedClip as exc:
            failed.append({**item, "error": str(exc)})
            continue
        yield item, log_mel_blocks(wav)


PREPARED_COLUMNS = ("id", "path", "frames", "fbank")


def prepared_clips(rows: Iterable[dict[str, Any]]) -> Iterator[tuple[dict, list]]:
    """(item, [its raw log-mel]) of each stored row of a prepared set (PREPARED_COLUMNS)."""
    import torch

    for clip in rows:
        feats = np.frombuffer(clip["fbank"], dtype=np.float16).reshape(int(clip["frames"]), -1)
        yield ({"id": str(clip["id"]), "path": str(clip["path"] or "")},
               [torch.from_numpy(feats.astype(np.float32))])


def stored_rows(prepared: Path, split: str | None) -> Iterator[dict[str, Any]]:
    """The stored rows of a prepared set's ``split`` (every split by default), in shard order, read here."""
    from .data.card import load_card
    from .data.feed import raw_batches

    splits = split or list(load_card(prepared)["splits"])
    for batch in raw_batches(prepared, splits, columns=PREPARED_COLUMNS):
        yield from batch.to_pylist()


def row(item: dict, found, readout: str, timestamps: bool) -> dict[str, Any]:
    """One output row of a clip's ``ClipEmbedding``."""
    out = {"id": item["id"], "path": item["path"], "frames": found.frames, "embedding": found.scene[readout]}
    if timestamps:
        out["timestamp_embedding"], out["timestamps_ms"] = found.timestamps, found.times_ms
    return out


class Writer:
    """Writes rows to ``out`` (Parquet, streamed; or .npy, gathered), through a temporary file renamed into place
    at the end, with the rejected files listed beside it; shows progress."""

    def __init__(self, out: Path, timestamps: bool, meta: dict[str, Any]):
        self.out, self.timestamps, self.meta, self.written = out, timestamps, meta, 0
        self.tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")

    def write_all(self, rows: Iterable[dict[str, Any]], total: int) -> list[dict[str, str]]:
        from .console import progress

        self.out.parent.mkdir(parents=True, exist_ok=True)
        rejected, kept, shown = [], [], progress(total, "clips embedded")
        sink = self._parquet() if self.out.suffix == ".parquet" else None
        try:
            for done, r in enumerate(rows, 1):
                if "error" in r:
                    rejected.append(r)
                else:
                    kept.append(r)
                    if sink is not None and len(kept) >= 64:
                        self._flush(sink, kept)
                if shown:
                    shown.update(done)
            self._finish(sink, kept)
        finally:
            self.tmp.unlink(missing_ok=True)
        if shown:
            shown.finish()
        self._report(rejected)
        return rejected

    def _parquet(self):
        import pyarrow.parquet as pq

        return pq.ParquetWriter(self.tmp, self._schema())

    def _schema(self):
        import pyarrow as pa

        fields = [("id", pa.string()), ("path", pa.string()), ("frames", pa.int64()),
                  ("embedding", pa.list_(pa.float32()))]
        if self.timestamps:
            fields += [("timestamp_embedding", pa.list_(pa.list_(pa.float32()))),
                       ("timestamps_ms", pa.list_(pa.float64()))]
        return pa.schema(fields, metadata={"asda.embedding": json.dumps(self.meta)})

    def _flush(self, sink, kept: list[dict]) -> None:
        import pyarrow as pa

        columns = {name: [_plain(r[name]) for r in kept] for name in self._schema().names}
        sink.write_table(pa.table(columns, schema=self._schema()))
        self.written += len(kept)
        kept.clear()

    def _finish(self, sink, kept: list[dict]) -> None:
        if sink is not None:
            self._flush(sink, kept)
            sink.close()
            os.replace(self.tmp, self.out)
            return
        width = len(kept[0]["embedding"]) if kept else 0
        with open(self.tmp, "wb") as fh:
            np.save(fh, np.stack([r["embedding"] for r in kept]) if kept else np.zeros((0, width), np.float32))
        ids = self.out.with_name(self.out.name[: -len(".npy")] + ".ids.tsv")
        ids.write_text("".join(f"{r['id']}\t{r['path']}\n" for r in kept))
        os.replace(self.tmp, self.out)
        self.written = len(kept)

    def _report(self, rejected: list[dict]) -> None:
        listing = self.out.with_name(self.out.name + ".rejected.json")
        if not rejected:
            listing.unlink(missing_ok=True)
            return
        listing.write_text(json.dumps(rejected, indent=2) + "\n")
        shown = "; ".join(f"{r['path']}: {r['error']}" for r in rejected[:5])
        print(f"skipped {len(rejected)} file(s) that cannot be embedded ({shown}"
              f"{'; ...' if len(rejected) > 5 else ''}); the full list: {listing}", flush=True)


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


# --- on Ray Data ---------------------------------------------------------------------------------------------

ITEMS_PER_CALL = 8  # inputs an actor embeds per call


class _EmbedActor:
    """One actor of the pool: rebuilds the encoder from the object store once, then embeds batches of inputs
    (file items, or a prepared set's stored rows) into output columns; a rejected file's row carries its error."""

    def __init__(self, spec_ref: list, *, feeding, settings: EmbedSettings, threads: int):
        from .inference import actor_model

        self.encoder, _, _ = actor_model(spec_ref, threads)
        self.feeding, self.settings = feeding, settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from model.embedding import embed_log_mels

        records = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        failed: list[dict] = []
        clips = list(prepared_clips(records) if "fbank" in batch else audio_clips(records, failed))
        found = embed_log_mels(self.encoder, (feats for _, feats in clips), self.feeding,
                               batch_size=self.settings.batch_size, readouts=(self.settings.readout,))
        rows = [row(item, f, self.settings.readout, self.settings.timestamps)
                for (item, _), f in zip(clips, found, strict=True)]
        return _columns(rows, failed, self.settings.timestamps)


def _columns(rows: list[dict], failed: list[dict], timestamps: bool) -> dict[str, np.ndarray]:
    """Rows and rejected files as one batch of columns (a rejected file: error set, the rest empty)."""
    every = rows + [{"id": f["id"], "path": f["path"], "frames": 0, "embedding": np.zeros(0, np.float32),
                     "timestamp_embedding": np.zeros((0, 0), np.float32), "timestamps_ms": np.zeros(0),
                     "error": f["error"]} for f in failed]
    names = ["id", "path", "frames", "embedding"] + (["timestamp_embedding", "timestamps_ms"] if timestamps else [])
    out = {name: _objects([r[name] for r in every]) for name in names}
    out["frames"] = np.asarray([r["frames"] for r in every], dtype=np.int64)
    out["error"] = np.asarray([r.get("error", "") for r in every], dtype=object)
    return out


def _objects(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def embed_on_ray(encoder, feeding, settings: EmbedSettings, items: list[dict], prepared: Path | None,
                 count: int) -> Iterator[dict[str, Any]]:
    """Rows (as ``_embed_here`` gives them) of every input, embedded by an actor pool on Ray Data, in order."""
    import ray.data

    from .data.feed import DATA_TASK_CPUS
    from .inference import INFERENCE_THREADS, model_spec, on_actor_pool, pool_size
    from .runtime import ensure_ray

    ray_module = ensure_ray()
    if prepared is not None:
        ds = _prepared_dataset(prepared, settings.split)
    else:
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // ITEMS_PER_CALL)))
    actors, per_actor = pool_size(ray_module, -(-count // ITEMS_PER_CALL))
    ds = on_actor_pool(ds, _EmbedActor, batch_size=ITEMS_PER_CALL, batch_format="numpy",
                       fn_constructor_args=([ray_module.put(model_spec(encoder))],),
                       fn_constructor_kwargs=dict(feeding=feeding, settings=settings, threads=INFERENCE_THREADS),
                       compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                       **{"num_cpus": DATA_TASK_CPUS, **per_actor})
    ds.context.execution_options.preserve_order = True
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for values in zip(*batch.values(), strict=True):
            found = dict(zip(batch, values, strict=True))
            error = found.pop("error")
            yield {"id": found["id"], "path": found["path"], "error": error} if error else found


def _prepared_dataset(prepared: Path, split: str | None):
    """A prepared set's stored rows (PREPARED_COLUMNS) of ``split`` (every split by default) on Ray Data, in shard
    order, read as the feed reads them."""
    from .data.card import load_card
    from .data.feed import DATA_TASKS_PER_WORKER, check_splits, read_rows, verify_shards

    card = load_card(prepared)
    return read_rows(shards=verify_shards(prepared, card), splits=check_splits(card, split or list(card["splits"])),
                     folds=None, tasks=DATA_TASKS_PER_WORKER, columns=PREPARED_COLUMNS)
