"""Model checkpoints: weights plus the resolved config, loadable with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ASDAConfig
from .encoder import ASDAEncoder

FORMAT_VERSION = 1
HASH_SUFFIX = ".sha256"  # beside every checkpoint: the hex sha256 of its bytes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, config: ASDAConfig, **extra: Any) -> Path:
    """Write {"format", "config", "model", **extra} atomically, with its sha256 beside it (``<path>.sha256``);
    ``extra`` must hold tensors and plain values."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT_VERSION, "config": config.to_dict(), "model": model.state_dict(), **extra}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    digest = _sha256(tmp)
    os.replace(tmp, path)  # never leave a half-written file under the real name
    hash_file = path.with_name(path.name + HASH_SUFFIX)
    hash_file.with_name(hash_file.name + ".tmp").write_text(digest + "\n")
    os.replace(hash_file.with_name(hash_file.name + ".tmp"), hash_file)
    return path


def corruption(path: str | Path) -> str | None:
    """Why the checkpoint file at ``path`` must not be read (its bytes differ from the sha256 saved beside it),
    or None."""
    path = Path(path)
    hash_file = path.with_name(path.name + HASH_SUFFIX)
    if hash_file.is_file() and _sha256(path) != hash_file.read_text().strip():
        return f"checkpoint {path} is corrupt: its sha256 differs from the one saved beside it ({hash_file.name})"
    return None


def read_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint file's contents, after checking its bytes against the sha256 saved beside it (checkpoints
    written before hashes were kept have none and are read as they are). Only tensors and plain containers are
    unpickled (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    problem = corruption(path)
    if problem:
        raise ValueError(f"{problem}; use an earlier checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, foreign pickle
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from exc


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, ASDAConfig]:
    """(whole state dict, config), verified (see ``read_state``)."""
    path = Path(path)
    state = read_state(path, map_location)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"checkpoint {path} is not an ASDA checkpoint (needs 'model' and 'config' entries)")
    return state, ASDAConfig.from_dict(state["config"])


def load_encoder(path: str | Path, which: str = "student", map_location: str | torch.device = "cpu") -> ASDAEncoder:
    """The student or teacher encoder of a pretraining checkpoint, or the encoder of a classifier checkpoint."""
    if which not in ("student", "teacher"):
        raise ValueError(f"which={which!r} is not allowed: expected 'student' or 'teacher'")
    state, config = load_checkpoint(path, map_location)
    return encoder_from_state(state, config, which, path)


def encoder_from_state(state: dict, config: ASDAConfig, which: str, path: str | Path) -> ASDAEncoder:
    """``load_encoder`` from a checkpoint's contents already read (``load_checkpoint``)."""
    weights = state["model"]
    for prefix in (f"{which}.", "encoder.", ""):
        sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if prefix == "" or sub:
            break
    encoder = ASDAEncoder(config)
    missing, unexpected = encoder.load_state_dict(sub, strict=False)
    if missing:
        raise ValueError(f"checkpoint {path} lacks encoder weights {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return encoder
