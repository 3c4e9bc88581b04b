"""What a grid costs before it runs (``sweeps.estimate``): the counts, the rates, the time model. No Ray; the tests
that measure time a very small model for a second or two and check shapes, never a duration."""

import json
import math

import pytest
import yaml

import sweeps.rates as rates
from model import ASDAConfig
from pipelines import runtime
from sweeps import driver
from sweeps.estimate import (
    counts,
    data_facts,
    estimate,
    estimate_command,
    format_estimate,
    header_line,
    model_groups,
    prepared_path,
    save_estimate,
    schedule,
)
from sweeps.grid import load_grid


@pytest.fixture(autouse=True)
def _data_not_prepared(tmp_path, monkeypatch):
    """Every grid's data reads as not prepared yet, whatever this checkout has prepared."""
    monkeypatch.setattr(runtime, "DATA_ROOT", tmp_path / "data")
    monkeypatch.setattr(driver, "DATA_ROOT", tmp_path / "data")


def _grid(tmp_path, name: str, **changes):
    """The smoke grid (a 64-wide, 2-block model on a small synthetic set) with ``changes`` to its sections."""
    raw = yaml.safe_load(open(load_grid("smoke").path))
    raw.pop("tasks")
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    raw["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_grid(path)


def _no_measuring(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("measured although a rate was given")
    monkeypatch.setattr(rates, "measure", refuse)


def test_the_estimate_counts_every_trial_and_evaluation_of_the_grid(monkeypatch):
    _no_measuring(monkeypatch)
    ablation = counts(load_grid("ablation"))
    # 9 cells x 2 seeds pretrain; the centre's two other read-outs are evaluations of its pretraining, per seed
    assert (ablation["trials"], ablation["cells"], ablation["seeds"]) == (18, 9, 2)
    assert (ablation["evaluations"], ablation["shared_evaluations"], ablation["baseline"]) == (22, 4, 2)
    assert (ablation["updates_per_trial"], ablation["clips_per_trial"]) == (300, 2400)
    paper = counts(load_grid("paper"))  # 11 cells x 3 seeds, the mean read-out fine-tunes the centre's encoders
    assert (paper["trials"], paper["evaluations"], paper["baseline"], paper["clips_per_update"]) == (33, 36, 3, 48)
    assert counts(load_grid("multitask"))["task_probes"] == 1 * (18 + 2)  # every trial and baseline seed
    est = estimate(load_grid("ablation"), clips_per_s=100.0)
    assert est["counts"] == ablation and len(est["per_trial"]) == 18
    text = format_estimate(est)
    assert "18 pretraining trials (9 cells x 2 seeds)" in text and "22 probes" in text


def test_a_given_clips_per_s_skips_the_measurement_and_scales_the_training_time(tmp_path, monkeypatch):
    _no_measuring(monkeypatch)
    grid = _grid(tmp_path, "given", train={"steps": 400})
    slow, fast = estimate(grid, clips_per_s=50.0), estimate(grid, clips_per_s=100.0)
    assert not slow["rates"]["measured"]
    assert slow["trial"]["train_s"] == pytest.approx(2 * fast["trial"]["train_s"])
    centre_s = next(t["train_s"] for t in slow["per_trial"] if t["cell"] == "centre")
    assert centre_s == pytest.approx(400 * 4 / 50.0)  # 400 updates of 4 clips at the given rate
    # the other cell, plain attention, costs fewer FLOPs per clip and so runs faster at the same efficiency
    centre, plain = (next(m for m in fast["models"] if cell in m["cells"]) for cell in ("centre", "diff_lambda=0.0"))
    assert plain["clips_per_s"] == pytest.approx(100.0 * centre["gflops_per_clip"] / plain["gflops_per_clip"])
    assert plain["clips_per_s"] > 100.0
    assert slow["wall"]["total_s"] > fast["wall"]["total_s"]


def test_more_devices_shorten_the_wall_time_not_the_device_hours(tmp_path, monkeypatch):
    _no_measuring(monkeypatch)
    grid = _grid(tmp_path, "gpus", train={"use_gpu": True, "workers": 2, "steps": 100_000}, seeds=[0, 1, 2, 3])
    four, eight = (estimate(grid, clips_per_s=100.0, devices=n) for n in (4, 8))
    assert (four["placement"]["concurrent"], eight["placement"]["concurrent"]) == (2, 4)  # 2 GPUs per trial
    assert four["placement"]["devices_per_trial"] == 2 and four["placement"]["unit"] == "GPU"
    assert eight["wall"]["trials_s"] < 0.6 * four["wall"]["trials_s"]
    # the same trial-seconds on the same GPUs per trial; only the extra slots' first process starts are added
    assert eight["device_hours"] == pytest.approx(four["device_hours"], rel=0.01)
    with pytest.raises(ValueError, match="each trial trains on train.workers = 2 GPUs"):
        estimate(grid, clips_per_s=100.0, devices=1)


def test_cells_that_change_the_models_cost_are_measured_apart_and_the_others_share_a_measurement():
    grid = load_grid("ablation")
    groups = model_groups(grid, grid.trials(), 112)
    cells = sorted(sorted(g["cells"]) for g in groups.values())
    assert cells == [["alpha=1.0", "alpha=2.0", "centre", "cls_position=middle", "diff_lambda=0.5"],
                     ["cls_position=none"], ["diff_lambda=0.0"], ["num_students=1"], ["num_students=8"]]
    flops = {g["cells"][0]: g["gflops"] for g in groups.values()}
    assert flops["num_students=1"] < flops["centre"] < flops["num_students=8"]
    assert flops["diff_lambda=0.0"] < flops["centre"]  # no second attention map


def test_the_measurement_times_each_distinct_model_once_at_the_grids_batch_and_threads(tmp_path, monkeypatch):
    grid = _grid(tmp_path, "measured")
    calls = []
    real = rates.measure

    def spy(jobs, **kwargs):
        calls.append((jobs, kwargs))
        return real(jobs, **kwargs)
    monkeypatch.setattr(rates, "measure", spy)
    est = estimate(grid, concurrent=1)  # one trial at a time: everything timed in this process
    assert len(calls) == 1 and calls[0][1]["processes"] == 1 and calls[0][1]["threads"] == 1
    pretrain = [j for j in calls[0][0] if j.kind == "pretrain"]
    assert len(pretrain) == 2 and {j.batch for j in pretrain} == {4}  # two cells of different cost, batch 4
    assert {j.kind for j in calls[0][0]} == {"pretrain", "attention", "encode", "fit"}
    assert est["rates"]["measured"] and est["rates"]["slowdown"] == 1.0
    assert all(m["clips_per_s"] > 0 for m in est["models"]) and est["wall"]["total_s"] > 0
    assert "measured here" in est["sources"][0]


def test_several_processes_time_each_job_together_and_the_mean_of_their_times_is_reported():
    config = ASDAConfig.tiny().with_overrides({"embed_dim": 32, "depth": 1, "num_heads": 2, "average_top_k_layers": 1,
                                             "target_length": 32})
    job = rates.RateJob("encode", config, 2)
    found = rates.measure([job, job], processes=2, threads=1, warmup=1, repeats=3, budget_s=0.1)
    assert found["processes"] == 2 and len(found["seconds"]) == 2
    assert all(s > 0 for s in found["seconds"])


def test_trials_run_in_grid_order_on_the_first_free_slot_and_each_slot_pays_its_start_once():
    assert schedule([10, 10, 10], 2, 5) == 25  # 5 + 10 on both slots, then 10 more on the first
    assert schedule([30, 10, 10, 10], 2, 0) == 30  # the short ones share the other slot
    assert schedule([10, 10], 4, 1) == 11
    assert schedule([], 2, 5) == 0


def test_a_readout_cell_adds_an_evaluation_to_its_trial_not_a_pretraining(tmp_path, monkeypatch):
    _no_measuring(monkeypatch)
    grid = _grid(tmp_path, "finetuned", evaluation={"kind": "finetune", "metric": "eval_accuracy",
                                                    "settings": {"steps": 20, "batch_size": 4}})
    est = estimate(grid, clips_per_s=100.0)
    assert est["counts"]["trials"] == 2 and est["counts"]["evaluations"] == 3
    parts = {t["cell"]: t for t in est["per_trial"]}
    assert parts["centre"]["eval_s"] == pytest.approx(2 * parts["diff_lambda=0.0"]["eval_s"])  # cls and mean
    assert parts["centre"]["train_s"] > 0 and "(2 + 1 sharing a trial's pretraining)" in format_estimate(est)


def test_data_not_prepared_yet_is_read_from_the_grids_options_in_the_folder_the_driver_prepares_into(monkeypatch):
    _no_measuring(monkeypatch)
    grid = load_grid("ablation")
    facts = data_facts(grid.data)
    assert (facts.splits, facts.target_length, facts.classes) == ({"train": 1280, "test": 1280}, 112, 8)
    assert not facts.prepared and facts.audio_seconds == 2560.0
    before = estimate(grid, clips_per_s=100.0)
    assert before["wall"]["prepare_s"] > 0
    folder = prepared_path(grid.data)
    folder.mkdir(parents=True)
    card = {"name": "synthetic", "splits": {"train": 100, "test": 50}, "target_length": 112,
            "class_names": [str(i) for i in range(8)]}
    (folder / "dataset.json").write_text(json.dumps(card))
    assert driver.prepared_data(grid) == folder  # the driver's folder: found there, nothing prepared
    facts = data_facts(grid.data)
    assert facts.prepared and facts.splits == {"train": 100, "test": 50}
    after = estimate(grid, clips_per_s=100.0)
    assert after["wall"]["prepare_s"] == 0 and after["trial"]["eval_s"] < before["trial"]["eval_s"]


def test_a_gpu_grid_is_not_measured_on_a_machine_without_a_gpu_and_the_error_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    grid = _grid(tmp_path, "gpu", train={"use_gpu": True, "workers": 1})
    with pytest.raises(ValueError, match="--clips-per-s"):
        estimate(grid)


def test_the_sweep_header_uses_the_rates_an_estimate_kept_and_else_names_the_command(tmp_path, monkeypatch):
    _no_measuring(monkeypatch)
    grid = _grid(tmp_path, "header")
    storage = tmp_path / "sweeps"
    line = header_line(grid, concurrent=2, storage=storage)
    assert "2 trials x 4 updates" in line and f"asda sweep --grid {grid.name} --estimate" in line
    text = estimate_command(grid.path, storage=storage, clips_per_s=100.0)
    assert "pretraining trials" in text and "rates kept" in text
    line = header_line(grid, concurrent=2, storage=storage)
    assert "about" in line and "given 100 clips/s" in line and "--estimate" not in line
    est = estimate(grid, clips_per_s=100.0)
    save_estimate({**est, "rates": {"measured": True}}, grid, storage)  # another machine's or version's rates
    assert "--estimate" in header_line(grid, concurrent=2, storage=storage)
    assert math.isfinite(est["device_hours"]) and est["device_hours"] > 0
