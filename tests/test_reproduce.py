"""`asda reproduce`'s refusals: what it needs of a sweep folder and a trial, named before any work starts. Its
rerun matching a sweep to the bit is checked on a real sweep in tests/test_sweep.py."""

import json

import pytest

from pipelines.cli import main
from sweeps.grid import load_grid
from sweeps.report import reproduce_command as command
from sweeps.reproduce import find_trial, parse_trial


def _sweep(tmp_path, fingerprint=None, rows=()):
    grid = load_grid("smoke")
    folder = tmp_path / f"smoke-{fingerprint or grid.fingerprint()}"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"sweep_id": "smoke-1", "grid": "smoke"}))
    (folder / "trials.json").write_text(json.dumps(list(rows)))
    return folder


def test_a_trial_is_named_cell_slash_seed():
    assert parse_trial("diff_lambda=0.5/1") == ("diff_lambda=0.5", 1)
    assert parse_trial("alpha=1.0,diff_lambda=0.0/2") == ("alpha=1.0,diff_lambda=0.0", 2)
    for bad in ("centre", "centre/", "/0", "centre/one"):
        with pytest.raises(ValueError, match="expected CELL/SEED"):
            parse_trial(bad)
    assert command("/s", "centre", 0) == "asda reproduce --sweep /s --trial 'centre/0'"


def test_a_read_out_cell_is_reproduced_by_the_trial_that_pretrained_it(tmp_path):
    centre = {"cell": "centre", "seed": 0, "metric_value": 0.5}
    mean = {"cell": "readout=mean", "seed": 0, "metric_value": 0.4, "shares_pretraining_of": "centre"}
    grid, _, trial, row, shared = find_trial(_sweep(tmp_path, rows=[centre, mean]), "readout=mean", 0)
    assert (trial.cell, trial.seed, row, shared) == ("centre", 0, centre, [mean])


def test_what_cannot_be_reproduced_is_refused_naming_why(tmp_path, capsys):
    with pytest.raises(ValueError, match="holds no finished sweep"):
        find_trial(tmp_path, "centre", 0)
    with pytest.raises(ValueError, match="has no trial centre/7; it has centre/0"):
        find_trial(_sweep(tmp_path, rows=[{"cell": "centre", "seed": 0}]), "centre", 7)
    with pytest.raises(ValueError, match="has changed since sweep smoke-0000000000 ran"):
        find_trial(_sweep(tmp_path, fingerprint="0000000000"), "centre", 0)
    assert main(["reproduce", "--sweep", str(tmp_path), "--trial", "centre"]) == 2
    assert "expected CELL/SEED" in capsys.readouterr().err


def test_the_terminal_report_points_at_the_commands_report_md_lists(capsys):
    from sweeps.report import REPRODUCE_HEADING, print_report, reproduce_markdown

    rows = [{"cell": "centre", "seed": 0}, {"cell": "readout=mean", "seed": 0, "shares_pretraining_of": "centre"},
            {"cell": "diff_lambda=0.0", "seed": 1}]
    lines = reproduce_markdown(rows, "/s")
    assert lines[1] == REPRODUCE_HEADING
    assert [line for line in lines if line.startswith("asda")] == [command("/s", "centre", 0),
                                                                   command("/s", "diff_lambda=0.0", 1)]
    print_report({"markdown": "# table\n" + "\n".join(lines), "folder": "/s/report"})
    shown = capsys.readouterr().out
    assert "# table" in shown and "asda reproduce" in shown and "--trial" not in shown
    assert "/s/report/report.md" in shown
