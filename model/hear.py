"""The HEAR API (Turian et al., HEAR 2021) over any encoder of this platform, so HEAR-style tooling evaluates it:

    from model import hear
    model = hear.load_model("exported/")           # an `asda export` folder, or a checkpoint file (.pt)
    scene = hear.get_scene_embeddings(audio, model)                  # audio: (n, samples) at 16 kHz
    emb, times_ms = hear.get_timestamp_embeddings(audio, model)      # (n, t, D), (n, t)

Audio of any length is cut into chunks of the frames the encoder was fed in training (``model.embedding``); the
scene embedding is the read-out ``load_model`` names ("cls" by default: the utterance vector; "mean": the patch
outputs' mean; "cls+mean": both, 2D floats), averaged over the chunks; a timestamp embedding is one patch column's
outputs averaged over frequency, every 160 ms, at the column's centre.
"""

from __future__ import annotations

import torch
from torch import nn

from .embedding import SCENE_READOUTS, Feeding, embed_waveforms, load_embedder
from .encoder import ASDAEncoder
from .features import SAMPLE_RATE

BATCH_CHUNKS = 16  # chunks per forward pass


class HearModel(nn.Module):
    """An encoder with what the HEAR API asks of a model: ``sample_rate``, ``scene_embedding_size`` and
    ``timestamp_embedding_size``; ``feeding`` is how its audio becomes the encoder's input."""

    sample_rate = SAMPLE_RATE

    def __init__(self, encoder: ASDAEncoder, feeding: Feeding, readout: str = "cls"):
        super().__init__()
        if readout not in SCENE_READOUTS:
            raise ValueError(f"readout={readout!r} is not allowed: expected one of {list(SCENE_READOUTS)}")
        feeding.check(encoder)
        self.encoder, self.feeding, self.readout = encoder.eval(), feeding, readout
        width = encoder.config.embed_dim
        self.scene_embedding_size = width * (2 if readout == "cls+mean" else 1)
        self.timestamp_embedding_size = width

    def embeddings(self, audio: torch.Tensor):
        """Each clip's ``embedding.ClipEmbedding`` of (n, samples) 16 kHz audio."""
        if audio.dim() != 2:
            raise ValueError(f"audio must be (n, samples) at {SAMPLE_RATE} Hz, got shape {tuple(audio.shape)}")
        clips = (clip.detach().float().cpu().unsqueeze(0) for clip in audio)
        return list(embed_waveforms(self.encoder, clips, self.feeding, batch_size=BATCH_CHUNKS,
                                    readouts=(self.readout,)))


def load_model(model_file_path: str = "", readout: str = "cls") -> HearModel:
    """The HEAR model of an exported folder (``asda export``) or a checkpoint file; ``readout``: the scene
    embedding's read-out (``embedding.SCENE_READOUTS``)."""
    if not model_file_path:
        raise ValueError("load_model needs the path of an exported folder (asda export) or a checkpoint file")
    encoder, feeding, _ = load_embedder(model_file_path)
    return HearModel(encoder, feeding, readout)


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """(n, samples) audio at ``model.sample_rate`` -> (n, ``scene_embedding_size``) float32, on audio's device."""
    found = model.embeddings(audio)
    return torch.stack([torch.from_numpy(e.scene[model.readout]) for e in found]).to(audio.device)


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, samples) audio -> ((n, t, ``timestamp_embedding_size``) float32, (n, t) centre times in ms), on
    audio's device; the clips of one batch have one length, so one t."""
    found = model.embeddings(audio)
    embeddings = torch.stack([torch.from_numpy(e.timestamps) for e in found])
    times = torch.stack([torch.from_numpy(e.times_ms) for e in found]).float()
    return embeddings.to(audio.device), times.to(audio.device)
