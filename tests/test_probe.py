"""Evaluation outputs on Ray Data: the probe's features and fine-tuning's logits come from an actor pool, bit for bit
what the same model gives in one process, and this process receives the vectors, never the clips."""

import dataclasses

import numpy as np
import pytest
import torch

from model import ASDAClassifier, ASDAConfig, ASDAEncoder
from pipelines import inference
from pipelines.data.feed import read_clips
from pipelines.inference import model_outputs
from pipelines.probe import ProbeSettings, encoder_features, probe

pytestmark = pytest.mark.ray

TINY = ASDAConfig.tiny(embed_dim=64, depth=2, num_heads=4, average_top_k_layers=2, num_students=2,
                       decoder_layers=1)


@pytest.fixture
def one_thread():
    """The in-process reference runs with the actors' torch thread count (it orders the float sums)."""
    before = torch.get_num_threads()
    torch.set_num_threads(inference.INFERENCE_THREADS)
    yield
    torch.set_num_threads(before)


def test_ray_data_outputs_are_the_in_process_encoding_bit_for_bit_on_two_actors(synthetic_prepared, one_thread,
                                                                               monkeypatch):
    """Utterance vectors, alone or beside the mean patch token (an encoder), and logits (a classifier) from a pool
    of two actors equal, with torch.equal, encoding the same clips in this process in batches of the same size:
    batches are consecutive clips in shard order, whichever actor runs them. 96 clips in batches of 10: the last
    batch is short."""
    spawned = []

    def two_actors(ray, batches):
        size, per_actor = real_pool_size(ray, batches)
        spawned.append(size)
        return 2, per_actor

    real_pool_size = inference.pool_size
    monkeypatch.setattr(inference, "pool_size", two_actors)
    torch.manual_seed(3)
    encoder = ASDAEncoder(TINY).eval()
    classifier = ASDAClassifier(TINY, 8).eval()
    splits = ["train", "test"]
    clips = read_clips(synthetic_prepared, splits, labels="index")
    batches = [torch.as_tensor(clips["fbank"][i:i + 10]) for i in range(0, len(clips["fbank"]), 10)]
    with torch.no_grad():
        both = [encoder.extract_features(batch) for batch in batches]
    beside_mean = torch.cat([torch.cat([utterance, patches.mean(1)], dim=-1) for utterance, patches in both])
    assert torch.equal(encoder_features(encoder, clips["fbank"], 10, "cls+mean"), beside_mean)
    for model, readout, reference in (
            (encoder, "cls", encoder_features(encoder, clips["fbank"], 10)),
            (encoder, "cls+mean", beside_mean),  # (N, 2D): the utterance vector, then the mean patch output
            (classifier, "cls", torch.cat([classifier(batch) for batch in batches]).detach())):
        out = model_outputs(model, synthetic_prepared, splits, labels="index", batch_size=10, readout=readout)
        assert set(out) == {"output", "label", "id", "split", "fold"}  # no fbank comes back
        assert out["output"].shape == tuple(reference.shape) and out["output"].dtype == np.float32
        assert torch.equal(torch.from_numpy(out["output"]), reference)
        assert list(out["id"]) == list(clips["id"]) and np.array_equal(out["label"], clips["label"])
        assert set(out["split"]) == set(splits) and (out["split"] == "test").sum() == 32
    assert spawned  # the pool was sized through pool_size


def test_an_encoding_finishes_where_less_than_a_cpu_is_left_beside_its_model_actor(ray_local, synthetic_prepared):
    """Every CPU of the instance but one held (as a trial holds its node's, say): the reads' planning takes that
    CPU and lets it go, then the model actor takes a quarter of it and the blocks of exactly batch_size rows
    are cut on tasks that fit in the rest. (Ray Data gives its repartition a whole CPU unless told: this waited
    for good, as the trial left on a cluster's head did after its other node was lost.)"""
    class Holder:  # defined here: a Ray worker cannot import a test module
        def ready(self) -> bool:
            return True

    free = ray_local.available_resources().get("CPU", 0)
    if free < 2:
        pytest.skip(f"the session's Ray instance has {free:g} CPU free, fewer than this test holds and leaves")
    holder = ray_local.remote(num_cpus=free - 1)(Holder).remote()

    @ray_local.remote(num_cpus=0)
    def encode(prepared):
        torch.manual_seed(0)
        return model_outputs(ASDAEncoder(TINY).eval(), prepared, ["test"], labels="none", batch_size=10)["output"]

    ref, done = None, []
    try:
        ray_local.get(holder.ready.remote(), timeout=60)
        done, _ = ray_local.wait([ref := encode.remote(str(synthetic_prepared))], timeout=180)
        assert done, "the encoding waited on CPUs it could not get"
        assert ray_local.get(ref).shape == (32, TINY.embed_dim)
    finally:
        if ref is not None and not done:  # a stuck encoding must not hold the session's instance; only then:
            ray_local.cancel(ref)  # Ray 2.60's driver aborts on a forced cancel of a task that has just ended
        ray_local.kill(holder)


def test_probe_readouts_other_than_the_three_named_are_refused_before_any_work():
    with pytest.raises(ValueError, match=r"readout='patches' is not allowed: expected one of \['cls', 'mean', "
                                         r"'cls\+mean'\]"):
        ProbeSettings(data="-", readout="patches")


def test_the_probes_older_features_names_are_read_as_readouts_with_a_warning():
    with pytest.warns(UserWarning, match=r"features='utterance\+mean' is now readout='cls\+mean'"):
        settings = ProbeSettings(data="-", features="utterance+mean")
    assert settings.readout == "cls+mean" and settings.features is None


def test_a_small_job_runs_on_one_actor_and_gpus_get_one_actor_each(monkeypatch):
    """The pool never outgrows its work (one actor per BATCHES_PER_ACTOR batches) or the cluster."""
    monkeypatch.setattr(inference.os, "cpu_count", lambda: 2)

    class Cluster:
        def __init__(self, cpus, gpus=0, nodes=1):
            self.resources, self.node_count = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}, nodes

        def cluster_resources(self):
            return self.resources

        def nodes(self):
            return [{"Alive": True}] * self.node_count + [{"Alive": False}]

    assert inference.pool_size(Cluster(6), 40) == (1, {"num_cpus": inference.DATA_TASK_CPUS})  # 2 cores, 6 logical
    assert inference.pool_size(Cluster(32, nodes=4), 40)[0] == 4  # four 2-core nodes
    assert inference.pool_size(Cluster(64, gpus=4), 1000) == (4, {"num_gpus": 1, "num_cpus": inference.DATA_TASK_CPUS})
    assert inference.pool_size(Cluster(64, gpus=4), 9)[0] == 2
    assert inference.pool_size(Cluster(64, gpus=4), 1)[0] == 1


@pytest.mark.slow  # two probes, ~25 s; the bit-for-bit test above is the fast suite's check of the same path
def test_the_same_probe_twice_gives_identical_features_and_metrics(synthetic_prepared, tracking_store, monkeypatch):
    """Two runs of one random-init probe: the features (as Ray Data returned them) and every metric are equal."""
    seen = []

    def recording(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    real = inference.model_outputs
    monkeypatch.setattr(inference, "model_outputs", recording)
    settings = ProbeSettings(data=str(synthetic_prepared), eval_split="test", max_iter=50, batch_size=16)
    first, second = probe(settings, TINY, also=("mean",)), probe(settings, TINY)
    assert np.array_equal(seen[0]["output"], seen[1]["output"])
    metrics = {k: v for k, v in first.items() if k.startswith(("eval_", "train_")) and k != "eval_split"}
    assert metrics and metrics == {k: second[k] for k in metrics}
    assert (first["num_train"], first["num_eval"]) == (64, 32)
    # Another read-out scored from the same encoding is the probe of that read-out run by itself.
    alone = probe(dataclasses.replace(settings, readout="mean"), TINY)
    assert first["readouts"]["mean"] == {k: v for k, v in alone.items() if k in first["readouts"]["mean"]}
    assert first["readouts"]["mean"]["eval_accuracy"] != first["eval_accuracy"] or \
        first["readouts"]["mean"]["train_accuracy"] != first["train_accuracy"]


def test_a_probe_that_does_not_fit_its_own_training_clips_warns_of_a_collapsed_encoder():
    from pipelines.probe import near_chance

    card = {"multilabel": False, "class_names": list("abcdefgh"), "class_counts": {"train": [80] * 8}}
    warning = near_chance({"train_accuracy": 0.18, "eval_accuracy": 0.17}, card)  # a collapsed tiny run's numbers
    assert warning is not None and "0.180" in warning and "0.125" in warning and "asda.collapsed" in warning
    assert near_chance({"train_accuracy": 0.42}, card) is None  # the random-init encoder's
    skewed = {**card, "class_counts": {"train": [560] + [20] * 7}}  # chance is the largest class's share, 0.8
    assert near_chance({"train_accuracy": 0.81}, skewed) is not None  # the line: 0.8 + 0.1 x 0.2 = 0.82
    assert near_chance({"train_accuracy": 0.9}, skewed) is None
    assert near_chance({"train_map": 0.1}, {**card, "multilabel": True}) is None


def test_the_probe_scores_the_eval_split_with_noise_by_the_classifier_fitted_on_clean_features(
        synthetic_prepared, tracking_store):
    """Noise at 80 dB changes nothing the classifier can see; at -20 dB it buries the clips. Each level is logged
    beside the clean metric, for every read-out."""
    from mlflow import MlflowClient

    settings = ProbeSettings(data=str(synthetic_prepared), eval_split="test", max_iter=50, noise_snrs=(80, -20))
    out = probe(settings, TINY, also=("mean",))
    assert out["eval_accuracy_snr80"] == out["eval_accuracy"]
    assert 0.0 <= out["eval_accuracy_snr-20"] <= 1.0 and "eval_map_snr-20" in out
    assert out["readouts"]["mean"]["eval_accuracy_snr80"] == out["readouts"]["mean"]["eval_accuracy"]
    logged = MlflowClient().get_run(out["run_id"]).data.metrics
    assert {"eval_accuracy_snr80", "eval_accuracy_snr-20", "readout_mean/eval_accuracy_snr-20"} <= set(logged)
    with pytest.raises(ValueError, match=r"noise_snrs=\(5, 5\) is not allowed: expected distinct finite numbers"):
        ProbeSettings(data="-", noise_snrs=(5, 5))


RESTART_WARNING_SCRIPT = """
import sys

from model import ASDAConfig, ASDAEncoder
from pipelines import inference

encoder = ASDAEncoder(ASDAConfig.tiny(embed_dim=64, depth=2, num_heads=4, average_top_k_layers=2, num_students=2,
                                      decoder_layers=1)).eval()
inference.model_outputs(encoder, sys.argv[1], ["test"], batch_size=16)
print("=== restartable actors", file=sys.stderr, flush=True)
inference.on_actor_pool = lambda ds, actor_class, **options: ds.map_batches(actor_class, **options)
inference.model_outputs(encoder, sys.argv[1], ["test"], batch_size=16)
"""


def test_the_probes_actor_pool_prints_no_ray_core_line_on_the_console(ray_local, synthetic_prepared):
    """The probe's pass on Ray Data, in a process of its own (Ray's core worker prints its warning once per
    process, so an earlier actor of this one could hide it), writes no core_worker.cc line to stderr. The same
    process then runs the pass with Ray Data's restartable actors and the line appears: what the first pass
    avoided, and proof that the check can see it. If Ray stops printing it, the control fails: the pool's
    max_restarts=0 (``inference.on_actor_pool``) can then go. A subprocess, not capfd: it is the only way to a
    process whose once-only line is not spent."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    run = subprocess.run([sys.executable, "-c", RESTART_WARNING_SCRIPT, str(synthetic_prepared)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ours, restartable = run.stderr.split("=== restartable actors")
    assert "core_worker.cc" not in ours and "deprecated" not in ours, ours  # nor Ray's word on the knob used
    assert "has constructor arguments in the object store and max_restarts > 0" in restartable, restartable[-2000:]
