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


def test_data_commands_and_help_import_no_torch_timm_or_albumentations(tmp_path):
    """`finetune --help` and `finetune data split|inspect` load only what they use: the data layer, not torch."""
    from PIL import Image

    for label in ("a", "b"):
        for i in range(4):
            (tmp_path / "d" / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (60 * i, 0, 200 if label == "a" else 0)).save(tmp_path / "d" / label / f"{i}.png")
    script = (
        "import sys, contextlib, io\n"
        "from finetune.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"    assert main(['data', 'split', {str(tmp_path / 'd')!r}, '--out', {str(tmp_path / 's.csv')!r}, '--val', '0.25', '--test', '0.25']) == 0\n"
        f"    assert main(['data', 'inspect', {str(tmp_path / 'd')!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'timm', 'albumentations', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "FINETUNE_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
