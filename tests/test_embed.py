"""`asda embed`: audio files, folders or a prepared set -> embeddings, in this process or on Ray Data."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from model import ASDAConfig, ASDAEncoder, save_checkpoint
from model.embedding import Feeding, embed_waveforms
from model.features import mono_16k
from pipelines.cli import main
from pipelines.embed import EmbedSettings, embed

CONFIG = ASDAConfig.preset("tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    encoder = ASDAEncoder(CONFIG)
    path = tmp_path_factory.mktemp("ckpt") / "final.pt"
    return save_checkpoint(path, encoder, CONFIG, feeding={"mean": -5.0, "std": 3.0, "chunk_frames": 256})


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """Four clips at four sample rates, channel counts and lengths (one past two chunks), a broken file, a hidden
    file and a text file."""
    root = tmp_path_factory.mktemp("recordings")
    (root / "takes").mkdir()
    rng = np.random.default_rng(0)
    for name, rate, channels, seconds in (("a.wav", 16000, 1, 1.0), ("takes/b.flac", 44100, 2, 3.0),
                                          ("c.wav", 8000, 1, 0.5), ("takes/d.wav", 22050, 1, 6.0)):
        sf.write(root / name, (0.2 * rng.standard_normal((int(rate * seconds), channels))).astype(np.float32), rate)
    (root / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    sf.write(root / ".hidden.wav", np.zeros(1600, np.float32), 16000)
    (root / "notes.txt").write_text("not audio")
    return root


def test_a_folder_of_any_rate_and_channels_gives_each_clip_its_embedding_and_lists_what_it_skipped(
        checkpoint, recordings, tmp_path):
    out = embed(EmbedSettings(inputs=(str(recordings),), checkpoint=str(checkpoint), out=str(tmp_path / "e.parquet"),
                              timestamps=True, ray=False))
    assert out["clips"] == 4 and out["engine"] == "process"
    assert [(r["id"], r["error"][:15]) for r in out["rejected"]] == [("broken.wav", "cannot decode: ")]
    assert json.loads((tmp_path / "e.parquet.rejected.json").read_text())[0]["path"].endswith("broken.wav")
    table = pq.read_table(tmp_path / "e.parquet")
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["a.wav", "c.wav", "takes/b.flac", "takes/d.wav"]
    assert json.loads(table.schema.metadata[b"asda.embedding"])["feeding"] == {"mean": -5.0, "std": 3.0,
                                                                              "chunk_frames": 256}
    # the same numbers as the embedding module on the file's audio made mono 16 kHz
    data, rate = sf.read(recordings / "takes" / "b.flac", dtype="float32", always_2d=True)
    encoder = ASDAEncoder(CONFIG)
    encoder.load_state_dict({k: v for k, v in torch.load(checkpoint)["model"].items()})
    (direct,) = embed_waveforms(encoder, [mono_16k(torch.from_numpy(data.T.copy()), rate)],
                                Feeding(-5.0, 3.0, 256))
    b = rows[2]
    assert np.allclose(b["embedding"], direct.scene["cls"], atol=1e-6)
    assert np.allclose(b["timestamps_ms"], direct.times_ms) and len(b["timestamp_embedding"]) == 19
    assert rows[3]["frames"] == 598 and len(rows[3]["timestamps_ms"]) == 38  # 6 s: three chunks


def test_a_prepared_set_is_embedded_from_its_stored_features_as_the_probe_encodes_them(synthetic_prepared,
                                                                                       tmp_path):
    from pipelines.data.card import load_card
    from pipelines.data.feed import read_clips
    from pipelines.probe import encoder_features

    card = load_card(synthetic_prepared)
    norm = card["normalisation"]
    torch.manual_seed(1)
    config = ASDAConfig.preset("tiny", target_length=card["target_length"])
    encoder = ASDAEncoder(config).eval()
    path = save_checkpoint(tmp_path / "final.pt", encoder, config, feeding={
        "mean": norm["mean"], "std": norm["std"], "chunk_frames": card["target_length"]})
    out = embed(EmbedSettings(inputs=(str(synthetic_prepared),), checkpoint=str(path), out=str(tmp_path / "t.npy"),
                              split="test", ray=False, readout="cls+mean"))
    found = np.load(tmp_path / "t.npy")
    clips = read_clips(synthetic_prepared, "test", labels="none")
    expected = encoder_features(encoder, clips["fbank"], batch_size=1, readout="cls+mean").numpy()
    assert out["clips"] == found.shape[0] == 32
    assert [line.split("\t")[0] for line in (tmp_path / "t.ids.tsv").read_text().splitlines()] == \
        list(clips["id"])
    assert np.allclose(found, expected, atol=1e-5)


@pytest.mark.ray
def test_on_ray_data_the_rows_and_rejections_are_those_of_the_in_process_run(checkpoint, recordings, tmp_path,
                                                                             ray_local):
    here = embed(EmbedSettings(inputs=(str(recordings),), checkpoint=str(checkpoint),
                               out=str(tmp_path / "here.parquet"), timestamps=True, ray=False))
    there = embed(EmbedSettings(inputs=(str(recordings),), checkpoint=str(checkpoint),
                                out=str(tmp_path / "ray.parquet"), timestamps=True, ray=True))
    assert there["engine"] == "ray" and there["rejected"] == here["rejected"]
    a, b = (pq.read_table(tmp_path / f"{n}.parquet").to_pylist() for n in ("here", "ray"))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert np.allclose(x["embedding"], y["embedding"], atol=1e-5)
        assert np.allclose(np.array(x["timestamp_embedding"]), np.array(y["timestamp_embedding"]), atol=1e-5)


def test_bad_requests_are_refused_before_any_work_naming_what_is_allowed(checkpoint, recordings, tmp_path, capsys):
    def refused(*args):
        assert main(["embed", *map(str, args)]) == 2
        return capsys.readouterr().err

    assert "timestamp embeddings have one length per clip" in refused(recordings, "--checkpoint", checkpoint,
                                                                      "--out", tmp_path / "x.npy", "--timestamps")
    assert "expected a file ending in .parquet or .npy" in refused(recordings, "--checkpoint", checkpoint,
                                                                   "--out", tmp_path / "x.csv")
    assert "does not exist" in refused(tmp_path / "nowhere", "--checkpoint", checkpoint, "--out", tmp_path / "x.npy")
    (tmp_path / "empty").mkdir()
    assert "no audio files" in refused(tmp_path / "empty", "--checkpoint", checkpoint, "--out", tmp_path / "x.npy")
    (tmp_path / "x.npy").write_bytes(b"keep me")
    assert "exists; pass --force" in refused(recordings, "--checkpoint", checkpoint, "--out", tmp_path / "x.npy")
    assert (tmp_path / "x.npy").read_bytes() == b"keep me"


def test_the_command_line_writes_npy_with_the_ids_beside_it(checkpoint, recordings, tmp_path, capsys):
    assert main(["embed", str(recordings / "a.wav"), str(recordings / "c.wav"), "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "two.npy"), "--readout", "cls+mean", "--no-ray"]) == 0
    assert "2 clip(s) embedded" in capsys.readouterr().out
    assert np.load(tmp_path / "two.npy").shape == (2, 2 * CONFIG.embed_dim)
    assert (tmp_path / "two.ids.tsv").read_text().splitlines()[1].startswith("c.wav\t")
