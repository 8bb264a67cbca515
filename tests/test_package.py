"""cogview as an installed package: a wheel in a fresh virtual environment, run from a
directory outside the checkout, finds its configs and runs every command."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cogview.cli import COMMANDS, main
from tests.helpers import ROOT, TINY_MODEL


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_answers_help_with_status_0(name, capsys):
    if COMMANDS[name].hydra:  # Hydra prints and exits itself
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code in (0, None)
        assert "Configuration groups" in capsys.readouterr().out
    else:
        assert main([name, "--help"]) == 0
        assert f"usage: cogview {name}" in capsys.readouterr().out


def test_unknown_commands_and_module_mains():
    assert main([]) == 2 and main(["trian"]) == 2
    for module in ("cogview.convert", "cogview.export", "cogview.data.shapes"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                              capture_output=True, text=True)
        assert done.returncode == 0 and "keys" in done.stdout, (module, done.stderr[-500:])


@pytest.mark.slow
def test_wheel_installs_and_runs_from_outside_the_checkout(tmp_path):
    """Build the wheel, install it into a fresh venv (dependencies reused from this
    interpreter's site-packages through a .pth file), then from an empty directory: --help,
    a VQ-VAE and shards made there, one fast_dev_run of t2i training, and inference."""
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(dist)], cwd=ROOT,
                           capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = dist.glob("cogview-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.check_output(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
         "['purelib'])"], text=True).strip())
    (site / "cogview-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                                "install", "-q", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cogview = str(venv / "bin" / "cogview")

    def run(*args, timeout=600):
        done = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
        return done.stdout + done.stderr

    where = run(str(venv / "bin" / "python"), "-c", "import torch, cogview, cogview._C; "
                "print(cogview.__file__)")
    assert str(venv) in where, f"cogview imported from {where} instead of the wheel"
    assert "train" in run(cogview, "--help")
    run(str(venv / "bin" / "python"), "-c",
        "from cogview.modules.vqvae import VQVAE, VQVAEConfig; VQVAE(VQVAEConfig.preset("
        "'tiny', channels=(16, 32, 32), res_channels=16, code_dim=16, num_codes=64, "
        "num_res_blocks=1)).save_pretrained('vqvae')")
    run(cogview, "pretokenize", "vqvae_dir=vqvae", "out=shards", "source.shapes.length=32",
        "shard_size=16", "size=64", "num_workers=0", "progress=false")
    run(cogview, "train", "task=t2i", "vqvae_dir=vqvae", "data.train_shards=shards",
        "data.batch_size=4", "data.num_workers=0", "logger=csv", "task.sample_every_n_steps=0",
        "trainer.fast_dev_run=true", "precision=32-true", "export_dir=t2i-export",
        "hydra.run.dir=run", *TINY_MODEL)
    assert (work / "t2i-export" / "cogview.json").is_file()
    run(cogview, "infer", "task=t2i", "ckpt=t2i-export", "prompts=[red]", "num_samples=1",
        "output_dir=samples")
    assert list((work / "samples").glob("**/*.png"))
    python_m = run(str(venv / "bin" / "python"), "-m", "cogview", "export", "--help")
    assert "usage: cogview export" in python_m


def test_inference_and_shard_reading_do_not_import_lightning():
    """Lightning lives at the edges: inference, shard sets, the stream and the tar reader are
    usable without it (the DataModule is the thin Lightning layer over them)."""
    code = ("import sys, cogview.inference, cogview.data.shards, cogview.data.stream, "
            "cogview.data.tar_reader; "
            "assert not [m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning')], sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
