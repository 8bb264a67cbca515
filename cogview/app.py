"""The web demo: a Gradio app over cogview.Pipeline.

    python -m cogview.app ckpt=artifacts/demo              # or: make app
    python -m cogview.app ckpt=runs/t2i/export port=8080   # one export; every key: cogview/conf/app.yaml

Tabs: text-to-image (a gallery with caption scores, a progress bar that follows the generated
tokens, a zip of the PNGs and the results.jsonl rows infer.py writes), captioning,
super-resolution (before/after) and completion. A tab whose model is not loaded is shown
disabled with a note on how to get one. Requests wait in a bounded queue and run one model call
at a time; a bad request (empty prompt, unreadable or too large upload, a decompression bomb)
gets a message in the page, never a traceback, and the app keeps serving. Request folders and
Gradio's cached files older than cleanup.max_age_hours are deleted, so it can run for days.
"""

from __future__ import annotations

import atexit
import contextlib
import html
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from cogview.config import CONF_DIR
from cogview.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image, resize_center_crop
from cogview.exports import find_exports
from cogview.inference import jsonl, write_rows
from cogview.pipeline import Pipeline
from cogview.tokenization.layouts import TASKS
from cogview.validate import grid_side


# Before gradio is imported: no telemetry or version-check calls (the demo must work offline).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


log = logging.getLogger("cogview.app")
MAX_SEED = 2**31 - 1
HOW_TO_GET = {
    "t2i": "run `make demo` (it exports artifacts/demo/t2i) or `python train.py task=t2i ...`, "
           "then pass `ckpt=artifacts/demo` or `ckpt=<run>/export`",
    "caption": "`python train.py task=caption ...`, then copy its export to `<ckpt>/caption` "
               "(it also enables reranking and caption scores)",
    "sr": "`python train.py task=sr ...`, then copy its export to `<ckpt>/sr`",
}
# The folders DemoApp._save makes per request (tempfile.mkdtemp: a prefix + 8 random characters);
# the cleanup deletes nothing else, whatever else output_dir holds.
REQUEST_FOLDER = re.compile(r"(t2i|sr|completion)-[a-z0-9_]{8}")
REGIONS = [("下半部分 bottom half", "bottom"), ("上半部分 top half", "top"),
           ("左半部分 left half", "left"), ("右半部分 right half", "right"),
           ("矩形 box (pixels below)", "box")]


def user_error(message: str) -> gr.Error:
    """A gr.Error shown in the page as plain text (no traceback in the server log either)."""
    return gr.Error(html.escape(message), print_exception=False)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns the pipeline's ValueErrors (bad prompt, region, size) and MemoryErrors into
    messages in the page; anything else stays a server error."""
    try:
        yield
    except gr.Error:
        raise
    except (ValueError, MemoryError) as error:  # ImageDecodeError is a ValueError
        raise user_error(str(error)) from error


# ------------------------------------------------------------------------------------------------
# models


@dataclass
class DemoModels:
    """The pipelines the app serves (None where no export was given) and where each came from."""

    t2i: Pipeline | None = None
    caption: Pipeline | None = None
    sr: Pipeline | None = None
    sources: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def load(cls, ckpt: str | Path, device: str = "cpu", dtype=None,
             precision: str = "auto") -> "DemoModels":
        """Loads every export that ``find_exports(ckpt)`` finds."""
        sources = find_exports(ckpt)
        pipes = {task: Pipeline.from_pretrained(path, device=device, dtype=dtype,
                                                precision=precision)
                 for task, path in sources.items()}
        for task, path in sources.items():
            log.info("%s model: %s (%s)", task, path, pipes[task])
        return cls(sources=sources, **pipes)


# ------------------------------------------------------------------------------------------------
# input checks


def as_number(value, name: str, low: float, high: float | None = None,
              whole: bool = False) -> float:
    """A form value -> a number in [low, high] (a whole number when ``whole``), else a message."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise user_error(f"{name} is {value!r}, not a number: enter one") from None
    if whole and not number.is_integer():
        raise user_error(f"{name}={number:g} must be a whole number")
    if number < low or (high is not None and number > high):
        limit = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise user_error(f"{name}={number:g} is out of range: pick a value in {limit}")
    return number


def as_int(value, name: str, low: int, high: int | None = None) -> int:
    """A form value -> a whole number in [low, high], else a message."""
    return int(as_number(value, name, low, high, whole=True))


def check_prompt(prompt) -> str:
    """The stripped prompt; an empty one is a message asking for a description."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise user_error("提示词为空 The prompt is empty: describe the picture, e.g. "
                         "左上角有一个大的红色圆形")
    return prompt.strip()


def upload_path(payload) -> tuple[str, str] | None:
    """An uploaded image as the event receives it (a FileData dict, a path, None) ->
    (path on the server, the name the user gave it), or None when nothing was uploaded."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        path, name = payload.get("path"), payload.get("orig_name")
    else:
        path, name = getattr(payload, "path", payload), getattr(payload, "orig_name", None)
    if not path:
        return None
    return str(path), name or Path(str(path)).name


def read_upload(payload, max_side: int,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An uploaded image -> RGB PIL image; nothing uploaded, a file PIL cannot decode, an image
    above ``max_side`` pixels per side or ``max_pixels`` pixels in all (a decompression bomb;
    None: no limit) is a message (the size is read before decoding)."""
    upload = upload_path(payload)
    if upload is None:
        raise user_error("没有图片 No image: upload a PNG, JPEG or WebP image first")
    path, name = upload
    try:
        with Image.open(path) as probe:  # reads the header only
            width, height = probe.size
    except Image.DecompressionBombError:
        raise user_error(f"{name} is too large to decode safely: upload a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise user_error(f"cannot read {name}: it is not an image file this app can decode "
                         "(upload a PNG, JPEG or WebP image)") from None
    if max(width, height) > max_side:
        raise user_error(f"{name} is {width}x{height} pixels, above the limit of {max_side} "
                         f"pixels per side (upload.max_side): scale it down and upload it again")
    if max_pixels is not None and width * height > max_pixels:
        raise user_error(f"{name} is {width}x{height} = {width * height:,} pixels, above the "
                         f"limit of {max_pixels:,} pixels (upload.max_pixels): scale it down "
                         "and upload it again")
    try:
        return load_image(path, name=name, max_pixels=max_pixels)
    except ImageDecodeError as error:
        raise user_error(f"{error}: upload an intact PNG, JPEG or WebP image") from None


def token_progress(progress, desc: str, unit: str = "tokens") -> Callable[[int, int], None]:
    """A Pipeline callback(done, total) (tokens, or steps) that moves a gr.Progress bar."""
    def callback(done: int, total: int) -> None:
        progress((done, total), desc=desc, unit=unit)
    return callback


def remove_old_outputs(folder: Path, max_age_s: float, keep=frozenset(),
                       now: float | None = None) -> list[Path]:
    """Deletes the request folders in ``folder`` (REQUEST_FOLDER names: t2i-*, sr-*,
    completion-*) last modified more than ``max_age_s`` seconds ago, except those in ``keep``
    -> the folders removed. Nothing else in ``folder`` is touched."""
    now = time.time() if now is None else now
    removed = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not REQUEST_FOLDER.fullmatch(entry.name) or entry in keep or entry.is_symlink():
            continue
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:  # removed meanwhile (another sweep)
            continue
        if entry.is_dir() and age > max_age_s:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        log.info("removed %d request folder(s) older than %.1f h from %s", len(removed),
                 max_age_s / 3600, folder)
    return removed


def cleanup_settings(cfg: DictConfig) -> tuple[float | None, float]:
    """app.yaml cleanup -> (max age of a request folder in seconds or None: keep them all,
    seconds between sweeps); a value that is not a positive number is a ValueError."""
    cleanup = cfg.get("cleanup") or {}
    hours, minutes = cleanup.get("max_age_hours", 24), cleanup.get("interval_minutes", 10)
    for key, value in (("max_age_hours", hours), ("interval_minutes", minutes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value <= 0):
            raise ValueError(f"cleanup.{key}={value!r} must be a positive number"
                             + (" (null: keep every request folder)"
                                if key == "max_age_hours" else ""))
    return (None if hours is None else float(hours) * 3600), float(minutes or 10) * 60


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# request handlers


class DemoApp:
    """The request handlers behind the page, plain methods callable without a browser.

    Each model has a lock, taken in a fixed order, so requests that share a model run one
    after another even when the queue lets several run at once.
    """

    def __init__(self, models: DemoModels, cfg: DictConfig) -> None:
        self.models, self.cfg = models, cfg
        self._locks = {task: threading.Lock() for task in TASKS}
        self.max_age_s, self.sweep_interval_s = cleanup_settings(cfg)
        self._saving: set[Path] = set()  # request folders being written: never swept
        self._sweep_lock = threading.Lock()
        self._last_sweep = float("-inf")
        if cfg.get("output_dir"):
            self.output_dir = Path(cfg.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.sweep_outputs()  # what an earlier run left there
        else:
            self.output_dir = Path(tempfile.mkdtemp(prefix="cogview-app-"))
            atexit.register(shutil.rmtree, self.output_dir, ignore_errors=True)

    def sweep_outputs(self, force: bool = True) -> list[Path]:
        """Deletes request folders older than cleanup.max_age_hours (not the ones being
        written) -> the folders removed. force=False: only when cleanup.interval_minutes
        have passed since the last sweep (each request calls it: the check is cheap)."""
        if self.max_age_s is None:
            return []
        with self._sweep_lock:
            now = time.monotonic()
            if not force and now - self._last_sweep < self.sweep_interval_s:
                return []
            self._last_sweep = now
            keep = frozenset(self._saving)
        return remove_old_outputs(self.output_dir, self.max_age_s, keep)

    def _model(self, task: str) -> Pipeline:
        pipe = getattr(self.models, task)
        if pipe is None:
            raise user_error(f"no {task} model is loaded: {HOW_TO_GET[task]}")
        return pipe

    @contextlib.contextmanager
    def _using(self, *tasks: str) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for task in TASKS:  # one global order: no deadlock between requests
                if task in tasks:
                    stack.enter_context(self._locks[task])
            yield

    @property
    def max_side(self) -> int:
        return int(self.cfg.upload.max_side)

    def _read_upload(self, payload) -> Image.Image:
        """read_upload under app.yaml's upload.max_side and upload.max_pixels."""
        return read_upload(payload, self.max_side,
                           self.cfg.upload.get("max_pixels", DEFAULT_MAX_PIXELS))

    def _save(self, task: str, images: list[Image.Image], rows: list[dict],
              seed: int) -> tuple[list[str], str]:
        """PNGs + results.jsonl in a fresh folder, and a zip of both -> (PNG paths, zip path).
        Sweeps old request folders first (at most once per cleanup.interval_minutes)."""
        self.sweep_outputs(force=False)
        with self._sweep_lock:
            folder = Path(tempfile.mkdtemp(prefix=f"{task}-", dir=self.output_dir))
            self._saving.add(folder)
        try:
            paths = []
            for image, row in zip(images, rows):
                image.save(folder / row["path"])
                paths.append(str(folder / row["path"]))
            write_rows(folder / "results.jsonl", rows)
            archive = folder / f"cogview_{task}_seed{seed}.zip"
            with zipfile.ZipFile(archive, "w") as bundle:
                for name in [row["path"] for row in rows] + ["results.jsonl"]:
                    bundle.write(folder / name, name)
        finally:
            with self._sweep_lock:
                self._saving.discard(folder)
        return paths, str(archive)

    @property
    def caption_beams(self) -> int:
        """Beams for greedy captions (app.yaml caption.num_beams)."""
        return int(self.cfg.caption.get("num_beams", 1))

    def _sampling(self, section: str, temperature=None, top_k=None) -> dict:
        """temperature and top-k (0: off) from the form, else from the config section."""
        defaults = self.cfg[section]
        temperature = defaults.temperature if temperature is None else temperature
        top_k = defaults.top_k if top_k is None else top_k
        top_k = as_int(top_k, "top-k", 0)
        return {"temperature": as_number(temperature, "temperature", 0.01, 100.0),
                "top_k": top_k or None}

    # ---------------------------------------------------------------- text to image
    def generate(self, prompt: str, num_images=4, seed=0, temperature=1.0, top_k=200,
                 cfg_scale=1.0, rerank=False, num_candidates=16, progress=gr.Progress()):
        """Text-to-image -> (gallery items (PNG path, "seed s · caption score x"), zip path,
        the results.jsonl text). With rerank and a caption model: the best num_images of
        num_candidates; with a caption model every image gets its caption score."""
        pipe = self._model("t2i")
        conf = self.cfg.t2i
        prompt = check_prompt(prompt)
        num_images = as_int(num_images, "number of images", 1, conf.max_num_images)
        seed = as_int(seed, "seed", 0, MAX_SEED - conf.max_candidates)
        options = dict(self._sampling("t2i", temperature, top_k), top_p=conf.top_p,
                       cfg_scale=as_number(cfg_scale, "guidance scale", 0.0, 100.0),
                       max_inference_batch_size=self.cfg.max_inference_batch_size,
                       progress=False, callback=token_progress(progress, "generating image tokens"))
        scorer = self.models.caption
        rerank = bool(rerank) and scorer is not None
        if rerank:
            num_candidates = as_int(num_candidates, "candidates", num_images, conf.max_candidates)
        with self._using("t2i", "caption"), user_errors():
            if rerank:
                best = pipe(prompt, num_images=num_images, seed=seed, reranker=scorer,
                            num_candidates=num_candidates, **options)
                images, scores, samples = best.images, best.scores, best.samples
            else:
                images = pipe(prompt, num_images=num_images, seed=seed, **options).images
                samples = list(range(num_images))
                scores = (scorer.caption_scores(images, prompt, progress=False)
                          if scorer is not None else None)
        rows = []
        for rank, sample in enumerate(samples):
            row = {"id": 0, "prompt": prompt, "sample": sample, "seed": seed + sample,
                   "path": f"00000_{sample:03d}.png"}
            if scores is not None:
                row["caption_score"] = round(float(scores[rank]), 4)
            rows.append(row)
        paths, archive = self._save("t2i", images, rows, seed)
        gallery = [(path, f"seed {row['seed']}" + (f" · caption score {row['caption_score']:.3f}"
                                                   if "caption_score" in row else ""))
                   for path, row in zip(paths, rows)]
        return gallery, archive, jsonl(rows)

    # ---------------------------------------------------------------- captioning
    def caption(self, image, greedy=True, seed=0) -> str:
        """An uploaded image -> its caption (greedy, or sampled with ``seed``); with a t2i
        model loaded and app.yaml caption.rerank_candidates > 0, the best of it and that many
        sampled captions by the t2i model's image score (``Pipeline.caption(reranker=...)``)."""
        pipe = self._model("caption")
        picture = self._read_upload(image)
        seed = as_int(seed, "seed", 0, MAX_SEED)
        candidates = int(self.cfg.caption.get("rerank_candidates", 0))
        rerank = ({"reranker": self.models.t2i, "num_candidates": candidates}
                  if candidates > 0 and self.models.t2i is not None else {})
        with self._using("caption", *(["t2i"] if rerank else [])), user_errors():
            text = pipe.caption([picture], greedy=bool(greedy), seed=seed, progress=False,
                                num_beams=self.caption_beams if greedy else 1,
                                **self._sampling("caption"), **rerank)[0]
        return text or "(空 the model ended the caption at once)"

    # ---------------------------------------------------------------- super-resolution
    def super_resolve(self, image, prompt="", seed=0, progress=gr.Progress()):
        """An uploaded image (+ its description; empty: the caption model's caption) -> the
        (before, after) pair (before: the model's input upscaled bicubic) and a zip."""
        pipe = self._model("sr")
        picture = self._read_upload(image)
        seed = as_int(seed, "seed", 0, MAX_SEED)
        input_side = int(self.cfg.sr.get("input_side") or 8 * pipe.sr_window)
        with user_errors():
            picture = resize_center_crop(picture, input_side)
        if not (isinstance(prompt, str) and prompt.strip()) and self.models.caption is not None:
            with self._using("caption"), user_errors():
                prompt = self.models.caption.caption([picture], progress=False,
                                                     num_beams=self.caption_beams)[0]
        prompt = check_prompt(prompt)
        with self._using("sr"), user_errors():
            after = pipe.super_resolve([picture], prompt, seed=seed, progress=False,
                                       max_inference_batch_size=self.cfg.max_inference_batch_size,
                                       refine_sweeps=self.cfg.sr.get("refine_sweeps", 2),
                                       refine_candidates=self.cfg.sr.get("refine_candidates", 8),
                                       refine_codebook=self.cfg.sr.get("refine_codebook", 0),
                                       callback=token_progress(
                                           progress, "high-res codes, then refinement", "steps"),
                                       **self._sampling("sr")).images[0]
        before = picture.resize(after.size, Image.Resampling.BICUBIC)
        rows = [{"id": 0, "prompt": prompt, "sample": 0, "seed": seed, "path": "00000_000.png"}]
        _, archive = self._save("sr", [after], rows, seed)
        return (before, after), archive

    # ---------------------------------------------------------------- completion
    def complete(self, image, prompt: str, region="bottom", left=0, top=0, right=0, bottom=0,
                 num_images=4, seed=0, progress=gr.Progress()):
        """An uploaded image + prompt -> completions that redraw ``region`` (a half, or the
        box [left, top, right, bottom] in pixels of the image at the model's size), as
        (gallery items, zip path, the results.jsonl text)."""
        pipe = self._model("t2i")
        picture = self._read_upload(image)
        prompt = check_prompt(prompt)
        num_images = as_int(num_images, "number of images", 1, self.cfg.t2i.max_num_images)
        seed = as_int(seed, "seed", 0, MAX_SEED - self.cfg.t2i.max_num_images)
        side = 8 * grid_side(pipe.image_tokens)
        if region == "box":
            region = [as_int(v, name, 0, side) for v, name in
                      zip((left, top, right, bottom), ("left", "top", "right", "bottom"))]
        with self._using("t2i"), user_errors():
            images = pipe.complete(picture, prompt, region=region, num_images=num_images,
                                   seed=seed, progress=False,
                                   max_inference_batch_size=self.cfg.max_inference_batch_size,
                                   callback=token_progress(progress, "redrawn tokens"),
                                   **self._sampling("completion")).images
        rows = [{"id": 0, "prompt": prompt, "sample": i, "seed": seed + i, "region": region,
                 "path": f"00000_{i:03d}.png"} for i in range(num_images)]
        paths, archive = self._save("completion", images, rows, seed)
        gallery = [(path, f"seed {row['seed']}") for path, row in zip(paths, rows)]
        return gallery, archive, jsonl(rows)


# ------------------------------------------------------------------------------------------------
# the page


def _missing_note(task: str, what: str) -> None:
    gr.Markdown(f"**{what}: no {task} model is loaded.** To get one: {HOW_TO_GET[task]}.",
                elem_classes=["missing-model"])


def gradio_cache_cleanup(app: DemoApp) -> tuple[int, int] | None:
    """Blocks(delete_cache=(every, age)) in seconds: Gradio's copies of uploads and results
    are deleted on the same schedule as the request folders (None: cleanup.max_age_hours
    is null, keep them)."""
    if app.max_age_s is None:
        return None
    return max(1, round(app.sweep_interval_s)), max(1, round(app.max_age_s))


def build_demo(app: DemoApp) -> gr.Blocks:
    """The Blocks page: one tab per task, each wired to a DemoApp handler (API names
    /generate, /caption, /super_resolve, /complete)."""
    cfg, models = app.cfg, app.models
    have = {task: getattr(models, task) is not None for task in TASKS}
    loaded = " · ".join(f"{task}: `{models.sources[task]}`" if have[task] else f"{task}: —"
                        for task in TASKS)
    queued = dict(concurrency_id="model", concurrency_limit=cfg.queue.concurrency_limit)
    with gr.Blocks(title=cfg.title, analytics_enabled=False,
                   delete_cache=gradio_cache_cleanup(app)) as demo:
        gr.Markdown(f"# {cfg.title}\nCogView-style Chinese text-to-image. Models: {loaded}")
        with gr.Tabs():
            # ---------------------------------------------------------------- text to image
            with gr.Tab("文生图 Text to image", id="t2i"):
                if not have["t2i"]:
                    _missing_note("t2i", "Text to image")
                t2i = cfg.t2i
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="提示词 Prompt", elem_id="t2i-prompt",
                                            placeholder="左上角有一个大的红色圆形",
                                            interactive=have["t2i"])
                        with gr.Row():
                            num_images = gr.Slider(1, t2i.max_num_images, value=t2i.num_images,
                                                   step=1, label="图片数 Images")
                            seed = gr.Number(t2i.seed, precision=0, label="种子 Seed",
                                             elem_id="t2i-seed")
                        with gr.Row():
                            temperature = gr.Slider(0.05, 2.0, value=t2i.temperature, step=0.05,
                                                    label="Temperature")
                            top_k = gr.Number(t2i.top_k, precision=0, label="Top-k (0: off)")
                            cfg_scale = gr.Slider(0.0, 10.0, value=t2i.cfg_scale, step=0.5,
                                                  label="Guidance scale (1: off)")
                        with gr.Row():
                            rerank = gr.Checkbox(
                                value=bool(t2i.rerank) and have["caption"],
                                interactive=have["caption"],
                                label="Rerank by caption score" + ("" if have["caption"] else
                                                                   " (needs a caption model)"))
                            candidates = gr.Slider(1, t2i.max_candidates, step=1,
                                                   value=t2i.num_candidates,
                                                   interactive=have["caption"],
                                                   label="Candidates (rerank keeps the best)")
                        generate = gr.Button("生成 Generate", variant="primary",
                                             interactive=have["t2i"], elem_id="t2i-generate")
                    with gr.Column():
                        gallery = gr.Gallery(label="结果 Results", columns=4, format="png",
                                             elem_id="t2i-gallery")
                        download = gr.File(label="下载 Download (PNG + results.jsonl)",
                                           elem_id="t2i-download")
                        with gr.Accordion("results.jsonl", open=False):
                            rows = gr.Code(language="json", label="results.jsonl",
                                           interactive=False)
                gr.on([generate.click, prompt.submit], app.generate,
                      [prompt, num_images, seed, temperature, top_k, cfg_scale, rerank,
                       candidates], [gallery, download, rows], api_name="generate", **queued)

            # ---------------------------------------------------------------- captioning
            with gr.Tab("图像描述 Captioning", id="caption"):
                if not have["caption"]:
                    _missing_note("caption", "Captioning")
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(type="filepath", label="上传图片 Image",
                                         sources=["upload", "clipboard"],
                                         interactive=have["caption"], elem_id="caption-image")
                        with gr.Row():
                            greedy = gr.Checkbox(value=cfg.caption.greedy,
                                                 label="Greedy (off: sample with the seed)")
                            caption_seed = gr.Number(cfg.caption.seed, precision=0,
                                                     label="种子 Seed")
                        describe = gr.Button("描述 Caption", variant="primary",
                                             interactive=have["caption"],
                                             elem_id="caption-button")
                    caption_text = gr.Textbox(label="描述 Caption", elem_id="caption-output",
                                              interactive=False)
                # preprocess=False: uploads reach read_upload undecoded, so an unreadable
                # file gets its message instead of a component error.
                describe.click(app.caption, [image, greedy, caption_seed], caption_text,
                               api_name="caption", preprocess=False, **queued)

            # ---------------------------------------------------------------- super-resolution
            with gr.Tab("超分辨率 Super-resolution", id="sr"):
                if not have["sr"]:
                    _missing_note("sr", "Super-resolution")
                with gr.Row():
                    with gr.Column():
                        sr_image = gr.Image(type="filepath", label="上传图片 Image",
                                            sources=["upload", "clipboard"],
                                            interactive=have["sr"], elem_id="sr-image")
                        sr_prompt = gr.Textbox(
                            label="描述 Description" + (" (empty: the caption model's caption)"
                                                       if have["caption"] else ""),
                            interactive=have["sr"])
                        sr_seed = gr.Number(cfg.sr.seed, precision=0, label="种子 Seed")
                        upscale = gr.Button("放大 2x Upscale", variant="primary",
                                            interactive=have["sr"], elem_id="sr-button")
                    with gr.Column():
                        sr_slider = gr.ImageSlider(label="Before (bicubic) / after (sr)",
                                                   type="pil", format="png", elem_id="sr-output")
                        sr_download = gr.File(label="下载 Download (PNG + results.jsonl)")
                upscale.click(app.super_resolve, [sr_image, sr_prompt, sr_seed],
                              [sr_slider, sr_download], api_name="super_resolve",
                              preprocess=False, **queued)

            # ---------------------------------------------------------------- completion
            with gr.Tab("图像补全 Completion", id="completion"):
                if not have["t2i"]:
                    _missing_note("t2i", "Completion")
                side = 8 * grid_side(models.t2i.image_tokens) if have["t2i"] else 64
                with gr.Row():
                    with gr.Column():
                        fill_image = gr.Image(type="filepath", label="上传图片 Image",
                                              sources=["upload", "clipboard"],
                                              interactive=have["t2i"], elem_id="completion-image")
                        fill_prompt = gr.Textbox(label="提示词 Prompt",
                                                 interactive=have["t2i"])
                        region = gr.Radio(REGIONS, value=cfg.completion.region,
                                          label="重新生成的区域 Region to redraw")
                        with gr.Row():
                            box = [gr.Number(value, precision=0, label=f"{name} (px of {side})")
                                   for name, value in (("left", 0), ("top", side // 2),
                                                       ("right", side), ("bottom", side))]
                        with gr.Row():
                            fill_count = gr.Slider(1, cfg.t2i.max_num_images, step=1,
                                                   value=cfg.completion.num_images,
                                                   label="图片数 Images")
                            fill_seed = gr.Number(cfg.completion.seed, precision=0,
                                                  label="种子 Seed")
                        fill = gr.Button("补全 Complete", variant="primary",
                                         interactive=have["t2i"], elem_id="completion-button")
                    with gr.Column():
                        fill_gallery = gr.Gallery(label="结果 Results", columns=4, format="png")
                        fill_download = gr.File(label="下载 Download (PNG + results.jsonl)")
                        with gr.Accordion("results.jsonl", open=False):
                            fill_rows = gr.Code(language="json", label="results.jsonl",
                                                interactive=False)
                fill.click(app.complete,
                           [fill_image, fill_prompt, region, *box, fill_count, fill_seed],
                           [fill_gallery, fill_download, fill_rows], api_name="complete",
                           preprocess=False, **queued)
    return demo


def launch(cfg: DictConfig, models: DemoModels | None = None,
           block: bool = True) -> tuple[gr.Blocks, str]:
    """Loads the models (unless given), builds the page and serves it on cfg.host:cfg.port
    (port 0: a free one) -> (the Blocks, its local URL). block=False returns at once."""
    if models is None:
        models = DemoModels.load(cfg.ckpt, cfg.device, cfg.dtype, cfg.precision)
    app = DemoApp(models, cfg)
    demo = build_demo(app)
    demo.queue(default_concurrency_limit=cfg.queue.concurrency_limit,
               max_size=cfg.queue.max_size)
    port = int(cfg.port) or free_port(cfg.host)
    _, url, _ = demo.launch(
        server_name=cfg.host, server_port=port, share=False, inbrowser=False,
        show_error=False,  # unexpected errors say "Error", never a traceback; ours use gr.Error
        ssr_mode=False, mcp_server=False, pwa=False, quiet=not block,
        max_file_size=cfg.upload.max_file_size, allowed_paths=[str(app.output_dir)],
        footer_links=["api"], prevent_thread_lock=not block, theme=gr.themes.Default())
    return demo, url


def compose_config(overrides: list[str]) -> DictConfig:
    """cogview/conf/app.yaml with command-line overrides (key=value)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="app", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    """python -m cogview.app [key=value ...]: serves the demo until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's startup self-checks
    cfg = compose_config(list(argv if argv is not None else sys.argv[1:]))
    try:
        launch(cfg)
    except (FileNotFoundError, ValueError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    from cogview.cli import run_command  # the same --help and exit codes as `cogview app`

    sys.exit(run_command("app", sys.argv[1:]))
