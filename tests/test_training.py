"""Ray Train pretraining, recovery, probe and fine-tuning for real: tiny model, tiny synthetic data, 2 CPUs."""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from model import ASDA, ASDAConfig, load_checkpoint
from pipelines.data.card import load_card
from pipelines.pretrain import PretrainSettings, pretrain
from pipelines.probe import ProbeSettings, probe
from pipelines.training import NonFiniteLossError

pytestmark = pytest.mark.ray

TINY = ASDAConfig.tiny(embed_dim=64, depth=2, num_heads=4, average_top_k_layers=2, num_students=2,
                       decoder_layers=1)
GOLDEN = Path(__file__).parent / "golden" / "pretrain_tiny_loss.json"


def _settings(data, storage, name, **overrides):
    base = dict(data=str(data), storage=str(storage), name=name, steps=6, batch_size=4, checkpoint_every=3,
                log_every=2, warmup_steps=2, figure_clips=2)
    return PretrainSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def pretrained(synthetic_prepared, tracking_store, tmp_path_factory):
    storage = tmp_path_factory.mktemp("results")
    result = pretrain(TINY, _settings(synthetic_prepared, storage, "ddp", workers=2))
    return {"result": result, "storage": storage}


def test_two_worker_ddp_pretraining_checkpoints_and_tracks(pretrained):
    result = pretrained["result"]
    run_dir = Path(result["run_dir"])
    assert result["metrics"]["step"] == 6
    last = Path(result["ray_checkpoint"])
    assert last.name == "checkpoint_0000006"
    assert {"model.pt", "rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in last.iterdir()}
    state = torch.load(last / "model.pt", weights_only=True)
    assert state["step"] == 6 and {"optimizer", "scheduler", "epoch", "settings", "config"} <= set(state)
    assert any(k.startswith("teacher.") for k in state["model"]) and any(k.startswith("decoder.") for k in state["model"])
    final, config = load_checkpoint(run_dir / "final.pt")
    assert config == TINY.for_run(6)  # the teacher's anneal sized to the run's 6 updates
    # what turns audio into this encoder's input, for asda embed, the HEAR module and asda export
    norm = load_card(final["settings"]["data"])["normalisation"]
    assert final["feeding"] == {"mean": norm["mean"], "std": norm["std"], "chunk_frames": config.target_length}
    assert final["settings"]["seed"] == 0 and final["settings"]["workers"] == 2

    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.diff_lambda"] == "0.3" and run.data.params["train.workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    for key in ("loss_frame", "loss_utterance", "lr", "ema_decay", "grad_norm", "clips_per_s",
                "attn_event_share", "attn_event_share_uniform", "attn_negative_off_event", "attn_clips",
                "attn_event_share_a1_layer0"):
        assert key in run.data.metrics, key
    assert any(k.startswith("system/") for k in run.data.metrics)
    artifacts = {a.path for folder in ("figures", "config") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"figures/attention.png", "figures/loss_curves.png", "config/model.yaml", "config/train.yaml"} <= artifacts


def test_same_name_resumes_from_the_last_checkpoint(pretrained, synthetic_prepared):
    first = pretrained["result"]
    again = pretrain(TINY, _settings(synthetic_prepared, pretrained["storage"], "ddp", workers=2, steps=9))
    assert again["metrics"]["step"] == 9 and again["metrics"]["resumed_from_step"] == 6
    assert again["run_id"] == first["run_id"]
    steps = [m.step for m in MlflowClient().get_metric_history(first["run_id"], "loss")]
    assert steps[-1] == 9 and 8 in steps


def test_a_killed_worker_is_replaced_and_training_continues_from_the_checkpoint(synthetic_prepared, tmp_path,
                                                                               tracking_store):
    settings = _settings(synthetic_prepared, tmp_path, "kill", workers=2, steps=24, checkpoint_every=4,
                         figure_clips=0, max_failures=1)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=pretrain(TINY, settings)), daemon=True)
    thread.start()
    run_dir = tmp_path / "kill"
    deadline = time.time() + 300
    while not _registered_checkpoints(run_dir) and time.time() < deadline:
        time.sleep(0.2)
    assert _registered_checkpoints(run_dir), "no checkpoint before the deadline"
    os.kill(int((run_dir / "workers" / "rank1.pid").read_text()), signal.SIGKILL)
    killed_at = time.time()
    thread.join(timeout=400)
    assert "result" in outcome, "training did not finish after the worker was killed"
    metrics = outcome["result"]["metrics"]
    assert metrics["step"] == 24
    assert metrics["resumed_from_step"] >= 4  # continued from a checkpoint, not from 0
    resumed = MlflowClient().get_metric_history(outcome["result"]["run_id"], "resumed_from_step")
    restart = [m for m in resumed if m.value >= 4]
    assert restart
    print(f"recovered {restart[0].timestamp / 1000 - killed_at:.1f} s after the kill, "
          f"from step {int(restart[0].value)}")


def _registered_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train has finished registering (a folder alone may still be uploading)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]


def test_fixed_seed_loss_curve_matches_the_golden_file(synthetic_prepared, tmp_path, tracking_store):
    result = pretrain(TINY, _settings(synthetic_prepared, tmp_path, "golden", steps=8, log_every=1,
                                      checkpoint_every=8, figure_clips=0))
    losses = [round(m.value, 6) for m in sorted(MlflowClient().get_metric_history(result["run_id"], "loss"),
                                                  key=lambda m: m.step)]
    if os.environ.get("ASDA_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": "tests/test_training.py::TINY", "loss": losses}, indent=1))
    golden = json.loads(GOLDEN.read_text())["loss"]
    assert losses == pytest.approx(golden, rel=2e-3), (losses, golden)


def test_non_finite_loss_stops_the_run_naming_the_update_and_checkpoint(synthetic_prepared, tmp_path,
                                                                       tracking_store):
    settings = _settings(synthetic_prepared, tmp_path, "nan", steps=12, lr=1e30, warmup_steps=0,
                         checkpoint_every=1, figure_clips=0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at update \d+.*last good checkpoint: checkpoint_"):
        pretrain(TINY, settings)


def test_non_finite_loss_stops_fine_tuning_too_naming_the_update_and_checkpoint(synthetic_prepared, tmp_path,
                                                                               tracking_store):
    from pipelines.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(data=str(synthetic_prepared), storage=str(tmp_path), name="ft-nan", steps=12,
                                batch_size=4, lr=1e30, warmup_steps=0, checkpoint_every=1, log_every=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at update \d+.*last good checkpoint: checkpoint_"):
        finetune(TINY, settings)


# Tiny runs whose collapse guard must trip and must not: the release's sums at a large alpha (the utterance term
# 160x the frame term per element) drive every clip to nearly one utterance vector within 40 updates; the tiny
# preset's recipe keeps them apart (measured in process on the synthetic set: window rank 2.9 and 5.6-8.9).
COLLAPSING = TINY.with_overrides({"loss_reduction": "release", "alpha": 10.0})


def _guard_settings(data, storage, name, **overrides):
    return _settings(data, storage, name, **{**dict(steps=40, batch_size=8, log_every=10, checkpoint_every=20,
                                                    lr=1e-3, warmup_steps=4, figure_clips=0, in_process=True),
                                             **overrides})


def test_a_collapsing_run_is_tagged_and_says_so_on_the_console_and_a_healthy_one_is_not(
        synthetic_prepared, tmp_path, tracking_store, capsys):
    fallen = pretrain(COLLAPSING, _guard_settings(synthetic_prepared, tmp_path, "collapsing"))
    healthy = pretrain(TINY, _guard_settings(synthetic_prepared, tmp_path, "healthy", lr=5e-4))
    out = capsys.readouterr().out
    client = MlflowClient()
    tags = client.get_run(fallen["run_id"]).data.tags
    assert tags["asda.collapsed"] == "true" and fallen["collapse"] == tags["asda.collapse"]
    assert fallen["collapse"].startswith("update ") and "utterance_rank" in fallen["collapse"]
    lines = [line for line in out.splitlines() if "collapse" in line]  # one, from the progress bar or the end
    assert len(lines) == 1 and lines[0].startswith("collapse: ")
    assert lines[0].endswith(f"at {fallen['collapse']}: the encoder gives nearly one output for every clip (MLflow "
                             f"tag asda.collapsed = true)")
    run = client.get_run(healthy["run_id"])
    assert healthy["collapse"] is None and run.data.tags["asda.collapsed"] == "false"
    assert min(m.value for m in client.get_metric_history(healthy["run_id"], "health.utterance_rank")) >= 4
    assert fallen["metrics"]["step"] == 40  # it trained on: the guard only watches unless asked to stop
    assert client.get_run(fallen["run_id"]).data.params["loss.alpha_effective"] == "160"
    assert run.data.params["loss.alpha_effective"] == "0"


def test_stop_on_collapse_ends_the_run_naming_the_update_and_the_last_good_checkpoint(
        synthetic_prepared, tmp_path, tracking_store):
    from pipelines.training import CollapseError

    settings = _guard_settings(synthetic_prepared, tmp_path, "stopped", stop_on_collapse=True)
    with pytest.raises(CollapseError, match=r"^collapse at update (30|40): utterance_rank .* < 4 "
                                            r"\(stop_on_collapse\); last good checkpoint: checkpoint_0000020$"):
        pretrain(COLLAPSING, settings)
    run_id = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("asda").experiment_id],
                                        filter_string="tags.`asda.run_name` = 'stopped'")[0].info.run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["asda.collapsed"] == "true"


def test_bad_settings_fail_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="steps=0"):
        PretrainSettings(data=str(tmp_path), steps=0)
    with pytest.raises(ValueError, match="not a prepared data set"):
        pretrain(TINY, PretrainSettings(data=str(tmp_path / "nowhere")))


def test_probe_is_clearly_above_chance_on_an_easy_split(pretrained, easy_synthetic, tracking_store):
    result = probe(ProbeSettings(data=str(easy_synthetic), checkpoint=pretrained["result"]["checkpoint"]))
    n = result["num_eval"]
    correct = round(result["eval_accuracy"] * n)
    # Chance is 1/8 (8 balanced classes): this many correct answers by guessing has probability < 1 %.
    p_chance = sum(math.comb(n, k) * (1 / 8) ** k * (7 / 8) ** (n - k) for k in range(correct, n + 1))
    assert p_chance < 1e-2, (result, p_chance)
    assert 0 < result["eval_map"] <= 1
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.metrics["eval_accuracy"] == result["eval_accuracy"]


def test_pretrain_probe_and_finetune_commands_run_on_a_prepared_esc50_layout_with_fold_cv(
        ray_local, tracking_store, tmp_path, capsys):
    from layouts import write_esc50

    from pipelines.cli import main
    from pipelines.data.prepare import prepare

    source = write_esc50(tmp_path / "ESC-50-master", n_per_fold=2, classes=3)
    data = tmp_path / "esc50"
    prepare("esc50", source, data)
    runs = tmp_path / "runs"
    small = ["embed_dim=64", "depth=2", "average_top_k_layers=2", "num_students=2", "decoder_layers=1"]
    common = ["--data", str(data), "--storage", str(runs), "--batch-size", "4", "--warmup-steps", "1",
              "--log-every", "1"]
    assert main(["pretrain", *common, "--name", "esc", "--steps", "2", "--checkpoint-every", "2", *small]) == 0
    assert (runs / "esc" / "final.pt").is_file()
    assert load_checkpoint(runs / "esc" / "final.pt")[1].target_length == 512  # ESC-50's length, not the preset's
    shown = capsys.readouterr().out
    assert "2/2 updates" in shown and "clips/s" in shown, shown  # the command's progress bar

    # ESC-50 has no test split: the probe and fine-tuning cross-validate over its folds.
    assert main(["probe", "--data", str(data), "--checkpoint", str(runs / "esc"), "--cv-folds", "5"]) == 0
    out = capsys.readouterr().out
    assert "train folds 1-5 (30 train / 30 eval clips)" in out
    probe_run = MlflowClient().get_run(out.strip().rsplit(" ", 1)[-1])
    folds = [probe_run.data.metrics[f"eval_accuracy_fold{k}"] for k in range(1, 6)]
    assert probe_run.data.metrics["eval_accuracy"] == pytest.approx(sum(folds) / 5)
    assert probe_run.data.params["data.target_length"] == "512"

    assert main(["finetune", *common, "--checkpoint", str(runs / "esc"), "--name", "esc-ft", "--steps", "1",
                 "--checkpoint-every", "1", "--cv-folds", "2", "--readout", "mean"]) == 0
    # ESC-50's release recipe, but for the flags given; the head read the mean of the patch outputs
    assert "recipe esc50: lr 5e-05, min_lr 1e-06, grad_clip 0.0, mixup 0.0, specaug_time 0.4" in capsys.readouterr().out
    client = MlflowClient()
    for k in (1, 2):
        run = client.search_runs([probe_run.info.experiment_id], filter_string=f"tags.mlflow.runName = 'esc-ft-fold{k}'")
        assert len(run) == 1 and 0 <= run[0].data.metrics["eval_accuracy"] <= 1
        params = run[0].data.params
        assert (params["train.recipe"], params["train.readout"], params["train.batch_size"]) == ("esc50", "mean", "4")
        assert (params["train.loss"], params["train.label_smoothing"], params["train.grad_clip"]) == ("ce", "0.1",
                                                                                                    "0.0")

    # Holding fold 1 out leaves fold 2's 6 clips: fewer than a batch of 8. A clear error before any run starts.
    capsys.readouterr()
    assert main(["finetune", *common, "--batch-size", "8", "--name", "esc-small", "--steps", "1",
                 "--cv-folds", "2"]) == 2
    err = capsys.readouterr().err
    assert "split 'train' folds [2]" in err and "has 6 clips, fewer than one update needs (8 per worker" in err
    assert not client.search_runs([probe_run.info.experiment_id],
                                  filter_string="tags.mlflow.runName LIKE 'esc-small%'")


def test_probe_feeds_the_data_sets_length_not_the_encoders(ray_local, tracking_store, tmp_path, monkeypatch):
    from layouts import write_speechcommands

    from pipelines import inference
    from pipelines.data.prepare import prepare

    data = tmp_path / "spc"
    prepare("speechcommands", write_speechcommands(tmp_path / "raw"), data)
    seen = []

    def recording(model, prepared, split, **kwargs):  # the actors decode to the length they are given
        seen.append(kwargs["target_length"])
        return real(model, prepared, split, **kwargs)

    real = inference.model_outputs
    monkeypatch.setattr(inference, "model_outputs", recording)
    encoder_config = TINY  # target_length 256; Speech Commands clips are 1 s = 128 frames
    result = probe(ProbeSettings(data=str(data), eval_split="test", max_iter=5), encoder_config)
    assert seen == [128]
    assert MlflowClient().get_run(result["run_id"]).data.params["data.target_length"] == "128"


@pytest.mark.slow  # `make test-all`; in `make test` the sweep's stopped-and-resumed test covers the same handling
def test_a_stopped_pretraining_run_is_marked_killed_and_the_printed_command_resumes_it(
        ray_local, tracking_store, synthetic_prepared, tmp_path):
    """SIGTERM to `asda pretrain` after its first checkpoint: exit 143, the MLflow run KILLED, and a command that,
    run again, continues from the checkpoint and finishes the run."""
    import shlex
    import subprocess
    import sys

    from conftest import stop_group

    small = ["embed_dim=64", "depth=2", "average_top_k_layers=2", "num_students=2", "decoder_layers=1"]
    argv = [str(Path(sys.executable).with_name("asda")), "pretrain", "--data", str(synthetic_prepared),
            "--storage", str(tmp_path), "--name", "stop-me", "--steps", "32", "--checkpoint-every", "4",
            "--batch-size", "4", "--target-length", "64", *small]  # stopped soon after update 4: the rest resumed
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        # a checkpoint Ray Train has registered (its snapshot names it): the one a resumed run starts from
        while time.time() < deadline and not (list(tmp_path.glob("stop-me/checkpoint_*/model.pt")) and
                                              (tmp_path / "stop-me" / "checkpoint_manager_snapshot.json").is_file()):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        stop_group(proc, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("asda").experiment_id],
                                     filter_string="tags.`asda.run_name` = 'stop-me'")[0]
    assert run.info.status == "KILLED"
    command = out.strip().splitlines()[-1]
    assert command.startswith("resume it with: asda pretrain") and "--name stop-me" in command, out[-2000:]
    again = subprocess.run([str(Path(sys.executable).with_name("asda")), *shlex.split(command)[4:]], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    run = MlflowClient().get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["resumed_from_step"] >= 4


def test_workers_the_commands_own_ray_cannot_hold_are_refused_before_ray_starts(synthetic_prepared, tmp_path):
    """`asda pretrain` as typed, with no cluster to join: two workers of every logical CPU the instance it would
    start has are refused (exit 2) before Ray starts, naming the CPUs asked and had; nothing is written."""
    import subprocess
    import sys

    from pipelines.runtime import RUNNING_CLUSTER_FILE, local_num_cpus

    if RUNNING_CLUSTER_FILE.is_file():
        pytest.skip(f"{RUNNING_CLUSTER_FILE} names a cluster here: the command would join it")
    per_worker = local_num_cpus()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    found = subprocess.run([str(Path(sys.executable).with_name("asda")), "pretrain", "--data", str(synthetic_prepared),
                            "--storage", str(tmp_path), "--workers", "2", "--cpus-per-worker", str(per_worker),
                            "--steps", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 2, found.stdout[-2000:] + found.stderr[-2000:]
    assert f"--workers 2 x --cpus-per-worker {per_worker} = {2 * per_worker} Ray CPUs is not allowed: the Ray " \
           f"instance this command starts has {local_num_cpus()}" in found.stderr, found.stderr
    assert "Traceback" not in found.stderr and "RAY_ADDRESS" in found.stderr
    assert not any(tmp_path.iterdir())


def test_a_run_whose_workers_a_cluster_cannot_place_says_each_minute_what_they_ask_and_what_ray_has(
        ray_local, tracking_store, synthetic_prepared, tmp_path):
    """`asda pretrain` joined to a Ray instance (RAY_ADDRESS: not refused, nodes may join a cluster) asking two
    workers of 3 CPUs of its 4: Ray Train waits for them, and the command says so once a minute (here every 2 s)
    instead of nothing."""
    import subprocess
    import sys

    from conftest import stop_group

    argv = [str(Path(sys.executable).with_name("asda")), "pretrain", "--data", str(synthetic_prepared),
            "--storage", str(tmp_path), "--workers", "2", "--cpus-per-worker", "3", "--steps", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "ASDA_WAIT_NOTICE_S": "2"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.time() + 120  # a run that says nothing fails here, not by hanging the suite
        while time.time() < deadline and not any(line.startswith("waiting") for line in lines):
            time.sleep(0.5)
    finally:
        stop_group(proc, signal.SIGKILL)
    waiting = next((line for line in lines if line.startswith("waiting")), None)
    assert waiting, "".join(lines)[-3000:]
    assert waiting.startswith("waiting   0 of 2 Train worker(s) placed after 0:0") and "each asks 3 CPU, all at " \
        "once; Ray has " in waiting and " free of CPU 4, memory " in waiting and waiting.rstrip().endswith("(`ray status` shows the pending " \
        "demands)"), waiting


def test_cross_validation_names_the_folds_a_data_set_lacks(synthetic_prepared):
    with pytest.raises(ValueError, match=r"has no fold \[1, 2\].*ESC-50 has folds 1-5"):
        probe(ProbeSettings(data=str(synthetic_prepared), cv_folds=2))


@pytest.mark.slow
def test_pretrain_compile_trains_ddp_through_ray_train_and_resumes_into_eager_and_back(
        ray_local, tracking_store, synthetic_prepared, tmp_path, capsys):
    """`asda pretrain --compile` end to end: two DDP workers run the compiled model; the run continues eagerly
    from the compiled run's checkpoint, then compiled again from the eager one. Checkpoints keep the model's own
    names, so each leg loads the other's weights, optimiser and EMA teacher."""
    from pipelines.cli import main

    small = ["embed_dim=64", "depth=2", "average_top_k_layers=2", "num_students=2", "decoder_layers=1"]

    def leg(steps, *flags):
        argv = ["pretrain", "--data", str(synthetic_prepared), "--storage", str(tmp_path), "--name", "compiled",
                "--workers", "2", "--steps", str(steps), "--batch-size", "4", "--checkpoint-every", "2",
                "--log-every", "2", "--target-length", "64", *flags, *small]
        assert main(argv) == 0, capsys.readouterr()
        return torch.load(tmp_path / "compiled" / f"checkpoint_{steps:07d}" / "model.pt", weights_only=True)

    compiled = leg(4, "--compile")
    eager = leg(6)
    again = leg(8, "--compile")
    for state in (compiled, eager, again):
        assert not any("_orig_mod" in k for k in state["model"])
        assert set(state["model"]) == set(ASDA(TINY).state_dict())
    assert int(eager["model"]["num_updates"]) == 6 and int(again["model"]["num_updates"]) == 8  # EMA steps
    state, config = load_checkpoint(tmp_path / "compiled" / "final.pt")
    ASDA(config).load_state_dict(state["model"])  # the portable weights load into a plain (eager) model

    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("asda").experiment_id],
                             filter_string="tags.`asda.run_name` = 'compiled'")[0]
    assert run.data.params["train.compile"] == "True" and run.data.params["train.precision"] == "fp32"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    assert {4.0, 6.0} <= set(resumed)
