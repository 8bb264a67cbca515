"""task=vqvae: trains the VQ-VAE image tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from cogview.eval.oracle import read_scene, score_scene
from cogview.modules.vqvae import VQVAE, VQVAEConfig
from cogview.tasks.base import CogViewTask
from cogview.visualize import comparison_grid, psnr

class VQVAETask(CogViewTask):
    """Reconstruction + commitment loss; logs PSNR, codebook usage and perplexity, and
    pictures of originals beside reconstructions."""

    def __init__(self, vqvae: dict, lr: float = 2e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 100, min_lr_ratio: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.99), sample_dir: str | None = None,
                 num_sample_images: int = 8, oracle_eval: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = VQVAE(VQVAEConfig.from_dict(dict(vqvae)))
        self.sample_dir = Path(sample_dir) if sample_dir else None
        self._val_codes: list[torch.Tensor] = []
        self._val_psnr: list[torch.Tensor] = []
        self._val_images: list[torch.Tensor] = []
        self._val_recons: list[torch.Tensor] = []

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.model(images)
        batch = images.shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=batch)
        self.log("train/recon_loss", out["recon_loss"], batch_size=batch)
        self.log("train/commit_loss", out["commit_loss"], batch_size=batch)
        self.log("train/psnr", psnr(images, out["recon"].detach()).mean(), prog_bar=True,
                 batch_size=batch)
        self.log("train/perplexity", out["perplexity"], batch_size=batch)
        self.log("train/codebook_usage", out["usage"], batch_size=batch)
        return out["loss"]

    def validation_step(self, images: torch.Tensor, batch_idx: int) -> None:
        codes = self.model.encode(images)
        recon = self.model.decode(codes)
        self._val_codes.append(codes.cpu())
        self._val_psnr.append(psnr(images, recon).cpu())
        self._val_images.append(images.cpu())
        self._val_recons.append(recon.cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_codes:
            return
        codes = torch.cat(self._val_codes)
        images, recons = torch.cat(self._val_images), torch.cat(self._val_recons)
        metrics = {
            "val/psnr": torch.cat(self._val_psnr).mean().item(),
            "val/codebook_usage": self.model.codebook_usage(codes),
            "val/perplexity": self.model.codebook_perplexity(codes),
        }
        if self.hparams.oracle_eval:
            metrics["val/oracle_match"] = oracle_match(images, recons)
        self.log_dict(metrics, prog_bar=True)
        self._log_pictures(images, recons)
        self._val_codes, self._val_psnr, self._val_images, self._val_recons = [], [], [], []

    def _log_pictures(self, images: torch.Tensor, recons: torch.Tensor) -> None:
        count = self.hparams.num_sample_images
        picture = comparison_grid([images[:count], recons[:count]], ["original", "recon"])
        if self.sample_dir is not None and not self.trainer.sanity_checking:
            self.sample_dir.mkdir(parents=True, exist_ok=True)
            picture.save(self.sample_dir / f"vqvae_step{self.global_step:06d}.png")
        log_image = getattr(self.logger, "log_image", None)
        if log_image is not None and not self.trainer.sanity_checking:
            log_image(key="val/reconstructions", images=[picture], step=self.global_step)

    def export(self, directory: str | Path) -> Path:
        """Writes the image tokenizer (model.safetensors + config.json)."""
        self.model.save_pretrained(directory)
        return Path(directory)


def oracle_match(images: torch.Tensor, recons: torch.Tensor) -> float:
    """Fraction of reconstructions whose scene the shapes-zh oracle reads as the original's."""
    matches = [score_scene(read_scene(recon), read_scene(image))["full_match"]
               for image, recon in zip(images, recons)]
    return sum(matches) / max(1, len(matches))
