"""Miniature copies of every data set layout the adapters read (SPEC §6), written into a test's tmp folder.

Each writer mimics its release as users have it: the same file and folder names, the same CSV quirks (``#``
comment lines, the space after commas, quoted display names with commas), and clips in a mix of sample rates,
bit depths and channel counts, but a fraction of a second long so that preparing them is fast. The docstrings
state exactly what is written, so tests can assert counts and rejections.

Import from a test as ``from layouts import write_esc50`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import soundfile as sf

# (sample rate, channels, WAV subtype) cycled through by every writer: what the prepare step must handle.
FORMATS = (
    (16_000, 1, "PCM_16"),
    (44_100, 2, "PCM_24"),
    (22_050, 1, "FLOAT"),
    (48_000, 2, "PCM_16"),
    (8_000, 1, "PCM_24"),
)
_SUBTYPES = {".wav": None, ".flac": "PCM_16", ".ogg": "VORBIS"}  # None: use the FORMATS subtype

ESC50_CATEGORIES = ("dog", "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow")
AUDIOSET_CLASSES = (  # (mid, display name): real AudioSet rows, one display name with a comma
    ("/m/09x0r", "Speech"),
    ("/m/05zppz", "Male speech, man speaking"),
    ("/m/0jbk", "Animal"),
    ("/m/04rlf", "Music"),
    ("/m/06mb1", "Rain"),
)
AUDIOSET_UNKNOWN_MID = "/m/0unknown"


def write_clip(path: Path, number: int, *, seconds: float = 0.3, fmt: tuple[int, int, str] | None = None) -> Path:
    """A short tone-plus-noise clip whose pitch depends on ``number``; format ``FORMATS[number % 5]`` unless given.

    The extension picks the container (.wav, .flac, .ogg); FLAC and Ogg use a subtype they support.
    """
    rate, channels, subtype = fmt or FORMATS[number % len(FORMATS)]
    rng = np.random.default_rng(number)
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * (220.0 + 110.0 * (number % 7)) * t) + 0.02 * rng.standard_normal(len(t))
    data = np.repeat(mono[:, None], channels, axis=1) * np.linspace(1.0, 0.7, channels)  # (samples, channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data.astype(np.float32), rate, subtype=_SUBTYPES.get(path.suffix.lower()) or subtype)
    return path


def write_esc50(root: Path, n_per_fold: int = 2, classes: int = 3) -> Path:
    """ESC-50: ``audio/<fold>-<src>-<take>-<target>.wav`` and ``meta/esc50.csv``.

    ``n_per_fold`` clips of each class in each of the 5 folds: 5 * n_per_fold * classes clips, all listed, all
    present; class ``t`` is ``ESC50_CATEGORIES[t]``.
    """
    assert classes <= len(ESC50_CATEGORIES), f"at most {len(ESC50_CATEGORIES)} classes"
    rows = []
    number = 0
    for fold in range(1, 6):
        for target in range(classes):
            for take in range(n_per_fold):
                src = 100000 + 37 * number
                name = f"{fold}-{src}-{'ABCDEFGH'[take % 8]}-{target}.wav"
                write_clip(root / "audio" / name, number, seconds=0.25)
                rows.append([name, fold, target, ESC50_CATEGORIES[target], target < 2, src, "ABCDEFGH"[take % 8]])
                number += 1
    (root / "meta").mkdir(parents=True, exist_ok=True)
    with (root / "meta" / "esc50.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        writer.writerows(rows)
    return root


def write_speechcommands(root: Path, keywords: tuple[str, ...] = ("yes", "no", "up"), per_keyword: int = 4) -> Path:
    """Speech Commands V2: ``<keyword>/<speaker>_nohash_<n>.wav``, 16 kHz mono PCM-16, 0.5 s.

    Per keyword, clip 1 is in ``validation_list.txt``, clip 2 in ``testing_list.txt``, the rest are train
    (per_keyword - 2 each). Also a ``_background_noise_`` folder (2 long files, not a class), a LICENSE and a
    README at the top.
    """
    assert per_keyword >= 3, "per_keyword must leave at least one train clip"
    valid, test = [], []
    for k, keyword in enumerate(keywords):
        for i in range(per_keyword):
            name = f"{0x0a1b2c3d + 7919 * (k * per_keyword + i):08x}_nohash_{i % 3}.wav"
            write_clip(root / keyword / name, k * per_keyword + i, seconds=0.5, fmt=FORMATS[0])
            if i == 1:
                valid.append(f"{keyword}/{name}")
            elif i == 2:
                test.append(f"{keyword}/{name}")
    for i, noise in enumerate(("white_noise.wav", "running_tap.wav")):
        write_clip(root / "_background_noise_" / noise, 1000 + i, seconds=1.0, fmt=FORMATS[0])
    (root / "validation_list.txt").write_text("\n".join(valid) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "LICENSE").write_text("Creative Commons BY 4.0\n")
    (root / "README.md").write_text("Speech Commands (miniature test copy)\n")
    return root


def _ytid(number: int) -> str:
    """An 11-character YouTube-like id (letters, digits, '-' and '_', sometimes leading '-')."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    rng = np.random.default_rng(10_000 + number)
    ytid = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=11))
    return "--" + ytid[2:] if number % 3 == 0 else ytid  # real ids often start with dashes


def _segment_csv(path: Path, rows: list[tuple[str, float, float, list[str]]]) -> None:
    """A segment CSV exactly as released: 3 ``#`` lines, ', ' between fields, the MID list quoted without spaces."""
    lines = [
        "# Segments csv created Sun Mar  5 10:54:31 2017",
        f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels={len(AUDIOSET_CLASSES)}, "
        f"num_positive_labels={sum(len(r[3]) for r in rows)}",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    lines += [f'{ytid}, {start:.3f}, {end:.3f}, "{",".join(mids)}"' for ytid, start, end, mids in rows]
    path.write_text("\n".join(lines) + "\n")


def write_audioset(root: Path, n_train: int = 4, n_eval: int = 3, n_unbalanced: int = 0) -> Path:
    """AudioSet: segment CSVs, ``class_labels_indices.csv`` (5 classes, index 1 "Male speech, man speaking") and
    ``audio/<YTID>_<start>.wav`` (the default ``name_pattern``), 0.3 s clips.

    Good segments: n_train in balanced_train, n_eval in eval, n_unbalanced in unbalanced_train (its CSV is only
    written when n_unbalanced > 0), each with 1-2 known MIDs; the first train segment also carries
    ``AUDIOSET_UNKNOWN_MID`` (kept, one rejection). Extra balanced_train rows: one whose audio is missing and one
    whose only MID is unknown (dropped). Extra eval row: a duplicate of the first train segment. So the index has
    n_train + n_eval + n_unbalanced clips and 4 rejections: "missing audio file", 2 x "unknown label MID", and
    "duplicate id" (3 with n_train=0: no duplicate, no kept clip with an unknown MID).
    """
    root.mkdir(parents=True, exist_ok=True)
    with (root / "class_labels_indices.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows((i, mid, name) for i, (mid, name) in enumerate(AUDIOSET_CLASSES))

    number = 0

    def segments(count: int) -> list[tuple[str, float, float, list[str]]]:
        nonlocal number
        rows = []
        for _ in range(count):
            mids = [AUDIOSET_CLASSES[number % 5][0]] + ([AUDIOSET_CLASSES[(number + 2) % 5][0]] if number % 2 else [])
            start = float(10 * (number % 4))
            rows.append((_ytid(number), start, start + 10.0, mids))
            write_clip(root / "audio" / f"{_ytid(number)}_{start:.3f}.wav", number)
            number += 1
        return rows

    train, evaluation, unbalanced = segments(n_train), segments(n_eval), segments(n_unbalanced)
    if n_train:
        train[0][3].append(AUDIOSET_UNKNOWN_MID)
        evaluation.append(train[0])  # the duplicate: same YTID and start in another CSV
    train.append((_ytid(900), 0.0, 10.0, [AUDIOSET_CLASSES[0][0]]))  # no audio file written
    unknown_only = (_ytid(901), 30.0, 40.0, [AUDIOSET_UNKNOWN_MID])
    write_clip(root / "audio" / f"{unknown_only[0]}_30.000.wav", 901)
    train.append(unknown_only)
    _segment_csv(root / "balanced_train_segments.csv", train)
    _segment_csv(root / "eval_segments.csv", evaluation)
    if n_unbalanced:
        _segment_csv(root / "unbalanced_train_segments.csv", unbalanced)
    return root


def write_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "rain"), per_class: int = 6) -> Path:
    """One folder per class: ``<class>/clip_<n>.<wav|flac|ogg>`` (the container cycles), per_class each, plus
    files that are not clips: ``<class>/notes.txt`` and a hidden ``.DS_Store``."""
    number = 0
    for name in classes:
        for i in range(per_class):
            write_clip(root / name / f"clip_{i:02d}{('.wav', '.flac', '.ogg')[i % 3]}", number)
            number += 1
        (root / name / "notes.txt").write_text("not audio\n")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def write_lengths(root: Path, seconds: list[float], classes: tuple[str, ...] = ("hit", "roll")) -> Path:
    """A ``folder`` layout of clips with the given lengths, 16 kHz mono PCM-16 (no resampling): clip ``i`` is
    ``<classes[i % len(classes)]>/clip_<i>.wav``, ``seconds[i]`` long, so it has ``clip_frames(seconds[i])``
    fbank frames."""
    for i, length in enumerate(seconds):
        write_clip(root / classes[i % len(classes)] / f"clip_{i:03d}.wav", i, seconds=length, fmt=FORMATS[0])
    return root


def clip_frames(seconds: float, rate: int = 16_000) -> int:
    """Fbank frames of a clip ``seconds`` long as ``write_clip`` writes it: 25 ms windows every 10 ms."""
    return 1 + (int(seconds * rate) - 400) // 160


def write_manifest(root: Path, multilabel: bool = False) -> Path:
    """``manifest.csv`` next to ``clips/`` with 9 good rows (classes bird, car, speech; splits 4 train, 3 valid,
    2 test; one row with an absolute path), plus one row whose file is missing (split train) and one with
    split "holdout". With ``multilabel`` the column is ``labels`` and some rows name two classes ("a;b" and
    "a, b" forms). Returns ``root`` (pass it, or ``root / "manifest.csv"``, as the source)."""
    classes = ("bird", "car", "speech")
    splits = ("train", "train", "valid", "train", "test", "valid", "train", "test", "valid")
    rows = []
    for i, split in enumerate(splits):
        rel = f"clips/{classes[i % 3]}_{i}.wav"
        write_clip(root / rel, i)
        label = classes[i % 3]
        if multilabel and i % 3 == 1:
            label = f"{label};{classes[(i + 1) % 3]}" if i % 2 else f"{label}, {classes[(i + 1) % 3]}"
        rows.append([str(root / rel) if i == 4 else rel, label, split])
    rows.append(["clips/missing.wav", "bird", "train"])
    write_clip(root / "clips/holdout.wav", 20)
    rows.append(["clips/holdout.wav", "car", "holdout"])
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels" if multilabel else "label", "split"])
        writer.writerows(rows)
    return root


def write_broken_tree(root: Path) -> tuple[Path, dict[str, str]]:
    """A ``folder`` layout (classes ``alpha``, ``beta``, 3 good clips each) with six bad files in ``alpha/`` that
    only decoding can find. Returns (root, {bad file name: keyword its rejection reason should contain}).

    The adapter indexes all 12 files (it does not decode); the prepare step must reject exactly the bad six.
    """
    for c, name in enumerate(("alpha", "beta")):
        for i in range(3):
            write_clip(root / name / f"good_{i}.wav", 3 * c + i)
    bad = root / "alpha"
    rng = np.random.default_rng(0)
    (bad / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + rng.bytes(64))  # header lies, not decodable
    (bad / "empty.wav").write_bytes(b"")  # 0 bytes: nothing to decode
    sf.write(bad / "zero_samples.wav", np.zeros((0, 1), dtype=np.float32), 16_000, subtype="PCM_16")
    sf.write(bad / "nan.wav", np.full(8000, np.nan, dtype=np.float32), 16_000, subtype="FLOAT")
    with_inf = 0.1 * rng.standard_normal(8000).astype(np.float32)
    with_inf[1234] = np.inf
    sf.write(bad / "inf.wav", with_inf, 16_000, subtype="FLOAT")
    sf.write(bad / "too_short.wav", 0.1 * rng.standard_normal(160).astype(np.float32), 16_000,
             subtype="PCM_16")  # 10 ms: less than one 25 ms fbank frame
    expected = {
        "garbage.wav": "decode",
        "empty.wav": "decode",
        "zero_samples.wav": "empty",
        "nan.wav": "non-finite",
        "inf.wav": "non-finite",
        "too_short.wav": "too short",
    }
    return root, expected


def write_awkward_names(root: Path) -> tuple[Path, dict[str, str]]:
    """A ``folder`` layout (classes ``alpha``, ``beta``, 4 good clips each) plus three files that cannot be
    prepared: one whose name is not UTF-8 (bytes 0xE9), a dangling symbolic link and a symbolic link loop.
    Returns (root, {name as shown, escaped: keyword its rejection reason should contain})."""
    for c, name in enumerate(("alpha", "beta")):
        for i in range(4):
            write_clip(root / name / f"good_{i}.wav", 4 * c + i)
    write_clip(root / "alpha" / "cafe.wav", 9)
    os.rename(bytes(root / "alpha" / "cafe.wav"), bytes(root / "alpha") + b"/caf\xe9.wav")  # Latin-1 bytes
    os.symlink(root / "alpha" / "nowhere.wav", root / "alpha" / "dangling.wav")
    os.symlink(root / "beta" / "loop.wav", root / "beta" / "loop.wav")
    return root, {"caf\\xe9.wav": "not valid UTF-8", "dangling.wav": "dangling symbolic link",
                  "loop.wav": "symbolic link loop"}
