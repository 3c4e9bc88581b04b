import json

import numpy as np
import pytest
import soundfile as sf

from pipelines.data import synthetic
from pipelines.data.adapters import build_index
from pipelines.data.synthetic import CLASS_NAMES, SEQUENCE_ORDERS, class_names, ensure_dataset, generate_clip

SMALL = dict(num_train=8, num_valid=4, num_test=4)
SR = 16_000


def _bytes_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.wav"))}


def _clips_per_class(per_class, seed=7):
    """{class: [(waveform, event), ...]}, each clip from its own generator."""
    return {c: [generate_clip(c, np.random.default_rng([seed, c, i])) for i in range(per_class)]
            for c in range(len(CLASS_NAMES))}


def _modulation_spectrum(wav, event):
    """Log magnitude of the 2-D FFT of the first 0.3 s of the event's log spectrogram (10 ms hop, 125 Hz - 6 kHz).

    Invariant to where the event sits in time and frequency, so it compares the *shape* of events: sweeps, ripples,
    pulses. The clip's loudness only shifts the DC bin, which the mean removal zeroes.
    """
    start = int(event[0] * SR)
    x = wav[start:start + int(0.3 * SR)].astype(np.float64)
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160] * np.hanning(400)  # (T, 400)
    log_power = np.log(np.abs(np.fft.rfft(frames, 512, axis=1))[:, 4:196] ** 2 + 1e-10)  # (T, F)
    log_power -= log_power.mean()
    return np.log(np.abs(np.fft.fft2(log_power)) + 1e-6)


def test_same_seed_gives_the_same_bytes(tmp_path):
    ensure_dataset(tmp_path / "a", **SMALL, seed=3)
    ensure_dataset(tmp_path / "b", **SMALL, seed=3)
    a, b = _bytes_of(tmp_path / "a"), _bytes_of(tmp_path / "b")
    assert len(a) == 16 and a == b
    assert (tmp_path / "a" / "synthetic.json").read_text() == (tmp_path / "b" / "synthetic.json").read_text()


def test_another_seed_gives_different_audio(tmp_path):
    ensure_dataset(tmp_path / "a", **SMALL, seed=0)
    ensure_dataset(tmp_path / "b", **SMALL, seed=1)
    a, b = _bytes_of(tmp_path / "a"), _bytes_of(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_a_clip_does_not_depend_on_the_size_of_other_splits(tmp_path):
    ensure_dataset(tmp_path / "a", num_train=8, num_valid=4, num_test=4)
    ensure_dataset(tmp_path / "b", num_train=3, num_valid=4, num_test=2)
    a, b = _bytes_of(tmp_path / "a"), _bytes_of(tmp_path / "b")
    assert all(a[name] == data for name, data in b.items())


def test_set_is_regenerated_only_when_params_change(tmp_path, monkeypatch):
    first = ensure_dataset(tmp_path, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.wav")}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "generate_clip", fail)
        assert ensure_dataset(tmp_path, **SMALL) == first
        assert build_index("synthetic", tmp_path, **SMALL).clips  # the adapter reuses it too
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.wav")} == stamps

    second = ensure_dataset(tmp_path, **{**SMALL, "num_train": 2, "seed": 5})
    assert second["params"]["seed"] == 5
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.wav")) == sorted(
        c["file"] for c in second["clips"])  # no stale clips of the old set are left behind


def test_a_set_with_a_missing_clip_or_no_manifest_is_regenerated(tmp_path):
    ensure_dataset(tmp_path, **SMALL)
    (tmp_path / "train" / "00003.wav").unlink()
    ensure_dataset(tmp_path, **SMALL)
    assert (tmp_path / "train" / "00003.wav").is_file()
    (tmp_path / "synthetic.json").unlink()  # as after an interrupted generation
    ensure_dataset(tmp_path, **SMALL)
    assert json.loads((tmp_path / "synthetic.json").read_text())["params"]["num_train"] == 8


def test_generation_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "my_recordings.wav").write_bytes(b"precious")
    with pytest.raises(ValueError, match="refusing to generate"):
        ensure_dataset(tmp_path, **SMALL)
    assert (tmp_path / "my_recordings.wav").read_bytes() == b"precious"


def test_written_files_are_16khz_mono_pcm16_of_the_clip_length(tmp_path):
    manifest = ensure_dataset(tmp_path, **SMALL, clip_seconds=1.5)
    info = sf.info(tmp_path / manifest["clips"][0]["file"])
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16_000, 1, "PCM_16", 24_000)


def test_synthetic_index_has_balanced_splits_events_and_no_published_stats(tmp_path):
    index = build_index("synthetic", tmp_path / "new" / "folder", **SMALL)  # the folder is created
    splits = [c.split for c in index.clips]
    assert (splits.count("train"), splits.count("valid"), splits.count("test")) == (8, 4, 4)
    assert index.class_names == list(CLASS_NAMES) and len(CLASS_NAMES) == 8
    assert (index.target_length, index.stats, index.multilabel, index.rejected) == (256, None, False, [])
    assert sorted(c.labels[0] for c in index.clips if c.split == "train") == list(range(8))
    assert all(c.event is not None and 0.0 <= c.event[0] < c.event[1] <= 2.56 for c in index.clips)


def test_options_arrive_as_strings_from_the_command_line(tmp_path):
    index = build_index("synthetic", tmp_path, num_train="4", num_valid="0", num_test="0", seed="2")
    assert len(index.clips) == 4


@pytest.mark.parametrize("bad, message", [
    (dict(num_train=-1), "num_train=-1"),
    (dict(num_train=0, num_valid=0, num_test=0), "no clips"),
    (dict(sample_rate=8000), "sample_rate=8000"),
    (dict(clip_seconds=0.4), "clip_seconds=0.4"),
    (dict(num_train="many"), "num_train='many'"),
    (dict(classes="words"), "classes='words' is not allowed: expected one of \\['events', 'sequences'\\]"),
    (dict(classes="sequences", clip_seconds=0.8), "clip_seconds=0.8 is not allowed: must hold a 0.9 s event"),
    (dict(colour="red"), "colour"),
])
def test_bad_params_raise_value_errors_naming_them(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        ensure_dataset(tmp_path, **{**SMALL, **bad})
    assert not (tmp_path / "synthetic.json").exists()


def test_unknown_class_index_is_a_value_error():
    with pytest.raises(ValueError, match="class_index=8"):
        generate_clip(8, np.random.default_rng(0))


def test_events_lie_inside_the_clip_and_last_0_3_to_0_6_s():
    for c, clips in _clips_per_class(6).items():
        for wav, (start, end) in clips:
            assert wav.dtype == np.float32 and wav.shape == (40_960,), CLASS_NAMES[c]
            assert 0.0 <= start and end <= 2.56 and 0.3 - 1e-3 <= end - start <= 0.6


def test_clips_never_clip_and_are_never_silent():
    for clips in _clips_per_class(6).values():
        for wav, _ in clips:
            rms_db = 10 * np.log10(np.mean(wav.astype(np.float64) ** 2))
            assert np.isfinite(wav).all() and np.abs(wav).max() <= 0.95 + 1e-6
            assert -45 < rms_db <= -20 + 1e-3  # -36..-20 dBFS, lower only where the peak cap applied


def test_classes_differ_in_time_frequency_structure():
    """Class means of a shift-invariant spectro-temporal feature, from two disjoint halves of the clips: each
    class is closer to itself than to any other class, and nearest-mean classification is far above chance."""
    clips = _clips_per_class(24)
    feats = {c: np.stack([_modulation_spectrum(w, e) for w, e in clips[c]]) for c in clips}
    fit = np.stack([feats[c][:12].mean(0) for c in feats])  # (C, T, F)
    held = np.stack([feats[c][12:].mean(0) for c in feats])
    dist = np.linalg.norm(fit[:, None] - held[None], axis=(2, 3))  # (C, C)
    for c in range(len(CLASS_NAMES)):
        assert dist[c, c] < np.delete(dist[c], c).min(), CLASS_NAMES[c]
    predictions = [np.linalg.norm(fit - f, axis=(1, 2)).argmin() for c in feats for f in feats[c][12:]]
    truth = [c for c in feats for _ in range(12)]
    assert np.mean(np.array(predictions) == np.array(truth)) > 0.5  # chance is 1/8


def test_loudness_does_not_give_the_class_away():
    """Class means of the clips' log RMS differ far less than clips within a class do."""
    log_rms = np.array([[np.log(np.sqrt(np.mean(w.astype(np.float64) ** 2))) for w, _ in clips]
                        for clips in _clips_per_class(24).values()])  # (C, clips)
    assert log_rms.mean(axis=1).std() < 0.5 * log_rms.std(axis=1).mean()


@pytest.mark.slow
def test_the_default_set_generates_in_seconds(tmp_path):
    import time

    started = time.perf_counter()
    manifest = ensure_dataset(tmp_path)
    assert len(manifest["clips"]) == 960 and time.perf_counter() - started < 30


@pytest.mark.parametrize("seconds, frames", [(2.56, 256), (1.0, 112)])
def test_the_cards_length_is_the_clips_own_in_whole_patches(tmp_path, seconds, frames):
    index = build_index("synthetic", tmp_path, num_train=2, num_valid=0, num_test=0, clip_seconds=seconds)
    assert index.target_length == frames  # a 1 s clip is not padded to 2.56 s


# --- the "sequences" class set ------------------------------------------------------------------------------------

def _sequence_clips(c, n=24):
    return [generate_clip(c, np.random.default_rng([7, c, i]), clip_seconds=1.0, snr_db=(6.0, 15.0),
                          classes="sequences") for i in range(n)]


def _sorted_log_spectrum(wav, start, end):
    """The event's log power spectrum (25 ms frames, 10 ms hop, 125 Hz - 6 kHz) averaged over [start, end) seconds
    and sorted: how power spreads over the bands, wherever in frequency the sound was drawn."""
    x = wav[int(start * SR):int(end * SR)].astype(np.float64)
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160] * np.hanning(400)
    return np.sort(np.log(np.abs(np.fft.rfft(frames, 512, axis=1))[:, 4:196] ** 2 + 1e-10).mean(0))


def _nearest_mean_accuracy(a, b):
    """Fit class means on the first half of each class's features, classify the other half."""
    ma, mb = a[: len(a) // 2].mean(0), b[: len(b) // 2].mean(0)
    hits = [np.linalg.norm(x - ma) < np.linalg.norm(x - mb) for x in a[len(a) // 2:]]
    hits += [np.linalg.norm(x - mb) < np.linalg.norm(x - ma) for x in b[len(b) // 2:]]
    return float(np.mean(hits))


def test_sequence_classes_are_every_pair_of_sounds_in_both_orders():
    names = class_names("sequences")
    assert len(names) == 8 and names == tuple(f"{a}_then_{b}" for a, b in SEQUENCE_ORDERS)
    assert {(b, a) for a, b in SEQUENCE_ORDERS} == set(SEQUENCE_ORDERS)  # each call's reverse is a class too
    assert class_names() == CLASS_NAMES  # "events" stays the generator's default


def test_a_sequence_pair_differs_in_order_and_not_in_what_it_holds():
    """Within each pair (harmonic then noise / noise then harmonic, ...) the call's spectrum averaged over its whole
    span tells the two classes apart no better than chance, while first half against second half always does:
    the classes are defined by order alone, which a bag-of-frames feature cannot see."""
    for first in range(0, 8, 2):
        blind, aware = [], []
        for c in (first, first + 1):
            clips = _sequence_clips(c)
            blind.append(np.array([_sorted_log_spectrum(w, s, e) for w, (s, e) in clips]))
            aware.append(np.array([_sorted_log_spectrum(w, s, (s + e) / 2) - _sorted_log_spectrum(w, (s + e) / 2, e)
                                   for w, (s, e) in clips]))
        name = class_names("sequences")[first]
        assert _nearest_mean_accuracy(*blind) < 0.75, name
        assert _nearest_mean_accuracy(*aware) > 0.9, name


def test_sequence_calls_lie_inside_the_clip_last_0_6_to_0_9_s_and_give_no_loudness_cue():
    clips = {c: _sequence_clips(c, 12) for c in range(8)}
    for c, members in clips.items():
        for wav, (start, end) in members:
            assert wav.shape == (16_000,) and np.abs(wav).max() <= 0.95 + 1e-6, c
            assert 0.0 <= start and end <= 1.0 and 0.6 - 1e-3 <= end - start <= 0.9
    log_rms = np.array([[np.log(np.sqrt(np.mean(w.astype(np.float64) ** 2))) for w, _ in members]
                        for members in clips.values()])
    assert log_rms.mean(axis=1).std() < 0.5 * log_rms.std(axis=1).mean()


def test_a_sequences_set_is_indexed_with_its_own_class_names(tmp_path):
    index = build_index("synthetic", tmp_path, num_train=8, num_valid=0, num_test=0, clip_seconds=1.0,
                        classes="sequences")
    assert index.class_names == list(class_names("sequences")) and index.target_length == 112
    assert sorted(c.labels[0] for c in index.clips) == list(range(8))
    assert all(0.6 - 1e-3 <= c.event[1] - c.event[0] <= 0.9 for c in index.clips)
