import math

import pytest
import torch
import torchaudio

from model import fbank, log_mel


def _tone(seconds=1.0, rate=16000, freq=440.0, channels=1):
    t = torch.arange(int(seconds * rate)) / rate
    wav = 0.5 * torch.sin(2 * math.pi * freq * t) + 0.01 * torch.randn(t.shape)
    return wav.repeat(channels, 1)


def test_fbank_equals_the_direct_torchaudio_pipeline():
    wav = _tone(seconds=2.0, rate=44100, channels=2)
    ours = fbank(wav, 44100, target_length=512, mean=-6.627, std=5.359)

    mono = wav.mean(0, keepdim=True)
    mono = torchaudio.functional.resample(mono, 44100, 16000)
    mono = mono - mono.mean()
    ref = torchaudio.compliance.kaldi.fbank(
        mono, htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
        num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25,
    )
    ref = torch.nn.functional.pad(ref, (0, 0, 0, 512 - ref.shape[0]))
    ref = (ref - (-6.627)) / (2 * 5.359)
    torch.testing.assert_close(ours, ref)


def test_ten_second_clip_gives_998_frames_and_pads_to_target():
    wav = _tone(seconds=10.0)
    assert log_mel(wav, 16000).shape == (998, 128)
    assert fbank(wav, 16000).shape == (1024, 128)


def test_padding_happens_before_normalisation():
    out = fbank(_tone(seconds=1.0), 16000, target_length=128, mean=-4.0, std=2.0)
    # 1 s gives 98 frames; padded frames are zeros normalised: (0 - mean) / (2 std) = 1.0
    assert torch.all(out[98:] == 1.0)


def test_long_clip_is_cropped_and_no_target_keeps_all_frames():
    wav = _tone(seconds=3.0)
    assert fbank(wav, 16000, target_length=128).shape == (128, 128)
    assert fbank(wav, 16000, target_length=None).shape == (298, 128)


def test_mono_input_and_one_channel_input_agree():
    wav = _tone()
    torch.testing.assert_close(fbank(wav[0], 16000), fbank(wav, 16000))


def test_too_short_clip_is_a_clear_error():
    with pytest.raises(ValueError, match="too short"):
        log_mel(torch.zeros(100), 16000)
