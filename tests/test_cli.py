import subprocess
import sys

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
