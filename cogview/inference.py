"""The inference runs behind infer.py: task=vqvae (reconstruction), t2i, caption."""

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
TASKS = ("vqvae", "t2i", "caption")


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


# ------------------------------------------------------------------------------------------------
# t2i


def read_prompts(cfg: DictConfig) -> list[tuple[object, str]]:
    """(id, prompt) pairs from ``prompts=[...]`` or ``prompts_file=`` (.txt: one prompt per
    line, id = line number; .jsonl: rows with "prompt" and optional "id"). An empty prompt is
    a ValueError naming its line or id."""
    prompts = list(cfg.get("prompts") or [])
    prompts_file = cfg.get("prompts_file")
    if prompts and prompts_file:
        raise ValueError("give either prompts=[...] or prompts_file=..., not both")
    records: list[tuple[object, str, str]] = []  # (id, prompt, where it came from)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={path} not found")
        lines = path.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()  # trailing blank lines are not prompts
        for number, line in enumerate(lines, start=1):
            where = f"{path}:{number}"
            if path.suffix == ".jsonl":
                if not line.strip():
                    raise ValueError(f"{where}: empty line; every line must be a JSON object "
                                     'with a "prompt"')
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: not valid JSON ({error})") from None
                if not isinstance(row, dict) or "prompt" not in row:
                    raise ValueError(f'{where}: expected an object with a "prompt" key, '
                                     f'got {line!r}')
                row_id = row.get("id", number - 1)
                records.append((row_id, row["prompt"], f"{where} (id {row_id!r})"))
            else:
                records.append((number - 1, line, f"{where} (id {number - 1})"))
    else:
        records = [(index, str(prompt), f"prompts[{index}]")
                   for index, prompt in enumerate(prompts)]
    if not records:
        raise ValueError('no prompts given: pass "prompts=[\'一只猫\']" or prompts_file=prompts.txt')
    for row_id, prompt, where in records:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"empty prompt at {where}: every prompt needs some text "
                             f"(got {prompt!r})")
    ids = [row_id for row_id, _, _ in records]
    if len(set(map(str, ids))) != len(ids):
        raise ValueError(f"prompt ids are not unique: {ids}")
    return [(row_id, prompt) for row_id, prompt, _ in records]


def load_pipeline(cfg: DictConfig):
    """The Pipeline of cfg.ckpt, checking that the export was trained for cfg.task.name."""
    from cogview.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(cfg.ckpt, device=cfg.device, dtype=cfg.get("dtype"))
    if pipe.task != cfg.task.name:
        log.warning("ckpt=%s was exported by a %s run but task=%s", cfg.ckpt, pipe.task,
                    cfg.task.name)
    return pipe


def write_rows(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, Chinese kept readable."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def text_to_image(cfg: DictConfig) -> Path:
    """task=t2i: num_samples images per prompt -> PNGs, a grid per prompt and results.jsonl
    (id, prompt, sample, seed, path; paths relative to output_dir)."""
    from cogview.visualize import image_grid

    records = read_prompts(cfg)  # every prompt checked before the model is loaded
    pipe = load_pipeline(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = pipe([prompt for _, prompt in records], num_images=cfg.num_samples, seed=cfg.seed,
                  temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                  cfg_scale=cfg.cfg_scale, image_tokens=cfg.get("image_tokens"),
                  max_inference_batch_size=cfg.max_inference_batch_size)
    rows = []
    for index, ((row_id, prompt), samples) in enumerate(zip(records, images)):
        grid = f"{index:05d}_grid.png"
        image_grid(samples, columns=cfg.grid_columns or len(samples)).save(out / grid)
        for sample, image in enumerate(samples):
            name = f"{index:05d}_{sample:03d}.png"
            image.save(out / name)
            rows.append({"id": row_id, "prompt": prompt, "sample": sample,
                         "seed": cfg.seed + sample, "path": name, "grid": grid})
    write_rows(out / "results.jsonl", rows)
    log.info("%d images for %d prompts (batch size %d) in %s", len(rows), len(records),
             pipe.batch_sizer.size, out)
    return out


# ------------------------------------------------------------------------------------------------
# caption


def caption_images(cfg: DictConfig) -> Path:
    """task=caption: a caption per image -> results.jsonl (id, path, caption); an image that
    cannot be read gets an "error" in its row and the others go on."""
    paths = list_images(cfg.images)
    pipe = load_pipeline(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, good = [], []
    for index, path in enumerate(paths):
        row = {"id": index, "path": str(path)}
        try:
            good.append((row, pipe.prepare_image(path)))
        except (ImageDecodeError, FileNotFoundError, ValueError) as error:
            row["error"] = str(error)
            log.warning("skipped %s: %s", path, error)
        rows.append(row)
    if good:
        captions = pipe.caption([image for _, image in good], greedy=cfg.greedy,
                                max_len=cfg.get("max_len"), seed=cfg.seed,
                                temperature=cfg.temperature, top_k=cfg.top_k,
                                max_inference_batch_size=cfg.max_inference_batch_size)
        for (row, _), caption in zip(good, captions):
            row["caption"] = caption
    write_rows(out / "results.jsonl", rows)
    log.info("%d images captioned, %d failed; results in %s", len(good), len(rows) - len(good), out)
    return out


def infer(cfg: DictConfig) -> Path:
    """Runs the configured inference task (vqvae, t2i or caption)."""
    runners = {"vqvae": reconstruct, "t2i": text_to_image, "caption": caption_images}
    if cfg.task.name not in runners:
        raise ValueError(f"infer task={cfg.task.name!r} is not available; choose one of {TASKS}")
    return runners[cfg.task.name](cfg)
