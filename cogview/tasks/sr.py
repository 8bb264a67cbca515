"""task=sr: super-resolution in token space,
``[ROI1] text [BASE] [BOI1] low-res [EOI1] [ROI2] [POS0] [BASE] [BOI2] high-res [EOI2]``."""

from __future__ import annotations

import torch

from cogview.generation import generate_sr
from cogview.tasks.sequence import SequenceTask
from cogview.tokenization.layouts import extract_image_codes, extract_text_ids
from cogview.visualize import comparison_grid

class SRTask(SequenceTask):
    """Token-space 2x super-resolution conditioned on the caption and the low-res codes."""

    layout_name = "sr"

    @torch.no_grad()
    def log_samples(self, batch: dict) -> None:
        rows = batch["input_ids"][:4].cpu()
        lowres = [extract_image_codes(self.vocab, row, which=1) for row in rows]
        target = [extract_image_codes(self.vocab, row, which=2) for row in rows]
        texts = [extract_text_ids(self.vocab, row).tolist() for row in rows]
        was_training = self.model.training
        self.model.eval()
        generated = generate_sr(self.model, self.vocab, texts, lowres,
                                hr_tokens=target[0].numel(), seeds=list(range(len(rows))),
                                top_k=self.hparams.sample_top_k,
                                temperature=self.hparams.sample_temperature,
                                max_text_len=self.hparams.max_text_len, text_slots=self.text_slots)
        self.model.train(was_training)
        low_side, high_side = int(round(lowres[0].numel() ** 0.5)), int(round(target[0].numel() ** 0.5))
        decode = self.image_tokenizer.decode
        low = decode(torch.stack(lowres).view(-1, low_side, low_side))
        low = torch.nn.functional.interpolate(low, scale_factor=2, mode="bicubic").clamp(0, 1)
        high = decode(generated.view(-1, high_side, high_side).cpu())
        truth = decode(torch.stack(target).view(-1, high_side, high_side))
        self.save_picture(comparison_grid([low, high, truth], ["bicubic", "sr", "target"]), "sr")
