import subprocess
import sys

from finetune import __version__
from finetune.cli import main


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert __version__ in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "predict", "export", "data", "models"):
        assert command in out


def test_models_lists_offline_weights(capsys):
    assert main(["models", "lite0"]) == 0
    out = capsys.readouterr().out
    assert "tf_efficientnet_lite0" in out and "offline weights" in out


def test_models_with_no_match_says_so(capsys):
    assert main(["models", "no_such_net_xyz"]) == 1
    assert "no timm backbone matches" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "finetune", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
