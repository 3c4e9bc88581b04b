"""The one step loop and checkpointer every Ray Train worker runs (pipelines.worker), on plain objects.

Pretraining and fine-tuning both run ``run_steps`` with a ``Checkpointer`` (tests/test_layout.py checks that they
do), so the properties below hold for both; tests/test_training.py runs them through real Ray Train.
"""

import shutil
from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint

from model import ASDAConfig
from pipelines import worker


class _Copy:
    """A stand-in for ``ray.train.report`` that keeps each reported checkpoint folder."""

    def __init__(self, root: Path):
        self.root, self.reports = root, []

    def __call__(self, metrics, *, checkpoint, checkpoint_dir_name):
        shutil.copytree(checkpoint.path, self.root / checkpoint_dir_name)
        self.reports.append(metrics)


def _checkpointer(tmp_path, rank=0, every=2, last_step=10, report=None):
    model = torch.nn.Linear(4, 2)
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, worker.warmup_cosine(1, last_step))
    return worker.Checkpointer(rank=rank, run_dir=str(tmp_path / "run"), every=every, last_step=last_step,
                               model=model, optimiser=optimiser, scheduler=scheduler, config=ASDAConfig.tiny(),
                               report=report or _Copy(tmp_path / "kept"))


class _Job:
    """A job whose batches and gradient norms the test chooses."""

    def __init__(self, batches_per_epoch: int, norms: list[float], stop_at: int | None = None):
        self.batches_per_epoch, self.norms, self.calls = batches_per_epoch, list(norms), 0
        self.stop_at = stop_at  # the update from which stop_reason answers

    def batches(self, epoch):
        return [{"x": torch.zeros(1)}] * self.batches_per_epoch

    def step(self, batch):
        self.calls += 1
        norm = self.norms.pop(0) if self.norms else 1.0
        return worker.StepOutput(torch.tensor(norm), torch.tensor(norm), clips=1)

    def metrics(self, out):
        return {"loss": out.loss.item()}

    def finish(self):
        return {"eval_accuracy": 0.5}

    def no_batch_reason(self):
        return "split 'train' gives no batch of 8 clips per worker"

    def stop_reason(self):
        if self.stop_at is not None and self.calls >= self.stop_at:
            return f"collapse at update {self.calls}: utterance_rank 1.2 < 4 (stop_on_collapse)"
        return None


def _logger():
    return worker.RankZeroLogger("sqlite:///unused.db", run_id=None, enabled=False)


def test_an_epoch_without_a_batch_stops_the_run_with_a_record_instead_of_spinning(tmp_path):
    checkpointer = _checkpointer(tmp_path)
    result = worker.run_steps(_Job(batches_per_epoch=0, norms=[]), checkpointer, _logger(), steps=10, log_every=1)
    assert result["stopped"].startswith("split 'train' gives no batch of 8 clips per worker")
    note = worker.read_stop(tmp_path / "run")
    assert note["kind"] == worker.STOP_NO_BATCH and note["step"] == 0


def test_a_non_finite_gradient_stops_naming_the_update_and_the_last_good_checkpoint(tmp_path):
    kept = _Copy(tmp_path / "kept")
    checkpointer = _checkpointer(tmp_path, every=2, report=kept)
    job = _Job(batches_per_epoch=3, norms=[1.0, 1.0, float("nan")])
    result = worker.run_steps(job, checkpointer, _logger(), steps=10, log_every=1)
    assert result["stopped"] == "non-finite loss/gradient at update 3 (loss nan); last good checkpoint: checkpoint_0000002"
    assert job.calls == 3 and [r["step"] for r in kept.reports] == [2]
    note = worker.read_stop(tmp_path / "run")
    assert note["kind"] == worker.STOP_NON_FINITE and note["last_checkpoint"] == "checkpoint_0000002"


def test_a_job_that_asks_to_stop_ends_the_run_at_the_log_step_naming_the_last_good_checkpoint(tmp_path):
    kept = _Copy(tmp_path / "kept")
    checkpointer = _checkpointer(tmp_path, every=2, report=kept)
    job = _Job(batches_per_epoch=3, norms=[], stop_at=3)
    result = worker.run_steps(job, checkpointer, _logger(), steps=10, log_every=2)
    # asked at the log steps only (2, 4, ...): update 3 trips it, update 4 is where the loop hears it
    assert result["stopped"] == ("collapse at update 4: utterance_rank 1.2 < 4 (stop_on_collapse); last good "
                                 "checkpoint: checkpoint_0000002")
    assert job.calls == 4 and [r["step"] for r in kept.reports] == [2]
    note = worker.read_stop(tmp_path / "run")
    assert note["kind"] == worker.STOP_COLLAPSE and note["step"] == 4


def test_only_rank_zero_writes_the_stop_record(tmp_path):
    checkpointer = _checkpointer(tmp_path, rank=1)
    result = worker.run_steps(_Job(batches_per_epoch=0, norms=[]), checkpointer, _logger(), steps=4, log_every=1)
    assert "stopped" in result and worker.read_stop(tmp_path / "run") is None


def test_the_loop_saves_at_the_interval_and_the_last_update_and_finishes_with_the_job_metrics(tmp_path):
    kept = _Copy(tmp_path / "kept")
    result = worker.run_steps(_Job(batches_per_epoch=3, norms=[]), _checkpointer(tmp_path, every=4, last_step=7,
                                                                                  report=kept),
                              _logger(), steps=7, log_every=5)
    assert result == {"step": 7, "resumed_from_step": 0}
    assert [(r["step"], r["epoch"]) for r in kept.reports] == [(4, 1), (7, 2)]
    assert kept.reports[-1]["eval_accuracy"] == 0.5 and "clips_per_s" in kept.reports[-1]
    state = torch.load(tmp_path / "kept" / "checkpoint_0000007" / worker.CHECKPOINT_FILE, weights_only=True)
    assert {"format", "config", "model", "optimizer", "scheduler", "step", "epoch"} <= set(state)


def test_a_fresh_start_reseeds_with_seed_plus_1000_per_rank(tmp_path):
    step, epoch = _checkpointer(tmp_path, rank=2).restore(None, seed=7)
    drawn = torch.rand(3)
    torch.manual_seed(7 + 2000)
    assert (step, epoch) == (0, 0) and torch.equal(drawn, torch.rand(3))


def test_a_restore_continues_the_rank_rng_or_reseeds_at_the_step_where_none_was_saved(tmp_path):
    saving = _checkpointer(tmp_path, rank=0, every=4)  # rank 0 writes the state, each rank its RNG:
    other = _checkpointer(tmp_path, rank=1, every=4, report=_Copy(tmp_path / "rank1"))  # Ray merges the folders
    torch.manual_seed(123)
    saving.save(4, 1, {"loss": 1.0})
    other.save(4, 1, {"loss": 1.0})
    expected = torch.rand(3)  # what the rank would have drawn next
    folder = tmp_path / "kept" / "checkpoint_0000004"
    shutil.copy(tmp_path / "rank1" / "checkpoint_0000004" / "rng_rank1.pt", folder)

    restoring = _checkpointer(tmp_path, rank=1)
    torch.manual_seed(999)
    assert restoring.restore(Checkpoint.from_directory(str(folder)), seed=7) == (4, 1)
    assert torch.equal(torch.rand(3), expected)
    assert restoring.resumed_from == 4 and restoring.last_checkpoint == "checkpoint_0000004"
    assert torch.equal(restoring.model.weight, saving.model.weight)

    (folder / "rng_rank1.pt").unlink()
    _checkpointer(tmp_path, rank=1).restore(Checkpoint.from_directory(str(folder)), seed=7)
    drawn = torch.rand(3)
    torch.manual_seed(7 + 1000 + 4)
    assert torch.equal(drawn, torch.rand(3))


def test_resolve_checkpoint_takes_a_run_folder_a_checkpoint_folder_or_a_file(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / worker.FINAL_FILE).write_bytes(b"x")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / worker.CHECKPOINT_FILE).write_bytes(b"x")
    assert worker.resolve_checkpoint(tmp_path / "run") == str(tmp_path / "run" / worker.FINAL_FILE)
    assert worker.resolve_checkpoint(tmp_path / "ckpt") == str(tmp_path / "ckpt" / worker.CHECKPOINT_FILE)
    assert worker.resolve_checkpoint(None) is None
    with pytest.raises(ValueError, match="no checkpoint at .*nowhere"):
        worker.resolve_checkpoint(tmp_path / "nowhere")


def test_resuming_from_a_checkpoint_changed_after_saving_is_refused(tmp_path):
    _checkpointer(tmp_path, every=4).save(4, 1, {"loss": 1.0})
    folder = tmp_path / "kept" / "checkpoint_0000004"
    assert (folder / (worker.CHECKPOINT_FILE + ".sha256")).is_file()  # the hash travels with the checkpoint
    state = folder / worker.CHECKPOINT_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"checkpoint {state} is corrupt"):
        _checkpointer(tmp_path).restore(Checkpoint.from_directory(str(folder)), seed=0)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _one(step):
    return 1.0


def test_a_corrupt_newest_checkpoint_gives_way_to_the_one_before_it(tmp_path, capsys):
    def in_process():
        """A checkpointer writing into the run folder, as a trial training in its own process does."""
        model = torch.nn.Linear(4, 2)
        optimiser = torch.optim.AdamW(model.parameters())
        return worker.Checkpointer(rank=0, run_dir=str(tmp_path / "run"), every=2, last_step=10, model=model,
                                   optimiser=optimiser, scheduler=torch.optim.lr_scheduler.LambdaLR(optimiser, _one),
                                   config=ASDAConfig.tiny(), in_process=True, report=lambda *a, **k: None)

    saver = in_process()
    saver.save(2, 0, {"loss": 1.0})
    saver.save(4, 0, {"loss": 1.0})
    _flip_a_byte(tmp_path / "run" / "checkpoint_0000004" / worker.CHECKPOINT_FILE)
    found = in_process().latest()
    assert Path(found.path).name == "checkpoint_0000002"
    assert "checkpoint_0000004/model.pt is corrupt" in capsys.readouterr().err
    _flip_a_byte(tmp_path / "run" / "checkpoint_0000002" / worker.CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="every checkpoint of .* is corrupt"):
        in_process().latest()


def test_a_run_restored_from_its_last_checkpoint_reports_that_updates_metrics_again(tmp_path):
    """A trial stopped after its last update (in its evaluation, say) resumes with nothing to train: its result
    still carries the loss of its last update, not a missing one (the sweep's pretrain_loss)."""
    def in_process(reports):
        model = torch.nn.Linear(4, 2)
        optimiser = torch.optim.AdamW(model.parameters())
        return worker.Checkpointer(rank=0, run_dir=str(tmp_path / "run"), every=2, last_step=4, model=model,
                                   optimiser=optimiser, scheduler=torch.optim.lr_scheduler.LambdaLR(optimiser, _one),
                                   config=ASDAConfig.tiny(), in_process=True,
                                   report=lambda metrics, **k: reports.append(metrics))

    first = []
    worker.run_steps(_Job(batches_per_epoch=4, norms=[0.5, 0.25, 0.125, 0.0625]), in_process(first), _logger(),
                     steps=4, log_every=2)
    again = []
    resumed = in_process(again)
    start = resumed.restore(resumed.latest(), seed=0)
    assert worker.run_steps(_Job(batches_per_epoch=4, norms=[]), resumed, _logger(), steps=4, log_every=2,
                            start=start) == {"step": 4, "resumed_from_step": 4}
    assert first[-1]["loss"] == 0.0625 and again[-1]["loss"] == first[-1]["loss"]
    assert again[-1]["eval_accuracy"] == 0.5 and again[-1]["resumed_from_step"] == 4


class _NumberedJob(_Job):
    """Batches that say which epoch and place they are; ``fail_at``: the update whose step raises (a lost node)."""

    def __init__(self, batches_per_epoch: int, fail_at: int | None = None):
        super().__init__(batches_per_epoch, norms=[])
        self.trained, self.fail_at = [], fail_at

    def batches(self, epoch):
        return ({"x": torch.tensor([10.0 * epoch + i])} for i in range(self.batches_per_epoch))

    def step(self, batch):
        if self.fail_at is not None and len(self.trained) + 1 == self.fail_at:
            raise RuntimeError("the node went away")
        self.trained.append(int(batch["x"].item()))
        return super().step(batch)


def test_a_run_restored_mid_epoch_trains_on_the_batches_an_undisturbed_run_trains_on_next(tmp_path):
    """Stopped after update 7 with a checkpoint at update 6 (mid-epoch: 4 batches per epoch), the restored run
    skips the 2 batches of epoch 1 it had trained on and trains on the same batches as a run never stopped."""
    def in_process(folder):
        model = torch.nn.Linear(4, 2)
        optimiser = torch.optim.AdamW(model.parameters())
        return worker.Checkpointer(rank=0, run_dir=str(folder), every=3, last_step=10, model=model,
                                   optimiser=optimiser, scheduler=torch.optim.lr_scheduler.LambdaLR(optimiser, _one),
                                   config=ASDAConfig.tiny(), in_process=True, report=lambda *a, **k: None)

    undisturbed = _NumberedJob(4)
    worker.run_steps(undisturbed, in_process(tmp_path / "a"), _logger(), steps=10, log_every=5)
    stopped = _NumberedJob(4, fail_at=8)
    with pytest.raises(RuntimeError, match="the node went away"):
        worker.run_steps(stopped, in_process(tmp_path / "b"), _logger(), steps=10, log_every=5)
    restored, resumed = in_process(tmp_path / "b"), _NumberedJob(4)
    start = restored.restore(restored.latest(), seed=0)
    assert start == (6, 1) and restored.epoch_batches == 2
    worker.run_steps(resumed, restored, _logger(), steps=10, log_every=5, start=start)
    assert stopped.trained[:6] + resumed.trained == undisturbed.trained == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21]
