"""A trained cogview model as one object: text in, images out (and images in, captions out).

    from cogview import Pipeline
    pipe = Pipeline.from_pretrained("runs/t2i/export")          # a SequenceTask.export directory
    images = pipe("左上角有一个大的红色圆形", num_images=4, seed=0).images  # 4 PIL images
    captions = pipe.caption(["a.png", "b.png"])                 # with a caption export
    best = pipe(prompt, num_images=2, reranker=caption_pipe, num_candidates=8)  # .scores too
    big = sr_pipe.super_resolve(images, prompt).images          # with an sr export: 2x side
    filled = pipe.complete("a.png", prompt, region="bottom").images  # redraw the bottom half

Seeding: sample ``i`` of every prompt is drawn with seed ``seed + i`` (its own generator), so
an image depends only on (seed, prompt, sample index), never on the batch it ran in.
"""

from __future__ import annotations

import functools
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from cogview.data.images import load_image, resize_center_crop, to_rgb
from cogview.exports import (
    EXPORT_CONFIG,
    IMAGE_TOKENIZER_DIR,
    TEXT_TOKENIZER_DIR,
    read_export_info,
    write_export_info,
)
from cogview.generation.batching import BatchSizer, run_in_batches
from cogview.generation.beam import check_num_beams
from cogview.generation.completion import known_codes, region_mask
from cogview.generation.drivers import generate_captions, generate_images
from cogview.generation.scoring import caption_log_likelihood, image_log_likelihood
from cogview.generation.superres import (
    SRSettings,
    check_refine_args,
    plan_sr_windows,
    super_resolve_codes,
)
from cogview.model_card import write_model_card
from cogview.modules.transformer import CogViewTransformer
from cogview.modules.vqvae import VQVAE, pil_to_tensor
from cogview.precision import AUTO, AUTOCAST_DTYPES, resolve_precision, warn_if_emulated
from cogview.tokenization import CogViewVocab, load_text_tokenizer
from cogview.validate import check_int, grid_side
from cogview.visualize import tensor_to_pil


log = logging.getLogger(__name__)
DEFAULT_IMAGE_TOKENS = 64  # an 8x8 code grid: 64x64 pixels, what the shapes-zh recipes train on
DTYPES = {None: None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_export(name_or_path: str | Path, revision: str | None = None,
                   cache_dir: str | Path | None = None, local_files_only: bool = False,
                   token: str | None = None) -> Path:
    """A local export directory as it is; a Hub repository id ("org/name") -> its snapshot in
    the huggingface_hub cache (downloaded unless offline or ``local_files_only``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith((".", "/")):
        raise FileNotFoundError(f"{name}: no such export directory (and not a Hub repository "
                                "id like 'org/name')")
    # deferred on purpose: only Hub ids need huggingface_hub (local exports never import it)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, token=token))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{name}: not a local directory, and not in the Hub cache "
            f"({cache_dir or 'the default cache'}) while the Hub cannot be reached (offline, "
            "HF_HUB_OFFLINE=1 or local_files_only=True): fetch it once with network access, "
            "or give an export directory") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise FileNotFoundError(f"{name} (revision {revision or 'main'}): {error}") from None
    except HfHubHTTPError as error:
        raise OSError(f"{name}: the Hub answered {error}") from None


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, a torch.dtype or a name ("bf16", "fp16", "fp32") -> torch.dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not known; use one of "
                         f"{sorted(k for k in DTYPES if k)} or null for the saved float32")
    return DTYPES[dtype]


ProgressCallback = Callable[[int, int], None]
PRECISIONS = {**AUTOCAST_DTYPES, "32-true": None}  # "auto" resolves to one of these


def mixed_precision(method):
    """Runs a Pipeline method under the pipeline's autocast precision (none for 32-true)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return method(self, *args, **kwargs)
        with torch.autocast(self.device.type, dtype=dtype):
            return method(self, *args, **kwargs)
    return wrapper


def sample_seeds(seed: int | None, generator, count: int) -> list[int]:
    """The seeds of ``count`` samples: ``seed + i`` (seed 0 by default), or from ``generator``:
    one torch.Generator gives a base seed (then + i), a list one seed per sample."""
    if generator is None:
        return [(0 if seed is None else seed) + i for i in range(count)]
    if seed is not None:
        raise ValueError("give seed= or generator=, not both")

    def draw(g: torch.Generator) -> int:
        return int(torch.randint(0, 2**31 - 1, (), generator=g))

    if isinstance(generator, torch.Generator):
        base = draw(generator)
        return [base + i for i in range(count)]
    generators = list(generator)
    if len(generators) != count or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"generator: a list of {len(generators)} for {count} samples; give one "
                         "torch.Generator per sample, or a single one")
    return [draw(g) for g in generators]


def pair_prompts(images, prompts, what: str) -> tuple[list, list[str]]:
    """One image (PIL or path) or a list, with one prompt for all or one each -> two equal
    lists; ValueError for no images or mismatched counts."""
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    images = list(images)
    prompt_list = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if not images:
        raise ValueError(f"no images given to {what}")
    if len(prompt_list) != len(images):
        raise ValueError(f"got {len(images)} images and {len(prompt_list)} prompts; pass one "
                         "prompt per image (or one str for all)")
    return images, prompt_list


class TokenProgress:
    """Turns per-chunk step callbacks into ``callback(done_tokens, total_tokens)`` for a run.

    ``chunk(rows, tokens_per_row, steps)`` returns the step callback of the next chunk: a chunk
    of ``rows`` samples that generates ``tokens_per_row`` tokens each over ``steps`` positions
    (steps > tokens when known tokens are fed in place, as in completion).
    """

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def chunk(self, rows: int, tokens_per_row: int | None = None, steps: int | None = None):
        if self.callback is None:
            return None
        start = self.done

        def step(position: int, positions: int) -> None:
            per_row = positions if tokens_per_row is None else tokens_per_row
            fraction = position / (steps or positions)
            self.done = start + round(rows * per_row * fraction)
            self.callback(min(self.done, self.total), self.total)

        return step


@dataclass
class SampleRequest:
    """One image to draw: prompt ``prompt_index``, sample ``sample`` with seed ``seed``."""

    prompt_index: int
    sample: int
    seed: int
    text_ids: list[int]


@dataclass
class PipelineOutput:
    """What every image-making call returns (``Pipeline(...)`` whatever the options,
    ``complete``, ``super_resolve``): every image in order (prompt by prompt, ``num_images``
    each; best first when reranked), each with its prompt (sr: its caption), sample index and
    seed, and the caption scores when a reranker chose them (else None)."""

    images: list[Image.Image]
    prompts: list[str]
    samples: list[int]
    seeds: list[int]
    scores: list[float] | None = None
    num_images: int = 1  # per prompt

    def _grouped(self, values: list) -> list[list]:
        return [values[i:i + self.num_images] for i in range(0, len(values), self.num_images)]

    @property
    def per_prompt(self) -> list[list[Image.Image]]:
        """The images grouped by prompt: ``[prompt][sample]``."""
        return self._grouped(self.images)

    @property
    def scores_per_prompt(self) -> list[list[float]] | None:
        return None if self.scores is None else self._grouped(self.scores)


SCORE_BATCH = 256  # (image, caption) pairs per forward when reranking captions


class Pipeline:
    """A CogViewTransformer with its text tokenizer, VQ-VAE and vocabulary, ready to sample."""

    def __init__(self, model, text_tokenizer, image_tokenizer, vocab, info: dict,
                 device: str | torch.device = "cpu", precision: str = AUTO) -> None:
        self.model = model.eval()
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer.eval()
        self.vocab = vocab
        self.info = info
        self.task = info.get("task", "t2i")
        self.max_text_len = info.get("max_text_len")
        self.text_slots = info.get("text_slots")  # None: sequential positions (CogView's)
        self.device = torch.device(device)
        if precision != AUTO and precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} must be one of {[AUTO, *PRECISIONS]}")
        self.requested_precision = precision  # "auto" is resolved again by .to(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_sizer: BatchSizer | None = None  # the last run's batch size (after backoff)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        dtype=None, precision: str = AUTO, *, torch_dtype=None,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, token: str | None = None) -> "Pipeline":
        """Loads an export: a local directory (``cogview train`` writes ``<run>/export``), or
        a Hugging Face Hub repository id ("org/name") fetched through huggingface_hub's
        ``snapshot_download`` (``revision``, ``cache_dir``, ``local_files_only``, ``token``;
        with ``HF_HUB_OFFLINE=1`` only the cache is read).

        torch_dtype: the same as ``dtype`` (the name diffusers and transformers use).
        dtype: None keeps the saved float32 weights; "bf16"/"fp16" casts the transformer (the
        VQ-VAE stays float32). precision: "auto" (default: bf16 autocast on GPUs with bf16 and
        on CPUs with native bf16, AVX512-BF16/AMX; fp16 autocast on other GPUs; else fp32, see
        cogview.precision), "bf16-mixed", "16-mixed" or "32-true". A checkpoint whose
        vocabulary does not match its tokenizers raises ValueError naming both values.
        """

        if torch_dtype is not None:
            if dtype is not None and resolve_dtype(dtype) != resolve_dtype(torch_dtype):
                raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: "
                                 "give one of them")
            dtype = torch_dtype
        export_dir = resolve_export(name_or_path, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only, token=token)
        info = read_export_info(export_dir)
        vocab = CogViewVocab.from_dict(info["vocab"])
        text_dir = export_dir / info.get("text_tokenizer", TEXT_TOKENIZER_DIR)
        text_tokenizer = load_text_tokenizer(text_dir)
        image_tokenizer = VQVAE.from_pretrained(
            export_dir / info.get("image_tokenizer", IMAGE_TOKENIZER_DIR))
        weight_dtype = resolve_dtype(dtype)
        if weight_dtype is not None and torch.device(device).type == "cpu":
            warn_if_emulated(weight_dtype, f"dtype={dtype}")
        model = CogViewTransformer.from_pretrained(export_dir, dtype=weight_dtype)
        checks = [
            ("the transformer's vocab_size", model.config.vocab_size,
             f"the vocabulary size in {EXPORT_CONFIG}", vocab.size),
            ("the VQ-VAE's num_codes", image_tokenizer.num_codes,
             f"num_image_codes in {EXPORT_CONFIG}", vocab.num_image_codes),
            ("the text tokenizer's vocab_size", text_tokenizer.vocab_size,
             f"text_vocab_size in {EXPORT_CONFIG}", vocab.text_vocab_size),
        ]
        for name_a, value_a, name_b, value_b in checks:
            if value_a != value_b:
                raise ValueError(
                    f"{export_dir}: {name_a} is {value_a} but {name_b} is {value_b}; the "
                    "checkpoint and its tokenizers come from different runs: re-export the run "
                    "(its export holds the tokenizers it was trained with)")
        model = model.to(device=device, dtype=weight_dtype)
        image_tokenizer = image_tokenizer.to(device)
        return cls(model, text_tokenizer, image_tokenizer, vocab, info, device, precision)

    def to(self, device: str | torch.device | None = None, dtype=None) -> "Pipeline":
        """Moves the pipeline (transformer and VQ-VAE) to ``device`` and/or casts the
        transformer to ``dtype``; returns it, so ``Pipeline.from_pretrained(...).to("cuda")``
        works. precision="auto" is chosen again for the new device."""
        if device is not None:
            self.device = torch.device(device)
            self.model.to(self.device)
            self.image_tokenizer.to(self.device)
            self.precision = resolve_precision(self.requested_precision, self.device)
        if dtype is not None:
            self.model.to(resolve_dtype(dtype))
        return self

    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes this pipeline as an export directory (weights, config, text tokenizer, VQ-VAE,
        cogview.json, model card) that ``from_pretrained`` loads back equal."""

        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.text_tokenizer.save(directory / TEXT_TOKENIZER_DIR)
        self.image_tokenizer.save_pretrained(directory / IMAGE_TOKENIZER_DIR)
        write_export_info(directory, {**self.info, "text_tokenizer": TEXT_TOKENIZER_DIR,
                                      "image_tokenizer": IMAGE_TOKENIZER_DIR})
        write_model_card(directory)
        return directory

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str = "Upload cogview export"):
        """Uploads the export (``save_pretrained``, model card included) to a Hub repository,
        creating it if needed; returns huggingface_hub's commit info. Refuses when offline."""

        from huggingface_hub import HfApi, is_offline_mode  # deferred: only uploads need it

        if is_offline_mode():
            raise RuntimeError(f"push_to_hub({repo_id!r}): huggingface_hub is in offline mode "
                               "(HF_HUB_OFFLINE is set); unset it on a machine that reaches the "
                               "Hub, or upload save_pretrained's directory yourself")
        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="cogview-push-") as folder:
            self.save_pretrained(folder)
            try:
                api.create_repo(repo_id, private=private, exist_ok=True)
                return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                         commit_message=commit_message)
            except OSError as error:  # no network, DNS, refused connection, ...
                raise RuntimeError(f"push_to_hub({repo_id!r}): the Hub cannot be reached: "
                                   f"{error}") from error

    @property
    def image_tokens(self) -> int:
        """Codes per image the export was trained on (cogview.json ``image_tokens``), else 64."""
        return int(self.info.get("image_tokens") or DEFAULT_IMAGE_TOKENS)

    # ------------------------------------------------------------------ t2i
    def encode_prompt(self, prompt: str, name: str = "prompt") -> list[int]:
        """A prompt -> tokenizer ids, cut to max_text_len with a warning; empty: ValueError."""
        if not isinstance(prompt, str):
            raise TypeError(f"{name} must be a str, got {type(prompt).__name__}: {prompt!r}")
        text_ids = self.text_tokenizer.encode(prompt) if prompt.strip() else []
        if not text_ids:
            raise ValueError(f"{name} is empty ({prompt!r}): give every prompt some text")
        if self.max_text_len and len(text_ids) > self.max_text_len:
            cut = len(text_ids) - self.max_text_len
            warnings.warn(f"{name} has {len(text_ids)} text tokens; cut {cut} tokens to fit "
                          f"max_text_len={self.max_text_len}: {prompt[:40]!r}...", stacklevel=3)
            text_ids = text_ids[:self.max_text_len]
        return text_ids

    @torch.inference_mode()
    @mixed_precision
    def __call__(self, prompts: str | Sequence[str], num_images: int = 4, seed: int | None = None,
                 temperature: float = 1.0, top_k: int | None = 200, top_p: float = 1.0,
                 cfg_scale: float = 1.0, max_inference_batch_size: int = 12,
                 image_tokens: int | None = None, progress: bool = True,
                 reranker: "Pipeline | None" = None, num_candidates: int | None = None,
                 callback: ProgressCallback | None = None, generator=None):
        """Text-to-image: a prompt or a list of prompts -> a ``PipelineOutput``: ``.images``,
        ``num_images`` per prompt, prompt by prompt (``.per_prompt`` groups them), with each
        image's prompt, sample index and seed. Sample i of each prompt uses seed ``seed + i``.

        Batches hold up to ``max_inference_batch_size`` samples (from any prompts) and shrink
        on out-of-memory; the result does not depend on the batch size.

        reranker: a caption Pipeline (CogView's post-selection). Draws ``num_candidates``
        (default 2 * num_images) per prompt, scores each with ``reranker.caption_scores`` and
        keeps the ``num_images`` best, best first, their scores in ``.scores``. Candidate i still
        uses seed ``seed + i``.
        callback: ``callback(done_tokens, total_tokens)`` as image codes are generated.
        generator: instead of ``seed``, a torch.Generator (a base seed is drawn from it; sample
        i of each prompt then uses base + i) or a list of them, one per image (prompts x draws).
        """
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list:
            raise ValueError("no prompts given: pass a prompt or a list of prompts")
        check_int("num_images", num_images)
        draws = num_images
        if reranker is not None:
            draws = 2 * num_images if num_candidates is None else num_candidates
            check_int("num_candidates", draws)
            if draws < num_images:
                raise ValueError(f"num_candidates={draws} is below num_images={num_images}: "
                                 "reranking keeps the best num_images of num_candidates")
        elif num_candidates is not None:
            raise ValueError("num_candidates needs a reranker (a caption Pipeline): "
                             "pipe(prompt, reranker=Pipeline.from_pretrained(caption_export))")
        image_tokens = self.image_tokens if image_tokens is None else image_tokens
        side = grid_side(image_tokens)
        names = ["prompt"] if single else [f"prompt {i}" for i in range(len(prompt_list))]
        encoded = [self.encode_prompt(p, n) for p, n in zip(prompt_list, names)]  # check all first
        if generator is not None and not isinstance(generator, torch.Generator):
            seeds = sample_seeds(seed, generator, len(prompt_list) * draws)
        else:
            seeds = sample_seeds(seed, generator, draws) * len(prompt_list)
        requests = [SampleRequest(p, i, seeds[p * draws + i], ids)
                    for p, ids in enumerate(encoded) for i in range(draws)]
        tracker = TokenProgress(callback, len(requests) * image_tokens)

        def draw(chunk: list[SampleRequest]) -> list[Image.Image]:

            codes = generate_images(
                self.model, self.vocab, [r.text_ids for r in chunk], image_tokens,
                [r.seed for r in chunk], temperature=temperature, top_k=top_k, top_p=top_p,
                cfg_scale=cfg_scale, max_text_len=self.max_text_len, text_slots=self.text_slots,
                callback=tracker.chunk(len(chunk)))  # (b, h*w)
            return self.decode_codes(codes.view(-1, side, side))

        self.batch_sizer = BatchSizer(max_inference_batch_size)
        images = run_in_batches(
            requests, draw, sizer=self.batch_sizer, desc="sampling", progress=progress,
            describe=lambda r: f"sample {r.sample} of {names[r.prompt_index]} "
                               f"({prompt_list[r.prompt_index][:40]!r})")
        if reranker is None:
            return PipelineOutput(images, [prompt_list[r.prompt_index] for r in requests],
                                  [r.sample for r in requests], [r.seed for r in requests],
                                  num_images=num_images)
        output = PipelineOutput([], [], [], [], scores=[], num_images=num_images)
        for p, prompt in enumerate(prompt_list):
            candidates = images[p * draws:(p + 1) * draws]
            scores = reranker.caption_scores(candidates, [prompt] * len(candidates),
                                             max_inference_batch_size=max_inference_batch_size,
                                             progress=False)
            for i in sorted(range(len(candidates)), key=lambda i: -scores[i])[:num_images]:
                seed_i = requests[p * draws + i].seed
                candidates[i].info.update(sample=i, seed=seed_i, caption_score=scores[i])
                output.images.append(candidates[i])
                output.prompts.append(prompt)
                output.samples.append(i)
                output.seeds.append(seed_i)
                output.scores.append(scores[i])
        return output

    def decode_codes(self, codes: torch.Tensor) -> list[Image.Image]:
        """Code grids [B, h, w] -> B PIL images through the VQ-VAE decoder."""

        pixels = self.image_tokenizer.decode(codes.to(self.device))  # (B, 3, 8h, 8w) in [0, 1]
        return [tensor_to_pil(image) for image in pixels.float().cpu()]

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Same-size RGB PIL images -> code grids LongTensor [B, h, w] (on the CPU)."""
        return self.image_tokenizer.encode(list(images)).long().cpu()

    # ------------------------------------------------------------------ completion
    @torch.inference_mode()
    @mixed_precision
    def complete(self, image: Image.Image | str | Path, prompt: str,
                 region: str | Sequence[int] = "bottom", num_images: int = 4,
                 seed: int | None = None,
                 temperature: float = 1.0, top_k: int | None = 200, top_p: float = 1.0,
                 max_inference_batch_size: int = 12, progress: bool = True,
                 callback: ProgressCallback | None = None, generator=None) -> PipelineOutput:
        """Image completion with a t2i export: keeps the image outside ``region`` and redraws
        the codes inside it ("bottom", "top", "left", "right" half, or a pixel box
        [left, top, right, bottom] of the image at the export's size) -> a ``PipelineOutput``
        with ``num_images`` images.
        The known codes come back unchanged (a code is redrawn when its 8x8 cell overlaps the
        region: ``cogview.generation.completion.region_mask(region, height, width)`` gives
        those cells); sample i uses seed ``seed + i`` (or ``generator``, as in ``__call__``)."""

        check_int("num_images", num_images)
        seeds = sample_seeds(seed, generator, num_images)
        text_ids = self.encode_prompt(prompt)
        picture = self.prepare_image(image)
        codes = self.encode_images([picture])  # (1, h, w)
        h, w = codes.shape[1:]
        mask = region_mask(region, picture.height, picture.width)
        known = known_codes(codes, mask).flatten(1)  # (1, h*w), -1 = redraw
        tracker = TokenProgress(callback, num_images * int(mask.sum()))

        def draw(samples: list[int]) -> list[Image.Image]:
            new = generate_images(
                self.model, self.vocab, [text_ids] * len(samples), h * w,
                [seeds[i] for i in samples], temperature=temperature, top_k=top_k, top_p=top_p,
                max_text_len=self.max_text_len, text_slots=self.text_slots,
                known_codes=known.expand(len(samples), -1),
                callback=tracker.chunk(len(samples), int(mask.sum()), h * w))
            return self.decode_codes(new.view(-1, h, w))

        self.batch_sizer = BatchSizer(max_inference_batch_size)
        images = run_in_batches(list(range(num_images)), draw, sizer=self.batch_sizer,
                                desc="completing", progress=progress,
                                describe=lambda i: f"completion sample {i}")
        return PipelineOutput(images, [prompt] * num_images, list(range(num_images)), seeds,
                              num_images=num_images)

    # ------------------------------------------------------------------ super-resolution
    @property
    def sr_window(self) -> int:
        """The low-res side of the sr model's window (image_tokens = (2 * window)^2)."""
        return grid_side(self.image_tokens) // 2

    @torch.inference_mode()
    @mixed_precision
    def super_resolve(self, images, prompts: str | Sequence[str], seed: int | None = None,
                      temperature: float = 1.0, top_k: int | None = 200, top_p: float = 1.0,
                      greedy: bool = False, refine_sweeps: int = 2, refine_candidates: int = 8,
                      refine_codebook: int = 0,
                      max_inference_batch_size: int = 12, progress: bool = True,
                      callback: ProgressCallback | None = None,
                      generator=None) -> PipelineOutput:
        """Token-space 2x super-resolution with an sr export: images (PIL or paths, any size
        that is a multiple of 8 pixels per window; they are centre-cropped to a square multiple
        of the window) + their captions -> a ``PipelineOutput`` of images of twice the side
        (one per input, with its caption and seed).

        An image of the model's window (e.g. 64 px for a 64 -> 128 px model) is one window;
        a larger one runs CogView's sliding 3x3 windows (each high-res code drawn once, each
        window continuing its neighbours). Image i uses seed ``seed + i`` (or ``generator``, as
        in ``__call__``); ``greedy=True`` takes
        the most likely code at every step instead (what the sr benchmark scores).

        Consistency refinement (``refine_sweeps`` > 0, the default 2): every high-res code may
        then become another of the model's ``refine_candidates`` most likely codes at its
        place, the one whose pixels, downsampled, best match the input image around it
        (`cogview.generation.superres.refine_sr_codes`). ``refine_sweeps=0``: the sampled codes.
        ``refine_codebook`` > 0 adds as many candidates without the model: the codebook entries
        nearest to the VQ-VAE's latents of the bicubic upsample.
        """

        check_refine_args(refine_sweeps, refine_candidates, refine_codebook,
                          num_codes=self.vocab.num_image_codes)
        settings = SRSettings(temperature, top_k, top_p, greedy, refine_sweeps,
                              refine_candidates, refine_codebook)

        images, prompt_list = pair_prompts(images, prompts, "super-resolve")
        seeds = sample_seeds(seed, generator, len(images))
        window_px = 8 * self.sr_window
        pictures = []
        for index, image in enumerate(images):
            picture = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
            side = min(picture.size)
            if side < window_px:
                raise ValueError(f"image {index} is {picture.width}x{picture.height}: smaller "
                                 f"than the sr model's window of {window_px} px; upscale it first")
            pictures.append(resize_center_crop(picture, side - side % 8))
        if len({p.size for p in pictures}) > 1:
            raise ValueError("images of different sizes: super-resolve each size in its own call "
                             f"(got {sorted({p.size for p in pictures})})")
        texts = [self.encode_prompt(p, f"prompt {i}") for i, p in enumerate(prompt_list)]
        lowres = self.encode_images(pictures)  # (B, L, L)
        per_image = len(plan_sr_windows(lowres.shape[1], self.sr_window)) * self.image_tokens
        # progress: the high-res codes, then as much again for the refinement when it runs
        tracker = TokenProgress(callback, len(images) * per_image * (2 if refine_sweeps else 1))
        indexed = list(range(len(images)))

        def draw(chunk: list[int]) -> list[Image.Image]:
            highres = super_resolve_codes(
                self.model, self.vocab, self.image_tokenizer, [texts[i] for i in chunk],
                lowres[chunk], torch.stack([pil_to_tensor(pictures[i]) for i in chunk]),
                self.sr_window, [seeds[i] for i in chunk], settings,
                max_text_len=self.max_text_len, text_slots=self.text_slots,
                progress=lambda stage: tracker.chunk(len(chunk), per_image))
            return self.decode_codes(highres)

        self.batch_sizer = BatchSizer(max_inference_batch_size)
        results = run_in_batches(indexed, draw, sizer=self.batch_sizer, desc="super-resolving",
                                 progress=progress, describe=lambda i: f"image {i}")
        return PipelineOutput(results, prompt_list, [0] * len(results), seeds)

    # ------------------------------------------------------------------ caption scores
    @torch.inference_mode()
    @mixed_precision
    def caption_scores(self, images, prompts: str | Sequence[str],
                       max_inference_batch_size: int = 12, progress: bool = True) -> list[float]:
        """Caption score with a caption export: mean log P(prompt tokens | image) per
        (image, prompt) pair; higher means the caption fits the image better."""

        images, prompt_list = pair_prompts(images, prompts, "score")
        pictures = [self.prepare_image(image) for image in images]
        texts = [self.encode_prompt(p, f"prompt {i}") for i, p in enumerate(prompt_list)]

        def score(chunk: list[int]) -> list[float]:
            codes = self.encode_images([pictures[i] for i in chunk]).flatten(1)  # (b, h*w)
            values = caption_log_likelihood(self.model, self.vocab, list(codes),
                                            [texts[i] for i in chunk],
                                            max_text_len=self.max_text_len,
                                            text_slots=self.text_slots,
                                            loss_vocab=self.loss_vocab,
                                            end_ids=self.caption_end_ids)
            return [float(v) for v in values]

        self.batch_sizer = BatchSizer(max_inference_batch_size)
        return run_in_batches(list(range(len(pictures))), score, sizer=self.batch_sizer,
                              desc="scoring", progress=progress, describe=lambda i: f"image {i}")

    # ------------------------------------------------------------------ caption
    @property
    def loss_vocab(self) -> str:
        """The vocabulary the model was trained over (exports before it was recorded: full)."""
        return self.info.get("loss_vocab") or "full"

    @property
    def caption_end_ids(self) -> list[int]:
        """The caption end token the captioner learned, if any (its cogview.json)."""
        token = self.info.get("caption_end_token")
        return [self.vocab.command(token)] if token else []

    @property
    def caption_stop_id(self) -> int | None:
        """The id that ends a caption: the export's caption_end_token; else [SEP] for models
        trained over the full vocabulary, and none for span models (they never scored a stop
        id, so their captions run to ``max_len``)."""
        if self.caption_end_ids:
            return self.caption_end_ids[0]
        return None if self.loss_vocab == "span" else self.vocab.sep_id

    def prepare_image(self, image: Image.Image | str | Path) -> Image.Image:
        """A PIL image or a path -> RGB, resized and centre-cropped to the training size."""

        image = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
        return resize_center_crop(image, 8 * grid_side(self.image_tokens))

    @torch.inference_mode()
    @mixed_precision
    def caption(self, images, greedy: bool = True, max_len: int | None = None, seed: int = 0,
                temperature: float = 1.0, top_k: int | None = 200,
                max_inference_batch_size: int = 12, progress: bool = True,
                num_beams: int = 1, cfg_scale: float = 1.0,
                reranker: "Pipeline | None" = None, num_candidates: int | None = None,
                details: bool = False) -> list:
        """Image captioning: PIL images, paths or code grids (LongTensor [h, w], e.g. from
        pretokenized shards) -> one caption each (image i: seed ``seed + i`` when sampling).
        Captions end at the end token (``caption_stop_id``: the export's, else [SEP] for
        full-vocabulary models) or after ``max_len`` tokens (default: the export's
        max_text_len). ``num_beams`` > 1 (with ``greedy=True``): the most likely caption found
        by beam search, not the greedy one. ``cfg_scale`` != 1: classifier-free guidance against
        the caption without its image (for captioners trained with ``task.image_dropout``).

        reranker: a t2i Pipeline (noisy-channel reranking). Beside the caption decoded as above,
        ``num_candidates`` (default 16) captions per image are sampled (``temperature``,
        ``top_k``, no guidance; candidate k of image i uses seed ``seed + (k + 1) * N + i`` for
        N images), and the caption kept is the one under which the t2i model finds the image
        most likely (``reranker.image_scores``; ties keep the decoded caption). A t2i model
        binds attributes to objects the captioner may mix up: it tells the right candidate
        from a near miss. details=True: a dict per image instead of a str, with the
        ``caption``, the ``decoded`` caption before reranking, the distinct ``candidates`` and
        their ``scores``.
        """

        check_num_beams(num_beams, greedy or temperature == 0)
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        items = [image if isinstance(image, torch.Tensor) else self.prepare_image(image)
                 for image in images]  # code grids [h, w] pass through
        if not items:
            raise ValueError("no images given to caption")
        draws = self._check_caption_reranker(reranker, num_candidates, items)
        max_len = max_len or self.max_text_len or 64
        indexed = list(enumerate(items))

        def decode(ids_list: list[list[int]]) -> list[str]:
            return [self.text_tokenizer.decode(ids) for ids in ids_list]

        def describe(chunk: list[tuple[int, object]]) -> list:
            pictures = [item for _, item in chunk if not isinstance(item, torch.Tensor)]
            encoded = iter(self.encode_images(pictures).flatten(1)) if pictures else iter(())
            codes = [item.flatten().long() if isinstance(item, torch.Tensor) else next(encoded)
                     for _, item in chunk]
            texts = decode(generate_captions(
                self.model, self.vocab, codes, max_len,
                [seed + index for index, _ in chunk], greedy=greedy, stop_id=self.caption_stop_id,
                temperature=temperature, top_k=top_k, text_slots=self.text_slots,
                num_beams=num_beams, cfg_scale=cfg_scale))
            if reranker is None:
                return [{"caption": t} for t in texts] if details else texts
            sampled = decode(generate_captions(
                self.model, self.vocab, codes * draws, max_len,
                [seed + (k + 1) * len(items) + index for k in range(draws) for index, _ in chunk],
                greedy=False, stop_id=self.caption_stop_id, temperature=temperature, top_k=top_k,
                text_slots=self.text_slots))
            return self._rerank_captions(reranker, chunk, texts, sampled, details)

        self.batch_sizer = BatchSizer(max_inference_batch_size)
        return run_in_batches(indexed, describe, sizer=self.batch_sizer, desc="captioning",
                              progress=progress, describe=lambda item: f"image {item[0]}")

    def _check_caption_reranker(self, reranker: "Pipeline | None", num_candidates: int | None,
                                items: list) -> int:
        """The number of sampled candidates per image (0 without a reranker); ValueError for a
        reranker that cannot score these captions."""
        if reranker is None:
            if num_candidates is not None:
                raise ValueError("num_candidates needs a reranker (a t2i Pipeline): pipe.caption("
                                 "images, reranker=Pipeline.from_pretrained(t2i_export))")
            return 0
        draws = 16 if num_candidates is None else num_candidates
        check_int("num_candidates", draws,
                  meaning="captions sampled per image beside the decoded one")
        if reranker.task != "t2i":
            raise ValueError(f"the caption reranker is a task={reranker.task!r} export; pass a t2i "
                             "export (it scores how likely the image is under each caption)")
        if any(isinstance(item, torch.Tensor) for item in items):
            mine, theirs = self.image_tokenizer_fingerprint, reranker.image_tokenizer_fingerprint
            if mine is None or mine != theirs:
                raise ValueError(
                    f"code grids from this export's VQ-VAE (fingerprint {mine}) cannot be scored "
                    f"by a t2i export with VQ-VAE {theirs}: pass the images as pictures, or a "
                    "reranker trained on the same VQ-VAE")
        return draws

    def _rerank_captions(self, reranker: "Pipeline", chunk: list[tuple[int, object]],
                         decoded: list[str], sampled: list[str], details: bool) -> list:
        """Per image of the chunk: the decoded caption and its distinct non-empty samples,
        scored by ``reranker.image_scores``; the best (the decoded one on a tie)."""
        candidates = []
        for j, text in enumerate(decoded):
            mine = [text] + sampled[j::len(chunk)]  # sample k of image j: row k * len(chunk) + j
            candidates.append([c for c in dict.fromkeys(mine) if c.strip()])
        pairs = [(item, text) for (_, item), texts in zip(chunk, candidates) for text in texts]
        scores = iter(reranker.image_scores([item for item, _ in pairs],
                                            [text for _, text in pairs],
                                            max_inference_batch_size=SCORE_BATCH,
                                            progress=False) if pairs else [])
        results = []
        for text, texts in zip(decoded, candidates):
            values = [next(scores) for _ in texts]
            best = texts[max(range(len(texts)), key=lambda i: (values[i], -i))] if texts else text
            results.append({"caption": best, "decoded": text, "candidates": texts,
                            "scores": values} if details else best)
        return results

    @property
    def image_tokenizer_fingerprint(self) -> str | None:
        """The VQ-VAE the model was trained on (the export's data fingerprints), if recorded."""
        return ((self.info.get("data") or {}).get("fingerprints") or {}).get("image_tokenizer")

    @torch.inference_mode()
    @mixed_precision
    def image_scores(self, images, prompts: str | Sequence[str],
                     max_inference_batch_size: int = 12, progress: bool = True) -> list[float]:
        """Image score with a t2i export: mean log P(image codes | prompt) per (image, prompt)
        pair; higher means the image fits the prompt better. Images: PIL images, paths or code
        grids of this export's VQ-VAE (LongTensor [h, w])."""

        if isinstance(images, torch.Tensor) and images.dim() == 2:
            images = [images]
        images, prompt_list = pair_prompts(images, prompts, "score")
        texts = [self.encode_prompt(p, f"prompt {i}") for i, p in enumerate(prompt_list)]
        prepared: dict[int, object] = {}  # an image given for several prompts: prepared once
        for image in images:
            if not isinstance(image, torch.Tensor) and id(image) not in prepared:
                prepared[id(image)] = self.prepare_image(image)
        items = [image if isinstance(image, torch.Tensor) else prepared[id(image)]
                 for image in images]

        def score(chunk: list[int]) -> list[float]:
            unique = list({id(items[i]): items[i] for i in chunk
                           if not isinstance(items[i], torch.Tensor)}.values())
            grids = (dict(zip(map(id, unique), self.encode_images(unique).flatten(1)))
                     if unique else {})
            codes = [items[i].flatten().long() if isinstance(items[i], torch.Tensor)
                     else grids[id(items[i])] for i in chunk]
            values = image_log_likelihood(self.model, self.vocab, [texts[i] for i in chunk], codes,
                                          max_text_len=self.max_text_len,
                                          text_slots=self.text_slots, loss_vocab=self.loss_vocab)
            return [float(v) for v in values]

        self.batch_sizer = BatchSizer(max_inference_batch_size)
        return run_in_batches(list(range(len(items))), score, sizer=self.batch_sizer,
                              desc="scoring", progress=progress, describe=lambda i: f"image {i}")

    def __repr__(self) -> str:
        return (f"Pipeline(task={self.task!r}, {self.vocab!r}, "
                f"params={self.model.num_parameters():,}, device={self.device}, "
                f"precision={self.precision!r})")
