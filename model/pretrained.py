"""Portable weights: an exported encoder read back with torch and safetensors alone.

``asda export`` writes a folder that needs none of the platform (no Ray, no MLflow, no prepared data) to use:

    model.safetensors   the encoder's tensors in float32 under ``ASDAEncoder.state_dict()`` names, and a fine-tuned
                        classifier's head under ``head.`` (``ClassificationHead``: ``head.norm.*``, ``head.linear.*``)
    config.json         {"format", "format_version", "model": ASDAConfig.to_dict(), "features": how to compute the
                        input (sample rate, mel bins, frames fed, the normalisation mean and std), "head": null or
                        {"num_classes", "readout"}, "weights": {"file", "sha256", "tensors"}}
    card.json, README.md  the model card (what it was trained on and how, what it scored); not read here

``load_pretrained`` checks the folder before trusting it (the files are there, the weights' bytes match the sha256
in config.json, the tensors are exactly the ones the config's encoder has, in its shapes) and names what is wrong,
because a folder of weights travels far from the run that made it. This module must stay importable without the
pipelines: ``tests/test_export.py`` checks that importing it loads neither ray, mlflow nor pipelines.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import ASDAConfig
from .encoder import ASDAEncoder
from .head import ASDAClassifier

FORMAT = "asda-pretrained"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "card.json"
README_FILE = "README.md"
HEAD_PREFIX = "head."  # a classifier's head tensors in the weights file; no encoder tensor starts with it
FEATURE_KEYS = ("sample_rate", "num_mel_bins", "target_length", "mean", "std")  # what feature_settings promises


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks (a base encoder is hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_pretrained(folder: str | Path, encoder_state: dict[str, torch.Tensor], config: ASDAConfig,
                     features: dict[str, Any], head: dict[str, Any] | None = None,
                     head_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (which must exist); returns config.json's
    contents. Floating tensors are stored as float32 (what ``ASDAEncoder`` holds, so the loaded encoder computes
    the same bits); ``head`` ({"num_classes", "readout"}) and ``head_state`` go together or not at all."""
    from safetensors.torch import save_file

    if (head is None) != (head_state is None):
        raise ValueError("a head needs both its description (num_classes, readout) and its tensors")
    missing = [k for k in FEATURE_KEYS if k not in features]
    if missing:
        raise ValueError(f"features lack {missing}; config.json must say how to compute the input")
    tensors = {k: _portable(v) for k, v in encoder_state.items()}
    tensors.update({HEAD_PREFIX + k: _portable(v) for k, v in (head_state or {}).items()})
    clash = [k for k in encoder_state if k.startswith(HEAD_PREFIX)]
    if clash:
        raise ValueError(f"encoder tensors {clash[:3]} collide with the head's prefix {HEAD_PREFIX!r}")
    folder = Path(folder)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "asda": FORMAT})
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict(),
                "features": features, "head": head,
                "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(folder / WEIGHTS_FILE),
                            "tensors": len(tensors)}}
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
    os.chmod(folder / WEIGHTS_FILE, (folder / CONFIG_FILE).stat().st_mode)  # safetensors writes it owner-only
    return document


def _portable(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy that safetensors can store on its own: contiguous, not sharing memory, float32 if floating."""
    tensor = tensor.detach().to("cpu")
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor.contiguous().clone()


def read_config(directory: str | Path) -> dict[str, Any]:
    """config.json of an exported folder, checked: the folder and both files exist, the file is this format's
    (a version this code reads) and its model config and feature settings are complete."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder; load_pretrained takes the folder asda export wrote "
                                f"(with {CONFIG_FILE} and {WEIGHTS_FILE})")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} lacks {name}: not a complete asda export (it needs "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE}); export the checkpoint again")
    try:
        document = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG_FILE} is not an asda export's config (expected \"format\": "
                         f"\"{FORMAT}\")")
    version = document.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_FILE} has format_version {version!r}; this code reads versions 1 to "
                         f"{FORMAT_VERSION} (a newer export needs newer code)")
    for key in ("model", "features", "weights"):
        if not isinstance(document.get(key), dict):
            raise ValueError(f"{directory / CONFIG_FILE} lacks its {key!r} section")
    missing = [k for k in FEATURE_KEYS if k not in document["features"]]
    if missing:
        raise ValueError(f"{directory / CONFIG_FILE}: features lack {missing}")
    return document


def feature_settings(directory: str | Path) -> dict[str, Any]:
    """How to compute an exported encoder's input: {"sample_rate", "num_mel_bins", "target_length", "mean",
    "std", ...} from its config.json, e.g. ``model.fbank(wav, sr, target_length=s["target_length"],
    mean=s["mean"], std=s["std"])``; "source" says where the mean and std came from."""
    return dict(read_config(directory)["features"])


def read_weights(directory: str | Path, map_location: str | torch.device = "cpu"
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json's contents, every tensor of the weights file) after checking the file's sha256 against the
    one config.json recorded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    document = read_config(directory)
    path = directory / WEIGHTS_FILE
    expected = document["weights"].get("sha256")
    if expected != file_sha256(path):
        raise ValueError(f"{path} does not match the sha256 in {CONFIG_FILE} (the file was changed or damaged "
                         f"after export); export the checkpoint again")
    try:
        tensors = load_file(str(path), device=str(map_location))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    return document, tensors


def _load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path, what: str) -> None:
    """Copy ``tensors`` into ``module``, or a ValueError naming the tensors missing, unexpected or misshapen."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshapen = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or misshapen:
        parts = [f"{label} {names[:4]}{' ...' if len(names) > 4 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected),
                                      ("shaped differently (weights vs config)", misshapen)) if names]
        raise ValueError(f"{where / WEIGHTS_FILE} does not fit the {what} {CONFIG_FILE} describes: "
                         f"{'; '.join(parts)}")
    module.load_state_dict(tensors, strict=True)


def _config(document: dict[str, Any], directory: Path) -> ASDAConfig:
    try:
        return ASDAConfig.from_dict(document["model"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{directory / CONFIG_FILE}: its model config is not valid: {exc}") from None


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> ASDAEncoder:
    """The encoder of an ``asda export`` folder, in eval mode, with its feature settings as
    ``encoder.feature_settings`` (see ``feature_settings``). A classifier's head, if the folder has one, is left
    out (``load_pretrained_classifier`` takes it)."""
    directory = Path(directory)
    document, tensors = read_weights(directory, map_location)
    encoder = ASDAEncoder(_config(document, directory)).to(map_location)
    _load_into(encoder, {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}, directory, "encoder")
    encoder.feature_settings = dict(document["features"])
    return encoder.eval()


def load_pretrained_classifier(directory: str | Path, map_location: str | torch.device = "cpu") -> ASDAClassifier:
    """Encoder and head of an ``asda export`` folder made from a fine-tuned classifier checkpoint, in eval mode,
    with ``feature_settings`` on the classifier; a folder without a head is refused."""
    directory = Path(directory)
    document, tensors = read_weights(directory, map_location)
    head = document.get("head")
    if not isinstance(head, dict) or "num_classes" not in head:
        raise ValueError(f"{directory} holds an encoder without a classifier head (exported from a pretraining or "
                         f"imported checkpoint); use load_pretrained")
    config = _config(document, directory)
    classifier = ASDAClassifier(config, int(head["num_classes"]), readout=head.get("readout", "cls"))
    _load_into(classifier.encoder, {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)},
               directory, "encoder")
    _load_into(classifier.head, {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)},
               directory, "classifier head")
    classifier.feature_settings = dict(document["features"])
    return classifier.to(map_location).eval()
