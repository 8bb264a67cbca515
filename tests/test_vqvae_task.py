"""task=vqvae through train.py, and VQ-VAE reconstruction through infer.py."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from cogview.data.images import ImageDecodeError, load_image, resize_center_crop
from cogview.modules.vqvae import VQVAE
from cogview.training import register_resolvers, train
from tests.helpers import CONF_DIR, ROOT

FAST = ["vqvae.channels=[16,32,32]", "vqvae.res_channels=16", "vqvae.num_codes=64",
        "vqvae.code_dim=16", "vqvae.num_res_blocks=1"]


def compose_train(overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="train", overrides=overrides, return_hydra_config=False)


def test_train_py_trains_and_exports_a_vqvae(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "task=vqvae", f"hydra.run.dir={out}",
               "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=2", "data.batch_size=8",
               "data.val_length=16", "data.num_workers=0", "logger=csv",
               *[f"task.{o}" for o in FAST]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = VQVAE.from_pretrained(out / "vqvae")
    assert model.num_codes == 64
    pictures = sorted((out / "samples").glob("vqvae_step*.png"))
    assert pictures and Image.open(pictures[-1]).size[0] > 64
    metrics = (out / "logs" / "metrics.csv").read_text()
    for name in ("val/psnr", "val/codebook_usage", "val/oracle_match", "train/loss"):
        assert name in metrics
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_vqvae_fast_dev_run_per_precision(tmp_path, precision):
    cfg = compose_train(["task=vqvae", f"precision={precision}", "trainer.fast_dev_run=true",
                         "data.batch_size=4", "data.num_workers=0", "logger=none",
                         f"output_dir={tmp_path}", *[f"task.{o}" for o in FAST]])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_unknown_override_is_a_clear_error(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        with pytest.raises(ConfigCompositionException) as error:
            compose(config_name="train", overrides=["trainer.max_step=3"])
    message = f"{error.value} {error.value.__cause__}"
    assert "max_step" in message and "not in struct" in message


def test_infer_py_reconstructs_images_and_reports_bad_ones(tmp_path):
    from cogview.modules.vqvae import VQVAEConfig

    VQVAE(VQVAEConfig.preset("tiny", num_codes=32)).save_pretrained(tmp_path / "vq")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (70, 45), (200, 30, 30)).save(folder / "red.png")
    Image.new("L", (32, 32), 128).save(folder / "grey.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "infer.py", "task=vqvae", f"ckpt={tmp_path / 'vq'}",
                             f"images=[{folder}]", f"output_dir={out}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_name = {row["source"].split("/")[-1]: row for row in rows}
    assert "cannot decode" in by_name["broken.png"]["error"]
    assert by_name["red.png"]["code_grid"] == [5, 8]  # 70x45 cropped to 64x40
    assert Image.open(out / by_name["grey.png"]["path"]).size == (32, 32)


def test_load_image_errors_and_modes(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot decode image x"):
        load_image(b"garbage", name="x")
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    path = tmp_path / "a.png"
    rgba.save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    image16 = Image.new("I;16", (8, 8))
    image16.putpixel((0, 0), 65535)
    assert to_rgb_pixel(image16) == (255, 255, 255)
    assert resize_center_crop(Image.new("RGB", (100, 50)), 32).size == (32, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        resize_center_crop(Image.new("RGB", (100, 50)), 30)


def to_rgb_pixel(image):
    from cogview.data.images import to_rgb

    return to_rgb(image).getpixel((0, 0))


@pytest.mark.parametrize("preset", ["tiny", "cogview"])
def test_conf_vqvae_presets_equal_the_python_presets(preset):
    from omegaconf import OmegaConf

    from cogview.modules.vqvae import VQVAEConfig

    values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "vqvae" / f"{preset}.yaml"))
    assert VQVAEConfig.from_dict(values) == VQVAEConfig.preset(preset)
