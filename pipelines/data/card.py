"""The dataset card (dataset.json) next to prepared shards. Light on purpose: Ray Data tasks import this module,
and must not pay for importing torch."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

CARD_NAME = "dataset.json"
HASH = "sha256"  # the card's per-shard content hash


def load_card(prepared: str | Path) -> dict:
    """The dataset card of a prepared folder (a path or a URI), or a clear error saying how to make one. The card
    is written last, so an output whose preparation has not finished has none and is refused here."""
    from . import storage

    card = read_card(*storage.filesystem(prepared))
    if card is None:
        raise ValueError(f"{prepared} is not a prepared data set (no {CARD_NAME}); run `asda prepare` first")
    return card


def read_card(fs, path: str) -> dict | None:
    """The card in folder ``path`` of pyarrow filesystem ``fs``, or None where there is none (yet)."""
    from . import storage

    text = storage.read_text(fs, f"{path}/{CARD_NAME}")
    return json.loads(text) if text is not None else None


def cv_folds(card: dict, split: str, k: int, data: str | Path) -> list[int]:
    """Folds 1..k of ``split`` for k-fold cross-validation, or a clear error naming the folds the card has."""
    folds = list(range(1, k + 1))
    present = card.get("folds", {}).get(split, {})
    missing = [f for f in folds if str(f) not in present]
    if missing:
        raise ValueError(f"cv_folds={k}: split {split!r} of {data} has no fold {missing}; it has "
                         f"{sorted(present) or 'no folds'} (ESC-50 has folds 1-5)")
    return folds


def feed_length(card: dict, override: int | None, data: str | Path, patch_size: int = 16) -> int:
    """Frames per clip fed to the encoder: ``override`` if given, else the data set's own length from its card
    (AudioSet 1024, ESC-50 512, Speech Commands 128), so a 1 s clip is never padded to a checkpoint's length."""
    length = card["target_length"] if override is None else override
    if isinstance(length, bool) or not isinstance(length, int) or length < patch_size or length % patch_size:
        raise ValueError(f"target_length={length!r} for {data} is not allowed: expected a positive multiple of "
                         f"{patch_size} (the card's is {card['target_length']})")
    return length


def file_hash(path: str | Path, chunk: int = 1 << 22, fs=None) -> str:
    """The content hash the card records for a shard (sha256, hex); ``fs``: the pyarrow filesystem it is on."""
    digest = hashlib.new(HASH)
    with open(path, "rb") if fs is None else fs.open_input_stream(str(path)) as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- the length clips are fed at ------------------------------------------------------------------------------

CROP_QUANTILE = 0.9  # a fitted length crops at most ~10 % of the clips
MAX_PADDING = 0.5  # ... and keeps padding at most half of the frames the encoder is fed
SHORTEST, LONGEST = 128, 1024  # the bounds of a fitted length: 8 patch columns, AudioSet's 10 s


def split_frames(card: dict, split: str | None) -> dict[int, int]:
    """{unpadded frames: clips} of ``split`` in the card's ``frame_counts``, or of every split where ``split`` is
    None; {} where the card has none (cards written before frame counts were recorded)."""
    counts: dict[int, int] = {}
    for name, per_split in card.get("frame_counts", {}).items():
        if split is None or name == split:
            for frames, n in per_split.items():
                counts[int(frames)] = counts.get(int(frames), 0) + n
    return dict(sorted(counts.items()))


def frames_quantile(counts: dict[int, int], q: float) -> int:
    """The smallest frame count at or below which at least ``q`` of the clips lie (the nearest-rank quantile: a
    real clip's length, and at most 1 - q of the clips are longer)."""
    assert counts, "no clips to take a quantile of"
    rank, seen = math.ceil(q * sum(counts.values())), 0
    for frames, n in sorted(counts.items()):
        seen += n
        if seen >= rank:
            return frames
    return max(counts)


def padded_share(counts: dict[int, int], length: int) -> float:
    """The share of fed frames that are padding when clips with these frame counts are fed at ``length`` frames
    (cropped or zero-padded): 1 - E[min(frames, length)] / length."""
    clips = sum(counts.values())
    return 1.0 - sum(min(f, length) * n for f, n in counts.items()) / (length * clips)


def cropped_share(counts: dict[int, int], length: int) -> float:
    """The share of clips longer than ``length`` frames: the ones the feed crops."""
    return sum(n for f, n in counts.items() if f > length) / sum(counts.values())


def length_limits(counts: dict, patch_size: int = 16, low: int = SHORTEST, high: int = LONGEST) -> tuple[int, int]:
    """(cut, pad) of ``fitted_length``, for clips with the lengths ``counts`` ({frames: clips}, not empty)."""
    counts = {int(f): n for f, n in counts.items()}
    cut = -(-frames_quantile(counts, CROP_QUANTILE) // patch_size) * patch_size
    fits = [length for length in range(low, high + 1, patch_size) if padded_share(counts, length) <= MAX_PADDING]
    return cut, fits[-1] if fits else low


def fitted_length(counts: dict, patch_size: int = 16, low: int = SHORTEST, high: int = LONGEST) -> int:
    """Frames per clip for a data set whose clips have the lengths ``counts`` ({frames: clips}, frames as ints or
    as the card's strings), where the layout says nothing (a folder, a manifest): min(cut, pad), kept in
    [low, high], where

    - cut: the 90th percentile of the frame counts (``frames_quantile``), rounded up to whole patches, so that
      at most ~10 % of the clips are cropped;
    - pad: the longest length, in whole patches within [low, high], at which padding is at most half of the
      frames fed (``padded_share``; it only grows with the length); ``low`` where even that pads more.

    Cropping loses a clip's tail and padding spends the encoder's work on zeros: the cut caps the first, the pad
    keeps the second a minority. ``low`` (128 = 8 patch columns) keeps a clip several patches long for the
    masking and the 2-D positions; ``high`` (1024) is AudioSet's 10 s, what the checkpoints are made for. No clips
    at all: ``high``.
    """
    if not counts:
        return high
    cut, pad = length_limits(counts, patch_size, low, high)
    return max(min(cut, pad), low)  # pad is within [low, high]


def fit_split(card: dict) -> str | None:
    """The split a length is fitted to: train, or every split (None) where there is no train."""
    return "train" if "train" in card.get("frame_counts", {}) else None


def padding_share(card: dict, split: str, length: int) -> float | None:
    """The share of fed frames that are padding when ``split``'s clips are fed at ``length`` frames, from the
    card's frame counts; None where the card has none (written before they were recorded)."""
    if "frame_counts" not in card:
        return None
    if split not in card["frame_counts"]:
        raise ValueError(f"split {split!r} is not in the card: it has {sorted(card['frame_counts'])}")
    return padded_share(split_frames(card, split), length)


def padding_note(card: dict, split: str, length: int) -> tuple[dict[str, str], str | None]:
    """What a run logs of the padding in what it is fed (``split``'s clips at ``length`` frames): the MLflow
    params ``data.padding_share`` and ``data.cropped_share`` (none where the card predates frame counts), and a
    warning to print where more than half of the fed frames are padding, or None."""
    share = padding_share(card, split, length)
    if share is None:
        return {}, None
    counts = split_frames(card, split)
    params = {"data.padding_share": f"{share:.4f}", "data.cropped_share": f"{cropped_share(counts, length):.4f}"}
    if share <= MAX_PADDING:
        return params, None
    fitted = fitted_length(counts)
    return params, (f"warning: {share:.0%} of the frames fed to the encoder are padding ({split!r} clips at "
                    f"{length} frames); their length fits {fitted} frames (--target-length {fitted})")
