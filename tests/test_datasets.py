import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from layouts import (
    AUDIOSET_CLASSES,
    AUDIOSET_UNKNOWN_MID,
    ESC50_CATEGORIES,
    write_audioset,
    write_broken_tree,
    write_clip,
    write_esc50,
    write_folder,
    write_manifest,
    write_speechcommands,
)

from model.features import DATASET_STATS
from pipelines.data.adapters import ADAPTERS, ClipRef, DatasetIndex, build_index, hash_split

WRITERS = {
    "esc50": write_esc50,
    "speechcommands": write_speechcommands,
    "audioset": write_audioset,
    "folder": write_folder,
    "manifest": write_manifest,
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """Every miniature layout, written once; tests that change a layout write their own."""
    root = tmp_path_factory.mktemp("layouts")
    return {name: write(root / name) for name, write in WRITERS.items()}


def _splits(index: DatasetIndex) -> dict[str, int]:
    return dict(Counter(c.split for c in index.clips))


def _reasons(index: DatasetIndex) -> list[str]:
    return [r["reason"] for r in index.rejected]


# --- every adapter -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", sorted(WRITERS))
def test_paths_are_absolute_existing_files_and_ids_unique(layouts, dataset):
    index = build_index(dataset, layouts[dataset])
    assert index.name == dataset and index.clips
    assert all(os.path.isabs(c.path) and Path(c.path).is_file() for c in index.clips)
    assert all(os.path.isabs(r["path"]) for r in index.rejected)
    assert len({c.id for c in index.clips}) == len(index.clips)
    assert all(c.labels == tuple(sorted(set(c.labels))) and c.labels for c in index.clips)


@pytest.mark.parametrize("dataset", sorted(WRITERS))
def test_index_is_deterministic_and_sorted_by_split_then_id(layouts, dataset):
    first, second = build_index(dataset, layouts[dataset]), build_index(dataset, layouts[dataset])
    assert first == second
    order = {"train": 0, "valid": 1, "test": 2, "unbalanced": 3}
    keys = [(order[c.split], c.id) for c in first.clips]
    assert keys == sorted(keys)


@pytest.mark.parametrize("dataset", sorted(WRITERS))
def test_a_relative_source_gives_absolute_paths(layouts, dataset, monkeypatch):
    monkeypatch.chdir(layouts[dataset].parent)
    relative = build_index(dataset, Path(layouts[dataset].name))
    assert relative == build_index(dataset, layouts[dataset])


def test_unknown_adapter_is_a_value_error_listing_the_allowed_names(tmp_path):
    with pytest.raises(ValueError, match="'esc-50'.*audioset, esc50, folder, manifest, speechcommands, synthetic"):
        build_index("esc-50", tmp_path)


def test_unknown_options_are_a_value_error_naming_them(layouts):
    with pytest.raises(ValueError, match=r"\['colour', 'size'\].*'folder'.*extensions"):
        build_index("folder", layouts["folder"], colour="red", size=3, extensions=".wav")
    with pytest.raises(ValueError, match="'esc50'.*none"):
        build_index("esc50", layouts["esc50"], name_pattern="{ytid}.wav")


@pytest.mark.parametrize("dataset", sorted(ADAPTERS.keys() - {"synthetic"}))
def test_a_missing_source_is_a_file_not_found_error_naming_it(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        build_index(dataset, tmp_path / "nowhere")


@pytest.mark.parametrize("dataset, metadata", [
    ("esc50", "meta/esc50.csv"),
    ("speechcommands", "validation_list.txt"),
    ("speechcommands", "testing_list.txt"),
    ("audioset", "class_labels_indices.csv"),
    ("manifest", "manifest.csv"),
])
def test_missing_metadata_file_is_an_error_naming_it(tmp_path, dataset, metadata):
    root = WRITERS[dataset](tmp_path / dataset)
    (root / metadata).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"source {root} lacks {metadata}")):
        build_index(dataset, root)


def test_audioset_without_any_requested_segment_csv_is_an_error(layouts):
    with pytest.raises(FileNotFoundError, match="lacks all of unbalanced_train_segments.csv"):
        build_index("audioset", layouts["audioset"], splits=("unbalanced_train",))


# --- ESC-50 --------------------------------------------------------------------------------------------------

def test_esc50_has_five_folds_of_every_class_all_in_train(layouts):
    index = build_index("esc50", layouts["esc50"])
    assert index.class_names == list(ESC50_CATEGORIES[:3])
    assert _splits(index) == {"train": 30} and index.rejected == []
    assert Counter(c.fold for c in index.clips) == {fold: 6 for fold in range(1, 6)}
    assert Counter(c.labels for c in index.clips) == {(0,): 10, (1,): 10, (2,): 10}
    # '<fold>-<source>-<take>-<target>.wav': fold and target come from the CSV and agree with the name.
    assert all(c.id.split("-")[0] == str(c.fold) and c.id.split("-")[-1] == str(c.labels[0]) for c in index.clips)
    assert all(Path(c.path).name == f"{c.id}.wav" for c in index.clips)
    assert (index.multilabel, index.target_length, index.stats) == (False, 512, DATASET_STATS["esc50"])


def test_esc50_rejects_missing_audio_duplicates_and_bad_rows(tmp_path):
    root = write_esc50(tmp_path, n_per_fold=1, classes=2)
    (root / "audio" / "1-100000-A-0.wav").unlink()
    with (root / "meta" / "esc50.csv").open("a") as fh:
        fh.write("1-100037-A-1.wav,2,1,rooster,True,100037,A\n")  # same file again
        fh.write("x.wav,one,0,dog,True,1,A\n")
        fh.write("5-100333-A-1.wav,5,1,cat,True,100333,A\n")  # category disagrees with target 1
    index = build_index("esc50", root)
    assert len(index.clips) == 10 - 1
    assert sorted(_reasons(index)) == sorted([
        "missing audio file", "duplicate id 1-100037-A-1 in meta/esc50.csv",
        "bad fold 'one' or target '0' in meta/esc50.csv", "category 'cat' conflicts with 'rooster' for target 1"])


# --- Speech Commands -----------------------------------------------------------------------------------------

def test_speechcommands_splits_follow_the_list_files(layouts):
    index = build_index("speechcommands", layouts["speechcommands"])
    assert index.class_names == ["no", "up", "yes"]  # sorted; _background_noise_ is not a class
    assert _splits(index) == {"train": 6, "valid": 3, "test": 3} and index.rejected == []
    listed = (layouts["speechcommands"] / "validation_list.txt").read_text().split()
    valid = [c for c in index.clips if c.split == "valid"]
    assert sorted(f"{c.id}.wav" for c in valid) == sorted(listed)
    assert all(index.class_names[c.labels[0]] == c.id.split("/")[0] for c in index.clips)
    assert (index.target_length, index.stats) == (128, DATASET_STATS["speechcommands"])


def test_speechcommands_rejects_list_entries_that_are_missing_or_in_both_lists(tmp_path):
    root = write_speechcommands(tmp_path)
    in_valid = (root / "validation_list.txt").read_text().split()[0]
    with (root / "testing_list.txt").open("a") as fh:
        fh.write(f"{in_valid}\nyes/gone_nohash_0.wav\n_background_noise_/white_noise.wav\n")
    (root / ".hidden").mkdir()
    write_clip(root / "yes" / "._resource_fork.wav", 0)
    index = build_index("speechcommands", root)
    assert _splits(index) == {"train": 6, "valid": 2, "test": 3}
    assert sorted(_reasons(index)) == [
        "listed in both validation_list.txt and testing_list.txt",
        "listed in testing_list.txt but '_background_noise_' is not a keyword folder",
        "listed in testing_list.txt but missing",
    ]


# --- AudioSet ------------------------------------------------------------------------------------------------

def test_audioset_reads_quoted_mids_and_display_names_with_commas(layouts):
    index = build_index("audioset", layouts["audioset"])
    assert index.class_names == [name for _, name in AUDIOSET_CLASSES]
    assert index.class_names[1] == "Male speech, man speaking"
    assert index.multilabel and (index.target_length, index.stats) == (1024, DATASET_STATS["audioset"])
    assert _splits(index) == {"train": 4, "test": 3}
    assert any(len(c.labels) == 2 for c in index.clips)
    by_ytid = {c.id.rsplit("_", 1)[0]: c for c in index.clips}
    csv_lines = (layouts["audioset"] / "balanced_train_segments.csv").read_text().splitlines()
    ytid, _, _, mids = csv_lines[4].split(", ", 3)  # a row with two known MIDs: 'ID, 10.000, 20.000, "a,b"'
    expected = tuple(sorted(i for i, (mid, _) in enumerate(AUDIOSET_CLASSES) if mid in mids.strip('"').split(",")))
    assert by_ytid[ytid].labels == expected and len(expected) == 2
    assert by_ytid[ytid].id == f"{ytid}_10.000"


def test_audioset_rejects_missing_audio_unknown_mids_and_duplicates(layouts):
    reasons = _reasons(build_index("audioset", layouts["audioset"]))
    assert sorted(reasons) == sorted([
        "missing audio file",
        f"unknown label MID {AUDIOSET_UNKNOWN_MID} in balanced_train_segments.csv",  # kept: it has a known MID
        f"unknown label MID {AUDIOSET_UNKNOWN_MID} in balanced_train_segments.csv",  # dropped: no known MID
        next(r for r in reasons if r.startswith("duplicate id")),
    ])
    duplicate = next(r for r in reasons if r.startswith("duplicate id"))
    assert "in eval_segments.csv (first in balanced_train_segments.csv)" in duplicate


def test_audioset_unbalanced_split_and_split_selection(tmp_path):
    root = write_audioset(tmp_path, n_train=2, n_eval=2, n_unbalanced=3)
    assert _splits(build_index("audioset", root)) == {"train": 2, "test": 2, "unbalanced": 3}
    only_eval = build_index("audioset", root, splits="eval")  # a comma-separated string, as from a CLI
    assert _splits(only_eval) == {"test": 3}  # the duplicate is no longer a duplicate
    with pytest.raises(ValueError, match="'balanced'"):
        build_index("audioset", root, splits=("balanced",))


def test_audioset_name_pattern_is_configurable(tmp_path):
    root = write_audioset(tmp_path, n_train=2, n_eval=2)
    mirror = root / "wavs" / "eval"
    mirror.mkdir(parents=True)
    for path in (root / "audio").glob("*.wav"):  # e.g. 'YTID_30.000.wav' -> 'wavs/eval/YTID-30.wav'
        ytid, start = path.stem.rsplit("_", 1)
        shutil.move(path, mirror / f"{ytid}-{int(float(start))}.wav")
    index = build_index("audioset", root, audio_dir="wavs", name_pattern="{split}/{ytid}-{start_int}.wav",
                        splits=["eval"])
    assert _splits(index) == {"test": 3}
    assert all(c.path.startswith(str(mirror)) and Path(c.path).is_file() for c in index.clips)


@pytest.mark.parametrize("pattern", ["{id}.wav", "{start}.wav", "{ytid.wav"])
def test_audioset_bad_name_pattern_is_a_value_error(layouts, pattern):
    with pytest.raises(ValueError, match="name_pattern"):
        build_index("audioset", layouts["audioset"], name_pattern=pattern)


# --- folder --------------------------------------------------------------------------------------------------

def test_folder_classes_are_the_sorted_subfolders_holding_audio(layouts):
    index = build_index("folder", layouts["folder"])
    assert index.class_names == ["cat", "dog", "rain"]
    assert len(index.clips) == 18 and index.rejected == []  # notes.txt and .DS_Store are not clips
    assert {Path(c.path).suffix for c in index.clips} == {".wav", ".flac", ".ogg"}
    assert all(c.id == f"{index.class_names[c.labels[0]]}/{Path(c.path).name}" for c in index.clips)
    assert all(c.split == hash_split(c.id) for c in index.clips)
    assert (index.multilabel, index.target_length, index.stats) == (False, None, None)  # None: fitted at prepare


def test_folder_fractions_zero_keep_everything_in_train_and_extensions_filter(layouts):
    index = build_index("folder", layouts["folder"], valid_fraction="0", test_fraction=0, extensions="flac")
    assert _splits(index) == {"train": 6} and all(c.path.endswith(".flac") for c in index.clips)


def test_folder_rejects_stray_root_files_and_ignores_empty_class_folders(tmp_path):
    root = write_folder(tmp_path, classes=("a", "b"), per_class=2)
    write_clip(root / "stray.wav", 0)
    (root / "empty_class").mkdir()
    write_clip(root / "b" / "nested" / "deep.wav", 1)
    index = build_index("folder", root)
    assert index.class_names == ["a", "b"]
    assert index.rejected == [{"path": str(root / "stray.wav"), "reason": "not inside a class folder"}]
    assert "b/nested/deep.wav" in {c.id for c in index.clips}


def test_folder_empty_tree_is_a_value_error(tmp_path):
    (tmp_path / "class_without_audio").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        build_index("folder", tmp_path)


@pytest.mark.parametrize("valid, test", [(-0.1, 0.1), (0.5, 0.5), (0.9, 0.2)])
def test_bad_split_fractions_are_a_value_error(layouts, valid, test):
    with pytest.raises(ValueError, match="valid_fraction"):
        build_index("folder", layouts["folder"], valid_fraction=valid, test_fraction=test)


def test_hash_split_is_stable_and_follows_the_fractions():
    keys = [f"speaker_{i}/clip_{i % 7}.wav" for i in range(4000)]
    counts = Counter(hash_split(k, 0.2, 0.1) for k in keys)
    assert abs(counts["valid"] / 4000 - 0.2) < 0.03 and abs(counts["test"] / 4000 - 0.1) < 0.03
    # Pinned values: a change here would silently move clips between train and test of existing preparations.
    assert [hash_split(f"dog/{i}.wav", 0.3, 0.3) for i in range(8)] == [
        "valid", "valid", "test", "test", "train", "train", "train", "test"]
    assert hash_split("cat/clip_00.wav", 0.0, 0.0) == "train" and hash_split("cat/clip_00.wav", 1 - 1e-9, 0) == "valid"


def test_broken_tree_is_indexed_whole_because_adapters_do_not_decode(tmp_path):
    root, bad = write_broken_tree(tmp_path)
    index = build_index("folder", root, valid_fraction=0, test_fraction=0)
    names = {Path(c.path).name for c in index.clips}
    assert bad.keys() <= names and len(index.clips) == 12 and index.rejected == []
    assert set(bad.values()) == {"decode", "empty", "non-finite", "too short"}


# --- manifest ------------------------------------------------------------------------------------------------

def test_manifest_single_label_with_splits(layouts):
    index = build_index("manifest", layouts["manifest"])
    assert index.class_names == ["bird", "car", "speech"] and not index.multilabel
    assert _splits(index) == {"train": 4, "valid": 3, "test": 2}
    assert all(c.id.startswith("clips/") for c in index.clips)  # the absolute row too: ids are relative
    assert sorted(_reasons(index)) == ["line 11: missing audio file",
                                       "line 12: unknown split 'holdout' (allowed: train, valid, test)"]
    assert build_index("manifest", layouts["manifest"] / "manifest.csv") == index  # the CSV itself as source


def test_manifest_multilabel_splits_labels_on_semicolons_and_commas(tmp_path):
    index = build_index("manifest", write_manifest(tmp_path, multilabel=True))
    assert index.multilabel and index.class_names == ["bird", "car", "speech"]
    assert Counter(c.labels for c in index.clips) == {(0,): 3, (1, 2): 3, (2,): 3}


def test_manifest_rejects_empty_labels_and_duplicate_paths(tmp_path):
    root = write_manifest(tmp_path)
    with (root / "manifest.csv").open("a") as fh:
        fh.write("clips/bird_0.wav,car,test\n./clips/../clips/car_1.wav,car,train\nclips/bird_3.wav,,train\n")
        fh.write(",bird,train\n")
    index = build_index("manifest", root)
    assert _splits(index) == {"train": 4, "valid": 3, "test": 2}
    reasons = _reasons(index)
    assert "line 13: duplicate path (first on line 2)" in reasons
    assert "line 14: duplicate path (first on line 3)" in reasons
    assert "line 15: empty label" in reasons and "line 16: empty path" in reasons


def test_manifest_without_split_column_uses_the_hash_split(tmp_path):
    for i in range(6):
        write_clip(tmp_path / f"{i}.wav", i)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\n" + "".join(f"{i}.wav,{'ab'[i % 2]}\n" for i in range(6)))
    index = build_index("manifest", csv_path, valid_fraction=0.3, test_fraction=0.3)
    assert all(c.split == hash_split(c.id, 0.3, 0.3) for c in index.clips) and len(index.clips) == 6


@pytest.mark.parametrize("header", ["file,label", "path,category", "path,label,labels"])
def test_manifest_without_path_and_one_label_column_is_a_value_error(tmp_path, header):
    (tmp_path / "manifest.csv").write_text(header + "\n")
    with pytest.raises(ValueError, match="expected 'path' and exactly one of 'label' or 'labels'"):
        build_index("manifest", tmp_path)


def test_clipref_is_frozen_and_hashable():
    clip = ClipRef(id="a", path="/a.wav", split="train", labels=(1,))
    assert (clip.fold, clip.event) == (0, None) and hash(clip) == hash(ClipRef("a", "/a.wav", "train", (1,)))
    with pytest.raises(AttributeError):
        clip.split = "test"


def test_audioset_malformed_rows_are_rejected_with_their_line(tmp_path):
    root = write_audioset(tmp_path, n_train=1, n_eval=1)
    with (root / "eval_segments.csv").open("a") as fh:
        fh.write('YTID, start_seconds, end_seconds, positive_labels\n')  # an uncommented header: skipped
        fh.write('abcdefghijk, thirty, 40.000, "/m/09x0r"\n')
        fh.write("abcdefghijk, 30.000\n")
        fh.write('abcdefghijk, nan, 40.000, "/m/09x0r"\n')
    index = build_index("audioset", root)
    csv_path = str(root / "eval_segments.csv")
    malformed = [r for r in index.rejected if r["path"] == csv_path]
    assert [r["reason"].split(":")[0] for r in malformed] == ["line 7", "line 8", "line 9"]
    assert _splits(index) == {"train": 1, "test": 1}


def test_a_source_that_is_a_link_loop_or_a_dangling_link_says_so(tmp_path):
    loop, dangling = tmp_path / "loop", tmp_path / "dangling"
    loop.symlink_to(loop)
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="folder source .*loop is a symbolic link loop"):
        build_index("folder", loop)
    with pytest.raises(FileNotFoundError, match=r"folder source .*dangling is a dangling symbolic link \(to .*nowhere\)"):
        build_index("folder", dangling)
