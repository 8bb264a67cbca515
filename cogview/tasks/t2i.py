"""task=t2i: text-to-image, ``[ROI1] text [BASE] [BOI1] image [EOI1]``."""

from __future__ import annotations

import json

import torch

from cogview.data.shapes import eval_prompts
from cogview.generation import generate_images
from cogview.tasks.sequence import SequenceTask, hide_tokens
from cogview.visualize import image_grid


def drop_text(batch: dict[str, torch.Tensor], rows: torch.Tensor, text_mask_key: str = "text_mask",
              keep_positions: bool = False) -> dict[str, torch.Tensor]:
    """Turns ``rows`` of a t2i batch into empty-caption sequences (``hide_tokens``)."""
    return hide_tokens(batch, batch[text_mask_key].bool() & rows[:, None], keep_positions)


class T2ITask(SequenceTask):
    """Text-to-image; ``caption_dropout`` empties the caption of that fraction of samples so
    classifier-free guidance can be used at inference."""

    layout_name = "t2i"

    def text_end_ids(self) -> list[int]:
        return [self.vocab.base_id]  # [ROI1] text [BASE]

    @property
    def condition_dropout(self) -> float:
        return self.hparams.caption_dropout

    def condition_tokens(self, batch: dict) -> torch.Tensor:
        return batch["text_mask"].bool()

    @torch.no_grad()
    def log_samples(self, batch: dict) -> None:
        prompts = list(self.hparams.sample_prompts or [])
        if not prompts:
            prompts = [p["caption"] for kind in ("seen", "heldout", "two")
                       for p in eval_prompts(kind, 2, seed=self.hparams.sample_seed)]
        image_tokens = int((batch["input_ids"][0] < self.vocab.num_image_codes).sum())
        side = int(round(image_tokens ** 0.5))
        was_training = self.model.training
        self.model.eval()
        codes = generate_images(
            self.model, self.vocab, [self.text_tokenizer.encode(p) for p in prompts],
            image_tokens=image_tokens, seeds=list(range(len(prompts))),
            top_k=self.hparams.sample_top_k, temperature=self.hparams.sample_temperature,
            max_text_len=self.hparams.max_text_len, text_slots=self.text_slots)
        self.model.train(was_training)
        images = self.image_tokenizer.decode(codes.view(-1, side, side).cpu())
        self.save_picture(image_grid(images, columns=len(prompts), scale=2), "t2i")
        if self.sample_dir is not None:
            (self.sample_dir / f"t2i_step{self.global_step:06d}.json").write_text(
                json.dumps({"prompts": prompts}, ensure_ascii=False))
