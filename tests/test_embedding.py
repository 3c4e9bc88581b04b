"""Embeddings of audio of any length (model.embedding) and the HEAR API over them (model.hear)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ASDAConfig, ASDAEncoder, fbank, log_mel, save_checkpoint
from model.embedding import Feeding, embed_waveforms, log_mel_blocks
from model.hear import HearModel, get_scene_embeddings, get_timestamp_embeddings, load_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = ASDAConfig.preset("tiny")  # fed 256 frames: a chunk is 2.56 s
FEEDING = Feeding(mean=-5.0, std=3.0, chunk_frames=CONFIG.target_length)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ASDAEncoder(CONFIG).eval()


def _audio(seconds: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    return (0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(len(t), generator=generator))[None]


def test_a_clip_within_one_chunk_is_encoded_as_the_probe_feeds_it(encoder):
    wav = _audio(1.5)
    (found,) = embed_waveforms(encoder, [wav], FEEDING)
    x = fbank(wav, 16000, target_length=CONFIG.target_length, mean=FEEDING.mean, std=FEEDING.std)
    with torch.no_grad():
        utterance, patches = encoder.extract_features(x[None])
    assert torch.equal(torch.from_numpy(found.scene["cls"]), utterance[0])
    assert torch.equal(torch.from_numpy(found.scene["mean"]), patches[0].mean(0))
    assert np.array_equal(found.scene["cls+mean"], np.concatenate([found.scene["cls"], found.scene["mean"]]))


def test_timestamps_are_the_centres_of_the_patch_columns_that_hold_audio(encoder):
    wav = _audio(1.5)
    (found,) = embed_waveforms(encoder, [wav], FEEDING)
    frames = log_mel(wav, 16000).shape[0]  # 148
    assert found.frames == frames
    assert found.timestamps.shape == (-(-frames // 16), CONFIG.embed_dim)
    assert found.times_ms[0] == pytest.approx(87.5)  # frames 0..15: centres 12.5 ... 162.5 ms
    assert np.allclose(np.diff(found.times_ms), 160.0)


def test_a_long_clip_is_cut_into_chunks_each_encoded_alone_and_weighted_by_its_frames(encoder):
    wav = _audio(6.0)  # 598 frames: chunks of 256, 256 and 86
    (found,) = embed_waveforms(encoder, [wav], FEEDING, batch_size=1)
    raw = log_mel(wav, 16000)
    chunks = [raw[:256], raw[256:512], torch.nn.functional.pad(raw[512:], (0, 0, 0, 256 - 86))]
    with torch.no_grad():
        utterances, patches = encoder.extract_features((torch.stack(chunks) - FEEDING.mean) / (2 * FEEDING.std))
    weights = torch.tensor([256.0, 256.0, 86.0]) / 598
    assert np.allclose(found.scene["cls"], (utterances * weights[:, None]).sum(0).numpy(), atol=1e-6)
    columns = patches.reshape(3, 16, 8, -1).mean(2)
    expected = torch.cat([columns[0], columns[1], columns[2, :6]])  # 86 real frames: 6 columns
    assert found.timestamps.shape == (38, CONFIG.embed_dim)
    assert np.allclose(found.timestamps, expected.numpy(), atol=1e-6)
    assert found.times_ms[-1] == pytest.approx(37 * 160 + 87.5)


def test_the_filterbank_in_blocks_gives_the_frames_of_one_call():
    wav = _audio(3.0)
    blocks = list(log_mel_blocks(wav, block_frames=50))
    assert [len(b) for b in blocks] == [50] * 5 + [48]
    assert torch.allclose(torch.cat(blocks), log_mel(wav, 16000), atol=1e-5)


def test_embeddings_are_the_same_bits_run_after_run_and_clips_keep_their_order(encoder):
    clips = [_audio(s, seed=i) for i, s in enumerate((0.5, 4.0, 0.01, 2.6))]
    first = list(embed_waveforms(encoder, clips, FEEDING, batch_size=3))
    again = list(embed_waveforms(encoder, clips, FEEDING, batch_size=3))
    assert [e.frames for e in first] == [48, 398, 1, 258]  # 10 ms is padded to one 25 ms frame
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.scene["cls+mean"], b.scene["cls+mean"]) and np.array_equal(a.timestamps, b.timestamps)
    alone = [next(embed_waveforms(encoder, [clip], FEEDING, batch_size=3)) for clip in clips]
    for a, b in zip(first, alone, strict=True):  # the clips of a batch only change float summation order
        assert np.allclose(a.scene["cls"], b.scene["cls"], atol=1e-5)


def test_a_chunk_longer_than_the_positional_table_is_refused(encoder):
    with pytest.raises(ValueError, match="longer than the encoder's positional table"):
        list(embed_waveforms(encoder, [_audio(1.0)], Feeding(chunk_frames=512)))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        list(embed_waveforms(encoder, [_audio(1.0)], Feeding(chunk_frames=100)))


# --- the HEAR API ------------------------------------------------------------------------------------------------

def test_hear_embeddings_have_the_shapes_types_and_regular_timestamps_the_api_asks(encoder):
    model = HearModel(encoder, FEEDING, readout="cls+mean")
    assert model.sample_rate == 16000
    assert (model.scene_embedding_size, model.timestamp_embedding_size) == (256, 128)
    audio = torch.rand(5, 32000) * 2 - 1
    embeddings, times = get_timestamp_embeddings(audio, model)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (5, 13, 128)
    assert times.shape == (5, 13)
    assert torch.all((torch.diff(times) - 160.0).abs() < 1e-3)
    scene = get_scene_embeddings(torch.rand(3, int(3.74 * 16000)) * 2 - 1, model)
    assert scene.dtype == torch.float32 and scene.shape == (3, 256)
    assert torch.equal(get_scene_embeddings(audio, model), get_scene_embeddings(audio, model))


def test_load_model_reads_the_feeding_a_pretraining_checkpoint_records(encoder, tmp_path):
    path = save_checkpoint(tmp_path / "final.pt", encoder, CONFIG, feeding={"mean": -5.0, "std": 3.0,
                                                                          "chunk_frames": 256})
    model = load_model(str(path))
    assert model.feeding == FEEDING and model.readout == "cls"
    audio = _audio(1.0)
    assert torch.equal(get_scene_embeddings(audio, model), get_scene_embeddings(audio, HearModel(encoder, FEEDING)))
    bare = load_model(str(save_checkpoint(tmp_path / "bare.pt", encoder, CONFIG)))
    assert (bare.feeding.mean, bare.feeding.chunk_frames) == (Feeding().mean, 256)  # the release's normalisation
    with pytest.raises(ValueError, match="readout='max' is not allowed"):
        load_model(str(path), readout="max")


def test_twenty_minutes_of_audio_are_embedded_in_bounded_memory():
    """The filterbank is computed in blocks and the encoder runs on a few chunks at a time: 20 minutes need no
    more memory than a few copies of their waveform (one call of the filterbank over them would need ~1 GB)."""
    script = """
import json, sys, torch
from model import ASDAConfig, ASDAEncoder
from model.embedding import Feeding
from model.hear import HearModel, get_timestamp_embeddings
def peak_mb():
    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024
torch.set_num_threads(1)
config = ASDAConfig.preset("tiny")
model = HearModel(ASDAEncoder(config), Feeding(chunk_frames=config.target_length))
audio = torch.randn(1, 16000 * 60 * 20) * 0.1
before = peak_mb()
embeddings, times = get_timestamp_embeddings(audio, model)
print(json.dumps({"growth_mb": peak_mb() - before, "shape": list(embeddings.shape), "last_ms": times[0, -1].item()}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["shape"] == [1, 7500, 128]  # 120 000 frames, one column per 16
    assert found["last_ms"] == pytest.approx(7499 * 160 + 87.5)
    waveform_mb = 16000 * 60 * 20 * 4 / 2**20  # 73 MB
    assert found["growth_mb"] < 4 * waveform_mb, found


def test_the_hear_validator_accepts_the_module(encoder, tmp_path):
    validate = pytest.importorskip("hearvalidator.validate", reason="the HEAR validator (hearvalidator, which "
                                   "needs tensorflow) is not installed here")
    path = save_checkpoint(tmp_path / "final.pt", encoder, CONFIG)
    validate.ValidateModel("model.hear", str(path), device="cpu")()


def test_an_exported_folder_gives_the_embeddings_of_its_checkpoint(encoder, tmp_path, monkeypatch):
    from pipelines.export import export

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    path = save_checkpoint(tmp_path / "run" / "final.pt", encoder, CONFIG,
                           feeding={"mean": -5.0, "std": 3.0, "chunk_frames": 256})
    export(path, tmp_path / "exported")
    from_export, from_checkpoint = load_model(str(tmp_path / "exported")), load_model(str(path))
    assert from_export.feeding == from_checkpoint.feeding == FEEDING  # the recorded normalisation travels
    audio = torch.stack([_audio(3.0, seed=1)[0], _audio(3.0, seed=2)[0]])
    assert torch.equal(get_scene_embeddings(audio, from_export), get_scene_embeddings(audio, from_checkpoint))
    assert torch.equal(get_timestamp_embeddings(audio, from_export)[0],
                       get_timestamp_embeddings(audio, from_checkpoint)[0])
