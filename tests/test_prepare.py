"""asda prepare for real on Ray Data: every layout, broken files, atomic output, idempotence."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from layouts import (
    write_audioset,
    write_broken_tree,
    write_esc50,
    write_folder,
    write_manifest,
    write_speechcommands,
)

from model.features import log_mel
from pipelines.cli import main
from pipelines.data.card import CARD_NAME, load_card
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
