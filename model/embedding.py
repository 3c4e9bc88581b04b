"""Embeddings of audio of any length: a scene vector per clip and a vector per patch column with its time.

    feeding = Feeding(mean=-4.27, std=4.57, chunk_frames=1024)
    found = embed_waveforms(encoder, [wav_16k_mono], feeding)  # wav: (1, samples) at 16 kHz
    found[0].scene["cls"]      # (D,): the utterance vector
    found[0].timestamps        # (t, D): one vector per 160 ms patch column
    found[0].times_ms          # (t,): the centre of each column, in ms from the clip's start

A clip's log-mel is computed in blocks (``BLOCK_FRAMES``), cut into chunks of ``chunk_frames`` (the length the
encoder was fed in training) and every chunk is fed at exactly that length, the last one zero-padded before
normalisation as ``features.pad_or_crop`` pads a clip in training and evaluation. A clip no longer than one chunk
is therefore encoded exactly as the probe encodes it. Memory is bounded by the waveform, one block of features and
``batch_size`` chunks, whatever the clip's length.

- **Scene** (per read-out, ``encoder.READOUTS`` and "cls+mean"): each chunk's read-out, averaged over the chunks
  with each weighted by its real (unpadded) frames.
- **Timestamps**: each patch column's outputs averaged over its frequency patches, for the columns that hold at
  least one real frame. Column c covers frames [16c, 16c + 16); its time is the mean of their centres,
  160 c + 87.5 ms (frame i spans [10 i, 10 i + 25] ms).

The results of one clip depend on the chunks batched with it only through float summation order: the same
``batch_size`` and thread count give the same bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import encoder_from_state, load_checkpoint
from .encoder import ASDAEncoder, read_out
from .features import DATASET_STATS, FEATURE_SETTINGS, SAMPLE_RATE, filterbank, normalise

SCENE_READOUTS = ("cls", "mean", "cls+mean")
FRAME_SHIFT_MS = FEATURE_SETTINGS["frame_shift"]
FRAME_LENGTH_MS = FEATURE_SETTINGS["frame_length"]
WINDOW = SAMPLE_RATE * FRAME_LENGTH_MS // 1000  # samples in one frame's window (400)
HOP = SAMPLE_RATE * FRAME_SHIFT_MS // 1000  # samples between frames (160)
BLOCK_FRAMES = 6000  # log-mel frames computed at once (60 s of audio): bounds the filterbank's memory


@dataclass(frozen=True)
class Feeding:
    """How audio becomes the encoder's input: the normalisation of its training data (EAT's (x - mean) / (2 std))
    and the frames per chunk it was fed (its ``target_length``)."""

    mean: float = DATASET_STATS["audioset"][0]
    std: float = DATASET_STATS["audioset"][1]
    chunk_frames: int = 1024

    def check(self, encoder: ASDAEncoder) -> None:
        patch = encoder.config.patch_size
        if self.chunk_frames < patch or self.chunk_frames % patch:
            raise ValueError(f"chunk_frames={self.chunk_frames} is not allowed: expected a positive multiple of "
                             f"the patch size ({patch})")
        if self.chunk_frames > encoder.config.target_length:
            raise ValueError(f"chunk_frames={self.chunk_frames} is longer than the encoder's positional table "
                             f"({encoder.config.target_length} frames)")
        if not self.std > 0:
            raise ValueError(f"std={self.std} is not allowed: expected > 0")


@dataclass
class ClipEmbedding:
    """One clip's embeddings (float32 numpy): ``scene`` read-out -> (D,) or (2D,) for "cls+mean";
    ``timestamps`` (t, D) and ``times_ms`` (t,); ``frames``: its log-mel frames."""

    scene: dict[str, np.ndarray]
    timestamps: np.ndarray
    times_ms: np.ndarray
    frames: int


@dataclass
class _Clip:
    """A clip's running sums while its chunks come back from the encoder."""

    frames: int = 0
    weights: list[int] = field(default_factory=list)  # each chunk's real frames
    scene: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"cls": [], "mean": []})
    columns: list[torch.Tensor] = field(default_factory=list)


def column_times_ms(columns: int, patch_size: int = 16) -> np.ndarray:
    """The time (ms) of each of ``columns`` patch columns: the mean centre of its frames."""
    first_centre = FRAME_LENGTH_MS / 2
    return (np.arange(columns) * patch_size + (patch_size - 1) / 2) * FRAME_SHIFT_MS + first_centre


def log_mel_blocks(wav: torch.Tensor, block_frames: int = BLOCK_FRAMES) -> Iterator[torch.Tensor]:
    """The raw log-mel of (1, samples) mono 16 kHz audio (``features.kaldi_log_mel``), in blocks of at most
    ``block_frames`` frames. The DC offset is removed over the whole clip first, as ``kaldi_log_mel`` does; each
    frame's window lies inside one block, so the frames are those of one call (up to float summation order).
    Audio shorter than one frame is zero-padded to one frame."""
    wav = wav - wav.mean()
    if wav.shape[-1] < WINDOW:
        wav = torch.nn.functional.pad(wav, (0, WINDOW - wav.shape[-1]))
    frames = 1 + (wav.shape[-1] - WINDOW) // HOP
    for start in range(0, frames, block_frames):
        count = min(block_frames, frames - start)
        yield filterbank(wav[:, start * HOP: (start + count - 1) * HOP + WINDOW])


def chunks_of(blocks: Iterable[torch.Tensor], chunk_frames: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(raw log-mel chunk of exactly ``chunk_frames`` frames, its real frames) from a clip's blocks of frames;
    the last chunk is zero-padded (raw zeros: what ``pad_or_crop`` pads before normalisation)."""
    pending: list[torch.Tensor] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += block.shape[0]
        while held >= chunk_frames:
            joined = torch.cat(pending)
            yield joined[:chunk_frames], chunk_frames
            pending, held = [joined[chunk_frames:]], held - chunk_frames
    if held:
        tail = torch.cat(pending)
        yield torch.nn.functional.pad(tail, (0, 0, 0, chunk_frames - held)), held


def embed_waveforms(encoder: ASDAEncoder, waveforms: Iterable[torch.Tensor], feeding: Feeding, *,
                    batch_size: int = 8, readouts: Sequence[str] = SCENE_READOUTS) -> Iterator[ClipEmbedding]:
    """Each clip's ``ClipEmbedding`` (see the module), in order, from (1, samples) mono 16 kHz waveforms
    (``features.mono_16k`` makes any file's audio so); ``batch_size`` chunks, of any clips, share a forward pass.
    The encoder runs where its weights are, in eval mode, without gradients."""
    blocks = (log_mel_blocks(wav) for wav in waveforms)
    yield from embed_log_mels(encoder, blocks, feeding, batch_size=batch_size, readouts=readouts)


def embed_log_mels(encoder: ASDAEncoder, clips: Iterable[Iterable[torch.Tensor]], feeding: Feeding, *,
                   batch_size: int = 8, readouts: Sequence[str] = SCENE_READOUTS) -> Iterator[ClipEmbedding]:
    """``embed_waveforms`` from each clip's raw log-mel, given as an iterable of (frames, 128) blocks."""
    feeding.check(encoder)
    unknown = [r for r in readouts if r not in SCENE_READOUTS]
    if unknown or batch_size < 1:
        raise ValueError(f"readouts={list(readouts)}, batch_size={batch_size} are not allowed: expected read-outs "
                         f"from {list(SCENE_READOUTS)} and batch_size >= 1")
    encoder.eval()
    open_clips: dict[int, _Clip] = {}
    batch: list[tuple[int, torch.Tensor, int]] = []
    done = 0  # the clips before this one have been yielded
    for index, blocks in enumerate(clips):
        open_clips[index] = _Clip()
        for chunk, real in chunks_of(blocks, feeding.chunk_frames):
            batch.append((index, chunk, real))
            if len(batch) == batch_size:
                _run(encoder, batch, open_clips, feeding)
                batch = []
        # every clip before the first one with a chunk still waiting in the batch is complete
        complete = batch[0][0] if batch else index + 1
        for finished in range(done, complete):
            yield _finished(open_clips.pop(finished), readouts, encoder.config.patch_size)
        done = complete
    if batch:
        _run(encoder, batch, open_clips, feeding)
    for index in sorted(open_clips):
        yield _finished(open_clips.pop(index), readouts, encoder.config.patch_size)


@torch.no_grad()
def _run(encoder: ASDAEncoder, batch: list[tuple[int, torch.Tensor, int]], clips: dict[int, _Clip],
         feeding: Feeding) -> None:
    """One forward pass over ``batch``'s chunks; each chunk's read-outs and real columns go to its clip."""
    device = next(encoder.parameters()).device
    raw = torch.stack([chunk for _, chunk, _ in batch]).to(device)
    utterance, patches = encoder.extract_features(normalise(raw, feeding.mean, feeding.std))
    rows = encoder.config.num_mel_bins // encoder.config.patch_size
    columns = patches.reshape(len(batch), -1, rows, patches.shape[-1]).mean(dim=2)  # (B, T/p, D)
    means = read_out(utterance, patches, "mean")
    patch = encoder.config.patch_size
    for k, (index, _, real) in enumerate(batch):
        clip = clips[index]
        clip.scene["cls"].append(utterance[k].float().cpu())
        clip.scene["mean"].append(means[k].float().cpu())
        clip.weights.append(real)
        clip.frames += real
        clip.columns.append(columns[k, : -(-real // patch)].float().cpu())


def _finished(clip: _Clip, readouts: Sequence[str], patch_size: int) -> ClipEmbedding:
    weights = torch.tensor(clip.weights, dtype=torch.float64) / clip.frames
    scene = {name: vectors[0] if len(vectors) == 1  # one chunk: its read-out as it is, bit for bit
             else (torch.stack(vectors).double() * weights[:, None]).sum(0).float()
             for name, vectors in clip.scene.items()}
    scene["cls+mean"] = torch.cat([scene["cls"], scene["mean"]])
    timestamps = torch.cat(clip.columns)
    return ClipEmbedding(scene={r: scene[r].numpy() for r in readouts}, timestamps=timestamps.numpy(),
                         times_ms=column_times_ms(len(timestamps), patch_size), frames=clip.frames)


def load_embedder(path: str | Path, which: str = "student",
                  map_location: str | torch.device = "cpu") -> tuple[ASDAEncoder, Feeding, str]:
    """(encoder in eval mode, its ``Feeding``, where the feeding came from) of an exported folder
    (``asda export``) or a checkpoint file (a pretraining run's ``final.pt``, which records the normalisation
    of its data and the frames it was fed, or an imported release checkpoint, fed as the release: AudioSet's
    normalisation, 1024 frames)."""
    path = Path(path)
    if path.is_dir():
        from .pretrained import feature_settings, load_pretrained

        found = feature_settings(path)
        feeding = Feeding(mean=found["mean"], std=found["std"], chunk_frames=found["target_length"])
        return load_pretrained(path, map_location).eval(), feeding, f"{path}/config.json (exported)"
    state, config = load_checkpoint(path, map_location)
    encoder = encoder_from_state(state, config, which, path).eval()
    recorded = state.get("feeding")
    if recorded:
        return encoder, Feeding(**recorded), f"{path} (recorded at pretraining)"
    return encoder, Feeding(chunk_frames=config.target_length), (
        f"the release's default, AudioSet's normalisation: {path} records none")
