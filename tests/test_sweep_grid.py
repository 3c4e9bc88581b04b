"""Grids and the ablation report, without Ray."""

import math

import pytest
import yaml

from sweeps.grid import load_grid
from sweeps.report import ablation_table, build_report, seed_noise


@pytest.mark.parametrize("name", ["ablation", "factorial", "smoke", "paper", "multitask"])
def test_every_shipped_grid_loads_and_builds_every_cell(name):
    grid = load_grid(name)
    trials = grid.trials()
    assert trials and len({t.trial_id for t in trials}) == len(trials)
    assert len({t.slug() for t in trials}) == len(trials)  # unique run names
    for trial in trials:
        grid.config_for(trial)


@pytest.mark.parametrize("name", ["ablation", "factorial", "smoke", "paper", "multitask"])
def test_every_cell_runs_exactly_the_centres_seeds_so_each_delta_is_paired(name):
    grid = load_grid(name)
    seeds: dict[str, list[int]] = {}
    for t in grid.trials():
        seeds.setdefault(t.cell, []).append(t.seed)
    assert all(sorted(s) == sorted(seeds["centre"]) for s in seeds.values()), seeds


def test_a_grid_whose_cells_would_not_run_the_centres_seeds_is_refused_with_how_to_fix_it(tmp_path):
    with pytest.raises(ValueError, match=r"seeds=\[0\] and centre_seeds=\[0, 1, 2\] differ: every cell now runs "
                                         r"the centre's seeds.*write one list, e.g. seeds: \[0, 1, 2\]"):
        load_grid(_write(tmp_path, seeds=[0], centre_seeds=[0, 1, 2]))
    # an older grid whose centre_seeds agree with seeds (or stand alone) still reads
    assert load_grid(_write(tmp_path, seeds=[1, 0], centre_seeds=[0, 1])).seeds == [1, 0]
    raw = yaml.safe_load(open(load_grid("smoke").path))
    del raw["seeds"]
    path = tmp_path / "alone.yaml"
    path.write_text(yaml.safe_dump({**raw, "centre_seeds": [3, 4]}))
    assert {t.seed for t in load_grid(path).trials()} == {3, 4}


def test_ablation_varies_one_factor_at_a_time_around_a_shared_centre():
    grid = load_grid("ablation")
    trials = grid.trials()
    centre = [t for t in trials if t.cell == "centre"]
    assert len(centre) >= 2  # the centre is repeated to measure seed noise
    assert {t.factor for t in trials} == {"centre", "diff_lambda", "alpha", "num_students", "cls_position"}
    for t in trials:
        changed = {k for k, v in t.overrides.items() if grid.centre.get(k) != v}
        assert changed == (set() if t.cell == "centre" else {t.factor})
    assert {t.value for t in trials if t.factor == "diff_lambda"} == {0.0, 0.5}


def _write(tmp_path, **changes):
    raw = yaml.safe_load(open(load_grid("smoke").path))
    raw.update(changes)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"factors": {"lamda": [0.1]}}, "'lamda' is not an ASDAConfig field"),
        ({"factors": {"diff_lambda": [0.0, 1.5]}}, r"cell diff_lambda=1.5: ASDAConfig.diff_lambda=1.5"),
        ({"evaluation": {"kind": "probe", "metric": "eval_auc"}}, "evaluation.metric='eval_auc'"),
        ({"design": "latin"}, "design='latin'"),
        ({"train": {"steps": 0}}, "steps=0"),
        ({"train": {"stepz": 3}}, "unknown train setting"),
        ({"colour": "red"}, "unknown key"),
        # duplicates would make one pretraining look like several results
        ({"factors": {"diff_lambda": [0.0, 0.0, 0.3]}}, r"factor diff_lambda lists \['0.0'\] more than once"),
        ({"factors": {"diff_lambda": [0, 0.0]}}, r"factor diff_lambda lists \['0.0'\] more than once"),
        ({"seeds": [0, 0]}, r"seeds repeats \[0\]"),
        ({"centre_seeds": [1, 2, 1]}, r"centre_seeds repeats \[1\]"),
        ({"seeds": ["zero"]}, r"seeds holds \['zero'\]: expected integers"),
        ({"factors": {"alpha": [float("inf")]}}, r"ASDAConfig.alpha=inf is not allowed: expected a finite number"),
        ({"train": {"lr": float("nan")}}, r"lr=nan is not allowed: expected a finite number"),
        ({"train": {"steps": 4, "compile": "yes"}}, r"train.compile='yes' is not allowed: expected true or false"),
        ({"train": {"steps": 4, "precision": "fp16"}}, r"train.precision='fp16' is not allowed"),
        ({"evaluation": {"kind": "probe", "settings": {"readoutz": "cls"}}},
         r"unknown evaluation setting\(s\) \['readoutz'\]; allowed: \[.*'readout'"),
        ({"evaluation": {"kind": "probe", "settings": {"readout": "patches"}}},
         r"evaluation.settings: readout='patches' is not allowed: expected one of \['cls', 'mean', 'cls\+mean'\]"),
        ({"evaluation": {"kind": "probe", "settings": {"seed": 3}}}, r"unknown evaluation setting\(s\) \['seed'\]"),
    ],
)
def test_bad_grids_fail_with_the_reason_before_anything_runs(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_grid(_write(tmp_path, **changes))


def test_unknown_grid_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="ablation.*smoke"):
        load_grid("nope")


def _rows(values):
    rows = []
    for cell, factor, value, seeds in values:
        for seed, metric in enumerate(seeds):
            rows.append({"cell": cell, "factor": factor, "value": value, "metric_value": metric, "seed": seed,
                         "error": None, "overrides": {}, "checkpoint": None})
    return rows


def test_report_gives_delta_vs_centre_and_judges_it_against_seed_noise(tmp_path):
    grid = load_grid("smoke")  # factor diff_lambda, values 0.0 and 0.3 (centre)
    rows = _rows([("centre", "centre", None, [0.50, 0.52, 0.48]),
                  ("diff_lambda=0.0", "diff_lambda", 0.0, [0.30, 0.33, 0.27])])
    noise = seed_noise(rows)
    assert noise == pytest.approx(math.sqrt((0.0008 + 0.0018) / 4), rel=1e-6)
    table = ablation_table(rows, grid)
    zero = next(r for r in table if r["value"] == 0.0)
    centre = next(r for r in table if r["centre"])
    assert centre["mean"] == pytest.approx(0.50) and centre["n"] == 3
    assert zero["delta"] == pytest.approx(-0.20) and zero["clear"] is True
    close = ablation_table(_rows([("centre", "centre", None, [0.50, 0.52, 0.48]),
                                  ("diff_lambda=0.0", "diff_lambda", 0.0, [0.51, 0.49, 0.50])]), grid)
    assert next(r for r in close if r["value"] == 0.0)["clear"] is False
    report = build_report(rows, grid, tmp_path / "report")
    assert (tmp_path / "report" / "report.csv").is_file() and (tmp_path / "report" / "factor_diff_lambda.png").is_file()
    assert "| diff_lambda | 0.0 | 0.300 ± 0.030 | 3 | -0.200 ± 0.006 | <0.001 | yes | 0.250 | — |" in report["markdown"]


@pytest.mark.parametrize("text, message", [
    ("name: x\nfactors: {diff_lambda: [0.0\n", r"grid .*bad.yaml is not valid YAML: .*line"),
    ("name: x\nname: y\n", r"grid .*bad.yaml is not valid YAML: key 'name' appears twice \(first on line 1\)"),
])
def test_a_grid_that_is_not_yaml_names_its_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_grid(path)


def test_a_bad_data_section_leaves_no_sweep_folder_behind(tmp_path):
    from sweeps.driver import run_sweep

    path = _write(tmp_path, data={"dataset": "synthetic", "options": {"num_trian": 10}})
    with pytest.raises(ValueError, match="num_trian"):
        run_sweep(path, storage=tmp_path / "sweeps")
    assert not (tmp_path / "sweeps").exists()


def test_a_plain_run_resumes_the_newest_unfinished_sweep_of_the_grid_and_sweep_id_picks_one(tmp_path):
    import json
    import os

    from sweeps.driver import STATE_FILE, _open_sweep

    grid = load_grid("smoke")
    first, state = _open_sweep(grid, tmp_path, fresh=False)
    first.mkdir()  # as run_sweep makes it
    (first / STATE_FILE).write_text(json.dumps({**state, "sweep_id": "first", "finished": True}))
    fresh, _ = _open_sweep(grid, tmp_path, fresh=True)  # --fresh: a folder of its own beside the first
    assert fresh != first and fresh.name.startswith(first.name)
    fresh.mkdir()
    (fresh / STATE_FILE).write_text(json.dumps({**state, "sweep_id": "fresh"}))  # killed before it finished
    os.utime(first / STATE_FILE, (1, 1))
    assert _open_sweep(grid, tmp_path, fresh=False)[0] == fresh  # not the older, finished one
    assert _open_sweep(grid, tmp_path, fresh=False, sweep_id="first")[0] == first
    with pytest.raises(ValueError, match="--sweep-id nope: no sweep of grid smoke has that id"):
        _open_sweep(grid, tmp_path, fresh=False, sweep_id="nope")


def test_the_factorial_grid_runs_its_cells_as_the_ablation_grid_runs_them():
    """A cell of the factorial grid is the same run as the ablation grid's cell of the same factor values."""
    ablation, factorial = load_grid("ablation"), load_grid("factorial")
    assert (factorial.data, factorial.model, factorial.train) == (ablation.data, ablation.model, ablation.train)
    assert factorial.evaluation == ablation.evaluation and factorial.centre == ablation.centre


def _release_students_grid(tmp_path, hold):
    raw = {"name": "held", "data": {"dataset": "synthetic"}, "seeds": [0],
           "model": {"preset": "tiny", "overrides": {"loss_reduction": "release"}, "hold_alpha_effective": hold},
           "train": {"steps": 10, "batch_size": 8}, "evaluation": {"kind": "probe"},
           "centre": {"alpha": 0.5, "num_students": 4}, "factors": {"num_students": [2, 4, 8], "alpha": [0.5, 1.0]}}
    path = tmp_path / f"held-{hold}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_grid(path)


def test_holding_the_effective_alpha_scales_alpha_against_the_student_count_and_nothing_else(tmp_path):
    held = _release_students_grid(tmp_path, True)
    configs = {t.cell: held.config_for(t) for t in held.trials()}
    weights = {cell: c.alpha_effective(8) for cell, c in configs.items()}
    assert weights["num_students=2"] == weights["num_students=8"] == weights["centre"] == 16.0  # 0.5 x 8 x 4
    assert configs["num_students=2"].alpha == 1.0 and configs["num_students=8"].alpha == 0.25
    assert configs["alpha=1.0"].alpha == 1.0 and weights["alpha=1.0"] == 32.0  # the alpha factor keeps its values
    loose = _release_students_grid(tmp_path, False)
    moved = {t.cell: loose.config_for(t).alpha_effective(8) for t in loose.trials()}
    assert moved["num_students=2"] == 8.0 and moved["num_students=8"] == 32.0  # the release's own behaviour


def test_a_sweep_warns_before_it_starts_of_cells_whose_recipe_collapsed_at_this_width(tmp_path):
    from sweeps.driver import collapse_risks

    grid = _release_students_grid(tmp_path, False)
    risks = collapse_risks(grid, grid.trials())
    assert set(risks) == {"centre", "num_students=2", "num_students=8", "alpha=1.0"}  # 8x and more
    assert "8x the frame term" in risks["num_students=2"]
    assert collapse_risks(load_grid("ablation"), load_grid("ablation").trials()) == {}
    with pytest.raises(ValueError, match="hold_alpha_effective='yes'"):
        load_grid(_write(tmp_path, model={"preset": "tiny", "hold_alpha_effective": "yes"}))


def test_a_readout_cell_evaluates_the_centres_pretraining_instead_of_pretraining_again(tmp_path):
    """readout is a factor of the evaluation: its cells add no trial; each centre trial scores them too."""
    grid = load_grid("ablation")
    trials = grid.trials()
    assert len(trials) == 9 * len(grid.seeds)  # the model cells only
    for t in trials:
        expected = ["readout=cls", "readout=mean"] if t.cell == "centre" else []
        assert [a["cell"] for a in t.also] == expected and t.evaluation == {"readout": "cls+mean"}
        assert "readout" not in t.overrides
    also = next(t for t in trials if t.cell == "centre").also
    assert [(a["factor"], a["value"], a["evaluation"]) for a in also] == [
        ("readout", "cls", {"readout": "cls"}), ("readout", "mean", {"readout": "mean"})]


def test_a_factorial_grid_scores_every_model_cell_with_every_readout(tmp_path):
    path = _write(tmp_path, design="factorial", centre={"diff_lambda": 0.3, "readout": "cls"},
                  factors={"diff_lambda": [0.0, 0.3], "readout": ["cls", "mean"]})
    trials = load_grid(path).trials()
    assert len(trials) == 2
    cells = {t.cell: [a["cell"] for a in t.also] for t in trials}
    assert cells == {"diff_lambda=0.0,readout=cls": ["diff_lambda=0.0,readout=mean"],
                     "centre": ["diff_lambda=0.3,readout=mean"]}


@pytest.mark.parametrize("changes, message", [
    ({"factors": {"readout": ["cls", "cls"]}}, r"factor readout lists \['cls'\] more than once"),
    ({"factors": {"readout": ["cls", "max"]}},
     r"readout='max' is not allowed for evaluation.kind probe: expected one of \['cls', 'mean', 'cls\+mean'\]"),
    ({"evaluation": {"kind": "finetune", "metric": "eval_accuracy"}, "factors": {"readout": ["cls", "cls+mean"]}},
     r"readout='cls\+mean' is not allowed for evaluation.kind finetune: expected one of \['cls', 'mean'\]"),
])
def test_a_readout_the_evaluation_does_not_have_is_refused_before_anything_runs(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_grid(_write(tmp_path, **changes))


@pytest.mark.parametrize("tasks, message", [
    ("events", r"tasks must be a list of mappings"),
    ([{"name": "a b", "data": {}}], r"tasks\[0\] needs a name \(letters, digits, - and _\) and a data mapping"),
    ([{"name": "a", "data": {}, "metric": "loss"}], r"tasks\[0\].metric='loss' is not allowed"),
    ([{"name": "a", "data": {}, "settings": {"seed": 1}}], r"tasks\[0\].settings \['seed'\] are set by the sweep"),
    ([{"name": "a", "data": {}, "settings": {"readout": "max"}}], r"tasks\[0\].settings: readout='max'"),
    ([{"name": "a", "data": {}}, {"name": "a", "data": {}}], r"task names repeat: \['a', 'a'\]"),
])
def test_a_bad_task_is_refused_naming_it_before_anything_runs(tmp_path, tasks, message):
    with pytest.raises(ValueError, match=message):
        load_grid(_write(tmp_path, tasks=tasks))


def test_a_second_sweep_of_the_same_folder_refuses_at_once_naming_the_first(tmp_path):
    """While one sweep holds the grid's folder, the same command refuses before Ray starts, naming its pid and
    command; once that process is gone its lock is taken over, saying whose it was."""
    import os
    import signal
    import subprocess
    import sys

    from sweeps.driver import run_sweep, sweep_dir
    from sweeps.lock import SweepBusy, sweep_lock

    grid = load_grid("smoke")
    folder = sweep_dir(grid, tmp_path)
    lock = folder.with_name(folder.name + ".lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from sweeps.lock import sweep_lock\n"
         f"with sweep_lock(Path({str(folder)!r})):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepBusy, match=rf"in use by a running sweep \(pid {holder.pid}: -c\).*--fresh"):
            run_sweep("smoke", storage=tmp_path)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not folder.exists()  # refused before the sweep made its folder or touched any data
    folder.mkdir()
    lock.write_text(f"pid {holder.pid}: asda sweep --grid smoke")  # as a sweep killed outright leaves it
    import io
    from contextlib import redirect_stdout

    shown = io.StringIO()
    with redirect_stdout(shown), sweep_lock(folder):
        assert lock.read_text().startswith(f"pid {os.getpid()}:")
    assert f"taking over {lock.name} from pid {holder.pid}: asda sweep --grid smoke" in shown.getvalue()
    assert lock.read_text() == ""  # a sweep that ends leaves nothing to take over
