"""The inference runs behind infer.py: task=vqvae (reconstruction), t2i (+ reranking), caption,
rerank, sr and complete. Under torchrun the items are split over the ranks and rank 0 writes
one results.jsonl."""

from __future__ import annotations

import codecs
import json
import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from cogview.config import INFERENCE_CONF_DIR
from cogview.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image, resize_center_crop
from cogview.data.shards import BadSample, decode_sample, resolve_shards
from cogview.data.tar_reader import TarProblem, read_tar
from cogview.eval.plots import plot_loss_curves
from cogview.eval.shapes_bench import run as run_shapes_benchmark
from cogview.exports import find_exports
from cogview.generation.completion import region_mask
from cogview.generation.superres import check_refine_args
from cogview.model_card import write_model_card
from cogview.modules.vqvae import VQVAE
from cogview.pipeline import Pipeline
from cogview.visualize import comparison_grid, image_grid, psnr, tensor_to_pil


log = logging.getLogger("cogview.infer")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
INFER_TASKS = ("vqvae", "t2i", "caption", "rerank", "sr", "complete", "eval")  # infer task=...
# What one sample may raise without stopping the run: it gets an "error" in its results.jsonl row
# (ImageDecodeError is a ValueError: unreadable, truncated or above max_pixels).
SAMPLE_ERRORS = (ImageDecodeError, FileNotFoundError, ValueError, MemoryError)


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


def open_image(cfg: DictConfig, path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB, refused from its header when it has more than
    ``cfg.max_pixels`` pixels (a decompression bomb; null: no limit) -> ImageDecodeError."""
    return load_image(path, max_pixels=cfg.get("max_pixels", DEFAULT_MAX_PIXELS))


def sample_error(row: dict, source, error: BaseException) -> None:
    """Records a failed sample: ``error`` in its row (naming the sample) and a warning."""
    message = str(error) or ("out of memory" if isinstance(error, MemoryError)
                             else type(error).__name__)
    if str(source) not in message:
        message = f"{source}: {message}"
    row["error"] = message
    log.warning("skipped %s: %s", source, message)


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

    model = VQVAE.from_pretrained(cfg.ckpt).to(cfg.device).eval()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, path in enumerate(tqdm(list_images(cfg.images), desc="reconstructing", unit="img")):
        row = {"id": index, "source": str(path)}
        try:
            image = open_image(cfg, path)
            image = resize_center_crop(image, cfg.size) if cfg.size else crop_to_multiple(image)
        except SAMPLE_ERRORS as error:
            sample_error(row, path, error)
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
    write_rows(out / "results.jsonl", rows)
    failed = sum("error" in row for row in rows)
    log.info("%d images reconstructed, %d failed; results in %s", len(rows) - failed, failed, out)
    return out


# ------------------------------------------------------------------------------------------------
# t2i


def read_text(path: Path, encoding: str, key: str) -> str:
    """The text of ``path`` in ``encoding`` (UTF-8: a leading byte-order mark is dropped).

    Bytes that are not valid in that encoding are a ValueError naming the file, the line, the
    encoding and the fix (save the file as UTF-8, or pass ``encoding=`` with its encoding).
    """
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"encoding={encoding!r} (for {key}={path}) is not a text encoding "
                         "Python knows: use e.g. utf-8, gbk, gb18030 or big5") from None
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as error:
        before = data[:error.start].decode(codec, errors="replace")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        bad = data[error.start:error.end].hex(" ")
        raise ValueError(
            f"{key}={path}: line {line}, column {column} is not valid {codec.upper()} text "
            f"(bytes {bad}); save the file as UTF-8, or pass its encoding, e.g. encoding=gbk "
            "(also gb18030, big5, utf-16)") from None


def read_prompts(cfg: DictConfig) -> list[tuple[object, str]]:
    """(id, prompt) pairs from ``prompts=[...]`` or ``prompts_file=`` (.txt: one prompt per
    line, id = line number; .jsonl: rows with "prompt" and optional "id"), read in
    ``encoding`` (default utf-8). An empty prompt or a line that is not valid in the encoding
    is a ValueError naming its line or id."""
    prompts = list(cfg.get("prompts") or [])
    prompts_file = cfg.get("prompts_file")
    if prompts and prompts_file:
        raise ValueError("give either prompts=[...] or prompts_file=..., not both")
    records: list[tuple[object, str, str]] = []  # (id, prompt, where it came from)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={path} not found")
        lines = read_text(path, cfg.get("encoding") or "utf-8", "prompts_file").splitlines()
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


def load_pipeline(cfg: DictConfig, ckpt: str | None = None, task: str | None = None):
    """The Pipeline of ``ckpt`` (default cfg.ckpt), warning when it was not exported for ``task``
    (default cfg.task.name)."""

    ckpt, task = ckpt or cfg.ckpt, task or cfg.task.name
    pipe = Pipeline.from_pretrained(ckpt, device=device_for(cfg), dtype=cfg.get("dtype"),
                                    precision=cfg.get("precision") or "auto")
    if pipe.task != task:
        log.warning("ckpt=%s was exported by a %s run but is used for %s", ckpt, pipe.task, task)
    return pipe


def jsonl(rows: list[dict]) -> str:
    """Rows as results.jsonl text: one JSON object per line, Chinese kept readable."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Writes ``jsonl(rows)`` to ``path`` in UTF-8."""
    Path(path).write_text(jsonl(rows), encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# data parallel: under torchrun every rank takes items rank, rank + world, ... and rank 0 merges


class RankWork:
    """Splits work over torchrun processes (one process: everything on rank 0) and merges rows.

    Items are dealt round-robin (item i to rank i % world), every rank writes its files under
    their global index, and rank 0 writes one results.jsonl in the original order.
    """

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started = False
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
            self.started = True

    def mine(self, count: int) -> list[int]:
        """The global indices of the items this rank runs."""
        return list(range(self.rank, count, self.world))

    def same_value(self, value):
        """Rank 0's value on every rank (e.g. a time-stamped output_dir)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def merge(self, rows: list[dict], key=lambda row: row["_order"]) -> list[dict] | None:
        """Every rank's rows -> all rows sorted by ``key`` on rank 0 (None on the others)."""
        if self.world > 1:
            gathered = [None] * self.world if self.rank == 0 else None
            torch.distributed.gather_object(rows, gathered, dst=0)
            if self.rank != 0:
                return None
            rows = [row for part in gathered for row in part]
        rows = sorted(rows, key=key)
        for row in rows:
            row.pop("_order", None)
        return rows

    def close(self) -> None:
        if self.started:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def device_for(cfg: DictConfig) -> str:
    """cfg.device, with cuda mapped to this process's GPU under torchrun."""
    device = str(cfg.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def prepare_output(cfg: DictConfig, ranks: RankWork) -> Path:
    out = Path(ranks.same_value(str(cfg.output_dir)))
    out.mkdir(parents=True, exist_ok=True)
    return out


def finish(out: Path, rows: list[dict], ranks: RankWork, what: str) -> Path:
    """Merges the ranks' rows into out/results.jsonl (rank 0) and logs a summary."""
    merged = ranks.merge(rows)
    if merged is not None:
        write_rows(out / "results.jsonl", merged)
        failed = sum("error" in row for row in merged)
        log.info("%s: %d rows (%d failed) from %d process(es) in %s", what, len(merged), failed,
                 ranks.world, out)
    return out


# ------------------------------------------------------------------------------------------------
# t2i (with optional reranking)


def text_to_image(cfg: DictConfig, ranks: RankWork) -> Path:
    """task=t2i: num_samples images per prompt -> PNGs, a grid per prompt and results.jsonl
    (id, prompt, sample, seed, path; paths relative to output_dir). With rerank.ckpt (a caption
    export): num_candidates per prompt, the ``keep`` best by caption score, with their scores."""

    records = read_prompts(cfg)  # every prompt checked before the model is loaded
    rerank_ckpt = (cfg.get("rerank") or {}).get("ckpt")
    pipe = load_pipeline(cfg)
    reranker = load_pipeline(cfg, rerank_ckpt, "caption") if rerank_ckpt else None
    out = prepare_output(cfg, ranks)
    mine = ranks.mine(len(records))
    rows = []
    if mine:
        kwargs = dict(seed=cfg.seed, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                      cfg_scale=cfg.cfg_scale, image_tokens=cfg.get("image_tokens"),
                      max_inference_batch_size=cfg.max_inference_batch_size)
        prompts = [records[i][1] for i in mine]
        if reranker is None:
            output = pipe(prompts, num_images=cfg.num_samples, **kwargs)
        else:
            output = pipe(prompts, num_images=cfg.keep, reranker=reranker,
                          num_candidates=cfg.num_candidates, **kwargs)
        results = zip(output.per_prompt, output.scores_per_prompt or [None] * len(prompts))
        for index, (samples, scores) in zip(mine, results):
            row_id, prompt = records[index]
            grid = f"{index:05d}_grid.png"
            image_grid(samples, columns=cfg.grid_columns or len(samples)).save(out / grid)
            for rank, image in enumerate(samples):
                sample = image.info.get("sample", rank)
                name = f"{index:05d}_{sample:03d}.png"
                image.save(out / name)
                row = {"id": row_id, "prompt": prompt, "sample": sample, "seed": cfg.seed + sample,
                       "path": name, "grid": grid, "_order": (index, rank)}
                if scores is not None:
                    row.update(caption_score=round(scores[rank], 5), rank=rank,
                               num_candidates=cfg.num_candidates)
                rows.append(row)
        log.info("rank %d: %d prompts at batch size %d", ranks.rank, len(mine),
                 pipe.batch_sizer.size)
    return finish(out, rows, ranks, "t2i")


# ------------------------------------------------------------------------------------------------
# images in: caption, rerank, sr


def read_images(cfg: DictConfig, paths: list[Path], prepare) -> list[tuple[dict, object]]:
    """(row, ``prepare(image)`` or None) per path; an image that cannot be read (missing,
    truncated, above cfg.max_pixels, out of memory) gets an "error" in its row."""
    items = []
    for index, path in enumerate(paths):
        row = {"id": index, "path": str(path), "_order": index}
        try:
            items.append((row, prepare(open_image(cfg, path))))
        except SAMPLE_ERRORS as error:
            sample_error(row, path, error)
            items.append((row, None))
    return items


def shard_codes(spec: str, limit: int | None) -> list[tuple[dict, object]]:
    """(row, code grid) per sample of pretokenized shards (``python -m cogview.data.pretokenize``),
    in shard order, at most ``limit``; a sample or shard that cannot be read gets an error row."""

    items: list[tuple[dict, object]] = []
    for url in resolve_shards(spec).urls:
        for record in read_tar(url):
            if limit is not None and len(items) >= limit:
                return items
            if isinstance(record, TarProblem):
                items.append(({"id": len(items), "shard": url, "error": record.message}, None))
                log.warning("%s", record.message)
                continue
            row = {"id": len(items), "key": record.key, "shard": url}
            try:
                sample = decode_sample(record.members, record.key, need_lowres=False)
            except BadSample as error:
                row["error"] = str(error)
                items.append((row, None))
                continue
            if sample.caption is not None:
                row["truth"] = sample.caption
            items.append((row, torch.from_numpy(sample.image_codes.astype("int64"))))
    return items


def caption_images(cfg: DictConfig, ranks: RankWork) -> Path:
    """task=caption: a caption per image -> results.jsonl (id, path, caption); an image that
    cannot be read gets an "error" in its row and the others go on. ``shards=<dir>`` captions
    the image codes of pretokenized shards instead (rows: id, key, shard, truth, caption)."""
    if cfg.get("shards"):
        if cfg.get("images"):
            raise ValueError("give either images=[...] or shards=<dir>, not both")
        return caption_shards(cfg, ranks)
    paths = list_images(cfg.images)
    pipe = load_pipeline(cfg)
    out = prepare_output(cfg, ranks)
    items = read_images(cfg, [paths[i] for i in ranks.mine(len(paths))], pipe.prepare_image)
    for (row, _), index in zip(items, ranks.mine(len(paths))):
        row["id"] = row["_order"] = index
    add_captions(cfg, pipe, items)
    return finish(out, [row for row, _ in items], ranks, "caption")


def caption_shards(cfg: DictConfig, ranks: RankWork) -> Path:
    """task=caption shards=<dir>: captions the code grids stored in pretokenized shards."""
    items = shard_codes(cfg.shards, cfg.get("limit"))
    if not items:
        raise ValueError(f"shards={cfg.shards} holds no samples")
    pipe = load_pipeline(cfg)
    out = prepare_output(cfg, ranks)
    mine = [items[i] for i in ranks.mine(len(items))]
    for row, _ in mine:
        row["_order"] = row["id"]
    add_captions(cfg, pipe, mine)
    return finish(out, [row for row, _ in mine], ranks, "caption")


def add_captions(cfg: DictConfig, pipe, items: list[tuple[dict, object]]) -> None:
    """Captions every item that has an image or code grid and stores it in its row. With
    rerank.ckpt (a t2i export) the row also gets the ``decoded`` caption before reranking and
    the kept caption's ``image_score``."""
    good = [(row, item) for row, item in items if item is not None]
    if not good:
        return
    rerank_ckpt = (cfg.get("rerank") or {}).get("ckpt")
    rerank = {} if not rerank_ckpt else {
        "reranker": load_pipeline(cfg, rerank_ckpt, "t2i"), "num_candidates": cfg.num_candidates}
    captions = pipe.caption([item for _, item in good], greedy=cfg.greedy,
                            max_len=cfg.get("max_len"), seed=cfg.seed,
                            temperature=cfg.temperature, top_k=cfg.top_k,
                            max_inference_batch_size=cfg.max_inference_batch_size,
                            num_beams=cfg.num_beams if cfg.greedy else 1,
                            cfg_scale=cfg.get("cfg_scale", 1.0), details=True, **rerank)
    for (row, _), caption in zip(good, captions):
        row["caption"] = caption["caption"]
        if rerank:
            texts = caption["candidates"]
            best = texts.index(caption["caption"]) if texts else None
            row.update(decoded=caption["decoded"], num_candidates=len(texts),
                       image_score=None if best is None else round(caption["scores"][best], 5))


def rerank_images(cfg: DictConfig, ranks: RankWork) -> Path:
    """task=rerank: caption scores of images against one prompt -> results.jsonl sorted best
    first (id, path, prompt, caption_score, rank) and a grid of the images in rank order."""

    if not str(cfg.get("prompt") or "").strip():
        raise ValueError('task=rerank needs the prompt the images are scored against: '
                         "\"prompt='左上角有一个大的红色圆形'\"")
    paths = list_images(cfg.images)
    out = prepare_output(cfg, ranks)
    if ranks.rank != 0:  # the images are ranked together: rank 0 scores them all
        return finish(out, [], ranks, "rerank")
    pipe = load_pipeline(cfg)
    items = read_images(cfg, paths, pipe.prepare_image)
    good = [(row, image) for row, image in items if image is not None]
    rows = [row for row, _ in items]
    if good:
        scores = pipe.caption_scores([image for _, image in good], cfg.prompt,
                                     max_inference_batch_size=cfg.max_inference_batch_size)
        for (row, _), score in zip(good, scores):
            row.update(prompt=cfg.prompt, caption_score=round(score, 5))
        ranked = sorted(good, key=lambda item: -item[0]["caption_score"])
        for rank, (row, _) in enumerate(ranked):
            row["rank"] = row["_order"] = rank
        for row in rows:
            row.setdefault("_order", len(good) + row["id"])  # failed images last
        image_grid([image for _, image in ranked], columns=min(8, len(ranked))).save(
            out / "ranked.png")
    return finish(out, rows, ranks, "rerank")


def sr_inputs(cfg: DictConfig) -> list[tuple[Path, str]]:
    """(image path, prompt) pairs: images=[...] with prompts=[one] or one per image, or
    from_results=<a t2i output_dir> (its images and their prompts)."""
    from_results = cfg.get("from_results")
    if from_results:
        results = Path(from_results) / "results.jsonl"
        if not results.is_file():
            raise FileNotFoundError(f"from_results={from_results}: no results.jsonl there; point "
                                    "it at an infer.py task=t2i output_dir")
        rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        return [(Path(from_results) / row["path"], row["prompt"]) for row in rows if "path" in row]
    paths = list_images(cfg.images)
    prompts = [str(p) for p in (cfg.get("prompts") or [])]
    if len(prompts) == 1:
        prompts = prompts * len(paths)
    if len(prompts) != len(paths) or not all(p.strip() for p in prompts):
        raise ValueError(f"task=sr got {len(paths)} images and {len(prompts)} prompts: give the "
                         "caption of every image (\"prompts=['红色的圆形']\" for all, or one each), "
                         "or from_results=<t2i output_dir>")
    return list(zip(paths, prompts))


def super_resolve(cfg: DictConfig, ranks: RankWork) -> Path:
    """task=sr: each image + its caption -> a 2x image (one window, or CogView's sliding 3x3
    windows for images larger than the model's window); writes <i>_sr.png, a before/after
    picture (bicubic 2x | sr) and results.jsonl (id, source, prompt, path, pair, size)."""

    pairs = sr_inputs(cfg)
    pipe = load_pipeline(cfg)
    check_refine_args(cfg.refine_sweeps, cfg.refine_candidates, cfg.refine_codebook,
                      num_codes=pipe.vocab.num_image_codes)  # not once per image
    out = prepare_output(cfg, ranks)
    rows = []
    for index in tqdm(ranks.mine(len(pairs)), desc="super-resolving", unit="img"):
        path, prompt = pairs[index]
        row = {"id": index, "source": str(path), "prompt": prompt, "_order": index}
        rows.append(row)
        try:
            image = open_image(cfg, path)
            (result,) = pipe.super_resolve(image, prompt, seed=cfg.seed + index,
                                           temperature=cfg.temperature, top_k=cfg.top_k,
                                           top_p=cfg.top_p, refine_sweeps=cfg.refine_sweeps,
                                           refine_candidates=cfg.refine_candidates,
                                           refine_codebook=cfg.refine_codebook,
                                           progress=False).images
        except SAMPLE_ERRORS as error:
            sample_error(row, path, error)
            continue
        side = result.width // 2
        bicubic = image.resize((side, side), Image.Resampling.BICUBIC) if image.size != (side, side) \
            else image
        bicubic = bicubic.resize(result.size, Image.Resampling.BICUBIC)
        name = f"{index:05d}_{path.stem}"
        result.save(out / f"{name}_sr.png")
        comparison_grid([[bicubic, result]], None, scale=1).save(out / f"{name}_pair.png")
        row.update(path=f"{name}_sr.png", pair=f"{name}_pair.png", size=list(result.size),
                   seed=cfg.seed + index, refine_sweeps=cfg.refine_sweeps,
                   refine_candidates=cfg.refine_candidates, refine_codebook=cfg.refine_codebook)
    return finish(out, rows, ranks, "sr")


# ------------------------------------------------------------------------------------------------
# completion


def parse_region(region):
    """cfg.region: "bottom" | "top" | "left" | "right" or [left, top, right, bottom] pixels."""
    if isinstance(region, str):
        return region
    return [float(v) for v in region]


def complete_image(cfg: DictConfig, ranks: RankWork) -> Path:
    """task=complete: an image, a region and a prompt -> num_samples completions, a picture
    (original | region | completions) and results.jsonl (id, prompt, sample, seed, path)."""

    if not str(cfg.get("prompt") or "").strip():
        raise ValueError("task=complete needs a prompt: \"prompt='左上角有一个大的红色圆形'\"")
    if not cfg.get("image"):
        raise ValueError("task=complete needs image=<path> (the picture to complete)")
    out = prepare_output(cfg, ranks)
    if ranks.rank != 0:  # one image: rank 0 does it
        return finish(out, [], ranks, "complete")
    pipe = load_pipeline(cfg)
    region = parse_region(cfg.region)
    try:
        original = pipe.prepare_image(open_image(cfg, cfg.image))
    except SAMPLE_ERRORS as error:  # unreadable, truncated, above max_pixels: an error row
        row = {"id": 0, "image": str(cfg.image), "prompt": cfg.prompt, "_order": 0}
        sample_error(row, cfg.image, error)
        return finish(out, [row], ranks, "complete")
    samples = pipe.complete(original, cfg.prompt, region=region,
                            num_images=cfg.num_samples, seed=cfg.seed,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            max_inference_batch_size=cfg.max_inference_batch_size).images
    rows = []
    masked = original.copy()
    mask = region_mask(region, original.height, original.width)  # the codes complete() redrew
    mask = mask.repeat_interleave(8, 0).repeat_interleave(8, 1)
    shade = Image.new("RGB", masked.size, (128, 128, 128))
    masked.paste(shade, mask=Image.fromarray(mask.numpy().astype("uint8") * 255))
    image_grid([original, masked, *samples], columns=len(samples) + 2).save(out / "grid.png")
    for sample, image in enumerate(samples):
        name = f"{sample:03d}.png"
        image.save(out / name)
        rows.append({"id": 0, "prompt": cfg.prompt, "sample": sample,
                     "seed": cfg.seed + sample, "path": name, "grid": "grid.png",
                     "region": cfg.region if isinstance(cfg.region, str) else list(cfg.region),
                     "_order": sample})
    return finish(out, rows, ranks, "complete")


# ------------------------------------------------------------------------------------------------
# the shapes-zh benchmark


def evaluate_exports(cfg: DictConfig, ranks: RankWork) -> Path:
    """task=eval: the shapes-zh benchmark on the exports under cfg.ckpt (one export, or a folder
    with t2i/, caption/, sr/ such as artifacts/demo) -> eval.json, report.md and pictures."""

    check_refine_args(cfg.sr_refine_sweeps)  # before t2i and caption spend their time
    exports = find_exports(cfg.ckpt)
    out = prepare_output(cfg, ranks)
    if ranks.rank != 0:
        return out
    pipes = {task: load_pipeline(cfg, str(path), task) for task, path in exports.items()}
    log.info("evaluating %s", ", ".join(f"{t}={p}" for t, p in exports.items()))
    results = run_shapes_benchmark(
        **pipes, out_dir=out, prompts_per_split=cfg.prompts_per_split,
        num_candidates=cfg.num_candidates, seed=cfg.seed, top_k=cfg.top_k,
        temperature=cfg.temperature, batch_size=cfg.max_inference_batch_size,
        rerank_temperature=cfg.get("rerank_temperature"), cfg_scale=cfg.get("cfg_scale", 1.0),
        fid_features=cfg.fid_features,
        is_classifier=cfg.is_classifier, caption_images=cfg.caption_images,
        sr_images=cfg.sr_images, sr_top_k=cfg.sr_top_k, sr_refine_sweeps=cfg.sr_refine_sweeps,
        caption_num_beams=cfg.caption_num_beams,
        caption_cfg_scale=cfg.get("caption_cfg_scale", 1.0),
        caption_candidates=cfg.get("caption_candidates", 0))
    runs = [Path(run) for run in (cfg.get("runs") or [])]
    if runs:

        logs = {run.name: run / "logs" / "metrics.csv" for run in runs}
        missing = [str(path) for path in logs.values() if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"runs=: no CSV log at {missing}; train with logger=csv "
                                    "(it writes <run>/logs/metrics.csv)")
        plot_loss_curves(logs, out / "loss_curves.png")
        with open(out / "report.md", "a", encoding="utf-8") as report:
            report.write("\n## Training curves\n\n![losses](loss_curves.png)\n")
    for task, path in exports.items():  # the scores go into each export's model card
        if task in results:
            write_model_card(path, scores=results[task])
    for split, result in results.get("t2i", {}).items():
        log.info("t2i %s: full match %.1f%%", split, 100 * result["one_sample"]["full_match"])
    log.info("report: %s", out / "report.md")
    return out


def infer(cfg: DictConfig) -> Path:
    """Runs the configured inference task; under torchrun the work is split over the ranks."""
    runners = {"t2i": text_to_image, "caption": caption_images, "rerank": rerank_images,
               "sr": super_resolve, "complete": complete_image, "eval": evaluate_exports}
    name = cfg.task.name
    if name == "vqvae":
        return reconstruct(cfg)
    if name not in runners:
        raise ValueError(f"infer task={name!r} is not available; choose one of {INFER_TASKS}")
    ranks = RankWork()
    try:
        return runners[name](cfg, ranks)
    finally:
        ranks.close()


@hydra.main(config_path=str(INFERENCE_CONF_DIR), config_name="infer", version_base=None)
def main(cfg: DictConfig) -> None:
    """``cogview infer`` / ``python infer.py``: Hydra app over cogview/conf/inference/infer.yaml."""
    infer(cfg)
