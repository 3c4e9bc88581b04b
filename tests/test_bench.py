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


def test_bench_step_counts_flops_and_reports_mfu(tmp_path):
    from bench.step import bench_step
    from model import ASDAConfig

    config = ASDAConfig.tiny().with_overrides(["depth=1", "average_top_k_layers=1", "target_length=64",
                                              "num_students=2"])
    report = bench_step(config, batch_size=2, repeats=1, warmup=1)
    by = {r["name"]: r for r in report["results"]}
    # The differential layer projects 5·D instead of 3·D and runs a second attention: strictly more FLOPs.
    assert by["differential"]["gflops_per_update"] > by["standard"]["gflops_per_update"] > 0
    assert report["flops_ratio"] > 1 and report["matmul_peak_tflops"] > 0
    assert all(0 < r["mfu"] for r in report["results"])


def test_bench_attention_quick_mode_writes_the_documented_schema(tmp_path, capsys):
    out = tmp_path / "attention.json"
    args = ["bench", "attention", "--seq-lens", "9,17", "--batch", "1", "--repeats", "1", "--warmup", "0",
            "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert [(r["name"], r["seq_len"]) for r in report["results"]] == [
        (name, n) for n in (9, 17) for name in ("standard", "differential", "naive")]
    for r in report["results"]:
        assert set(r) == {"name", "seq_len", "batch", "median_ms", "peak_mem_mb"}
        assert r["batch"] == 1 and r["median_ms"] > 0 and r["peak_mem_mb"] is None
    assert [r["seq_len"] for r in report["ratios"]] == [9, 17]
    assert "differential at 17" in capsys.readouterr().out


def test_bench_attention_rejects_unknown_versions_and_seq_lens():
    assert main(["bench", "attention", "--versions", "standard,flash3"]) == 2
    assert main(["bench", "attention", "--seq-lens", "513,many"]) == 2


def test_naive_and_stacked_baselines_compute_the_training_path_function():
    import torch

    from bench.attention import build_layer

    torch.manual_seed(0)
    reference = build_layer("differential", 64, 4, 0.3)
    x = torch.randn(2, 17, 64, dtype=torch.float64)
    padding = torch.zeros(2, 17, dtype=torch.bool)
    padding[1, -3:] = True
    reference.double()
    for name in ("naive", "stacked"):
        layer = build_layer(name, 64, 4, 0.3).double()
        layer.load_state_dict(reference.state_dict())
        # the naive maps take their softmax in float32, as the training path's explicit reference does
        torch.testing.assert_close(layer(x, padding)[:, :14], reference(x, padding)[:, :14], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer(x), reference(x), atol=1e-6, rtol=1e-5)


def test_bench_curve_probes_both_presets_at_each_interval(synthetic_prepared, tmp_path, capsys):
    out = tmp_path / "curve.json"
    assert main(["bench", "curve", "--data", str(synthetic_prepared), "--steps", "2", "--every", "1",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["curves"]) == {"old", "new"}
    for curve in report["curves"].values():
        assert curve["updates"] == [0, 1, 2] and all(0 <= a <= 1 for a in curve["accuracy"][0])
    assert "probe accuracy vs pretraining updates" in capsys.readouterr().out


def test_speechcommands_layout_of_the_synthetic_classes_prepares_as_speech_commands(ray_local, tmp_path):
    from bench.curve import speechcommands_layout
    from pipelines.data.card import load_card
    from pipelines.data.prepare import prepare

    prepare("speechcommands", speechcommands_layout(tmp_path / "raw", per_class=5), tmp_path / "prepared")
    card = load_card(tmp_path / "prepared")
    assert card["target_length"] == 128 and len(card["class_names"]) == 8
    assert card["splits"] == {"train": 32, "test": 8}


def test_bench_step_profile_counts_operator_calls_per_stage_of_the_trainers_update(tmp_path, capsys):
    out = tmp_path / "profile.json"
    args = ["bench", "step", "--profile", "--batch", "2", "--repeats", "1", "--json", str(out),
            "depth=1", "average_top_k_layers=1", "target_length=64", "num_students=2"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    stages = {r["stage"]: r["calls"] for r in report["stages"]}
    assert set(stages) >= {"draw_views", "teacher_targets", "forward", "backward", "clip", "optimiser", "ema"}
    # Fused AdamW and the multi-tensor EMA: a handful of calls for every parameter at once.
    assert stages["optimiser"] <= 4 and stages["ema"] <= 3
    assert report["total_calls"] == sum(stages.values()) and report["median_cpu_ms"] > 0
    assert "operator calls per stage" in capsys.readouterr().out


def test_bench_trainer_reads_the_clip_rate_asda_pretrain_logged(synthetic_prepared):
    from bench.step import bench_trainer
    from model import ASDAConfig

    config = ASDAConfig.tiny(depth=1, average_top_k_layers=1, num_students=2, target_length=64)
    r = bench_trainer(config, batch_size=4, steps=4, log_every=2, data=str(synthetic_prepared), in_process=True)
    assert len(r["windows_clips_per_s"]) == 2 and r["clips_per_s"] == r["windows_clips_per_s"][1] > 0
    assert r["precision"] == "fp32" and r["compiled"] is False and r["train_loop_s"] > 0


def test_a_cells_flops_per_update_are_its_batchs_counted_by_torch_and_its_parameters_the_encoders():
    """pretrain_flops counts one clip and scales by the batch: the count of a real batch of three is the same."""
    import torch

    from model import ASDA, ASDAConfig, ASDAEncoder
    from pipelines.cost import encoder_parameters, update_flops
    from pipelines.pretrain import PretrainSettings, pretrain_flops
    from pipelines.update import build_update

    config = ASDAConfig.tiny(embed_dim=64, depth=2, num_heads=4, average_top_k_layers=2, decoder_layers=1,
                             num_students=2)
    update = build_update(ASDA(config), PretrainSettings(data="-", precision="fp32"), torch.device("cpu"))
    direct = update_flops(update, torch.randn(3, 96, 128))
    assert pretrain_flops(config, 3, 96) == direct > 0
    assert pretrain_flops(config, 3, 192) > 1.9 * direct  # twice the frames, about twice the work
    assert encoder_parameters(config) == sum(p.numel() for p in ASDAEncoder(config).parameters())


def test_the_loops_memory_is_what_it_allocates_beyond_where_it_started():
    import torch

    from pipelines.cost import PeakMemory

    memory = PeakMemory()
    held = torch.ones(50 * 2**20)  # 200 MB, touched
    memory.sample()
    del held
    got = memory.as_metrics()
    assert 190 <= got["loop_rss_mb"] <= got["peak_rss_mb"] and "peak_gpu_mb" not in got
