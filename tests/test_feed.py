"""The feed: what Ray Train workers receive from a prepared folder."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.data.card import load_card
from pipelines.data.feed import feed_dataset, iter_torch, read_clips, to_model_batch, verify_shards

pytestmark = pytest.mark.ray


def test_feed_batches_have_model_shapes_and_card_normalisation(synthetic_prepared):
    card = load_card(synthetic_prepared)
    ds = feed_dataset(synthetic_prepared, "train", target_length=256, labels="index", random_crop=False)
    batches = list(iter_torch(ds, batch_size=16, seed=0))
    assert len(batches) == 64 // 16
    batch = batches[0]
    assert batch["fbank"].shape == (16, 256, 128) and batch["fbank"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["label"].max() < len(card["class_names"])
    # Normalised with the card's training statistics: the whole split has mean ~0 and std ~0.5 (x / (2 std)).
    everything = torch.cat([b["fbank"] for b in batches])
    assert abs(everything.mean().item()) < 0.05
    assert abs(everything.std().item() - 0.5) < 0.05


def test_the_feed_reads_on_the_classic_parquet_path_without_changing_the_process_wide_setting(synthetic_prepared):
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    ds = feed_dataset(synthetic_prepared, "train", labels="none")
    assert context.use_datasource_v2 == before
    ops = {type(op).__name__ for op in ds._logical_plan.dag.post_order_iter()}
    assert "Read" in ops and "ListFiles" not in ops, ops  # the newer path plans ListFiles -> ReadFiles


def test_a_fed_row_is_the_stored_fbank_padded_then_normalised(synthetic_prepared):
    card = load_card(synthetic_prepared)
    row = pq.read_table(synthetic_prepared / card["shards"][0]["file"]).slice(0, 1).to_pylist()[0]
    stored = np.frombuffer(row["fbank"], dtype=np.float16).reshape(row["frames"], 128).astype(np.float32)
    target = 300  # longer than the clip: zero-padded before normalising
    padded = np.zeros((target, 128), np.float32)
    padded[: row["frames"]] = stored
    norm = card["normalisation"]
    expected = (padded - norm["mean"]) / (2 * norm["std"])
    clips = read_clips(synthetic_prepared, row["split"], target_length=target, labels="index")
    index = list(clips["id"]).index(row["id"])
    np.testing.assert_allclose(clips["fbank"][index], expected, rtol=1e-6, atol=1e-6)
    assert clips["label"][index] == row["labels"][0]
    assert np.all(np.isfinite(clips["event"][index]))  # the synthetic set knows its events


def test_random_crop_is_seeded_per_clip():
    frames = 50
    batch = {"id": np.array(["a", "b"], dtype=object), "frames": np.array([frames, frames]),
             "fbank": np.array([np.arange(frames * 128, dtype=np.float16).tobytes()] * 2, dtype=object),
             "labels": np.array([[0], [1]], dtype=object), "event_start": np.array([np.nan] * 2),
             "event_end": np.array([np.nan] * 2)}
    kwargs = dict(mean=0.0, std=0.5, target_length=16, num_classes=2, labels="multihot", random_crop=True)
    a = to_model_batch(batch, seed=1, **kwargs)
    b = to_model_batch(batch, seed=1, **kwargs)
    c = to_model_batch(batch, seed=2, **kwargs)
    assert np.array_equal(a["fbank"], b["fbank"]) and not np.array_equal(a["fbank"], c["fbank"])
    assert not np.array_equal(a["fbank"][0], a["fbank"][1])  # each clip its own offset
    assert a["label"].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_unknown_split_and_wrong_label_mode_are_clear_errors(synthetic_prepared):
    with pytest.raises(ValueError, match="split .*'nope'.* has"):
        feed_dataset(synthetic_prepared, "nope")
    with pytest.raises(ValueError, match="labels='bogus'"):
        feed_dataset(synthetic_prepared, "train", labels="bogus")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_a_corrupt_shard_is_named(synthetic_prepared, tmp_path, damage):
    copy = tmp_path / "prepared"
    shutil.copytree(synthetic_prepared, copy)
    shard = copy / load_card(copy)["shards"][0]["file"]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "garbage":
        shard.write_bytes(b"\0" * shard.stat().st_size)
    else:
        shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        verify_shards(copy)
    with pytest.raises(ValueError, match=shard.name):
        feed_dataset(copy, "train")


def _flip_middle(shard, count=64):
    """XOR ``count`` bytes in the middle of a file: same size, same footer, different content."""
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_a_shard_changed_in_place_is_named_before_any_run_and_on_every_read(synthetic_prepared, tmp_path, capsys):
    import json

    from pipelines.cli import main

    copy = tmp_path / "prepared"
    shutil.copytree(synthetic_prepared, copy)
    card = load_card(copy)
    shard = copy / card["shards"][0]["file"]
    _flip_middle(shard)
    assert shard.stat().st_size == card["shards"][0]["bytes"]  # the old check, size and footer, passes
    assert main(["verify", str(copy)]) == 2
    assert f"corrupt shard {shard}: its sha256 differs" in capsys.readouterr().err
    assert main(["probe", "--data", str(copy), "--random-init"]) == 2
    assert shard.name in capsys.readouterr().err
    # Without the card's hash (a card of an older version, or a change after the check), the page checksums
    # written with every shard still refuse the damaged page.
    for entry in card["shards"]:
        entry.pop("sha256")
    (copy / "dataset.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=rf"corrupt shard {shard}: .*CRC checksum verification failed"):
        read_clips(copy, ["train", "test"])
    with pytest.raises(Exception, match="CRC checksum verification failed"):  # the Train workers' feed
        for split in ("train", "test"):
            list(iter_torch(feed_dataset(copy, split, labels="none", random_crop=False), batch_size=8))


def test_an_intact_prepared_folder_verifies(synthetic_prepared, capsys):
    from pipelines.cli import main

    assert main(["verify", str(synthetic_prepared)]) == 0
    assert "intact (sizes, footers, row counts, content hashes)" in capsys.readouterr().out


def test_each_pass_reads_the_shards_in_its_own_seeded_order_over_shuffled_clips(synthetic_prepared):
    """A run drawing more clips than the split holds gets enough passes, each every clip once and in its own
    seeded shard order (the same again for the same seed); the clips themselves are stored shuffled, so a shard
    is a random sample of the data set and not a run of one class."""
    from pipelines.data.feed import passes_for, shard_order

    card = load_card(synthetic_prepared)
    n, shards = card["splits"]["train"], len(card["shards"])
    assert shards >= 2 and passes_for(n + 1, n) == 3 and passes_for(None, n) == 1
    seed = next(s for s in range(20) if shard_order(shards, s, 0) != shard_order(shards, s, 1))

    def fed(seed: int) -> list[list[float]]:
        ds = feed_dataset(synthetic_prepared, "train", labels="index", random_crop=False, seed=seed, clips=n + 1)
        keys = [round(float(row["fbank"].sum()), 3) for row in ds.take_all()]
        assert len(keys) == 3 * n
        return [keys[k * n:(k + 1) * n] for k in range(3)]

    passes = fed(seed)
    assert all(sorted(p) == sorted(passes[0]) for p in passes)  # every clip once per pass
    assert passes[0] != passes[1]  # their shard orders differ
    assert fed(seed) == passes  # reproducible
    assert sorted(set(shard_order(shards, seed, 0))) == list(range(shards))

    stored = [i for shard in verify_shards(synthetic_prepared) for i in pq.read_table(shard, columns=["id"])["id"]
              .to_pylist()]
    assert "shuffled" in card["clip_order"] and sorted(stored) != stored and len(set(stored)) == len(stored)


def test_shuffled_batches_do_not_depend_on_the_cluster_size_the_reader_sees(easy_synthetic):
    """Ray Data sizes a read from the CPUs it expects to have (the cluster's, or its share inside a placement
    group such as a Train worker's); the block boundaries that follow decide what the seeded local shuffle
    buffer draws from. A run must get the same batches on a larger machine or with a smaller worker."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def batch_sums(ds) -> list[torch.Tensor]:
        """Each shuffled batch's per-clip sums, read where this runs, planned with no floor on the read's task
        count (Ray Data's floor of 200 would hide the expected CPUs behind this small set's size)."""
        import ray.data

        context = ray.data.DataContext.get_current()
        before = context.read_op_min_num_blocks
        context.read_op_min_num_blocks = 1
        try:
            return [b["fbank"].sum(dim=(1, 2)) for b in iter_torch(ds, batch_size=8, seed=3, shuffle_buffer=32)]
        finally:
            context.read_op_min_num_blocks = before

    ds = feed_dataset(easy_synthetic, "train", labels="index", seed=3, clips=400)
    whole_cluster = batch_sums(ds)
    one_cpu = placement_group([{"CPU": 1}])
    try:
        strategy = PlacementGroupSchedulingStrategy(one_cpu, placement_group_capture_child_tasks=True)
        in_one_cpu = ray.get(ray.remote(batch_sums).options(num_cpus=1, scheduling_strategy=strategy).remote(ds),
                             timeout=300)
    finally:
        remove_placement_group(one_cpu)
    assert len(whole_cluster) == len(in_one_cpu) > 8
    assert all(torch.equal(a, b) for a, b in zip(whole_cluster, in_one_cpu, strict=True))


def test_noise_is_added_in_the_mel_power_domain_at_the_snr_asked_and_the_same_for_a_clip_every_time():
    from pipelines.data.feed import add_noise, noise_log_mel

    rng = np.random.default_rng(0)
    clip = rng.normal(-5, 2, size=(40, 128)).astype(np.float32)
    noise = noise_log_mel(40, "clip-7", seed=0)
    assert noise.shape == (40, 128) and np.array_equal(noise, noise_log_mel(40, "clip-7", seed=0))
    assert not np.array_equal(noise, noise_log_mel(40, "clip-8", seed=0))
    for snr in (10.0, 0.0, -5.0):
        added = np.exp(add_noise(clip, noise, snr).astype(np.float64)) - np.exp(clip.astype(np.float64))
        ratio = np.exp(clip.astype(np.float64)).sum() / added.sum()
        assert 10 * np.log10(ratio) == pytest.approx(snr, abs=1e-3)
