import subprocess
import sys

import pytest

from pipelines.cli import main


def test_model_command_prints_resolved_config_and_parameters(capsys):
    assert main(["model", "--preset", "tiny", "diff_lambda=0.5", "cls_position=none"]) == 0
    out = capsys.readouterr().out
    assert "diff_lambda: 0.5" in out and "cls_position: none" in out and "encoder parameters" in out


def test_bad_override_exits_2_with_the_reason(capsys):
    assert main(["model", "diff_lambda=2"]) == 2
    assert "diff_lambda=2.0" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = __import__("pathlib").Path(sys.executable).with_name("asda")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "model" in result.stdout


def test_building_the_parser_and_every_help_imports_nothing_heavy():
    """`asda --help` and `asda <command> --help` answer without importing torch, Ray, MLflow or pyarrow."""
    probe = ("import sys\n"
             "from pipelines.cli import build_parser\n"
             "parser = build_parser()\n"
             "for argv in ([], ['prepare'], ['pretrain'], ['probe'], ['finetune'], ['sweep'], ['bench', 'step']):\n"
             "    try:\n"
             "        parser.parse_args([*argv, '--help'])\n"
             "    except SystemExit:\n"
             "        pass\n"
             "heavy = sorted(m for m in ('torch', 'ray', 'mlflow', 'pyarrow', 'numpy', 'yaml') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "HEAVY []" in result.stdout, result.stdout[-500:]


def test_parser_choices_match_the_presets_and_adapters_they_name():
    from model import READOUTS
    from model.config import PRESETS
    from pipelines.cli import DATASETS, FINETUNE_READOUTS, RECIPES
    from pipelines.cli import ENCODER_READOUTS as CLI_READOUTS
    from pipelines.cli import PRECISIONS as CLI_PRECISIONS
    from pipelines.cli import PRESETS as CLI_PRESETS
    from pipelines.data.adapters import ADAPTERS
    from pipelines.inference import ENCODER_READOUTS
    from pipelines.update import PRECISIONS

    assert CLI_PRESETS == PRESETS
    assert DATASETS == tuple(sorted(ADAPTERS))
    assert CLI_PRECISIONS == PRECISIONS
    assert CLI_READOUTS == ENCODER_READOUTS and FINETUNE_READOUTS == READOUTS
    from pipelines.cli import OLDER_READOUT_NAMES
    from pipelines.inference import READOUT_ALIASES
    from pipelines.recipes import RECIPE_CHOICES

    assert RECIPES == RECIPE_CHOICES and OLDER_READOUT_NAMES == READOUT_ALIASES


def test_pretrain_takes_compile_and_precision_and_refuses_an_unknown_precision(capsys):
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--compile", "--precision", "bf16", "--use-gpu"])
    assert args.compile is True and args.precision == "bf16"
    args = build_parser().parse_args(["pretrain"])
    assert args.compile is False and args.precision is None  # None: bf16 with --use-gpu, else fp32
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["pretrain", "--precision", "fp16"])
    assert stop.value.code == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def _option_examples() -> list[str]:
    """Every ``--option KEY=VALUE`` written in the README and in `asda prepare --help`, exactly as written."""
    import re
    from pathlib import Path

    from pipelines.cli import build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    prepare = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "prepare")[1]
    helps = " ".join(prepare.format_help().split())
    found = re.findall(r"--option[ =]([a-z_]+=[^\s`,)|]+(?:,[^\s`,)|]+)*)", readme)
    found += re.findall(r"e\.g\. ([a-z_]+=\S+?)[,)]", helps)
    found += re.findall(r"e\.g\. [^)]*?, ([a-z_]+=\S+?)\)", helps)
    return sorted(set(found))


def test_every_option_example_in_the_readme_and_help_is_taken_as_typed_by_the_adapter_that_declares_it():
    from pipelines.data.adapters import ADAPTERS, adapter_options, parse_options

    examples = _option_examples()
    assert {"name_pattern={ytid}_{start}.wav", "name_pattern={ytid}.flac", "splits=balanced_train,eval",
            "classes=events"} <= set(examples), examples
    for example in examples:
        key = example.partition("=")[0]
        owners = [d for d in ADAPTERS if key in adapter_options(d)]
        assert owners, example
        for dataset in owners:
            assert parse_options(dataset, [example])[key] is not None
    # a brace pattern stays the text it is (it used to be read as YAML, where {...} is a mapping)
    assert parse_options("audioset", ["name_pattern={ytid}_{start}.wav"]) == {"name_pattern": "{ytid}_{start}.wav"}
    assert parse_options("synthetic", ["num_train=2000", "snr_min_db=6", "classes=sequences"]) == {
        "num_train": 2000, "snr_min_db": 6.0, "classes": "sequences"}
    assert parse_options("folder", ["extensions=.wav,.flac"]) == {"extensions": ".wav,.flac"}


@pytest.mark.parametrize(("dataset", "item", "says"), [
    ("synthetic", "num_train=many", "option num_train='many' for data set 'synthetic' is not allowed: expected a "
                                    "whole number"),
    ("synthetic", "snr_min_db=nan", "expected a finite number"),
    ("folder", "valid_fraction=0,1", "option valid_fraction='0,1'"),
    ("audioset", "pattern={ytid}.wav", "unknown option 'pattern' for data set 'audioset': allowed are audio_dir "
                                       "(str), name_pattern (str), splits (list)"),
    ("esc50", "fold=1", "allowed are none"),
    ("synthetic", "num_train", "must look like KEY=VALUE"),
])
def test_a_bad_option_is_refused_naming_the_key_the_value_and_what_is_allowed_without_a_traceback(
        dataset, item, says, capsys):
    from pipelines.cli import main

    assert main(["prepare", "--dataset", dataset, "--source", "/nonexistent", "--option", item]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
