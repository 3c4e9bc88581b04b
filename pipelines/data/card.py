"""The dataset card (dataset.json) next to prepared shards. Light on purpose: Ray Data tasks import this module,
and must not pay for importing torch."""

from __future__ import annotations

import hashlib
import json
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
