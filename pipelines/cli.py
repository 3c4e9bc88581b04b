"""The `asda` command line: one subcommand per stage. Makefile targets are thin calls of these."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _model_info(args: argparse.Namespace) -> int:
    from model import ASDAConfig, ASDAEncoder

    config = ASDAConfig.tiny() if args.preset == "tiny" else ASDAConfig()
    if args.config:
        config = ASDAConfig.from_yaml(args.config)
    config = config.with_overrides(args.overrides)
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
    p.add_argument("--preset", choices=("base", "tiny"), default="base", help="starting point (default: base)")
    p.add_argument("--config", help="YAML file of ASDAConfig fields (replaces the preset)")
    p.add_argument("overrides", nargs="*", metavar="field=value", help="ASDAConfig fields to override")
    p.set_defaults(func=_model_info)


def _bench_step(args: argparse.Namespace) -> int:
    import json

    from bench.step import bench_step
    from model import ASDAConfig

    config = (ASDAConfig.tiny() if args.preset == "tiny" else ASDAConfig()).with_overrides(args.overrides)
    report = bench_step(config, batch_size=args.batch, repeats=args.repeats, device=args.device)
    for r in report["results"]:
        print(f"{r['name']:>12}: {r['median_ms']:8.1f} ms/update  {r['clips_per_s']:7.1f} clips/s")
    print(f"differential / standard: {report['differential_over_standard']:.2f}x "
          f"(batch {args.batch}, {config.num_students} students, {report['device']}, {report['threads']} threads)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    which = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    step = which.add_parser("step", help="one pretraining update: differential vs standard attention")
    step.add_argument("--preset", choices=("base", "tiny"), default="tiny")
    step.add_argument("--batch", type=int, default=8, help="clips per update (default: 8)")
    step.add_argument("--repeats", type=int, default=10, help="timed updates per variant (default: 10)")
    step.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    step.add_argument("--json", help="also write the results to this JSON file")
    step.add_argument("overrides", nargs="*", metavar="field=value", help="ASDAConfig fields to override")
    step.set_defaults(func=_bench_step)


# Each stage module contributes a function that adds its subparser(s).
REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_add_model, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asda", description="ASDA audio self-supervised learning platform")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # user errors: bad config, bad path, bad data
        print(f"asda {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
