"""task=caption: image-to-text, ``[BASE] [BOI1] image [EOI1] [ROI1] text``."""

from __future__ import annotations

import json

import torch

from cogview.generation import generate_captions
from cogview.tasks.sequence import SequenceTask
from cogview.tokenization.layouts import extract_image_codes
from cogview.visualize import image_grid


class CaptionTask(SequenceTask):
    """Captioning; fine-tune it from a t2i checkpoint with ``task.init_from=...``.

    ``image_dropout``: that fraction of training captions is scored without its image (the
    image tokens hidden, as the layout without them), so the model also learns the captions'
    unconditional distribution and captions can be decoded with classifier-free guidance
    (``generate_captions(cfg_scale=...)``).
    """

    layout_name = "caption"

    def __init__(self, *args, image_dropout: float = 0.0, **kwargs) -> None:
        if not 0.0 <= image_dropout < 1.0:
            raise ValueError(f"task.image_dropout={image_dropout} must be in [0, 1): the fraction "
                             "of training captions scored without their image (0 = off)")
        super().__init__(*args, **kwargs)

    @property
    def condition_dropout(self) -> float:
        return self.hparams.get("image_dropout", 0.0)  # checkpoints from before it: 0

    def condition_tokens(self, batch: dict) -> torch.Tensor:
        image = batch["input_ids"] < self.vocab.num_image_codes  # image ids come first
        return image & batch["attention_mask"].bool()

    @property
    def stop_id(self) -> int | None:
        """The end-of-caption token the data appends (data.caption_end_token), if any."""
        datamodule = getattr(self._trainer, "datamodule", None)
        token = getattr(datamodule, "caption_end_token", None)
        return self.vocab.command(token) if token else None

    def text_end_ids(self) -> list[int]:
        return [] if self.stop_id is None else [self.stop_id]

    @torch.no_grad()
    def log_samples(self, batch: dict) -> None:
        rows = batch["input_ids"][:4].cpu()
        codes = [extract_image_codes(self.vocab, row) for row in rows]
        was_training = self.model.training
        self.model.eval()
        captions = generate_captions(self.model, self.vocab, codes,
                                     max_len=self.hparams.max_text_len,
                                     seeds=list(range(len(codes))), greedy=True,
                                     stop_id=self.stop_id, text_slots=self.text_slots)
        self.model.train(was_training)
        texts = [self.text_tokenizer.decode(ids) for ids in captions]
        side = int(round(codes[0].numel() ** 0.5))
        images = self.image_tokenizer.decode(torch.stack(codes).view(-1, side, side))
        self.save_picture(image_grid(images, columns=len(texts), scale=2), "caption")
        references = batch.get("caption", [None] * len(texts))[: len(texts)]
        rows_out = [{"generated": t, "reference": r} for t, r in zip(texts, references)]
        if self.sample_dir is not None:
            (self.sample_dir / f"caption_step{self.global_step:06d}.json").write_text(
                json.dumps(rows_out, ensure_ascii=False, indent=1))
        log_text = getattr(self.logger, "log_text", None)
        if log_text is not None:
            log_text(key="samples/captions", columns=["generated", "reference"],
                     data=[[r["generated"], r["reference"]] for r in rows_out], step=self.global_step)
