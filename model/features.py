"""Log-mel filterbank features (SPEC §1): what the encoder sees, computed the same way everywhere."""

from __future__ import annotations

import functools

import torch
import torchaudio

SAMPLE_RATE = 16_000
NUM_MEL_BINS = 128
# (mean, std) of the log-mel features of each data set's training split, as published with EAT.
DATASET_STATS = {
    "audioset": (-4.268, 4.569),
    "esc50": (-6.627, 5.359),
    "speechcommands": (-6.846, 5.565),
}
FEATURE_SETTINGS = dict(
    sample_frequency=SAMPLE_RATE, htk_compat=True, use_energy=False, window_type="hanning",
    num_mel_bins=NUM_MEL_BINS, dither=0.0, frame_shift=10, frame_length=25,
)


def log_mel(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Raw log-mel filterbank of a clip: mono, 16 kHz, DC removed. Returns (frames, 128), unpadded, unnormalised."""
    return kaldi_log_mel(mono_16k(waveform, sample_rate))


def mono_16k(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(1, samples) at 16 kHz: channels averaged, then resampled (``torchaudio.functional.resample``'s filter)."""
    wav = torch.as_tensor(waveform, dtype=torch.float32)
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise ValueError(f"waveform must be (samples,) or (channels, samples), got shape {tuple(wav.shape)}")
    wav = wav.mean(dim=0, keepdim=True)  # (1, samples)
    if sample_rate != SAMPLE_RATE:
        wav = _resampler(int(sample_rate))(wav)
    return wav


@functools.lru_cache(maxsize=16)
def _resampler(sample_rate: int) -> torchaudio.transforms.Resample:
    """The resampling filter from ``sample_rate`` to 16 kHz, built once per rate and process: the same filter
    ``torchaudio.functional.resample`` rebuilds on every call (float32, sinc with a Hann window, width 6,
    roll-off 0.99), so the output is identical."""
    return torchaudio.transforms.Resample(sample_rate, SAMPLE_RATE, dtype=torch.float32)


def kaldi_log_mel(wav: torch.Tensor) -> torch.Tensor:
    """Log-mel filterbank (SPEC §1) of (1, samples) mono 16 kHz audio, after removing its DC offset."""
    wav = wav - wav.mean()
    # kaldi.fbank needs at least one 25 ms window; report that instead of its terse assertion.
    if wav.shape[-1] < SAMPLE_RATE * FEATURE_SETTINGS["frame_length"] // 1000:
        raise ValueError(f"clip too short for one 25 ms frame: {wav.shape[-1]} samples at 16 kHz")
    return filterbank(wav)


def filterbank(wav: torch.Tensor) -> torch.Tensor:
    """The Kaldi filterbank (SPEC §1) of (1, samples) mono 16 kHz audio as it is (``kaldi_log_mel`` removes the
    clip's DC offset first). Each frame depends on its own 25 ms window only."""
    return torchaudio.compliance.kaldi.fbank(wav, **FEATURE_SETTINGS)


def pad_or_crop(features: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad at the end or crop the first ``target_length`` frames of (frames, bins)."""
    frames = features.shape[0]
    if frames < target_length:
        return torch.nn.functional.pad(features, (0, 0, 0, target_length - frames))
    return features[:target_length]


def normalise(features: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """EAT/AST normalisation: (x - mean) / (2 * std)."""
    return (features - mean) / (2 * std)


def fbank(
    waveform: torch.Tensor,
    sample_rate: int,
    *,
    target_length: int | None = 1024,
    mean: float = DATASET_STATS["audioset"][0],
    std: float = DATASET_STATS["audioset"][1],
) -> torch.Tensor:
    """Model input for one clip: (target_length, 128), padded or cropped, then normalised.

    waveform: (samples,) or (channels, samples) at any sample rate. ``target_length=None`` keeps every frame.
    """
    features = log_mel(waveform, sample_rate)
    if target_length is not None:
        features = pad_or_crop(features, target_length)
    return normalise(features, mean, std)
