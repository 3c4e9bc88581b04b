"""asda prepare for real on Ray Data: every layout, broken files, atomic output, idempotence."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from layouts import (
    clip_frames,
    write_audioset,
    write_broken_tree,
    write_esc50,
    write_folder,
    write_lengths,
    write_manifest,
    write_speechcommands,
)

from model.features import log_mel
from pipelines.cli import main
from pipelines.data.card import CARD_NAME, feed_length, fitted_length, load_card, padding_share
from pipelines.data.prepare import prepare

pytestmark = pytest.mark.ray


@pytest.mark.parametrize(
    "dataset, writer, expected",
    [
        ("esc50", write_esc50, {"train": 30}),
        ("speechcommands", write_speechcommands, {"train": 6, "valid": 3, "test": 3}),
        ("audioset", write_audioset, {"train": 4, "test": 3}),
        ("manifest", write_manifest, None),
    ],
)
def test_every_layout_prepares_into_shards_and_a_card(ray_local, tmp_path, dataset, writer, expected):
    source = writer(tmp_path / "src")
    card = prepare(dataset, source, tmp_path / "out")
    if expected:
        assert card["splits"] == expected
    assert card["num_clips"] == sum(card["splits"].values()) > 0
    assert {k: sum(v.values()) for k, v in card["frame_counts"].items()} == card["splits"]
    own = {"esc50": 512, "speechcommands": 128, "audioset": 1024}
    if dataset in own:
        assert (card["target_length"], card["target_length_from"]) == (own[dataset], "dataset")
    else:  # 0.3 s clips: the shortest length allowed
        assert (card["target_length"], card["target_length_from"]) == (128, "fitted")
    assert sum(s["rows"] for s in card["shards"]) == card["num_clips"]
    assert card["code_version"] and card["features"]["num_mel_bins"] == 128
    assert np.isfinite(card["stats"]["mean"]) and card["stats"]["std"] > 0
    table = pq.read_table(tmp_path / "out" / card["shards"][0]["file"])
    assert {"id", "path", "split", "fold", "labels", "frames", "fbank", "sample_rate", "duration"} <= set(
        table.column_names)
    if dataset == "audioset":
        assert card["multilabel"] and any("missing audio file" in r["reason"] for r in card["rejected"])


def test_shard_rows_hold_the_exact_fbank_of_their_file(ray_local, tmp_path):
    import soundfile as sf
    import torch

    source = write_folder(tmp_path / "src")
    card = prepare("folder", source, tmp_path / "out")
    row = pq.read_table(tmp_path / "out" / card["shards"][0]["file"]).slice(0, 1).to_pylist()[0]
    data, rate = sf.read(row["path"], dtype="float32", always_2d=True)
    expected = log_mel(torch.from_numpy(data.T.copy()), rate).numpy().astype(np.float16)
    stored = np.frombuffer(row["fbank"], dtype=np.float16).reshape(row["frames"], 128)
    assert row["sample_rate"] == rate and np.array_equal(stored, expected)


def _prepare_and_check_rejections(root, expected: dict[str, str], out, capsys) -> dict:
    """`asda prepare` a folder layout; every file in ``expected`` is rejected with its keyword in the reason, in
    the card and on the terminal. Returns the card."""
    assert main(["prepare", "--dataset", "folder", "--source", str(root), "--out", str(out)]) == 0
    card = load_card(out)
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in card["rejected"]}
    for name, keyword in expected.items():
        assert keyword in reasons[name], (name, reasons)
    printed = capsys.readouterr().out
    assert all(name in printed for name in expected)
    return card


def test_broken_files_are_rejected_with_reasons_and_good_ones_kept(ray_local, tmp_path, capsys):
    root, expected = write_broken_tree(tmp_path / "broken")
    assert _prepare_and_check_rejections(root, expected, tmp_path / "out", capsys)["num_clips"] > 0


def test_awkward_file_names_and_links_are_rejected_with_their_own_reasons_and_good_clips_kept(
        ray_local, tmp_path, capsys):
    from layouts import write_awkward_names

    root, expected = write_awkward_names(tmp_path / "awkward")
    assert _prepare_and_check_rejections(root, expected, tmp_path / "out", capsys)["num_clips"] == 8


def test_too_many_rejections_fail_and_leave_nothing_that_looks_finished(ray_local, tmp_path):
    root, _ = write_broken_tree(tmp_path / "broken")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"rejected .*allowed 1%"):
        prepare("folder", root, out, max_rejected=0.01)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_finished_output_is_not_redone_and_survives_a_failed_redo(ray_local, tmp_path):
    source = write_esc50(tmp_path / "src", n_per_fold=1)
    out = tmp_path / "out"
    first = prepare("esc50", source, out)
    again = prepare("esc50", source, out)
    assert again["created"] == first["created"] and again["shards"] == first["shards"]
    broken, _ = write_broken_tree(tmp_path / "broken")
    with pytest.raises(ValueError, match="rejected"):
        prepare("folder", broken, out, force=True, max_rejected=0.01)
    assert json.loads((out / CARD_NAME).read_text()) == first  # the good result is untouched
    redone = prepare("esc50", source, out, force=True)
    assert redone["num_clips"] == first["num_clips"]


def test_bad_layout_fails_before_ray_starts(tmp_path):
    import ray

    was_running = ray.is_initialized()
    with pytest.raises((ValueError, FileNotFoundError), match="esc50.csv"):
        prepare("esc50", tmp_path, tmp_path / "out")
    assert ray.is_initialized() == was_running
    assert main(["prepare", "--dataset", "esc50", "--source", str(tmp_path / "nope")]) == 2


# --- the length clips are fed at -------------------------------------------------------------------------------

def _prepare_lengths(tmp_path, seconds: list[float], **kwargs) -> dict:
    """Prepare a folder of clips ``seconds`` long, every one in train; returns the card."""
    source = write_lengths(tmp_path / "src", seconds)
    return prepare("folder", source, tmp_path / "out", options={"valid_fraction": 0, "test_fraction": 0}, **kwargs)


def test_short_clips_are_fed_at_the_shortest_length_and_the_summary_shows_their_lengths(ray_local, tmp_path,
                                                                                        capsys):
    seconds = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    card = _prepare_lengths(tmp_path, seconds)
    assert card["frame_counts"] == {"train": {str(clip_frames(s)): 1 for s in seconds}}  # 8, 18, ..., 58 frames
    # The 90th percentile, 58 frames, rounds up to 64: below the shortest allowed, 128.
    assert (card["target_length"], card["target_length_from"]) == (128, "fitted")
    printed = capsys.readouterr().out
    assert "clip length (train, frames): min 8, 25 % 18, median 28, 75 % 48, 90 % 58, max 58" in printed
    assert ("fed at 128 frames (derived: the shortest allowed, 8 patch columns; the 90th percentile, 58, is "
            "shorter; 74 % of fed frames are padding, 0 % of clips cropped)") in printed  # 1 - 33 / 128


def test_long_clips_are_fed_at_their_90th_percentile_rounded_up_to_whole_patches(ray_local, tmp_path):
    seconds = [3.0 + 0.5 * i for i in range(10)]  # 3 to 7.5 s: 298, 348, ..., 748 frames
    card = _prepare_lengths(tmp_path, seconds)
    assert card["frame_counts"]["train"] == {str(f): 1 for f in range(298, 749, 50)}
    # cut: the 9th of 10 clips, 698 frames, rounded up to 704. pad: at 1024 frames the padding is
    # 1 - mean(298..748) / 1024 = 1 - 523 / 1024 = 49 %, within half, so pad = 1024. min(704, 1024) = 704.
    assert card["target_length"] == 704
    assert padding_share(card, "train", 704) == pytest.approx(1 - (sum(range(298, 699, 50)) + 704) / 7040)


def test_the_padding_limit_binds_where_most_clips_are_short_and_a_few_long(ray_local, tmp_path, capsys):
    card = _prepare_lengths(tmp_path, [2.2] * 8 + [8.0] * 2)  # 8 clips of 218 frames, 2 of 798
    # cut: the 9th of 10 clips, 798, rounds up to 800, where 1 - (8 * 218 + 2 * 800) / 8000 = 58 % is padding.
    # pad: 1 - (8 * 218 + 2 L) / (10 L) <= 1/2 holds up to L = 581, so 576 (36 patches): 49.7 %; 592 gives 50.5 %.
    assert card["target_length"] == 576
    assert padding_share(card, "train", 576) == pytest.approx(1 - (8 * 218 + 2 * 576) / 5760)
    assert padding_share(card, "train", 592) > 0.5
    assert ("fed at 576 frames (derived: the longest that pads at most 50 % of fed frames; the 90th percentile, "
            "798, pads more; 50 % of fed frames are padding, 20 % of clips cropped)") in capsys.readouterr().out


def test_target_length_option_overrides_the_fitted_length(ray_local, tmp_path, capsys):
    source = write_lengths(tmp_path / "src", [0.3, 0.5, 0.7])
    out = tmp_path / "out"
    assert main(["prepare", "--dataset", "folder", "--source", str(source), "--out", str(out),
                 "--target-length", "64"]) == 0
    card = load_card(out)
    assert (card["target_length"], card["target_length_from"]) == (64, "given")
    assert feed_length(card, None, out) == 64  # what pretrain, probe and finetune feed
    assert "fed at 64 frames (--target-length; " in capsys.readouterr().out


def test_a_target_length_not_in_whole_patches_is_refused_before_ray_starts(tmp_path, capsys):
    import ray

    was_running = ray.is_initialized()
    source = write_lengths(tmp_path / "src", [0.3, 0.5])
    with pytest.raises(ValueError, match=r"target_length=100 is not allowed: expected a positive multiple of 16"):
        prepare("folder", source, tmp_path / "out", target_length=100)
    assert main(["prepare", "--dataset", "folder", "--source", str(source), "--out", str(tmp_path / "out"),
                 "--target-length", "0"]) == 2
    assert "target_length=0 is not allowed" in capsys.readouterr().err
    assert ray.is_initialized() == was_running and not (tmp_path / "out").exists()


@pytest.mark.parametrize("counts, expected", [
    ({}, 1024),  # no clips: AudioSet's 10 s
    ({2000: 10}, 1024),  # 20 s clips: the longest allowed
    ({58: 9, 2000: 1}, 128),  # cut 64 is below the shortest allowed
    ({"200": 9, "2000": 1}, 208),  # cut: 200 rounded up (keys as the card writes them); pad would be 448
    ({100: 6, 1000: 4}, 592),  # pad: 1 - (600 + 4 L) / (10 L) <= 1/2 up to L = 600; cut would be 1008
])
def test_fitted_length_is_the_shorter_of_cut_and_pad_within_128_and_1024(counts, expected):
    assert fitted_length(counts) == expected


def test_padding_share_is_the_share_of_fed_frames_that_are_zeros():
    card = {"frame_counts": {"train": {"50": 2, "300": 1}, "test": {"100": 1}}}
    # at 128 frames: two clips of 50 real frames, one cropped to 128 real frames, of 3 * 128 fed
    assert padding_share(card, "train", 128) == pytest.approx(1 - (50 + 50 + 128) / (3 * 128))
    assert padding_share(card, "test", 96) == 0.0 and padding_share(card, "test", 200) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'valid' is not in the card: it has \\['test', 'train'\\]"):
        padding_share(card, "valid", 128)


def test_a_card_from_before_frame_counts_loads_and_has_no_padding_share(tmp_path):
    (tmp_path / CARD_NAME).write_text(json.dumps({"schema_version": 3, "target_length": 1024, "splits": {"train": 4}}))
    card = load_card(tmp_path)
    assert padding_share(card, "train", 1024) is None and feed_length(card, None, tmp_path) == 1024


# --- shared storage, resume, throughput, hashes -----------------------------------------------------------------

def _comparable(card: dict) -> dict:
    """A card without what depends on when and where it ran."""
    return {k: v for k, v in card.items() if k not in ("created", "prepare_seconds", "throughput")}


def _finished_records(staging) -> dict[int, int]:
    """Shard -> inode of its file, for every shard whose record says it is finished."""
    finished = {}
    for record_path in sorted((staging / "_progress").glob("shard-*.json")):
        record = json.loads(record_path.read_text())
        if record["rows"]:
            finished[record["shard"]] = (staging / record["file"]).stat().st_ino
    return finished


def test_a_killed_prepare_resumes_at_shard_granularity_and_ends_with_the_same_card(ray_local, tmp_path, capsys):
    """`asda prepare` in its own process, killed (SIGKILL) once some shards are finished; the same command again
    keeps those shards (same files, not rewritten) and makes only the rest; its card equals an uninterrupted
    run's, shard hashes included."""
    import os
    import signal
    import subprocess
    import sys
    import time

    source = write_esc50(tmp_path / "src", n_per_fold=8)  # 120 clips of 0.3 s at five sample rates
    out = tmp_path / "out"
    args = ["prepare", "--dataset", "esc50", "--source", str(source), "--out", str(out), "--shard-mb", "0.25"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            stagings = list(tmp_path.glob(".out.staging-*"))
            if stagings and len(list((stagings[0] / "_progress").glob("shard-*.json"))) >= 3:
                break
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        printed = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{printed[-2000:]}"
    assert not out.exists()  # nothing that looks finished
    (staging,) = tmp_path.glob(".out.staging-*")
    kept = _finished_records(staging)
    assert kept, "no shard was finished before the kill"

    capsys.readouterr()
    assert main(args) == 0
    card = load_card(out)
    resumed = card["throughput"]["shards_resumed"]  # a task of the killed run may have finished after the count
    assert f"resuming: {resumed} of 60 shards" in capsys.readouterr().out
    assert len(kept) <= resumed < 60 and card["throughput"]["shards_this_run"] == 60 - resumed
    for shard, inode in kept.items():  # the same files, moved into place with their folder, never rewritten
        assert (out / f"shard-{shard:05d}.parquet").stat().st_ino == inode
    assert not list(tmp_path.glob(".out.staging-*")) and not (out / "_progress").exists()

    whole = prepare("esc50", source, tmp_path / "whole", shard_mb=0.25)
    assert _comparable(card) == _comparable(whole)
    assert len(card["shards"]) == 60 and card["num_clips"] == 120
    assert main(["verify", str(out)]) == 0


def test_a_uri_is_resolved_to_its_filesystem_once_per_process(tmp_path, monkeypatch):
    """A feed resolves its location for the card, the shards and each read; an object store may answer each
    resolution with a request, so the same URI is built once."""
    import pyarrow.fs as pafs

    from pipelines.data import storage

    calls = []

    class Counting:
        @staticmethod
        def from_uri(uri):
            calls.append(uri)
            return pafs.LocalFileSystem(), uri.removeprefix("file://")

    storage._from_uri.cache_clear()
    monkeypatch.setattr(pafs, "FileSystem", Counting)
    uri = (tmp_path / "out").as_uri()
    try:
        for _ in range(3):
            assert storage.normalise(uri) == tmp_path / "out"
            assert storage.filesystem(uri)[1] == str(tmp_path / "out")
    finally:
        storage._from_uri.cache_clear()
    assert calls == [uri]


def test_a_file_uri_is_prepared_in_place_of_a_path_and_probed_end_to_end(ray_local, tracking_store, tmp_path,
                                                                          capsys):
    """`--out file:///...` writes real files where the path would; verify, the readers and `asda probe` take the
    URI; the card's hashes, made while writing, are the files' sha256; the card and the run's end report the
    throughput of every node."""
    from pipelines.data.card import file_hash
    from pipelines.data.feed import read_clips, verify_shards

    source = write_speechcommands(tmp_path / "src")
    uri = (tmp_path / "out").as_uri()
    assert uri.startswith("file:///")
    assert main(["prepare", "--dataset", "speechcommands", "--source", str(source), "--out", uri]) == 0
    printed = capsys.readouterr().out
    card = load_card(uri)
    assert card == load_card(tmp_path / "out")
    for shard in card["shards"]:
        assert file_hash(tmp_path / "out" / shard["file"]) == shard["sha256"]
    (node,) = card["throughput"]["nodes"]
    assert node["clips"] == card["num_clips"] == 12 and node["clips_per_s"] > 0 and node["audio_seconds_per_s"] > 0
    assert f"node {node['node_ip']}" in printed and "clips/s" in printed and "audio-s/s" in printed
    assert [str(p) for p in verify_shards(uri)] == [str(tmp_path / "out" / s["file"]) for s in card["shards"]]
    assert read_clips(uri, "test", labels="index")["fbank"].shape == (3, 128, 128)
    assert main(["verify", uri]) == 0
    assert main(["probe", "--data", uri, "--random-init", "--eval-split", "test"]) == 0
    assert "probe on test" in capsys.readouterr().out


def test_in_place_output_matches_the_staged_one_and_is_unfinished_without_its_card(ray_local, tmp_path):
    """Where nothing can be renamed (object stores), shards go straight into the output and the card last: the
    same shards, byte for byte, as the staged run; without the card readers refuse the folder."""
    source = write_esc50(tmp_path / "src", n_per_fold=1)
    staged = prepare("esc50", source, tmp_path / "staged", shard_mb=0.5)
    in_place = prepare("esc50", source, (tmp_path / "direct").as_uri(), shard_mb=0.5, in_place=True)
    assert _comparable(in_place) == _comparable(staged) and len(in_place["shards"]) > 1
    assert sorted(p.name for p in (tmp_path / "direct").iterdir()) == sorted(
        [CARD_NAME] + [s["file"] for s in staged["shards"]])
    (tmp_path / "direct" / CARD_NAME).unlink()
    with pytest.raises(ValueError, match="not a prepared data set"):
        load_card(tmp_path / "direct")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not ours")
    with pytest.raises(ValueError, match="holds files but no prepared data set"):
        prepare("esc50", source, tmp_path / "other", in_place=True)
    assert (tmp_path / "other" / "notes.txt").exists()


def test_shards_are_cut_from_the_data_alone():
    from pipelines.data.prepare import shard_rows

    assert shard_rows(2_000_000, 1024, 128.0) == 512  # AudioSet: 128 MB of 10 s clips
    assert shard_rows(2000, 256, 128.0) == 64  # a small set is still made in parallel
    assert shard_rows(100, 1024, 0.25) == 1
    assert shard_rows(20_000, 1024, 128.0) == 512


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_the_cached_resampler_gives_torchaudios_resample_exactly(rate):
    import torch
    import torchaudio

    from model.features import mono_16k

    wav = torch.randn(2, rate)
    expected = torchaudio.functional.resample(wav.mean(0, keepdim=True), rate, 16_000)
    assert torch.equal(mono_16k(wav, rate), expected) and torch.equal(mono_16k(wav, rate), expected)


def test_the_readmes_audioset_name_pattern_prepares_as_written(ray_local, tmp_path):
    """`--option name_pattern={ytid}_{start}.wav`, as the README writes it: the braces are the pattern's text."""
    source = write_audioset(tmp_path / "as")
    out = tmp_path / "out"
    assert main(["prepare", "--dataset", "audioset", "--source", str(source), "--out", str(out),
                 "--option", "name_pattern={ytid}_{start}.wav", "--option", "splits=balanced_train,eval"]) == 0
    assert load_card(out)["splits"] == {"test": 3, "train": 4}


def test_a_prepare_that_rejects_every_clip_says_why_by_reason_with_paths_and_the_full_list(ray_local, tmp_path,
                                                                                          capsys):
    source = tmp_path / "broken"
    for i in range(6):  # files named as audio that hold none
        (source / ("kick" if i % 2 else "snare")).mkdir(parents=True, exist_ok=True)
        (source / ("kick" if i % 2 else "snare") / f"hit_{i}.wav").write_bytes(b"not audio at all" * (i + 1))
    out = tmp_path / "out"
    assert main(["prepare", "--dataset", "folder", "--source", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    listing = tmp_path / "out.rejected.json"
    assert "6 of 6 clips rejected (100% > allowed 50%, --max-rejected): 6 rejected (6 x cannot decode); first: " in err and str(source / "kick" / "hit_1.wav") in err
    assert f"every one with its reason: {listing}" in err and "Traceback" not in err
    assert len(json.loads(listing.read_text())) == 6 and not out.exists()


def test_an_index_with_no_usable_clip_counts_its_reasons_and_writes_them_all(tmp_path):
    source = tmp_path / "m"
    source.mkdir()
    (source / "manifest.csv").write_text("path,label\n" + "".join(f"gone_{i}.wav,bird\n" for i in range(4))
                                         + ",bird\n")
    with pytest.raises(ValueError) as err:
        prepare("manifest", source, tmp_path / "out")
    text = str(err.value)
    assert "has no usable clips: 5 rejected (4 x missing audio file; 1 x empty path); first: " in text
    assert len(json.loads((tmp_path / "out.rejected.json").read_text())) == 5


def test_an_audioset_pattern_that_finds_no_file_names_the_folder_what_is_there_and_patterns_that_would(tmp_path):
    source = write_audioset(tmp_path / "as")
    with pytest.raises(ValueError) as err:
        prepare("audioset", source, tmp_path / "out", options={"name_pattern": "{ytid}.flac"})
    text = str(err.value)
    assert f"no segment's audio file was found with name_pattern '{{ytid}}.flac' in {source / 'audio'}" in text
    assert "that folder holds " in text and ".wav" in text
    assert "these patterns find files: --option name_pattern={ytid}_{start}.wav (" in text
