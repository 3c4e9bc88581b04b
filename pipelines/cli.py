"""The `asda` command line: one subcommand per stage. Makefile targets are thin calls of these.

Building the parser imports nothing heavy (no torch, Ray or MLflow): `asda --help` answers at once, and each command
imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

# Spelled out here rather than imported, because importing their homes imports torch; tests/test_cli.py checks they
# equal model.config.PRESETS, pipelines.data.adapters.ADAPTERS, pipelines.update.PRECISIONS and
# pipelines.inference.ENCODER_READOUTS (FINETUNE_READOUTS: model.READOUTS, RECIPES: pipelines.recipes).
PRESETS = ("base", "tiny", "release")
DATASETS = ("audioset", "esc50", "folder", "manifest", "speechcommands", "synthetic")
PRECISIONS = ("bf16", "fp32")  # pipelines.update.PRECISIONS
ENCODER_READOUTS = ("cls", "mean", "cls+mean")  # pipelines.inference.ENCODER_READOUTS
FINETUNE_READOUTS = ("cls", "mean")  # model.READOUTS
RECIPES = ("auto", "as20k", "as2m", "esc50", "spc2", "none")  # pipelines.recipes.RECIPE_CHOICES
OLDER_READOUT_NAMES = {"utterance": "cls", "utterance+mean": "cls+mean"}  # pipelines.inference.READOUT_ALIASES


def _model_info(args: argparse.Namespace) -> int:
    from model import ASDAEncoder

    config = _model_config(args)
    print(config.to_yaml(), end="")
    import torch

    with torch.device("meta"):
        encoder = ASDAEncoder(config)
    count = sum(p.numel() for p in encoder.parameters())
    print(f"# encoder parameters: {count:,} ({count / 1e6:.1f} M); patch grid {config.grid}, "
          f"{config.num_patches} patches")
    return 0


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="print the resolved model config and its parameter count")
    p.add_argument("--preset", choices=PRESETS, default="base", help="starting point (default: base)")
    p.add_argument("--config", help="YAML file of ASDAConfig fields (replaces the preset)")
    p.add_argument("overrides", nargs="*", metavar="field=value", help="ASDAConfig fields to override")
    p.set_defaults(func=_model_info)


def _write_json(path: str | None, report: dict) -> None:
    """A benchmark's results as JSON, when --json asked for them."""
    if path:
        import json

        with open(path, "w") as fh:
            json.dump(report, fh, indent=2)


def _bench_step(args: argparse.Namespace) -> int:

    from bench.step import bench_step
    from model import ASDAConfig

    config = ASDAConfig.preset(args.preset).with_overrides(args.overrides)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the benchmark's, the profile's and the --trainer run's
    if args.profile:
        return _bench_profile(args, config)
    report = bench_step(config, batch_size=args.batch, repeats=args.repeats, device=args.device,
                        compile=args.compile, precision=args.precision)
    for r in report["results"]:
        print(f"{r['name']:>12}: {r['median_ms']:8.1f} ms/update  {r['clips_per_s']:7.1f} clips/s  "
              f"{r['gflops_per_update']:8.1f} GFLOP/update  {r['achieved_tflops']:6.2f} TFLOP/s  MFU {r['mfu']:.1%}")
    print(f"differential / standard: {report['differential_over_standard']:.2f}x time, "
          f"{report['flops_ratio']:.2f}x FLOPs (batch {args.batch}, {config.num_students} students, "
          f"{report['device']}, {report['threads']} threads; MFU against a measured "
          f"{report['matmul_peak_dtype']} matmul peak of {report['matmul_peak_tflops']:.2f} TFLOP/s)")
    if args.trainer:
        from bench.step import bench_trainer

        trainer = bench_trainer(config, batch_size=args.batch, steps=args.trainer_steps, device=args.device,
                                compile=args.compile, precision=args.precision)
        report["trainer"] = trainer
        bench = report["results"][0]["clips_per_s"]
        where = "in process" if trainer["in_process"] else "in a Ray Train worker"
        print(f"asda pretrain ({where}), same update: {trainer['clips_per_s']:7.1f} clips/s (median of "
              f"{len(trainer['windows_clips_per_s']) - 1} windows of {trainer['log_every']} updates after the "
              f"first; first {trainer['first_window_clips_per_s']:.1f}); trainer / benchmark "
              f"{trainer['clips_per_s'] / bench:.2f}")
    _write_json(args.json, report)
    return 0


def _bench_profile(args: argparse.Namespace, config) -> int:
    from bench.profile import profile_update

    if args.device != "cpu":
        raise ValueError(f"--profile counts operator calls on CPU only, not --device {args.device}")
    r = profile_update(config, batch_size=args.batch, repeats=args.repeats)
    print(f"operator calls per stage of one update (batch {r['batch']}, {config.num_students} students, "
          f"{r['threads']} threads, float32 eager):")
    for row in r["stages"]:
        top = ", ".join(f"{name.removeprefix('aten::')} {n}" for name, n in row["top"])
        print(f"  {row['stage']:>15}: {row['calls']:5d}   {top}")
    print(f"  {'total':>15}: {r['total_calls']:5d}; update {r['median_ms']:.1f} ms wall, "
          f"{r['median_cpu_ms']:.1f} ms CPU (median of {args.repeats})")
    _write_json(args.json, r)
    return 0


def _bench_embed(args: argparse.Namespace) -> int:
    from bench.embed import bench_embed

    r = bench_embed(presets=tuple(args.presets), clip_seconds=tuple(args.clip_seconds),
                    total_seconds=args.total_seconds, batch_size=args.batch, long_minutes=args.long_minutes,
                    threads=args.threads)
    print(f"asda embed in one process ({r['threads']} threads, {r['batch_size']} chunks per pass, CPU unless "
          f"torch says otherwise); random-init encoders")
    for row in r["results"]:
        print(f"{row['preset']:>5}  clips of {row['clip_s']:6.1f} s: {row['realtime_x']:8.1f}x real time, "
              f"{row['clips_per_s']:7.1f} clips/s ({row['clips']} clips, chunks of {row['chunk_frames']} frames)")
    for row in r["peak"]:
        print(f"{row['preset']:>5}  one {row['minutes']:g}-minute clip: peak memory +{row['growth_mb']:.0f} MB over "
              f"{row['before_mb']:.0f} MB")
    _write_json(args.json, r)
    return 0


def _bench_attention(args: argparse.Namespace) -> int:

    from bench.attention import bench_attention

    try:
        seq_lens = tuple(int(n) for n in args.seq_lens.split(","))
    except ValueError:
        raise ValueError(f"--seq-lens {args.seq_lens!r} is not allowed: expected comma-separated integers") from None
    versions = tuple(args.versions.split(","))
    r = bench_attention(device=args.device, dtype=args.dtype, seq_lens=seq_lens, batch=args.batch,
                        repeats=args.repeats, warmup=args.warmup, versions=versions)
    print(f"one attention layer, forward + backward: width {r['dim']}, {r['heads']} heads, {r['device']}, "
          f"{r['dtype']}, {r['threads']} threads, median of {r['repeats']}")
    for row in r["results"]:
        mem = "" if row["peak_mem_mb"] is None else f"  {row['peak_mem_mb']:9.1f} MB"
        print(f"{row['name']:>13}  seq {row['seq_len']:5d}  batch {row['batch']:3d}  {row['median_ms']:9.2f} ms{mem}")
    for row in r["ratios"]:
        parts = [f"{k.replace('_', ' ')} {v:.2f}x" for k, v in row.items() if k != "seq_len"]
        print(f"differential at {row['seq_len']}: " + ", ".join(parts))
    _write_json(args.json, r)
    return 0


def _bench_data(args: argparse.Namespace) -> int:

    from bench.data import bench_data

    r = bench_data(clips=args.clips, batch_size=args.batch, epochs=args.epochs, sample_rate=args.sample_rate,
                   profile=args.profile)
    print(f"prepare: {r['clips']} clips at {r['sample_rate']} Hz in {r['prepare']['seconds']:.1f} s = "
          f"{r['prepare']['clips_per_s']:.1f} clips/s ({r['prepare']['clips_per_s_per_core']:.1f} per core, "
          f"{r['cores']} cores, {r['shards']} shards)")
    print(f"bare torchaudio decode + fbank: {r['bare_torchaudio']['clips_per_s_per_core']:.1f} clips/s per core; "
          f"prepare per core / bare = {r['prepare_per_core_over_bare']:.2f}")
    if r["prepare_per_cpu_s_over_bare"]:
        print(f"in CPU time: prepare {r['clips'] / r['prepare_cpu_s']:.1f} clips per CPU-second (every process of "
              f"the local Ray instance), bare {r['bare_torchaudio']['clips_per_cpu_s']:.1f}; "
              f"ratio {r['prepare_per_cpu_s_over_bare']:.2f}")
    ray_s = r["in_ray"]
    print("in the shard tasks: " + ", ".join(f"{k} {v:.2f} s" for k, v in ray_s["stage_seconds"].items())
          + f"; rest of the tasks {ray_s['task_seconds_outside_stages']:.2f} s; the tasks' CPU "
          f"{ray_s['task_cpu_seconds']:.1f} s; core-seconds outside tasks {ray_s['core_seconds_outside_tasks']:.1f}")
    if "profile" in r:
        print("one process, one thread, ms per clip: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["profile"]["ms_per_clip"].items()))
        for row in r["profile"]["top_functions"]:
            print(f"  {row['share']:6.1%}  {row['function']}")
    print(f"feed: {r['feed']['batches_per_s']:.1f} batches/s of {args.batch} ({r['feed']['mb_per_s']:.1f} MB/s)")
    _write_json(args.json, r)
    return 0


def _bench_sweep(args: argparse.Namespace) -> int:

    from bench.sweep import bench_sweep

    overrides = {"steps": args.steps} if args.steps else {}
    r = bench_sweep(args.grid, path=args.path, max_concurrent=args.max_concurrent, **overrides)
    print(f"\n{'trial':<28} {'wall s':>8} {'loop s':>8} {'eval s':>8} {'overhead s':>11}")
    for t in r["trials"]:
        cells = [t[k] for k in ("wall_s", "train_loop_s", "eval_s", "overhead_s")]
        shown = " ".join(f"{c:>8.1f}" if c is not None else f"{'—':>8}" for c in cells)
        print(f"{t['cell'] + ' seed ' + str(t['seed']):<28} {shown}")
    total = r["total"]
    print(f"sweep {r['grid']} ({r['path']}): {total['trials']} trials in {total['wall_s']:.1f} s wall; machine "
          f"{total['machine_cpu_s']:.0f} CPU-s ({total['machine_cpu_s_per_trial']:.1f} per trial, of which "
          f"{total['overhead_cpu_s_per_trial']:.1f} outside training and evaluation)")
    _write_json(args.json, r)
    return 0


def _bench_curve(args: argparse.Namespace) -> int:

    from bench.curve import bench_curve, speechcommands_layout

    data = args.data
    if args.layout == "speechcommands":  # the synthetic classes as 1 s clips in Speech Commands' layout
        from .data.prepare import prepare
        from .runtime import DATA_ROOT

        data = DATA_ROOT / "prepared" / "synthetic-speechcommands-layout"
        if not (data / "dataset.json").is_file():
            prepare("speechcommands", speechcommands_layout(DATA_ROOT / "raw" / "synthetic-speechcommands-layout"),
                    data)
    data = (data or _default_data()).resolve()
    _ensure_default_data(data)
    r = bench_curve(data, steps=args.steps, every=args.every, seeds=tuple(args.seeds), names=tuple(args.presets))
    print(f"probe accuracy vs pretraining updates on {data.name} (one torch thread, seeds {args.seeds}):")
    for name, c in r["curves"].items():
        means = [sum(run[i] for run in c["accuracy"]) / len(c["accuracy"]) for i in range(len(c["updates"]))]
        print(f"  {name:>11}: " + "  ".join(f"{u}: {m:.3f}" for u, m in zip(c["updates"], means, strict=True))
              + f"   ({c['seconds']:.0f} s)")
    _write_json(args.json, r)
    return 0


def _add_bench_embed(which: argparse._SubParsersAction) -> None:
    emb = which.add_parser("embed", help="asda embed's real-time factor per preset and clip length, and its "
                           "peak memory on one long clip")
    emb.add_argument("--presets", nargs="+", choices=PRESETS, default=["tiny", "base"])
    emb.add_argument("--clip-seconds", type=float, nargs="+", default=[1.0, 10.0, 60.0])
    emb.add_argument("--total-seconds", type=float, default=120.0, help="audio per clip length (default: 120)")
    emb.add_argument("--batch", type=int, default=8, help="chunks per forward pass (default: 8)")
    emb.add_argument("--long-minutes", type=float, default=20.0, help="the long clip's length (default: 20)")
    emb.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    emb.add_argument("--json", help="also write the results to this JSON file")
    emb.set_defaults(func=_bench_embed)


def _add_bench_curve(which: argparse._SubParsersAction) -> None:
    learn = which.add_parser("curve", help="probe accuracy vs pretraining updates: the tiny preset old and new")
    learn.add_argument("--data", type=Path, help="prepared folder (default: the synthetic set)")
    learn.add_argument("--layout", choices=("synthetic", "speechcommands"), default="synthetic",
                       help="speechcommands: the synthetic classes as 1 s clips in Speech Commands' layout")
    learn.add_argument("--steps", type=int, default=200, help="pretraining updates (default: 200)")
    learn.add_argument("--every", type=int, default=50, help="updates between probes (default: 50)")
    learn.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default: 0)")
    learn.add_argument("--presets", nargs="+", choices=("old", "new", "width-aware", "preset"), default=["old", "new"],
                       help="tiny preset before/after sizing (alpha 0.5), width-aware init, the preset as it is now")
    learn.add_argument("--json", help="also write the results to this JSON file")
    learn.set_defaults(func=_bench_curve)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    which = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    step = which.add_parser("step", help="one pretraining update: differential vs standard attention")
    step.add_argument("--preset", choices=PRESETS, default="tiny")
    step.add_argument("--batch", type=int, default=8, help="clips per update (default: 8)")
    step.add_argument("--repeats", type=int, default=10, help="timed updates per variant (default: 10)")
    step.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    step.add_argument("--compile", action="store_true", help="compile the model as asda pretrain --compile does")
    step.add_argument("--precision", choices=PRECISIONS, help="default: bf16 on cuda, fp32 on cpu")
    step.add_argument("--trainer", action="store_true",
                      help="also run asda pretrain at the same settings on a synthetic set and report its clips/s")
    step.add_argument("--trainer-steps", type=int, default=40, help="updates of the --trainer run (default: 40)")
    step.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    step.add_argument("--profile", action="store_true",
                      help="instead: count the operator calls of each stage of one update (torch.profiler, CPU)")
    step.add_argument("--json", help="also write the results to this JSON file")
    step.add_argument("overrides", nargs="*", metavar="field=value", help="ASDAConfig fields to override")
    step.set_defaults(func=_bench_step)
    attn = which.add_parser("attention", help="one attention layer: standard vs differential vs naive (maps)")
    attn.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    attn.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      help="compute dtype (default: float32 on CPU, bfloat16 autocast on CUDA)")
    attn.add_argument("--seq-lens", default="103,513,1025", help="comma-separated (default: 103,513,1025)")
    attn.add_argument("--batch", type=int, help="sequences per step (default: 2 on CPU, 8 on CUDA)")
    attn.add_argument("--repeats", type=int, default=5, help="timed steps per version (default: 5)")
    attn.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    attn.add_argument("--versions", default="standard,differential,naive",
                      help="comma-separated among standard, differential, naive, stacked")
    attn.add_argument("--json", help="also write the results to this JSON file")
    attn.set_defaults(func=_bench_attention)
    data = which.add_parser("data", help="prepare throughput vs bare torchaudio fbank, and the feed's rate")
    data.add_argument("--clips", type=int, default=320, help="synthetic clips to prepare (default: 320)")
    data.add_argument("--batch", type=int, default=32, help="feed batch size (default: 32)")
    data.add_argument("--epochs", type=int, default=2, help="passes over the prepared split (default: 2)")
    data.add_argument("--sample-rate", type=int, default=16_000,
                      help="sample rate of the synthetic clips (default: 16000; 44100 exercises resampling)")
    data.add_argument("--profile", action="store_true",
                      help="also time each stage in one process and list cProfile's busiest functions")
    data.add_argument("--json", help="also write the results to this JSON file")
    data.set_defaults(func=_bench_data)
    _add_bench_embed(which)
    sweep = which.add_parser("sweep", help="a grid from scratch: per trial wall, training-loop and overhead time")
    sweep.add_argument("--grid", default="smoke", help="grid name or YAML file (default: smoke)")
    sweep.add_argument("--path", choices=("auto", "in_process", "distributed"), default="auto",
                       help="where single-worker trials train (default: auto = in process)")
    sweep.add_argument("--steps", type=int, help="override the grid's updates per trial")
    sweep.add_argument("--max-concurrent", type=int, help="trials at a time (default: the sweep's)")
    sweep.add_argument("--json", help="also write the results to this JSON file")
    sweep.set_defaults(func=_bench_sweep)
    _add_bench_curve(which)


def _location(value: str | Path) -> Path | str:
    """A folder, or a URI pyarrow's filesystems know (file://, s3://, ...); local ones as absolute paths."""
    from .data.storage import normalise

    return normalise(value)


def _prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare
    from .runtime import DATA_ROOT

    if args.source is None and args.dataset != "synthetic":
        raise ValueError(f"--source is required for --dataset {args.dataset} (the folder as its release lays it out)")
    source = args.source or DATA_ROOT / "raw" / args.dataset
    out = args.out or DATA_ROOT / "prepared" / args.dataset
    from .data.adapters import parse_options

    card = prepare(args.dataset, source, out, force=args.force, shard_mb=args.shard_mb,
                   max_rejected=args.max_rejected, options=parse_options(args.dataset, args.option),
                   target_length=args.target_length)
    print(f"{out}: {card['num_clips']} clips {card['splits']}, {len(card['class_names'])} classes, "
          f"{len(card['shards'])} shard(s), {len(card['rejected'])} rejected")
    for r in card["rejected"][:20]:
        print(f"  rejected {r['path']}: {r['reason']}")
    if len(card["rejected"]) > 20:
        print(f"  ... and {len(card['rejected']) - 20} more (see {out}/dataset.json)")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="audio -> fbank Parquet shards + dataset.json, in parallel on Ray Data")
    p.add_argument("--dataset", choices=DATASETS, default="synthetic",
                   help="source layout (default: synthetic, generated if missing)")
    p.add_argument("--source", type=Path, help="the data set as its release lays it out "
                   "(default for synthetic: data/raw/synthetic)")
    p.add_argument("--out", type=_location,
                   help="output folder or URI, e.g. /shared/as2m, file:///shared/as2m or s3://bucket/as2m "
                   "(default: data/prepared/<dataset>)")
    p.add_argument("--force", action="store_true", help="redo a finished preparation")
    p.add_argument("--shard-mb", type=float, default=128.0, help="target shard size in MB (default: 128)")
    p.add_argument("--max-rejected", type=float, default=0.5,
                   help="fail when more than this share of clips is rejected (default: 0.5)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="adapter option, repeatable (e.g. name_pattern={ytid}.flac, num_train=2000)")
    p.add_argument("--target-length", type=int, metavar="FRAMES",
                   help="frames per clip the card says to feed the encoder, a multiple of 16 (100 frames = 1 s; "
                   "default: the data set's own, or for folder and manifest fitted to the clips' lengths)")
    _add_verbose(p)
    p.set_defaults(func=_prepare)


def _verify(args: argparse.Namespace) -> int:
    from .data.card import load_card
    from .data.feed import verify_shards

    folder = args.prepared
    card = load_card(folder)
    shards = verify_shards(folder, card)
    hashed = sum("sha256" in s for s in card["shards"])
    print(f"{folder}: {len(shards)} shard(s), {card['num_clips']} clips intact (sizes, footers, row counts"
          f"{', content hashes' if hashed == len(shards) else ''}{'' if hashed else '; this card has no hashes'})")
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a prepared folder's shards against its card (exit 2 naming a bad one)")
    p.add_argument("prepared", type=_location, help="the prepared folder or URI (holds dataset.json)")
    p.set_defaults(func=_verify)


def _model_config(args: argparse.Namespace):
    from model import ASDAConfig

    config = ASDAConfig.from_yaml(args.config) if args.config else ASDAConfig.preset(args.preset)
    return config.with_overrides(args.overrides)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's, Ray Data's and Tune's own output here (default: in Ray's log files)")


def _add_model_args(p: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    p.add_argument("--preset", choices=PRESETS, default=default_preset,
                   help=f"model preset (default: {default_preset}; base = the paper's 92 M encoder)")
    p.add_argument("--config", type=Path, help="YAML file of ASDAConfig fields (replaces the preset)")
    p.add_argument("overrides", nargs="*", metavar="field=value",
                   help="ASDAConfig fields to override, e.g. diff_lambda=0.5 num_students=8")


def _default_data() -> Path:
    from .runtime import DATA_ROOT

    return DATA_ROOT / "prepared" / "synthetic"


def _ensure_default_data(data: Path) -> None:
    """The embedded default: prepare the synthetic set on first use."""
    if data == _default_data() and not (data / "dataset.json").is_file():
        from .data.prepare import prepare
        from .runtime import DATA_ROOT

        print(f"preparing the synthetic data set into {data} (first use)")
        prepare("synthetic", DATA_ROOT / "raw" / "synthetic", data)


def _default(value, recipe: bool = False) -> str:
    return "the recipe's" if recipe else f"{value:g}" if isinstance(value, float) else str(value)


def _add_train_args(p: argparse.ArgumentParser, *, steps: int | None, batch: int | None, lr: float | None,
                    warmup: int | None) -> None:
    """The training flags; None as a default: the fine-tuning recipe's value (pipelines.recipes)."""
    p.add_argument("--data", type=_location,
                   help="prepared folder or URI (default: the synthetic set, prepared if missing)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP ranks; default: 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    p.add_argument("--cpus-per-worker", type=float, help="Ray CPUs per worker (default: derived from the machine)")
    recipe = steps is None
    p.add_argument("--steps", type=int, default=steps, help=f"optimiser updates (default: {_default(steps, recipe)})")
    p.add_argument("--batch-size", type=int, default=batch,
                   help=f"clips per worker per update (default: {_default(batch, recipe)})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {_default(lr, recipe)})")
    p.add_argument("--warmup-steps", type=int, default=warmup,
                   help=f"linear warm-up updates (default: {_default(warmup, recipe)}"
                        + (", scaled to --steps)" if recipe else ")"))
    p.add_argument("--log-every", type=int, default=10, help="updates between logged metrics (default: 10)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="updates between checkpoints (default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-failures", type=int, default=1, help="worker failures to recover from (default: 1)")
    _add_length_arg(p)
    p.add_argument("--in-process", action="store_true",
                   help="train the one CPU worker in this process (Ray Train's local mode; no recovery)")
    p.add_argument("--name", help="run name; running the same name again resumes it")
    p.add_argument("--experiment", default="asda", help="MLflow experiment (default: asda)")
    p.add_argument("--storage", type=Path, help="Ray Train storage folder (default: results/)")
    _add_verbose(p)
    _add_model_args(p)


def _add_length_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-length", type=int, metavar="FRAMES",
                   help="frames per clip fed to the encoder (default: the data set's, from its card: AudioSet "
                        "1024, ESC-50 512, Speech Commands 128)")


def _length(args: argparse.Namespace) -> int | None:
    """--target-length, or a model override target_length=N, which means the same thing; None: the card's."""
    if args.target_length is not None:
        return args.target_length
    given = [o.partition("=")[2] for o in getattr(args, "overrides", None) or [] if o.partition("=")[0].strip()
             == "target_length"]
    return int(given[-1]) if given else None


def _train_settings(args: argparse.Namespace, data: Path) -> dict:
    return dict(
        data=str(data), steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, seed=args.seed, workers=args.workers,
        use_gpu=args.use_gpu, max_failures=args.max_failures, name=args.name, experiment=args.experiment,
        cpus_per_worker=args.cpus_per_worker, in_process=args.in_process, target_length=_length(args),
        **({"storage": str(args.storage)} if args.storage else {}),
    )


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import PretrainSettings, pretrain

    config = _model_config(args)
    data = _location(args.data or _default_data())
    settings = PretrainSettings(**_train_settings(args, data), resume=str(args.resume) if args.resume else None,
                                compile=args.compile, precision=args.precision,
                                stop_on_collapse=args.stop_on_collapse)
    settings = settings.resolved("pretrain")  # its name now: the command that resumes it names it
    _ensure_default_data(data)
    from .runtime import ensure_ray, stop_signals
    from .training import CollapseError, check_data

    check_data(settings)  # bad data fails here, before Ray starts
    from model.health import collapse_risk

    risk = collapse_risk(config, settings.batch_size)
    if risk:
        print(f"warning: {risk}", file=sys.stderr, flush=True)
    ensure_ray()  # connecting installs Ray's own SIGTERM handler: ours goes on top of it
    with stop_signals() as received:
        try:
            result = pretrain(config, settings)
        except KeyboardInterrupt:
            return _stopped(settings, received.get("signum", signal.SIGINT))
        except CollapseError as exc:
            print(f"asda pretrain: error: run {settings.name} stopped at its {exc}", file=sys.stderr)
            return 1
    from .tracking import run_url

    collapsed = f"; COLLAPSED at {result['collapse']}" if result["collapse"] else ""
    print(f"finished {result['name']}: step {result['metrics'].get('step')}, "
          f"loss {result['metrics'].get('loss', float('nan')):.4f}{collapsed}")
    print(f"checkpoint: {result['checkpoint']}")
    print(f"MLflow: {run_url(result['run_id'])}")
    return 0


def _stopped(settings, signum: int) -> int:
    """A stopped training run: its MLflow run KILLED, the command that continues it, exit 128 + the signal."""
    import shlex

    from . import tracking

    run_id = tracking.find_run(settings.experiment, settings.name)
    if run_id:
        tracking.end_run(run_id, "KILLED")
    named = any(a == "--name" or a.startswith("--name=") for a in sys.argv[1:])
    argv = sys.argv[1:] if named else [*sys.argv[1:], "--name", settings.name]
    print(f"run {settings.name} stopped by {signal.Signals(signum).name}; its checkpoints in "
          f"{settings.storage}/{settings.name} are kept\nresume it with: {shlex.join(['asda', *argv])}", flush=True)
    return 128 + signum


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="ASDA self-supervised pretraining on Ray Train (DDP) with MLflow")
    _add_train_args(p, steps=300, batch=8, lr=5e-4, warmup=30)
    p.add_argument("--resume", type=Path, help="start from this checkpoint (folder or .pt) in a new run")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (a C++ compiler on CPU; the first updates take longer)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="bf16 autocast or float32 (default: bf16 with --use-gpu, else fp32)")
    p.add_argument("--stop-on-collapse", action="store_true",
                   help="end the run when its collapse guard trips (default: say so, tag the run, train on)")
    p.set_defaults(func=_pretrain)


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneSettings, finetune
    from .worker import resolve_checkpoint

    data = _location(args.data or _default_data())
    checkpoint = resolve_checkpoint(args.checkpoint)
    settings = FinetuneSettings(
        **_train_settings(args, data), recipe=args.recipe, checkpoint=checkpoint, which=args.which,
        readout=args.readout, layer_decay=args.layer_decay, drop_path=args.drop_path, loss=args.loss,
        label_smoothing=args.label_smoothing, mixup=args.mixup, mixup_prob=args.mixup_prob,
        specaug_time=args.specaug_time, specaug_freq=args.specaug_freq, min_lr=args.min_lr, grad_clip=args.grad_clip,
        noise=args.noise, eval_split=args.eval_split, cv_folds=args.cv_folds, split=args.split,
        balanced_sampling=args.balanced_sampling, clips_per_pass=args.clips_per_pass)
    _ensure_default_data(data)
    result = finetune(_model_config(args), settings)
    shown = {k: round(v, 4) for k, v in result.items() if k.startswith("eval_")}
    print(f"finished {result['name']}: {shown}")
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="supervised fine-tuning on Ray Train (the release's recipe for the data "
                                        "set, SPEC §5), then evaluation")
    _add_train_args(p, steps=None, batch=None, lr=None, warmup=None)
    p.add_argument("--recipe", choices=RECIPES, default="auto",
                   help="the recipe the unset flags below come from: auto (default: the data set's: as20k or, "
                        "with --split unbalanced, as2m for AudioSet; esc50; spc2 for Speech Commands; none for any "
                        "other data set), a release recipe by name, or none (the project's generic settings)")
    p.add_argument("--checkpoint", type=Path, help="pretraining run folder (final.pt), checkpoint folder or .pt; "
                   "without it the encoder starts from random weights (the model comes from --preset)")
    p.add_argument("--which", choices=("student", "teacher"), default="student", help="encoder of the checkpoint")
    p.add_argument("--readout", choices=FINETUNE_READOUTS, default="cls",
                   help="what the head reads: the CLS output (cls, default) or the release's mean pooling of the "
                        "patch outputs, the CLS kept in the sequence (mean)")
    p.add_argument("--split", help="training split (default: the recipe's: train, unbalanced for as2m)")
    p.add_argument("--eval-split", help="evaluation split (default: test, else valid)")
    p.add_argument("--cv-folds", type=int, default=0,
                   help="k-fold cross-validation over the split's folds 1..k (ESC-50: 5); reports the mean")
    p.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay (default: 0.65)")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the last block (default: 0.1)")
    p.add_argument("--loss", choices=("ce", "bce", "bce_clip"),
                   help="ce: cross-entropy; bce: BCE per positive label; bce_clip: BCE per clip (default: the "
                        "recipe's, else the data set's: bce for multi-label, bce_clip with mixup on speechcommands, "
                        "else ce)")
    p.add_argument("--label-smoothing", type=float,
                   help="cross-entropy label smoothing, ignored under mixup (default: the recipe's)")
    p.add_argument("--mixup", type=float, help="mixup Beta(a, a) parameter; 0 = off (default: the recipe's)")
    p.add_argument("--mixup-prob", type=float, default=0.9, help="share of batches mixed (default: 0.9)")
    p.add_argument("--min-lr", type=float, help="where the cosine ends, absolute (default: the recipe's, 1e-6 for "
                                                "the release's; recipe none: 0.005 x lr)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm at this value; 0 = off (default: off, "
                                                   "as the release's fine-tuning)")
    p.add_argument("--noise", action=argparse.BooleanOptionalAction, default=None,
                   help="the release's fbank noise and ±10-frame roll (default: the recipe's: on for spc2)")
    p.add_argument("--balanced-sampling", action=argparse.BooleanOptionalAction, default=None,
                   help="class-balanced passes over the split (default: on for AudioSet's unbalanced split only)")
    p.add_argument("--clips-per-pass", type=int, default=200_000,
                   help="clips a class-balanced pass keeps on average (default: 200000)")
    p.add_argument("--specaug-time", type=float, help="largest time mask, share of frames (default: the recipe's)")
    p.add_argument("--specaug-freq", type=float, help="largest frequency mask, share of bins (default: the recipe's)")
    p.set_defaults(func=_finetune)


def _older_features(value: str) -> str:
    """``--features``, the probe's older name of ``--readout``: utterance -> cls, utterance+mean -> cls+mean."""
    older = OLDER_READOUT_NAMES
    if value not in older:
        raise argparse.ArgumentTypeError(f"{value!r} is not allowed: expected one of {list(older)} (the older "
                                         f"names of --readout {', '.join(older.values())})")
    print(f"note: --features {value} is now --readout {older[value]}", file=sys.stderr)
    return older[value]


def _probe(args: argparse.Namespace) -> int:
    from .probe import ProbeSettings, probe
    from .worker import resolve_checkpoint

    data = _location(args.data or _default_data())
    checkpoint = resolve_checkpoint(args.checkpoint)
    if checkpoint is None and not args.random_init:
        raise ValueError("give --checkpoint (a pretraining run folder or .pt file) or --random-init for the baseline")
    settings = ProbeSettings(data=str(data), checkpoint=checkpoint, which=args.which, eval_split=args.eval_split,
                             cv_folds=args.cv_folds, readout=args.readout, noise_snrs=tuple(args.noise_snrs), l2=args.l2, seed=args.seed,
                             experiment=args.experiment,
                             name=args.name, target_length=args.target_length)
    _ensure_default_data(data)
    result = probe(settings, _model_config(args) if checkpoint is None else None)
    shown = {k: round(v, 4) for k, v in result.items()
             if k.startswith(("eval_", "train_")) and k != "eval_split" and "_fold" not in k}
    print(f"probe on {result['eval_split']} ({result['num_train']} train / {result['num_eval']} eval clips): {shown}")
    print(f"MLflow run {result['run_id']}")
    return 0


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="linear probe on frozen utterance vectors (eval_accuracy / eval_map)")
    p.add_argument("--data", type=_location,
                   help="prepared folder or URI (default: the synthetic set, prepared if missing)")
    p.add_argument("--checkpoint", type=Path, help="pretraining run folder (final.pt), checkpoint folder or .pt")
    p.add_argument("--random-init", action="store_true", help="probe a randomly initialised encoder (baseline)")
    p.add_argument("--which", choices=("student", "teacher"), default="student", help="encoder of the checkpoint")
    p.add_argument("--eval-split", help="split to evaluate on (default: test, else valid)")
    p.add_argument("--cv-folds", type=int, default=0,
                   help="k-fold cross-validation over the train split's folds 1..k (ESC-50: 5); reports the mean")
    p.add_argument("--readout", choices=ENCODER_READOUTS, default="cls",
                   help="what the classifier reads per clip: the CLS output (cls, default), the release's mean "
                        "pooling of the patch outputs (mean), or both side by side (cls+mean)")
    p.add_argument("--features", dest="readout", type=_older_features, help=argparse.SUPPRESS)
    p.add_argument("--noise-snrs", type=float, nargs="+", default=[], metavar="DB",
                   help="also score the eval split with seeded white noise added at these SNRs in dB, by the "
                        "classifier fitted on clean features (e.g. --noise-snrs 10 5 0 -5)")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty of the classifier (default: 1e-3)")
    _add_length_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiment", default="asda", help="MLflow experiment (default: asda)")
    p.add_argument("--name", help="MLflow run name")
    _add_verbose(p)
    _add_model_args(p)
    p.set_defaults(func=_probe)


def _sweep(args: argparse.Namespace) -> int:
    from sweeps.driver import SWEEPS_ROOT, SweepInterrupted, run_sweep

    if args.estimate:  # what the grid costs; nothing runs (no Ray, no MLflow run, no data prepared)
        from sweeps.estimate import estimate_command

        print(estimate_command(args.grid, storage=args.storage or SWEEPS_ROOT, clips_per_s=args.clips_per_s,
                               devices=args.devices, concurrent=args.max_concurrent))
        return 0
    if args.clips_per_s is not None or args.devices is not None:
        raise ValueError("--clips-per-s and --devices go with --estimate")
    try:
        result = run_sweep(args.grid, storage=args.storage or SWEEPS_ROOT, fresh=args.fresh,
                           max_concurrent=args.max_concurrent, asha=args.asha, experiment=args.experiment,
                           sweep_id=args.sweep_id)
    except SweepInterrupted as stop:
        print(f"{stop}\nresume it with: {stop.resume}", flush=True)
        return 128 + stop.signum
    failed = [t for t in result["trials"] if t.get("error")]
    if failed:
        print(f"{len(failed)} trial(s) failed; rerun the same command to retry them:")
        for t in failed:
            print(f"  {t['cell']} seed {t['seed']}: {t['error']}")
        return 1
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run an ablation grid on Ray Tune (pretrain -> probe/finetune per trial)")
    p.add_argument("--grid", default="ablation",
                   help="grid name in sweeps/grids (ablation, factorial, smoke, paper) or a YAML file")
    p.add_argument("--fresh", action="store_true", help="start a new sweep of this grid beside the existing ones")
    p.add_argument("--sweep-id", help="resume this sweep of the grid (default: its newest unfinished one)")
    p.add_argument("--max-concurrent", type=int, help="trials at a time (default: what the resources allow)")
    p.add_argument("--asha", action="store_true", help="stop weak trials early (ASHA on the pretraining loss)")
    p.add_argument("--experiment", default="asda", help="MLflow experiment (default: asda)")
    p.add_argument("--storage", type=Path, help="where sweeps live (default: results/sweeps)")
    p.add_argument("--estimate", action="store_true",
                   help="print what the grid costs (trials, evaluations, wall time, device-hours) from a short "
                        "measured probe of its models on this machine, then exit without running anything")
    p.add_argument("--clips-per-s", type=float,
                   help="with --estimate: the centre model's pretraining clips/s per device (e.g. measured on a "
                        "GPU) instead of measuring here")
    p.add_argument("--devices", type=int,
                   help="with --estimate: the GPUs (a GPU grid) or a cluster's CPUs the sweep gets (default: this "
                        "machine's)")
    _add_verbose(p)
    p.set_defaults(func=_sweep)


def _report(args: argparse.Namespace) -> int:
    from sweeps.report import print_report, rebuild_report

    report = rebuild_report(args.sweep, data=args.data)
    print_report(report)
    print(f"written to {report['folder']}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild the ablation report of a finished sweep folder")
    p.add_argument("--sweep", type=Path, required=True, help="the sweep's folder (results/sweeps/<grid>-<id>)")
    p.add_argument("--data", type=Path, help="prepared folder for the attention figure (optional)")
    p.set_defaults(func=_report)


def _reproduce(args: argparse.Namespace) -> int:
    from sweeps.reproduce import format_result, parse_trial, reproduce

    cell, seed = parse_trial(args.trial)
    result = reproduce(args.sweep, cell, seed, experiment=args.experiment)
    print(format_result(result))
    return 0 if result["matched"] else 1


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="rerun one trial of a finished sweep standalone and compare it to the bit "
                                         "(exit 1 where it differs)")
    p.add_argument("--sweep", type=Path, required=True, help="the sweep's folder (results/sweeps/<grid>-<id>)")
    p.add_argument("--trial", required=True, metavar="CELL/SEED", help="e.g. centre/0 or diff_lambda=0.5/1")
    p.add_argument("--experiment", default="asda", help="MLflow experiment of the rerun's runs (default: asda)")
    p.set_defaults(func=_reproduce)


def _import_weights(args: argparse.Namespace) -> int:
    from model.fairseq import format_report, import_fairseq

    report = import_fairseq(args.checkpoint, args.out, which=args.which, overrides=args.overrides, force=args.force)
    print(format_report(report))
    return 0


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="warm start: a released EAT or ASDA checkpoint as this project's checkpoint")
    p.add_argument("--from", dest="source_format", choices=("fairseq",), required=True,
                   help="format of the released checkpoint (fairseq: EAT and ASDA)")
    p.add_argument("checkpoint", type=Path, help="the released checkpoint file (.pt)")
    p.add_argument("--out", type=Path, required=True,
                   help="checkpoint to write (for asda probe/finetune --checkpoint); the report goes beside it "
                   "as <out>.import.json")
    p.add_argument("--which", choices=("student", "teacher"), default="student",
                   help="student (default; the release fine-tunes from it) or the EMA teacher")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("overrides", nargs="*", metavar="field=value",
                   help="ASDAConfig fields to set after inference (e.g. num_heads=12 for a checkpoint without cfg)")
    p.set_defaults(func=_import_weights)


def _export(args: argparse.Namespace) -> int:
    from .export import export, format_summary

    card = export(args.checkpoint, args.out, which=args.which, sweep=args.sweep, force=args.force)
    print(format_summary(card))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="portable weights: a checkpoint's encoder as safetensors, with its config and "
                                      "model card (model.load_pretrained reads it)")
    p.add_argument("checkpoint", type=Path,
                   help="a pretraining run's final.pt (or its run folder), a checkpoint folder's model.pt (a "
                   "fine-tuned classifier exports its head too), or what asda import wrote")
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write: model.safetensors, config.json, card.json and README.md")
    p.add_argument("--which", choices=("student", "teacher"), default=None,
                   help="student (default) or the EMA teacher of a pretraining checkpoint; a fine-tuned or imported "
                   "checkpoint has one encoder")
    p.add_argument("--sweep", type=Path,
                   help="the sweep folder whose trials.json scored the checkpoint, for the card's evaluation "
                   "(default: the sweep folder the checkpoint lies in, if any)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier export")
    p.set_defaults(func=_export)


def _embed(args: argparse.Namespace) -> int:
    from .embed import EmbedSettings, embed

    out = embed(EmbedSettings(inputs=tuple(args.inputs), checkpoint=args.checkpoint, out=args.out,
                              readout=args.readout, timestamps=args.timestamps, batch_size=args.batch_size,
                              device=args.device, which=args.which, ray=args.ray, split=args.split,
                              force=args.force))
    print(f"{out['clips']} clip(s) embedded into {out['out']} in {out['seconds']:.1f} s ({out['engine']})"
          + (f"; {len(out['rejected'])} file(s) skipped" if out["rejected"] else ""))
    return 0


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="audio files, folders or a prepared set -> embeddings (Parquet or .npy)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="audio files and folders (searched recursively), or one prepared folder")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, a run folder (its final.pt) or an exported folder (asda export)")
    p.add_argument("--out", required=True, help="file to write: .parquet (id, path, embedding, ...) or .npy")
    p.add_argument("--readout", choices=ENCODER_READOUTS, default="cls",
                   help="the scene embedding: cls (utterance vector, default), mean, or cls+mean")
    p.add_argument("--timestamps", action="store_true",
                   help="also one embedding per 160 ms patch column with its time in ms (Parquet only)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass (default 8)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="in process: where the encoder runs (default: cuda where there is one)")
    p.add_argument("--which", choices=("student", "teacher"), default="student",
                   help="a pretraining checkpoint's student (default) or EMA teacher")
    p.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None,
                   help="on Ray Data (--ray) or in this process (--no-ray); default: Ray for more than 64 inputs")
    p.add_argument("--split", help="a prepared set's split (default: every clip)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_embed)


# The functions above that add each command's subparser, in the order `asda --help` lists them.
REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_model, _add_prepare, _add_verify, _add_pretrain, _add_probe, _add_finetune, _add_sweep, _add_report,
    _add_reproduce, _add_import, _add_export, _add_embed, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asda", description="ASDA audio self-supervised learning platform")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .console import set_verbose, show_progress

    if getattr(args, "verbose", False):
        set_verbose(True)
    show_progress(args.command in ("pretrain", "probe", "finetune", "embed"))
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # user errors: bad config, bad path, bad data
        print(f"asda {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # out of space, a tracking server away: 1, as nothing in the command is wrong; rerun it
        from .disk import DiskFull
        from .tracking_watch import TrackingUnreachable

        if not isinstance(exc, DiskFull | TrackingUnreachable):
            raise
        print(f"asda {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
