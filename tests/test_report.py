"""The sweep report on hand-made rows, without Ray: paired Δ, honest one-seed cells, the random-init baseline,
the attention-on-event column, summary.json, and attention maps drawn the way the log-mel is."""

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from sweeps import report as rp
from sweeps.grid import load_grid
from sweeps.report import BASELINE, BASELINE_FILE, Z, ablation_table, build_report, paired_delta, seed_noise


def _rows(cells, shares=None):
    """[(cell, factor, value, {seed: metric})] -> trial rows; ``shares``: {cell: attention-on-event share}."""
    rows = []
    for cell, factor, value, by_seed in cells:
        for seed, metric in by_seed.items():
            rows.append({"cell": cell, "factor": factor, "value": value, "seed": seed, "metric_value": metric,
                         "error": None if metric is not None else "RuntimeError: boom", "checkpoint": None,
                         "attn_event_share": (shares or {}).get(cell), "attn_event_share_uniform": 0.25})
    return rows


def _baseline(by_seed):
    return [{"cell": BASELINE, "factor": BASELINE, "value": "random-init", "seed": s, "metric": "eval_accuracy",
             "metric_value": v, "error": None} for s, v in by_seed.items()]


def _zero(table):
    return next(r for r in table if r["value"] == 0.0)


def test_delta_is_the_mean_of_paired_differences_so_what_a_seed_shares_cancels():
    """Seeds move both runs alike (0.40 to 0.60): unpaired, the +0.017 would drown in that spread; paired by seed,
    the differences agree and Δ stands clear."""
    centre = {0: 0.50, 1: 0.60, 2: 0.40}
    cell = {0: 0.52, 1: 0.62, 2: 0.41}
    delta, se, pairs = paired_delta(cell, centre)
    diffs = [0.02, 0.02, 0.01]
    assert delta == pytest.approx(np.mean(diffs)) and pairs == 3
    assert se == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(3))
    table = ablation_table(_rows([("centre", "centre", None, centre), ("diff_lambda=0.0", "diff_lambda", 0.0, cell)]),
                           load_grid("smoke"))
    assert _zero(table)["delta"] == pytest.approx(delta) and _zero(table)["clear"] is True
    # a seed only one side ran is no pair
    assert paired_delta({0: 0.5, 5: 0.9}, centre) == (pytest.approx(0.0), pytest.approx(math.nan, nan_ok=True), 1)


def test_a_cell_is_judged_against_the_paired_noise_of_every_cell_not_its_own_two_pairs():
    """Two pairs that happen to agree (+0.010, +0.011) give a tiny spread of one degree of freedom; pooled with the
    other cells' differences the same Δ is noise."""
    grid = load_grid("ablation")
    rows = _rows([("centre", "centre", None, {0: 0.30, 1: 0.30}),
                  ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.310, 1: 0.311}),
                  ("alpha=1.0", "alpha", 1.0, {0: 0.36, 1: 0.26}),
                  ("alpha=2.0", "alpha", 2.0, {0: 0.25, 1: 0.33})])
    zero = next(r for r in ablation_table(rows, grid) if r["cell"] == "diff_lambda=0.0")
    assert zero["delta"] == pytest.approx(0.0105) and zero["pairs"] == 2
    alone = paired_delta({0: 0.310, 1: 0.311}, {0: 0.30, 1: 0.30})[1]
    assert abs(zero["delta"]) > Z * alone  # its own two pairs would call it clear
    assert zero["se_delta"] > 0.03 and zero["clear"] is False


# The default grid's trials as a from-scratch `make sweep` measured them: alpha = 2 collapsed on seed 0 only.
DEFAULT_SWEEP = [
    ("centre", "centre", None, {0: 0.4328125, 1: 0.4265625}),
    ("alpha=1.0", "alpha", 1.0, {0: 0.4140625, 1: 0.45}),
    ("alpha=2.0", "alpha", 2.0, {0: 0.3109375, 1: 0.4203125}),
    ("cls_position=none", "cls_position", "none", {0: 0.3828125, 1: 0.365625}),
    ("cls_position=middle", "cls_position", "middle", {0: 0.4296875, 1: 0.43359375}),
    ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.4265625, 1: 0.434375}),
    ("diff_lambda=0.5", "diff_lambda", 0.5, {0: 0.415625, 1: 0.44609375}),
    ("num_students=1", "num_students", 1, {0: 0.43828125, 1: 0.48125}),
    ("num_students=8", "num_students", 8, {0: 0.42265625, 1: 0.440625}),
]


def test_cochran_limits_are_the_published_table():
    """Cochran's C at 5 %, from its table: k variances of 2 runs, then of 3."""
    two = {4: 0.9065, 5: 0.8412, 9: 0.6385, 10: 0.6020}
    three = {2: 0.9750, 5: 0.6838, 10: 0.4450}
    assert all(rp.cochran_limit(k, 2) == pytest.approx(c, abs=2e-4) for k, c in two.items())
    assert all(rp.cochran_limit(k, 3) == pytest.approx(c, abs=2e-4) for k, c in three.items())


def test_a_cell_whose_seeds_disagree_far_beyond_the_others_is_unstable_and_kept_out_of_the_noise(tmp_path):
    """alpha = 2's two seeds are 0.11 apart where the other cells' are at most 0.04: pooled in, it alone would
    make sigma_seed 0.031 for every cell; it is flagged, left out of sigma_seed and sigma_diff, and its own delta
    is judged against its own paired spread."""
    rows = _rows(DEFAULT_SWEEP)
    assert rp.unstable_cells(rows) == ["alpha=2.0"]
    others = [list(v.values()) for cell, _, _, v in DEFAULT_SWEEP if cell != "alpha=2.0"]
    by_hand = math.sqrt(np.mean([np.var(v, ddof=1) for v in others]))
    assert seed_noise(rows, {"alpha=2.0"}) == pytest.approx(by_hand) and by_hand < 0.02 < seed_noise(rows)

    table = ablation_table(rows, load_grid("ablation"))
    alpha2 = next(r for r in table if r["cell"] == "alpha=2.0")
    own = paired_delta({0: 0.3109375, 1: 0.4203125}, {0: 0.4328125, 1: 0.4265625})
    assert alpha2["unstable"] and alpha2["se_delta"] == pytest.approx(own[1]) and alpha2["clear"] is False
    centre = {0: 0.4328125, 1: 0.4265625}
    diffs = [[v[s] - centre[s] for s in (0, 1)] for cell, _, _, v in DEFAULT_SWEEP if cell not in ("centre", "alpha=2.0")]
    sigma_diff = math.sqrt(np.mean([np.var(d, ddof=1) for d in diffs]))
    mean_cls = next(r for r in table if r["cell"] == "cls_position=none")
    assert not mean_cls["unstable"] and mean_cls["se_delta"] == pytest.approx(sigma_diff / math.sqrt(2))
    # clear of the noise by the uncorrected z-rule, not after Holm's correction over the grid's 8 comparisons:
    # t = 0.0555 / 0.0153 on 7 degrees of freedom gives p = 0.0085, times 8 is 0.068
    assert mean_cls["z_rule"] is True and mean_cls["clear"] is False
    assert mean_cls["df"] == 7 and mean_cls["p_holm"] == pytest.approx(8 * mean_cls["p"]) == pytest.approx(0.0677,
                                                                                                         abs=5e-4)

    report = build_report(rows, load_grid("ablation"), tmp_path, baseline=[])
    assert "no (unstable: seeds disagree)" in report["markdown"] and "alpha=2.0" in report["markdown"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["unstable_cells"] == ["alpha=2.0"] and saved["sigma_seed"] == pytest.approx(by_hand)
    assert saved["sigma_seed_all_cells"] == pytest.approx(seed_noise(rows))


def test_one_cell_spreading_more_than_the_rest_by_chance_is_not_called_unstable():
    """Two seeds give one degree of freedom per cell, so spreads vary a lot by chance: a cell three times wider
    than eight others (C = 0.53 against a limit of 0.64) is noise, not instability."""
    cells = [("centre", "centre", None, {0: 0.40, 1: 0.42})]
    cells += [(f"diff_lambda={i}", "diff_lambda", i, {0: 0.40, 1: 0.42}) for i in range(7)]
    cells += [("alpha=2.0", "alpha", 2.0, {0: 0.40, 1: 0.46})]
    rows = _rows(cells)
    assert rp.unstable_cells(rows) == [] and seed_noise(rows, rp.unstable_cells(rows)) == pytest.approx(seed_noise(rows))


def test_a_one_seed_cell_has_no_error_bar_and_is_judged_against_root_two_sigma_seed(tmp_path):
    grid = load_grid("smoke")
    rows = _rows([("centre", "centre", None, {0: 0.50, 1: 0.52, 2: 0.48}),
                  ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.44, 1: None, 2: None})])
    sigma = seed_noise(rows)
    assert sigma == pytest.approx(0.02)  # only the centre ran several seeds
    zero = _zero(ablation_table(rows, grid))
    assert zero["n"] == 1 and math.isnan(zero["std"]) and zero["pairs"] == 1
    assert zero["se_delta"] == pytest.approx(math.sqrt(2) * sigma)
    # 0.06 > 2 · 0.0283 by the z-rule, but σ_seed comes from the centre's 3 seeds: Student's t on 2 degrees of
    # freedom gives p = 0.168, not clear
    assert zero["delta"] == pytest.approx(-0.06) and zero["z_rule"] is True and zero["df"] == 2
    assert zero["p"] == pytest.approx(0.168, abs=5e-4) and zero["clear"] is False
    report = build_report(rows, grid, tmp_path / "report")
    line = next(x for x in report["markdown"].splitlines() if x.startswith("| diff_lambda | 0.0 |"))
    assert line == "| diff_lambda | 0.0 | 0.440 | 1 (2 failed) | -0.060 | 0.168 | no | 1.000 | — | — | — | — | — |"
    assert "√2·σ_seed" in report["markdown"]
    # without any cell of two seeds there is no noise to judge a one-seed Δ against: no verdict, and the report
    # says why
    single = _rows([("centre", "centre", None, {0: 0.50}), ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.30})])
    assert _zero(ablation_table(single, grid))["clear"] is None
    text = build_report(single, grid, tmp_path / "single")["markdown"]
    assert "σ_seed unknown" in text and "| diff_lambda | 0.0 | 0.300 | 1 | -0.200 | — | — |" in text


def test_a_one_run_value_gets_no_whisker_in_the_factor_plot():
    from pipelines.plotting import plt

    rows = [{"value": 0.3, "centre": True, "mean": 0.5, "std": 0.02, "n": 3},
            {"value": 0.0, "centre": False, "mean": 0.4, "std": math.nan, "n": 1},
            {"value": 0.5, "centre": False, "mean": 0.45, "std": 0.01, "n": 2}]
    fig, ax = plt.subplots()
    rp.factor_panel(ax, rows, "eval_accuracy", {"mean": 0.2})
    errorbars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(errorbars) == 1
    segments = errorbars[0].lines[2][0].get_segments()
    assert sorted(float(s[0][0]) for s in segments) == [0.0, 2.0]  # values 0 and 2; none on the one-run value
    assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == 0.2 for line in ax.lines)  # the baseline
    plt.close(fig)


def test_the_report_shows_the_random_init_baseline_row_and_sigma_seed_where_a_user_reads_it(tmp_path, capsys):
    grid = load_grid("smoke")
    rows = _rows([("centre", "centre", None, {0: 0.50, 1: 0.52}), ("diff_lambda=0.0", "diff_lambda", 0.0,
                                                                    {0: 0.40, 1: 0.44})])
    report = build_report(rows, grid, tmp_path / "report", baseline=_baseline({0: 0.20, 1: 0.24}))
    assert report["baseline"]["mean"] == pytest.approx(0.22) and report["baseline"]["n"] == 2
    rp.print_report(report)
    shown = capsys.readouterr().out
    assert "| baseline | random-init | 0.220 ± 0.028 | 2 | -0.290 ± 0.010 | 0.022 | yes | 0.500 | — |" in shown
    assert f"σ_seed = {seed_noise(rows):.3f}" in shown and "Baseline (random-init encoder): 0.220 ± 0.028" in shown
    csv_text = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert csv_text[1].startswith("baseline,random-init,baseline,")
    # the baseline rows are no pretrained cell: they stay out of σ_seed
    assert seed_noise(rows + _baseline({0: 0.0, 1: 1.0})) == pytest.approx(seed_noise(rows))


def test_a_rebuilt_report_reads_the_baseline_cached_in_the_sweep_folder(tmp_path):
    (tmp_path / BASELINE_FILE).write_text(json.dumps(_baseline({0: 0.1})))
    rows = _rows([("centre", "centre", None, {0: 0.5}), ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.4})])
    report = build_report(rows, load_grid("smoke"), tmp_path / "report")
    assert "| baseline | random-init | 0.100 | 1 | -0.400 | — | — | 1.000 | — |" in report["markdown"]


def test_attention_on_event_is_the_cells_mean_and_a_dash_where_the_data_has_no_events(tmp_path):
    grid = load_grid("smoke")
    rows = _rows([("centre", "centre", None, {0: 0.5, 1: 0.6})], shares={"centre": 0.4})
    rows += _rows([("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.4, 1: 0.5})])
    rows[0]["attn_event_share"] = 0.6  # centre: 0.6 and 0.4
    table = ablation_table(rows, grid)
    assert next(r for r in table if r["centre"])["attn_event_share"] == pytest.approx(0.5)
    assert math.isnan(_zero(table)["attn_event_share"])
    text = build_report(rows, grid, tmp_path / "report")["markdown"]
    assert "| diff_lambda | 0.3 | 0.550 ± 0.071 | 2 |  |  | centre |  | 0.50 ± 0.14 | — |" in text
    assert "attention on event |" in text and "a uniform map gives 0.25" in text


def test_summary_json_holds_the_spec_keys_with_null_for_what_is_unknown(tmp_path):
    grid = load_grid("smoke")
    rows = _rows([("centre", "centre", None, {0: 0.50}), ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.30})])
    build_report(rows, grid, tmp_path / "report", baseline=_baseline({0: 0.2}))

    def no_nan(token):
        raise AssertionError(f"summary.json holds {token}, which is not JSON")

    summary = json.loads((tmp_path / "report" / "summary.json").read_text(), parse_constant=no_nan)
    assert {"metric", "centre_mean", "centre_std", "sigma_seed", "baseline_random_init", "cells"} <= set(summary)
    assert summary["metric"] == "eval_accuracy" and summary["centre_mean"] == pytest.approx(0.5)
    assert summary["centre_std"] is None and summary["sigma_seed"] is None  # one seed: no spread measured
    assert summary["baseline_random_init"]["mean"] == pytest.approx(0.2)
    assert summary["baseline_random_init"]["std"] is None
    for cell in summary["cells"]:
        assert {"factor", "value", "mean", "std", "n", "delta", "clear"} <= set(cell)
    zero = next(c for c in summary["cells"] if c["value"] == 0.0)
    assert zero["delta"] == pytest.approx(-0.2) and zero["clear"] is None and zero["n"] == 1
    without = build_report(rows, grid, tmp_path / "bare")["summary"]
    assert without["baseline_random_init"] is None


def test_patch_grid_image_puts_time_on_x_and_frequency_on_y():
    """Time-major flattening (index t·F + f) -> image[f, t], which origin="lower" draws at (x = t, y = f)."""
    from pipelines.analysis import patch_grid_image

    T, F, t, f = 5, 8, 3, 1
    weights = torch.zeros(T * F)
    weights[t * F + f] = 1.0
    image = patch_grid_image(weights, (T, F))
    assert image.shape == (F, T)
    assert image[f, t] == 1.0 and image.sum() == 1.0


def test_attention_panels_line_up_with_the_log_mel_of_their_clip():
    """Every panel of a row has the log-mel's extent (seconds × mel bins) and origin, and the map's peak patch
    lands where that patch's frames and mel bins are."""
    from model import ASDAConfig, ASDAEncoder
    from pipelines.analysis import attention_figure, patch_grid_image
    from pipelines.plotting import plt

    encoder = ASDAEncoder(ASDAConfig.tiny(embed_dim=32, depth=1, num_heads=2, average_top_k_layers=1))
    clips = {"fbank": np.random.default_rng(0).standard_normal((2, 96, 128)).astype(np.float32),
             "event": np.array([[0.2, 0.5], [np.nan, np.nan]])}
    fig = attention_figure(encoder, clips)
    axes = np.array([ax for ax in fig.axes if not hasattr(ax, "_colorbar")]).reshape(2, -1)  # colour bars aside
    for row in axes:
        images = [ax.get_images()[0] for ax in row]
        assert all(im.origin == "lower" for im in images)
        assert all(im.get_extent() == [0, 0.96, 0, 128] for im in images)  # 96 frames of 10 ms
        assert all(im.get_array().shape == (8, 6) for im in images[1:])  # (F, T) of 6 x 8 patches
    plt.close(fig)
    image = patch_grid_image(np.arange(48.0), (6, 8))  # value = t·F + f
    assert image[2, 4] == 4 * 8 + 2


def test_the_baseline_is_cached_in_the_sweep_folder_and_not_redone_on_resume(tmp_path, monkeypatch):
    from model import ASDAConfig
    from sweeps import driver

    raw = yaml.safe_load(open(load_grid("smoke").path))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**raw, "seeds": [0, 1]}))
    grid = load_grid(path)
    calls = []

    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"target_length": 64}))

    def fake(sweep, config, seed):
        calls.append(seed)
        # the centre's model, at the length its trials pretrain with (the data set's own)
        assert config == dataclasses.replace(ASDAConfig.tiny().with_overrides(grid.centre), target_length=64)
        return {"cell": BASELINE, "factor": BASELINE, "value": "random-init", "seed": seed, "metric": "eval_accuracy",
                "metric_value": 0.1 * seed, "error": "OSError: disk" if seed == 1 and len(calls) == 2 else None}

    monkeypatch.setattr(driver, "_baseline_seed", fake)
    sweep = SimpleNamespace(base=ASDAConfig.tiny(), tasks=(), pretrain=SimpleNamespace(data=str(data), target_length=None,
                                                                       threads_per_worker=1))
    assert [r["seed"] for r in driver.run_baseline(grid, sweep, tmp_path)] == [0, 1] and calls == [0, 1]
    assert json.loads((tmp_path / BASELINE_FILE).read_text())[1]["error"] == "OSError: disk"
    driver.run_baseline(grid, sweep, tmp_path)  # resumed: seed 0 is kept, the failed seed 1 runs again
    assert calls == [0, 1, 1]
    driver.run_baseline(grid, sweep, tmp_path)
    assert calls == [0, 1, 1]


def test_a_collapsed_seed_is_marked_in_its_cell_and_left_out_of_the_noise(tmp_path):
    """A seed whose collapse guard tripped scores near chance: pooled, it would make σ_seed many times what the
    healthy seeds show and hide every other cell's difference."""
    grid = load_grid("ablation")
    healthy = _rows([("centre", "centre", None, {0: 0.72, 1: 0.73}),
                     ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.70, 1: 0.71}),
                     ("alpha=2.0", "alpha", 2.0, {0: 0.66, 1: 0.65})])
    fallen = _rows([("centre", "centre", None, {0: 0.72, 1: 0.73}),
                    ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.70, 1: 0.71}),
                    ("alpha=2.0", "alpha", 2.0, {0: 0.66, 1: 0.15})])
    fallen[-1]["collapse"] = "update 120: utterance_rank 1.42 < 4"
    assert seed_noise(fallen) == pytest.approx(seed_noise(healthy[:-1]))  # the collapsed run is out of σ_seed
    noise = rp.noises(fallen)
    assert noise.collapsed == ("alpha=2.0 seed 1",) and noise.sigma_seed == pytest.approx(seed_noise(healthy[:-1]))
    report = build_report(fallen, grid, tmp_path / "report")
    cell = next(c for c in report["summary"]["cells"] if c["factor"] == "alpha" and c["value"] == 2.0)
    assert cell["collapsed"] == 1 and cell["n"] == 2  # still shown, with its mark
    assert all(c["collapsed"] == 0 for c in report["summary"]["cells"] if c["value"] != 2.0)
    assert report["summary"]["collapsed_trials"] == ["alpha=2.0 seed 1"]
    line = next(x for x in report["markdown"].splitlines() if x.startswith("| alpha | 2.0 |"))
    assert "(**1 collapsed**)" in line
    assert "left out of σ_seed and σ_diff: alpha=2.0 seed 1" in report["markdown"]


def test_the_effective_alpha_gets_a_column_only_where_it_moves_with_more_than_alpha(tmp_path):
    grid = load_grid("ablation")
    rows = _rows([("centre", "centre", None, {0: 0.72, 1: 0.73}),
                  ("num_students=8", "num_students", 8, {0: 0.70, 1: 0.71}),
                  ("alpha=1.0", "alpha", 1.0, {0: 0.70, 1: 0.71})])
    weights = {"centre": (0.5, 16.0), "num_students=8": (0.5, 32.0), "alpha=1.0": (1.0, 32.0)}  # release's sums
    for r in rows:
        r["alpha"], r["alpha_effective"] = weights[r["cell"]]
    text = build_report(rows, grid, tmp_path / "moved")["markdown"]
    assert "α effective |" in text and "| num_students | 8 |" in text
    assert next(x for x in text.splitlines() if x.startswith("| num_students | 8 |")).endswith(" 32.000 |")
    for r in rows:  # per-element means: the weight is α, and the α cells' own change is no hidden one
        r["alpha_effective"] = r["alpha"]
    assert "α effective" not in build_report(rows, grid, tmp_path / "held")["markdown"]


def test_a_readout_cell_is_judged_against_its_own_pairs_and_stays_out_of_the_pretraining_noise(tmp_path):
    """The read-out cells evaluate the centre's own encoders: their Δ pairs two evaluations of one encoder, so the
    pooled σ (the pretraining's seed noise) is the same with or without them, and each is judged by its own pairs."""
    rows = _rows(DEFAULT_SWEEP)
    readout = _rows([("readout=mean", "readout", "mean", {0: 0.4128125, 1: 0.4095625})])
    for r in readout:
        r["shares_pretraining_of"] = "centre"
    grid = load_grid("ablation")
    before, after = rp.noises(rows), rp.noises(rows + readout)
    assert (after.sigma_diff, after.sigma_seed, after.unstable) == (before.sigma_diff, before.sigma_seed,
                                                                   before.unstable)
    row = next(r for r in ablation_table(rows + readout, grid) if r["cell"] == "readout=mean")
    own = paired_delta({0: 0.4128125, 1: 0.4095625}, {0: 0.4328125, 1: 0.4265625})
    assert row["shares_pretraining"] and (row["delta"], row["se_delta"]) == pytest.approx(own[:2])
    # -0.018 ± 0.0015: clear by the z-rule, but an SE from two pairs has one degree of freedom (t = 12.3, p = 0.052)
    assert row["z_rule"] is True and row["df"] == 1 and row["clear"] is False
    built = build_report(rows + readout, grid, tmp_path, baseline=[])
    text = built["markdown"]
    assert "| readout | mean |" in text and "the cells of readout are evaluations of the centre's own" in text
    # the read-outs compared two by two on the same encoders (cls has no rows here: no pair)
    pairs = {(p["a"], p["b"]): p for p in built["summary"]["evaluation_pairs"]}
    assert pairs[("cls+mean", "mean")]["delta"] == pytest.approx(-own[0]) and pairs[("cls", "mean")]["pairs"] == 0
    assert "| readout | cls+mean | mean | +0.018 ± 0.00" in text and "| readout | cls | mean | — | 0 |" in text
    assert json.loads((tmp_path / "summary.json").read_text())["evaluation_pairs"][0]["delta"] is None


def test_each_cell_shows_what_it_cost_beside_its_metric(tmp_path):
    """clips/s mean ± std over seeds, peak memory (the GPU's where measured) and FLOPs per update, in the table and
    in summary.json's cost."""
    rows = _rows([("centre", "centre", None, {0: 0.50, 1: 0.52}),
                  ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.40, 1: 0.44})])
    costs = {("centre", 0): 100.0, ("centre", 1): 110.0, ("diff_lambda=0.0", 0): 150.0, ("diff_lambda=0.0", 1): 150.0}
    for r in rows:
        r["cost"] = {"clips_per_s": costs[(r["cell"], r["seed"])], "peak_rss_mb": 1900.0, "loop_rss_mb": 900.0 + r["seed"],
                     "params": 897_000, "gflops_per_update": 1.234 if r["cell"] == "centre" else 0.987}
    rows[0]["cost"]["peak_gpu_mb"] = rows[1]["cost"]["peak_gpu_mb"] = 2048.0
    report = build_report(rows, load_grid("smoke"), tmp_path / "report")
    lines = report["markdown"].splitlines()
    assert next(x for x in lines if x.startswith("| diff_lambda | 0.3 |")).endswith("| 105 ± 7 | 2048 | 1.23 |")
    assert next(x for x in lines if x.startswith("| diff_lambda | 0.0 |")).endswith("| 150 ± 0 | 900 | 0.987 |")
    cell = next(c for c in report["summary"]["cells"] if c["value"] == 0.0)
    assert cell["cost"] == pytest.approx({"clips_per_s": 150.0, "clips_per_s_std": 0.0, "loop_rss_mb": 900.5,
                                          "peak_rss_mb": 1900.0,
                                          "peak_gpu_mb": None, "params": 897_000, "gflops_per_update": 0.987})


def test_noise_robustness_is_each_cells_metric_at_each_snr_with_its_delta_paired_by_seed(tmp_path):
    from sweeps.robustness import levels

    rows = _rows([("centre", "centre", None, {0: 0.70, 1: 0.72}),
                  ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.68, 1: 0.69})])
    noisy = {("centre", 0): {"10": 0.60, "-5": 0.30}, ("centre", 1): {"10": 0.62, "-5": 0.34},
             ("diff_lambda=0.0", 0): {"10": 0.55, "-5": 0.20}, ("diff_lambda=0.0", 1): {"10": 0.59, "-5": 0.22}}
    for r in rows:
        r["robustness"] = noisy[(r["cell"], r["seed"])]
    assert levels(rows) == ["clean", "10", "-5"]
    report = build_report(rows, load_grid("smoke"), tmp_path / "report")
    entries = {(e["cell"], e["snr"]): e for e in report["summary"]["robustness"]}
    low = entries[("diff_lambda=0.0", "-5")]  # differences -0.10 and -0.12
    assert low["delta"] == pytest.approx(-0.11) and low["se_delta"] == pytest.approx(0.01)
    assert entries[("diff_lambda=0.0", "clean")]["delta"] == pytest.approx(-0.025)
    assert entries[("centre", "10")]["mean"] == pytest.approx(0.61) and entries[("centre", "10")]["centre"]
    text = report["markdown"]
    assert "| factor | value | clean | 10 dB | -5 dB |" in text
    assert "| diff_lambda | 0.0 | 0.685 (-0.025 ± 0.005) | 0.570 (-0.040 ± 0.010) | 0.210 (-0.110 ± 0.010) |" in text
    assert (tmp_path / "report" / "robustness.png").is_file()
    plain = build_report(_rows([("centre", "centre", None, {0: 0.7})]), load_grid("smoke"), tmp_path / "plain")
    assert "Noise robustness" not in plain["markdown"] and plain["summary"]["robustness"] == []


def test_each_task_gets_its_own_table_and_the_best_value_of_each_factor_on_each_task(tmp_path):
    """The main metric prefers the centre's λ 0.3; the task prefers λ 0: each table is the trials' scores on its
    own data, paired by seed, and the summary says which value wins where."""
    grid = load_grid("smoke")  # one task, "short"
    rows = _rows([("centre", "centre", None, {0: 0.70, 1: 0.72}),
                  ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.60, 1: 0.64})])
    task = {("centre", 0): 0.40, ("centre", 1): 0.42, ("diff_lambda=0.0", 0): 0.50, ("diff_lambda=0.0", 1): 0.53}
    for r in rows:
        r["tasks"] = {"short": task[(r["cell"], r["seed"])]}
    baseline = [{**b, "tasks": {"short": 0.2}} for b in _baseline({0: 0.3, 1: 0.32})]
    report = build_report(rows, grid, tmp_path / "report", baseline=baseline)
    short = report["summary"]["tasks"]["short"]
    zero = next(c for c in short["cells"] if c["value"] == 0.0)
    assert zero["mean"] == pytest.approx(0.515) and zero["delta"] == pytest.approx(0.105)
    assert short["baseline_random_init"]["mean"] == pytest.approx(0.2) and short["metric"] == "eval_accuracy"
    best = {(b["task"], b["factor"]): b for b in report["summary"]["best_by_task"]}
    assert best[("main", "diff_lambda")]["best"] == 0.3 and best[("main", "diff_lambda")]["is_centre"]
    assert best[("short", "diff_lambda")]["best"] == 0.0 and best[("short", "diff_lambda")]["delta"] == pytest.approx(
        0.105)
    text = report["markdown"]
    assert "## Task short: `eval_accuracy`" in text
    assert "\n| diff_lambda | 0.0 | 0.515 ± 0.021 | 2 | +0.105 ± 0.005 | 0.030 | yes |\n" in text
    assert "| diff_lambda | 0.3 (0.710; centre) | 0.0 (0.515; +0.105" in text
