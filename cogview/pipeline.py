"""A trained cogview model as one object: text in, images out (and images in, captions out).

    from cogview import Pipeline
    pipe = Pipeline.from_pretrained("runs/t2i/export")          # a SequenceTask.export directory
    images = pipe("左上角有一个大的红色圆形", num_images=4, seed=0)  # 4 PIL images
    captions = pipe.caption(["a.png", "b.png"])                 # with a caption export

Seeding: sample ``i`` of every prompt is drawn with seed ``seed + i`` (its own generator), so
an image depends only on (seed, prompt, sample index), never on the batch it ran in.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from cogview.generation.batching import BatchSizer, run_in_batches

log = logging.getLogger(__name__)
EXPORT_CONFIG = "cogview.json"
DEFAULT_IMAGE_TOKENS = 64  # an 8x8 code grid: 64x64 pixels, what the shapes-zh recipes train on
DTYPES = {None: None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, a torch.dtype or a name ("bf16", "fp16", "fp32") -> torch.dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not known; use one of "
                         f"{sorted(k for k in DTYPES if k)} or null for the saved float32")
    return DTYPES[dtype]


def grid_side(image_tokens: int) -> int:
    """The side of a square code grid with ``image_tokens`` codes (64 -> 8)."""
    side = math.isqrt(image_tokens) if isinstance(image_tokens, int) and image_tokens > 0 else 0
    if side * side != image_tokens:
        raise ValueError(f"image_tokens={image_tokens!r} must be a positive square number "
                         "(h * w codes of a square grid, e.g. 64 for 8x8 = 64x64 pixels)")
    return side


@dataclass
class SampleRequest:
    """One image to draw: prompt ``prompt_index``, sample ``sample`` with seed ``seed``."""

    prompt_index: int
    sample: int
    seed: int
    text_ids: list[int]


class Pipeline:
    """A CogViewTransformer with its text tokenizer, VQ-VAE and vocabulary, ready to sample."""

    def __init__(self, model, text_tokenizer, image_tokenizer, vocab, info: dict,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer.eval()
        self.vocab = vocab
        self.info = info
        self.task = info.get("task", "t2i")
        self.max_text_len = info.get("max_text_len")
        self.device = torch.device(device)
        self.batch_sizer: BatchSizer | None = None  # the last run's batch size (after backoff)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, export_dir: str | Path, device: str | torch.device = "cpu",
                        dtype=None) -> "Pipeline":
        """Loads an export directory (``train.py task=t2i|caption`` writes ``<run>/export``).

        dtype: None keeps the saved float32 weights; "bf16"/"fp16" casts the transformer (the
        VQ-VAE stays float32). A checkpoint whose vocabulary does not match its tokenizers
        raises ValueError naming both values.
        """
        from cogview.modules.transformer import CogViewTransformer
        from cogview.modules.vqvae import VQVAE
        from cogview.tokenization import CogViewVocab, load_text_tokenizer

        export_dir = Path(export_dir)
        info_path = export_dir / EXPORT_CONFIG
        if not info_path.is_file():
            raise FileNotFoundError(
                f"{info_path} not found: {export_dir} is not a cogview export directory "
                "(train.py task=t2i|caption writes one to <run>/export)")
        info = json.loads(info_path.read_text(encoding="utf-8"))
        vocab = CogViewVocab.from_dict(info["vocab"])
        text_dir = export_dir / info.get("text_tokenizer", "text_tokenizer")
        text_tokenizer = load_text_tokenizer(text_dir)
        image_tokenizer = VQVAE.from_pretrained(export_dir / info.get("image_tokenizer", "vqvae"))
        model = CogViewTransformer.from_pretrained(export_dir)
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
        model = model.to(device=device, dtype=resolve_dtype(dtype))
        image_tokenizer = image_tokenizer.to(device)
        return cls(model, text_tokenizer, image_tokenizer, vocab, info, device)

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
    def __call__(self, prompts: str | Sequence[str], num_images: int = 4, seed: int = 0,
                 temperature: float = 1.0, top_k: int | None = 200, top_p: float = 1.0,
                 cfg_scale: float = 1.0, max_inference_batch_size: int = 12,
                 image_tokens: int | None = None, progress: bool = True):
        """Text-to-image: one prompt -> a list of ``num_images`` PIL images; a list of prompts
        -> a list of such lists. Sample i of each prompt uses seed ``seed + i``.

        Batches hold up to ``max_inference_batch_size`` samples (from any prompts) and shrink
        on out-of-memory; the result does not depend on the batch size.
        """
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list:
            raise ValueError("no prompts given: pass a prompt or a list of prompts")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images={num_images!r} must be a positive int")
        image_tokens = self.image_tokens if image_tokens is None else image_tokens
        side = grid_side(image_tokens)
        names = ["prompt"] if single else [f"prompt {i}" for i in range(len(prompt_list))]
        encoded = [self.encode_prompt(p, n) for p, n in zip(prompt_list, names)]  # check all first
        requests = [SampleRequest(p, i, seed + i, ids)
                    for p, ids in enumerate(encoded) for i in range(num_images)]

        def draw(chunk: list[SampleRequest]) -> list[Image.Image]:
            from cogview.generation.sampling import generate_images
            from cogview.visualize import tensor_to_pil

            codes = generate_images(
                self.model, self.vocab, [r.text_ids for r in chunk], image_tokens,
                [r.seed for r in chunk], temperature=temperature, top_k=top_k, top_p=top_p,
                cfg_scale=cfg_scale, max_text_len=self.max_text_len)  # (b, h*w)
            pixels = self.image_tokenizer.decode(codes.view(-1, side, side))  # (b, 3, 8h, 8w)
            return [tensor_to_pil(image) for image in pixels.cpu()]

        self.batch_sizer = BatchSizer(max_inference_batch_size)
        images = run_in_batches(
            requests, draw, sizer=self.batch_sizer, desc="sampling", progress=progress,
            describe=lambda r: f"sample {r.sample} of {names[r.prompt_index]} "
                               f"({prompt_list[r.prompt_index][:40]!r})")
        per_prompt = [images[p * num_images:(p + 1) * num_images] for p in range(len(prompt_list))]
        return per_prompt[0] if single else per_prompt

    # ------------------------------------------------------------------ caption
    @property
    def caption_stop_id(self) -> int:
        """The id that ends a caption: the export's caption_end_token, else [SEP]."""
        return self.vocab.command(self.info.get("caption_end_token") or "[SEP]")

    def prepare_image(self, image: Image.Image | str | Path) -> Image.Image:
        """A PIL image or a path -> RGB, resized and centre-cropped to the training size."""
        from cogview.data.images import load_image, resize_center_crop, to_rgb

        image = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
        return resize_center_crop(image, 8 * grid_side(self.image_tokens))

    @torch.inference_mode()
    def caption(self, images, greedy: bool = True, max_len: int | None = None, seed: int = 0,
                temperature: float = 1.0, top_k: int | None = 200,
                max_inference_batch_size: int = 12, progress: bool = True) -> list[str]:
        """Image captioning: PIL images or paths -> one caption each (image i: seed ``seed + i``
        when sampling). Captions end at the end token ([SEP] unless the export names another)
        or after ``max_len`` tokens (default: the export's max_text_len)."""
        from cogview.generation.sampling import generate_captions

        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        pictures = [self.prepare_image(image) for image in images]
        if not pictures:
            raise ValueError("no images given to caption")
        max_len = max_len or self.max_text_len or 64
        indexed = list(enumerate(pictures))

        def describe(chunk: list[tuple[int, Image.Image]]) -> list[str]:
            codes = self.image_tokenizer.encode([picture for _, picture in chunk])  # (b, h, w)
            text_ids = generate_captions(
                self.model, self.vocab, list(codes.flatten(1).cpu()), max_len,
                [seed + index for index, _ in chunk], greedy=greedy, stop_id=self.caption_stop_id,
                temperature=temperature, top_k=top_k)
            return [self.text_tokenizer.decode(ids) for ids in text_ids]

        self.batch_sizer = BatchSizer(max_inference_batch_size)
        return run_in_batches(indexed, describe, sizer=self.batch_sizer, desc="captioning",
                              progress=progress, describe=lambda item: f"image {item[0]}")

    def __repr__(self) -> str:
        return (f"Pipeline(task={self.task!r}, {self.vocab!r}, "
                f"params={self.model.num_parameters():,}, device={self.device})")
