import subprocess
import sys

import pytest

from pipelines.cli import main


def test_model_command_prints_resolved_config_and_parameters(capsys):
    assert main(["model", "--preset", "tiny", "diff_lambda=0.5", "cls_position=mean"]) == 0
    out = capsys.readouterr().out
    assert "diff_lambda: 0.5" in out and "cls_position: mean" in out and "encoder parameters" in out


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
    from model.config import PRESETS
    from pipelines.cli import DATASETS
    from pipelines.cli import ENCODER_FEATURES as CLI_FEATURES
    from pipelines.cli import PRECISIONS as CLI_PRECISIONS
    from pipelines.cli import PRESETS as CLI_PRESETS
    from pipelines.data.adapters import ADAPTERS
    from pipelines.inference import ENCODER_FEATURES
    from pipelines.update import PRECISIONS

    assert CLI_PRESETS == PRESETS
    assert DATASETS == tuple(sorted(ADAPTERS))
    assert CLI_PRECISIONS == PRECISIONS
    assert CLI_FEATURES == ENCODER_FEATURES


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
