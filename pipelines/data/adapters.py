"""Data set adapters: index audio as users have it on disk (SPEC §6) into one ``DatasetIndex``.

An adapter only reads metadata and checks that files exist; it never decodes audio (the prepare step does, and
reports undecodable clips). Problems that concern one clip (a missing file, an unknown label, a duplicate) do not
stop indexing: the clip is left out and recorded in ``DatasetIndex.rejected`` with the reason. Problems with the
layout itself (no metadata file, no classes) raise. Everything is absolute and sorted, so two runs over the same
tree give the same index.
"""

from __future__ import annotations

import csv
import errno
import inspect
import math
import os
import re
import string
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.features import DATASET_STATS

from . import synthetic as synthetic_set

SPLITS = ("train", "valid", "test", "unbalanced")  # also the order of clips in an index
GENERIC_TARGET_LENGTH = 1024  # AudioSet's 10 s: how much of a clip of unknown length a shard is sized for


@dataclass(frozen=True)
class ClipRef:
    """One clip of a data set, as the index knows it (nothing decoded yet)."""

    id: str  # unique within the data set
    path: str  # absolute path of the audio file
    split: str  # one of SPLITS
    labels: tuple[int, ...]  # class indices, sorted
    fold: int = 0  # ESC-50: 1..5; 0 = none
    event: tuple[float, float] | None = None  # (start_s, end_s) of the labelled event, where known


@dataclass
class DatasetIndex:
    """Every usable clip of a data set, its classes, and what was rejected while indexing it."""

    name: str  # adapter name
    class_names: list[str]  # class index -> display name
    clips: list[ClipRef]
    rejected: list[dict]  # [{"path": absolute path, "reason": str}]
    multilabel: bool
    target_length: int | None  # default fbank frames for this data set; None: fitted to its clips at prepare
    stats: tuple[float, float] | None  # published (mean, std) of the log-mel fbank, or None: compute at prepare


# --- shared helpers ------------------------------------------------------------------------------------------

def _absolute(path: str | Path) -> Path:
    """Absolute and normalised, without resolving symlinks (a user's linked data folder keeps its name)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _require_dir(source: Path, title: str) -> None:
    if not source.exists():
        if source.is_symlink():
            try:
                source.resolve(strict=True)
            except RuntimeError:  # Python < 3.13 reports a loop this way
                raise ValueError(f"{title} source {shown(source)} is a symbolic link loop") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ValueError(f"{title} source {shown(source)} is a symbolic link loop") from None
            raise FileNotFoundError(f"{title} source {shown(source)} is a dangling symbolic link "
                                    f"(to {os.readlink(source)})")
        raise FileNotFoundError(f"{title} source {shown(source)} does not exist")
    if not source.is_dir():
        raise ValueError(f"{title} source {source} is not a folder")


def _require_file(source: Path, relative: str, title: str) -> Path:
    path = source / relative
    if not path.is_file():
        raise FileNotFoundError(f"{title} source {source} lacks {relative}")
    return path


def shown(path: str | Path) -> str:
    """A path as text that can be printed and stored: bytes of a name that are not UTF-8 become \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _reject(path: str | Path, reason: str) -> dict:
    return {"path": shown(path), "reason": reason}


def _storable(clip: ClipRef) -> bool:
    """The file name is text (UTF-8), as a Parquet string column and every tool downstream need."""
    try:
        clip.path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _finish(name: str, class_names: list[str], clips: list[ClipRef], rejected: list[dict], *, multilabel: bool,
            target_length: int | None, stats: tuple[float, float] | None) -> DatasetIndex:
    """Sort clips (by split, then id) and rejections (by path, then reason): the index is the same every run."""
    rank = {split: i for i, split in enumerate(SPLITS)}
    rejected = rejected + [_reject(c.path, "file name is not valid UTF-8 (shown with its bytes escaped); rename it")
                           for c in clips if not _storable(c)]
    clips = [c for c in clips if _storable(c)]
    assert all(c.split in rank for c in clips), "adapter produced a split outside SPLITS"
    assert all(0 <= i < len(class_names) for c in clips for i in c.labels), "label index outside class_names"
    return DatasetIndex(
        name=name, class_names=class_names, clips=sorted(clips, key=lambda c: (rank[c.split], c.id)),
        rejected=sorted(rejected, key=lambda r: (r["path"], r["reason"])), multilabel=multilabel,
        target_length=target_length, stats=stats,
    )


def _as_tuple(value: str | Iterable[str]) -> tuple[str, ...]:
    """A tuple option given as a sequence or as one comma-separated string (as it arrives from a command line)."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(item).strip() for item in items if str(item).strip())


def _check_fractions(valid_fraction: float, test_fraction: float) -> tuple[float, float]:
    valid_fraction, test_fraction = float(valid_fraction), float(test_fraction)
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError(f"valid_fraction={valid_fraction}, test_fraction={test_fraction} are not allowed: "
                         "expected non-negative fractions that sum to less than 1")
    return valid_fraction, test_fraction


def hash_split(key: str, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """Deterministic split of a clip from its key (relative path): the same on every run and every machine.

    zlib.crc32, not ``hash()``, which Python randomises per process. A clip keeps its split when others are
    added or removed.
    """
    u = zlib.crc32(key.encode("utf-8", "surrogateescape")) / 2**32  # uniform in [0, 1); any file name hashes
    if u < valid_fraction:
        return "valid"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"


def _visible(name: str) -> bool:
    """Not hidden (``.DS_Store``, macOS ``._x.wav`` resource forks) and not private (``_background_noise_``)."""
    return not name.startswith((".", "_"))


# --- ESC-50 --------------------------------------------------------------------------------------------------

ESC50_META = "meta/esc50.csv"


def esc50(source: str | Path) -> DatasetIndex:
    """ESC-50: ``audio/*.wav`` and ``meta/esc50.csv`` (filename, fold, target, category, ...). Folds 1-5, all train.

    Class names come from the category column, ordered by target.
    """
    source = _absolute(source)
    _require_dir(source, "ESC-50")
    meta = _require_file(source, ESC50_META, "ESC-50")
    with meta.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, skipinitialspace=True)
        missing = {"filename", "fold", "target", "category"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"ESC-50 {meta} lacks column(s) {sorted(missing)}")
        rows = list(reader)

    categories: dict[int, str] = {}
    clips, rejected, seen = [], [], set()
    for lineno, row in enumerate(rows, 2):  # line 1 is the header
        filename = (row["filename"] or "").strip()
        if not filename:
            rejected.append(_reject(meta, f"line {lineno}: empty filename"))
            continue
        path = source / "audio" / filename
        try:
            fold, target = int(row["fold"]), int(row["target"])
        except (TypeError, ValueError):
            rejected.append(_reject(path, f"bad fold {row['fold']!r} or target {row['target']!r} in {ESC50_META}"))
            continue
        if fold < 1 or target < 0:
            rejected.append(_reject(path, f"fold {fold} or target {target} out of range in {ESC50_META}"))
            continue
        category = (row["category"] or "").strip()
        if categories.setdefault(target, category) != category:
            rejected.append(_reject(path, f"category {category!r} conflicts with {categories[target]!r} "
                                          f"for target {target}"))
            continue
        if path.stem in seen:
            rejected.append(_reject(path, f"duplicate id {path.stem} in {ESC50_META}"))
            continue
        seen.add(path.stem)
        if not path.is_file():
            rejected.append(_reject(path, "missing audio file"))
            continue
        clips.append(ClipRef(id=path.stem, path=str(path), split="train", labels=(target,), fold=fold))

    if not categories:
        raise ValueError(f"ESC-50 {meta} lists no clips")
    class_names = [categories.get(t, f"class_{t}") for t in range(max(categories) + 1)]
    return _finish("esc50", class_names, clips, rejected, multilabel=False, target_length=512,
                   stats=DATASET_STATS["esc50"])


# --- Speech Commands -----------------------------------------------------------------------------------------

SPC_LISTS = {"validation_list.txt": "valid", "testing_list.txt": "test"}


def _read_list(path: Path) -> list[str]:
    """Relative clip paths of a Speech Commands list file, in POSIX form."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.strip().replace("\\", "/")
        if entry:
            entries.append(entry.removeprefix("./"))
    return entries


def speechcommands(source: str | Path) -> DatasetIndex:
    """Speech Commands (V1 or V2): one folder per keyword; ``validation_list.txt`` / ``testing_list.txt`` name the
    valid and test clips, everything else is train. ``_background_noise_`` and other ``_``/``.`` folders are not
    classes. Ids are ``<keyword>/<file stem>``.
    """
    source = _absolute(source)
    _require_dir(source, "Speech Commands")
    lists = {name: _read_list(_require_file(source, name, "Speech Commands")) for name in SPC_LISTS}
    keywords = sorted(p.name for p in source.iterdir() if p.is_dir() and _visible(p.name))
    if not keywords:
        raise ValueError(f"Speech Commands source {source} has no keyword folders")
    keyword_index = {k: i for i, k in enumerate(keywords)}

    rejected = []
    assigned: dict[str, str] = {}  # relative path -> split
    for list_name, split in SPC_LISTS.items():
        for entry in lists[list_name]:
            keyword = entry.split("/", 1)[0]
            if keyword not in keyword_index:
                rejected.append(_reject(source / entry, f"listed in {list_name} but {keyword!r} is not a keyword "
                                                        "folder"))
            elif not (source / entry).is_file():
                rejected.append(_reject(source / entry, f"listed in {list_name} but missing"))
            elif assigned.setdefault(entry, split) != split:
                assigned[entry] = "conflict"
    for entry in sorted(e for e, s in assigned.items() if s == "conflict"):
        rejected.append(_reject(source / entry, "listed in both validation_list.txt and testing_list.txt"))

    clips = []
    for keyword in keywords:
        for path in sorted((source / keyword).iterdir()):
            if not (path.is_file() and path.suffix.lower() == ".wav" and _visible(path.name)):
                continue
            split = assigned.get(f"{keyword}/{path.name}", "train")
            if split == "conflict":
                continue
            clips.append(ClipRef(id=f"{keyword}/{path.stem}", path=str(path), split=split,
                                 labels=(keyword_index[keyword],)))
    return _finish("speechcommands", keywords, clips, rejected, multilabel=False, target_length=128,
                   stats=DATASET_STATS["speechcommands"])


# --- AudioSet ------------------------------------------------------------------------------------------------

AUDIOSET_SEGMENTS = {  # option name -> (segment CSV, split in the index)
    "balanced_train": ("balanced_train_segments.csv", "train"),
    "unbalanced_train": ("unbalanced_train_segments.csv", "unbalanced"),
    "eval": ("eval_segments.csv", "test"),
}
AUDIOSET_LABELS = "class_labels_indices.csv"
AUDIOSET_PLACEHOLDERS = ("ytid", "start", "end", "start_int", "end_int", "split")


def _check_name_pattern(pattern: str) -> str:
    """The placeholders of an audio file name pattern must be known ones: catch typos before 2 M lookups."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError as err:
        raise ValueError(f"name_pattern {pattern!r} is not a valid format string: {err}") from err
    unknown = sorted(fields - set(AUDIOSET_PLACEHOLDERS))
    if unknown or "ytid" not in fields:
        raise ValueError(f"name_pattern {pattern!r} is not allowed: it must use {{ytid}} and only the placeholders "
                         f"{', '.join('{' + p + '}' for p in AUDIOSET_PLACEHOLDERS)} (unknown: {unknown})")
    return pattern


def _read_audioset_classes(path: Path) -> tuple[list[str], dict[str, int]]:
    """class_labels_indices.csv -> (display names by index, MID -> index). Display names may hold quoted commas."""
    names: list[str] = []
    mids: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh, skipinitialspace=True):
            if not row or row[0].strip() == "index":
                continue
            if len(row) < 3 or row[0].strip() != str(len(names)):
                raise ValueError(f"AudioSet {path}: expected rows 'index,mid,display_name' numbered 0, 1, ...; "
                                 f"got {row} at index {len(names)}")
            mid = row[1].strip()
            if mid in mids:
                raise ValueError(f"AudioSet {path}: MID {mid} appears twice")
            mids[mid] = len(names)
            names.append(row[2].strip())
    if not names:
        raise ValueError(f"AudioSet {path} lists no classes")
    return names, mids


class _FileLookup:
    """``is_file`` through one directory listing per folder, on plain strings: 2 M ``stat`` calls and ``Path``
    objects would dominate indexing AudioSet."""

    def __init__(self) -> None:
        self._listings: dict[str, set[str]] = {}

    def __call__(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self._listings:
            try:
                self._listings[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
            except OSError:
                self._listings[folder] = set()
        return name in self._listings[folder]


def _segment_rows(path: Path) -> Iterable[tuple[Path, int, list[str]]]:
    """(path, line number, fields) of a segment CSV; ``#`` lines are comments, fields lose the space after commas."""
    with path.open(newline="", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                yield path, lineno, next(csv.reader([line], skipinitialspace=True))


def _pattern_values(ytid: str, start: str, end: str, split_name: str) -> dict[str, str | int]:
    """What each placeholder of an AudioSet name pattern stands for in one segment (``AUDIOSET_PLACEHOLDERS``)."""
    return {"ytid": ytid, "start": start, "end": end, "start_int": int(float(start)), "end_int": int(float(end)),
            "split": split_name}


# Name patterns that mirrors use, tried against the files that are there when the given one finds none.
AUDIOSET_PATTERN_GUESSES = ("{ytid}", "{ytid}_{start}", "{ytid}_{start_int}", "{ytid}_{start_int}_{end_int}",
                            "{ytid}_{start}_{end}", "{split}/{ytid}", "{split}/{ytid}_{start}",
                            "{split}/{ytid}_{start_int}")


def _no_file_matches(audio_root: str, name_pattern: str, missing: list[dict[str, str | int]]) -> str:
    """Why an AudioSet source gave no clip at all: the pattern and folder tried, what is there, and the patterns
    that would have found files (by how many of the first segments each finds)."""
    try:
        there = sorted(e.name for e in os.scandir(audio_root))
    except OSError:
        there = []
    shown = f"{', '.join(there[:5])}{', ...' if len(there) > 5 else ''} ({len(there)} entries)" if there else \
        "nothing (or it does not exist)"
    extensions = sorted({os.path.splitext(n)[1] for n in there if os.path.splitext(n)[1]}) or [".wav"]
    exists = _FileLookup()
    found = []
    for stem in AUDIOSET_PATTERN_GUESSES:
        for ext in extensions:
            pattern = stem + ext
            hits = sum(exists(os.path.join(audio_root, pattern.format(**v))) for v in missing)
            if hits and pattern != name_pattern:
                found.append((hits, pattern))
    hint = ("; these patterns find files: " + ", ".join(f"--option name_pattern={p} ({n} of the first "
                                                         f"{len(missing)} segments)" for n, p in sorted(found,
                                                         key=lambda f: (-f[0], f[1]))[:3])
            if found else "; no usual pattern finds them either (placeholders: "
            + ", ".join("{" + p + "}" for p in AUDIOSET_PLACEHOLDERS) + ")")
    first = os.path.join(audio_root, name_pattern.format(**missing[0]))
    return (f"AudioSet: no segment's audio file was found with name_pattern {name_pattern!r} in {audio_root} "
            f"(the first segment looked for {first}); that folder holds {shown}{hint}")


def _audioset_clip(row: tuple[Path, int, list[str]], split_name: str, audio_root: str, name_pattern: str,
                   mid_index: dict[str, int], first_seen: dict[str, str], rejected: list[dict]) -> ClipRef | None:
    """One segment CSV line as a clip (its file not yet checked), or None with the reasons added to ``rejected``."""
    csv_path, lineno, fields = row
    csv_name, split = AUDIOSET_SEGMENTS[split_name]
    if fields[0] == "YTID":  # an uncommented header line
        return None
    try:
        ytid, start, end = fields[0].strip(), fields[1].strip(), fields[2].strip()
        start_s, end_s = float(start), float(end)
        int(start_s), int(end_s)  # NaN and inf fail here (the patterns' {start_int}, {end_int})
        mids = [m.strip() for m in ",".join(fields[3:]).split(",") if m.strip()]
        if not ytid:
            raise ValueError("empty YTID")
    except (IndexError, ValueError, OverflowError):
        rejected.append(_reject(csv_path, f"line {lineno}: expected YTID, start_seconds, end_seconds, "
                                          f"positive_labels; got {fields}"))
        return None
    clip_id = f"{ytid}_{start_s:.3f}"
    path = os.path.join(audio_root, name_pattern.format(**_pattern_values(ytid, start, end, split_name)))
    if clip_id in first_seen:
        rejected.append(_reject(path, f"duplicate id {clip_id} in {csv_name} (first in {first_seen[clip_id]})"))
        return None
    first_seen[clip_id] = csv_name
    rejected.extend(_reject(path, f"unknown label MID {m} in {csv_name}") for m in mids if m not in mid_index)
    labels = tuple(sorted({mid_index[m] for m in mids if m in mid_index}))
    if not mids:
        rejected.append(_reject(path, f"no labels in {csv_name} line {lineno}"))
    if not labels:  # no labels, or every MID unknown (already rejected, one entry per MID)
        return None
    return ClipRef(id=clip_id, path=path, split=split, labels=labels)


def audioset(
    source: str | Path,
    *,
    audio_dir: str = "audio",
    name_pattern: str = "{ytid}_{start}.wav",
    splits: str | Iterable[str] = ("balanced_train", "unbalanced_train", "eval"),
) -> DatasetIndex:
    """AudioSet: segment CSVs (``#`` comment lines; YTID, start_seconds, end_seconds, "MID,MID,...") and
    ``class_labels_indices.csv``; multi-label. Balanced train -> "train", unbalanced -> "unbalanced", eval -> "test".

    Audio lies at ``source/audio_dir/name_pattern`` (``audio_dir`` may be absolute). The pattern's placeholders:
    {ytid}, {start} and {end} exactly as written in the CSV ("30.000"), {start_int}/{end_int} as whole seconds
    ("30"), and {split} (the segment CSV's name without ``_segments.csv``, for mirrors with a folder per CSV).
    Ids are ``<YTID>_<start with 3 decimals>``; the first occurrence of an id wins, across CSVs in ``splits`` order.
    """
    source = _absolute(source)
    _require_dir(source, "AudioSet")
    name_pattern = _check_name_pattern(name_pattern)
    splits = _as_tuple(splits)
    unknown = sorted(set(splits) - set(AUDIOSET_SEGMENTS))
    if unknown or not splits:
        raise ValueError(f"AudioSet splits {list(splits)} are not allowed: choose from {list(AUDIOSET_SEGMENTS)}")
    class_names, mid_index = _read_audioset_classes(_require_file(source, AUDIOSET_LABELS, "AudioSet"))
    present = [s for s in splits if (source / AUDIOSET_SEGMENTS[s][0]).is_file()]
    if not present:
        raise FileNotFoundError(f"AudioSet source {source} lacks all of "
                                f"{', '.join(AUDIOSET_SEGMENTS[s][0] for s in splits)}")

    audio_root = str(source / audio_dir)
    exists = _FileLookup()
    clips, rejected = [], []
    missing: list[dict[str, str | int]] = []  # the placeholders of the first segments whose file was not found
    first_seen: dict[str, str] = {}  # id -> segment CSV where it first appeared
    for split_name in present:
        for row in _segment_rows(source / AUDIOSET_SEGMENTS[split_name][0]):
            clip = _audioset_clip(row, split_name, audio_root, name_pattern, mid_index, first_seen, rejected)
            if clip is not None and not exists(clip.path):
                rejected.append(_reject(clip.path, "missing audio file"))
                if len(missing) < 200:
                    fields = row[2]
                    missing.append(_pattern_values(fields[0].strip(), fields[1].strip(), fields[2].strip(),
                                                   split_name))
            elif clip is not None:
                clips.append(clip)
    if not clips and missing:
        raise ValueError(_no_file_matches(audio_root, name_pattern, missing))
    return _finish("audioset", class_names, clips, rejected, multilabel=True, target_length=1024,
                   stats=DATASET_STATS["audioset"])


# --- generic: one folder per class ---------------------------------------------------------------------------

def _normalise_extensions(extensions: str | Iterable[str]) -> tuple[str, ...]:
    exts = tuple("." + e.lower().lstrip(".") for e in _as_tuple(extensions))
    if not exts:
        raise ValueError("extensions is empty: name at least one, e.g. .wav")
    return exts


def _audio_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Audio files under ``folder``, recursively, skipping hidden files and folders; sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions]
    return sorted(found)


def folder(
    source: str | Path,
    *,
    extensions: str | Iterable[str] = (".wav", ".flac", ".ogg", ".mp3"),
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> DatasetIndex:
    """One sub-folder per class (sorted names; nested folders inside a class belong to it). Clips are split by a
    hash of their relative path (``hash_split``); set both fractions to 0 to keep everything in train.

    A sub-folder with no audio file is not a class; audio files directly in ``source`` are rejected. The layout
    says nothing about the clips' length: the card's is fitted to them at prepare (``card.fitted_length``).
    """
    source = _absolute(source)
    _require_dir(source, "folder")
    extensions = _normalise_extensions(extensions)
    valid_fraction, test_fraction = _check_fractions(valid_fraction, test_fraction)

    per_class = {p.name: _audio_files(p, extensions) for p in sorted(source.iterdir())
                 if p.is_dir() and not p.name.startswith(".")}
    class_names = [name for name, files in per_class.items() if files]
    if not class_names:
        raise ValueError(f"folder source {source} has no audio files ({', '.join(extensions)}) in class sub-folders")
    rejected = [_reject(p, "not inside a class folder") for p in sorted(source.iterdir())
                if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")]
    clips = []
    for label, name in enumerate(class_names):
        for path in per_class[name]:
            rel = path.relative_to(source).as_posix()
            clips.append(ClipRef(id=rel, path=str(path), split=hash_split(rel, valid_fraction, test_fraction),
                                 labels=(label,)))
    return _finish("folder", class_names, clips, rejected, multilabel=False,
                   target_length=None, stats=None)


# --- generic: a CSV manifest ---------------------------------------------------------------------------------

MANIFEST_SPLITS = ("train", "valid", "test")


def _manifest_labels(value: str | None, multilabel: bool) -> list[str]:
    """Class names of a cell: a ``labels`` cell splits on ``;`` and ``,``; a ``label`` cell is one name, commas
    and all."""
    if not multilabel:
        return [value.strip()] if value and value.strip() else []
    return sorted({part.strip() for part in re.split(r"[;,]", value or "") if part.strip()})


def _read_manifest(csv_path: Path) -> tuple[list[dict[str, str]], bool, bool]:
    """(rows, multi-label, has a split column) of a manifest CSV, or an error naming the columns it lacks."""
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, skipinitialspace=True)
        columns = [c.strip() for c in reader.fieldnames or ()]
        reader.fieldnames = columns
        rows = list(reader)
    if "path" not in columns or ("label" in columns) == ("labels" in columns):
        raise ValueError(f"manifest {csv_path} has columns {columns}: expected 'path' and exactly one of "
                         "'label' or 'labels' (and optionally 'split')")
    return rows, "labels" in columns, "split" in columns


def _manifest_rows(csv_path: Path, rows: list[dict[str, str]], multilabel: bool, has_split: bool,
                   valid_fraction: float, test_fraction: float):
    """(accepted [(id, path, split, label names)], rejected, path -> first line) of a manifest's rows."""
    base = csv_path.parent
    accepted: list[tuple[str, Path, str, list[str]]] = []
    rejected = []
    first_line: dict[Path, int] = {}
    for lineno, row in enumerate(rows, 2):  # line 1 is the header
        cell = (row.get("path") or "").strip()
        if not cell:
            rejected.append(_reject(csv_path, f"line {lineno}: empty path"))
            continue
        path = _absolute(base / cell)  # an absolute cell stays absolute
        names = _manifest_labels(row.get("labels" if multilabel else "label"), multilabel)
        if not names:
            rejected.append(_reject(path, f"line {lineno}: empty label"))
            continue
        split_cell = (row.get("split") or "").strip().lower() if has_split else None
        split = split_cell if has_split else hash_split(os.path.relpath(path, base), valid_fraction, test_fraction)
        if split not in MANIFEST_SPLITS:
            rejected.append(_reject(path, f"line {lineno}: unknown split {split_cell!r} "
                                          f"(allowed: {', '.join(MANIFEST_SPLITS)})"))
        elif path in first_line:
            rejected.append(_reject(path, f"line {lineno}: duplicate path (first on line {first_line[path]})"))
        else:
            first_line[path] = lineno
            accepted.append((Path(os.path.relpath(path, base)).as_posix(), path, split, names))
    return accepted, rejected, first_line


def manifest(
    source: str | Path,
    *,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> DatasetIndex:
    """A CSV with columns ``path``, ``label`` (one class name) or ``labels`` (names separated by ``;`` or ``,``
    inside the quoted field; multi-label), and optionally ``split`` (train, valid, test). ``source`` is the CSV
    or a folder holding ``manifest.csv``. Relative paths resolve against the CSV's folder; ids are paths relative
    to it. Without a split column, clips are split as in ``folder``.

    Class names (sorted) come from every row with a readable label, so a missing file does not renumber classes.
    The card's length is fitted to the clips at prepare, as for ``folder``.
    """
    source = _absolute(source)
    if source.is_dir():
        csv_path = _require_file(source, "manifest.csv", "manifest")
    elif source.is_file():
        csv_path = source
    else:
        raise FileNotFoundError(f"manifest source {source} does not exist")
    valid_fraction, test_fraction = _check_fractions(valid_fraction, test_fraction)
    rows, multilabel, has_split = _read_manifest(csv_path)
    accepted, rejected, first_line = _manifest_rows(csv_path, rows, multilabel, has_split, valid_fraction,
                                                    test_fraction)
    class_names = sorted({name for *_, names in accepted for name in names})
    if not class_names:
        raise ValueError(f"manifest {csv_path} has no row with a path, a label and a valid split")
    label_index = {name: i for i, name in enumerate(class_names)}
    clips = []
    for clip_id, path, split, names in accepted:
        if path.is_file():
            clips.append(ClipRef(id=clip_id, path=str(path), split=split,
                                 labels=tuple(sorted(label_index[n] for n in names))))
        else:
            rejected.append(_reject(path, f"line {first_line[path]}: missing audio file"))
    return _finish("manifest", class_names, clips, rejected, multilabel=multilabel,
                   target_length=None, stats=None)


# --- synthetic -----------------------------------------------------------------------------------------------

def synthetic(
    source: str | Path,
    *,
    num_train: int = synthetic_set.DEFAULT_PARAMS["num_train"],
    num_valid: int = synthetic_set.DEFAULT_PARAMS["num_valid"],
    num_test: int = synthetic_set.DEFAULT_PARAMS["num_test"],
    seed: int = synthetic_set.DEFAULT_PARAMS["seed"],
    clip_seconds: float = synthetic_set.DEFAULT_PARAMS["clip_seconds"],
    sample_rate: int = synthetic_set.DEFAULT_PARAMS["sample_rate"],
    snr_min_db: float = synthetic_set.DEFAULT_PARAMS["snr_min_db"],
    snr_max_db: float = synthetic_set.DEFAULT_PARAMS["snr_max_db"],
    classes: str = synthetic_set.DEFAULT_PARAMS["classes"],
) -> DatasetIndex:
    """The embedded procedural set (``pipelines.data.synthetic``): generated into ``source`` unless a set with the same
    parameters is already there, then indexed. Each clip knows where its class event is (``ClipRef.event``).
    """
    source = _absolute(source)
    generated = synthetic_set.ensure_dataset(
        source, num_train=num_train, num_valid=num_valid, num_test=num_test, seed=seed,
        clip_seconds=clip_seconds, sample_rate=sample_rate, snr_min_db=snr_min_db, snr_max_db=snr_max_db,
        classes=classes)
    clips = [ClipRef(id=c["id"], path=str(source / c["file"]), split=c["split"], labels=(c["label"],),
                     event=(float(c["event"][0]), float(c["event"][1]))) for c in generated["clips"]]
    # The clip's own length: 100 frames a second, rounded up to whole patches (2.56 s -> 256 frames).
    frames = -(-int(round(clip_seconds * 100)) // 16) * 16
    return _finish("synthetic", list(generated["class_names"]), clips, [], multilabel=False, target_length=frames,
                   stats=None)


# --- registry ------------------------------------------------------------------------------------------------

ADAPTERS: dict[str, Callable[..., DatasetIndex]] = {
    "esc50": esc50,
    "speechcommands": speechcommands,
    "audioset": audioset,
    "folder": folder,
    "manifest": manifest,
    "synthetic": synthetic,
}


def adapter_options(dataset: str) -> list[str]:
    """The keyword options an adapter accepts, sorted."""
    params = inspect.signature(ADAPTERS[dataset]).parameters.values()
    return sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _option_kind(annotation: Any) -> str:
    """What a command-line value of an adapter option is converted to, from its annotation (a string, since the
    module uses postponed annotations): "int", "float", "bool", "list" (a comma-separated list) or "str"."""
    text = str(annotation).replace(" ", "")
    if text in ("int", "float", "bool"):
        return text
    return "list" if "Iterable" in text or text.startswith(("list", "tuple")) else "str"


def parse_options(dataset: str, items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings from a command line -> an adapter's keyword options. The value is taken as typed, a
    string (``name_pattern={ytid}.flac`` stays that text), unless the adapter declares the option an int, a float
    or a bool, which converts it; a list option keeps the comma-separated text its adapter splits. An unknown key
    or a value that is not of the option's type is refused, naming the key, the value and what is allowed."""
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown data set {dataset!r}: allowed are {', '.join(sorted(ADAPTERS))}")
    params = {p.name: p for p in inspect.signature(ADAPTERS[dataset]).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"option {item!r} must look like KEY=VALUE (e.g. name_pattern={{ytid}}.flac)")
        if key not in params:
            allowed = ", ".join(f"{n} ({_option_kind(p.annotation)})" for n, p in sorted(params.items()))
            raise ValueError(f"unknown option {key!r} for data set {dataset!r}: allowed are {allowed or 'none'}")
        options[key] = _typed(dataset, key, raw, _option_kind(params[key].annotation))
    return options


def _typed(dataset: str, key: str, raw: str, kind: str) -> Any:
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            value = float(raw)
            if math.isfinite(value):
                return value
            raise ValueError(raw)
        if kind == "bool":
            if raw.strip().lower() in ("true", "false"):
                return raw.strip().lower() == "true"
            raise ValueError(raw)
    except ValueError:
        expected = {"int": "a whole number", "float": "a finite number", "bool": "true or false"}[kind]
        raise ValueError(f"option {key}={raw!r} for data set {dataset!r} is not allowed: expected {expected}") from None
    return raw


def build_index(dataset: str, source: str | Path, **options: Any) -> DatasetIndex:
    """Index ``source`` with the adapter named ``dataset``; options are that adapter's keyword arguments."""
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown data set {dataset!r}: allowed are {', '.join(sorted(ADAPTERS))}")
    allowed = adapter_options(dataset)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for data set {dataset!r}: allowed are {allowed or 'none'}")
    return ADAPTERS[dataset](source, **options)
