"""Benchmarks run in a quick mode and report in their documented shape; no timing assertions."""

import json

from pipelines.cli import main


def test_bench_step_quick_mode_writes_its_report(tmp_path, capsys):
    out = tmp_path / "step.json"
    args = ["bench", "step", "--batch", "2", "--repeats", "1", "--json", str(out),
            "depth=1", "average_top_k_layers=1", "target_length=64", "num_students=2"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["differential", "standard"]
    assert all(r["median_ms"] > 0 and r["clips_per_s"] > 0 for r in report["results"])
    assert report["differential_over_standard"] > 0
    assert "differential / standard" in capsys.readouterr().out


def test_bench_data_quick_mode_reports_prepare_and_feed_rates(ray_local, tmp_path, capsys):
    out = tmp_path / "data.json"
    assert main(["bench", "data", "--clips", "16", "--epochs", "1", "--batch", "8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["prepare"]["clips_per_s"] > 0 and report["bare_torchaudio"]["clips_per_s_per_core"] > 0
    assert report["feed"]["batches"] == 2 and report["feed"]["mb_per_s"] > 0
    assert "prepare per core / bare" in capsys.readouterr().out
