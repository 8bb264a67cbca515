"""The inference run behind infer.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from cogview.data.images import ImageDecodeError, load_image, resize_center_crop
from cogview.visualize import comparison_grid, psnr, tensor_to_pil

log = logging.getLogger("cogview.infer")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TASKS = ("vqvae",)


def list_images(entries) -> list[Path]:
    """Image files named directly or found (sorted) in the named folders."""
    paths: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(path)  # missing files are reported per item
    if not paths:
        raise ValueError("no images given: pass images=[file.png,folder/]")
    return paths


def crop_to_multiple(image: Image.Image, multiple: int = 8) -> Image.Image:
    """Centre-crops so both sides are multiples of ``multiple``."""
    width, height = image.size
    new_w, new_h = width - width % multiple, height - height % multiple
    if new_w == 0 or new_h == 0:
        raise ValueError(f"image of size {width}x{height} is smaller than {multiple} pixels")
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h))


@torch.no_grad()
def reconstruct(cfg: DictConfig) -> Path:
    """task=vqvae: encode each image to codes and decode it back; writes PNGs, a
    before/after picture per image and results.jsonl (PSNR, code grid, errors)."""
    from cogview.modules.vqvae import VQVAE

    model = VQVAE.from_pretrained(cfg.ckpt).to(cfg.device).eval()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, path in enumerate(tqdm(list_images(cfg.images), desc="reconstructing", unit="img")):
        row = {"id": index, "source": str(path)}
        try:
            image = load_image(path)
            image = resize_center_crop(image, cfg.size) if cfg.size else crop_to_multiple(image)
        except (ImageDecodeError, FileNotFoundError, ValueError) as error:
            row["error"] = str(error)
            log.warning("skipped %s: %s", path, error)
            rows.append(row)
            continue
        codes = model.encode(image)  # (1, h, w)
        recon = model.decode(codes)[0].cpu()  # (3, H, W)
        original = model.prepare_images(image)[0].cpu()
        name = f"{index:05d}_{path.stem}"
        tensor_to_pil(recon).save(out / f"{name}_recon.png")
        comparison_grid([[original], [recon]], ["original", "recon"]).save(out / f"{name}_pair.png")
        row.update(path=f"{name}_recon.png", pair=f"{name}_pair.png",
                   psnr=round(float(psnr(original[None], recon[None])), 3),
                   code_grid=list(codes.shape[1:]))
        rows.append(row)
    with open(out / "results.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    failed = sum("error" in row for row in rows)
    log.info("%d images reconstructed, %d failed; results in %s", len(rows) - failed, failed, out)
    return out


def infer(cfg: DictConfig) -> Path:
    """Runs the configured inference task."""
    if cfg.task.name not in TASKS:
        raise ValueError(f"infer task={cfg.task.name!r} is not available; choose one of {TASKS}")
    return reconstruct(cfg)
