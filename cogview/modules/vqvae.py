"""VQ-VAE image tokenizer: images <-> grids of discrete codes (8x downsampling).

CogView turns a 256x256 image into 32x32 = 1024 codes from an 8192-entry codebook and a
transformer models those codes next to the text. This module is that tokenizer:

    encoder (3 stride-2 convs, optional residual blocks, 1x1 conv to `code_dim`)
      -> EMA vector quantizer (vector-quantize-pytorch's `VectorQuantize`)
      -> decoder (mirror: 3 stride-2 transposed convs, 1x1 conv to RGB)

    images [B, 3, H, W] in [0, 1]  --encode-->  codes [B, H/8, W/8] in [0, num_codes)
    codes  [B, H/8, W/8]           --decode-->  images [B, 3, H, W] in [0, 1]

Codebook learning (no codebook gradients): the codebook is an exponential moving average
(decay 0.99) of the encoder outputs assigned to each code; the encoder gets straight-through
gradients and a commitment loss `beta * |z - sg(q)|^2`; codes whose EMA assignment count
falls below `dead_code_threshold` are re-seeded from encoder outputs of the current batch.

Presets (`VQVAEConfig.preset(name)`):
- "cogview": CogView's released VQ-VAE layout (channels 512, 8192 codes of dim 256, its
  dataset normalisation), so its checkpoint loads by renaming keys (see `VQVAE`).
- "tiny": a small CPU model for the embedded shapes-zh data (64x64 renders).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from vector_quantize_pytorch import VectorQuantize

from cogview.exports import MODEL_CONFIG, MODEL_WEIGHTS
from cogview.safe_load import check_finite, check_state_dict
from cogview.validate import check_int

ImageInput = Union[torch.Tensor, Image.Image, Sequence[Image.Image]]

CONFIG_KIND = "vqvae"

# Per-channel statistics of CogView's training images; its released VQ-VAE expects
# inputs normalised with them (CogView vqvae/api.py undoes them after decoding).
COGVIEW_MEAN = (0.79093, 0.76271, 0.75340)
COGVIEW_STD = (0.30379, 0.32279, 0.32800)


@dataclass
class VQVAEConfig:
    """Architecture and training hyper-parameters of a `VQVAE`.

    The encoder has three stride-2 4x4 convs with widths `channels` (at 1/2, 1/4 and 1/8
    resolution), then `num_res_blocks` residual blocks, ReLU and a 1x1 conv to `code_dim`.
    The decoder mirrors it: a stride-2 4x4 transposed conv from `code_dim` to
    `channels[2]`, `num_res_blocks` residual blocks, ReLU, two more transposed convs
    (`channels[2] -> channels[1] -> channels[0]`, ReLU after each) and a 1x1 conv to RGB.
    """

    channels: tuple[int, int, int] = (32, 64, 128)
    num_res_blocks: int = 2         # res blocks after encoder stage 3 and decoder stage 1
    res_channels: int = 64          # hidden width inside a residual block
    code_dim: int = 64              # dimension of a codebook vector
    num_codes: int = 1024           # codebook size K; codes are ids in [0, K)
    decay: float = 0.99             # EMA decay of the codebook statistics
    beta: float = 0.25              # commitment loss weight
    dead_code_threshold: float = 1.0  # re-seed codes whose EMA count drops below this; 0 = never
    l1_weight: float = 0.0          # recon loss = MSE + l1_weight * L1 (pixels in [0, 1])
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # input normalisation (x - mean) / std
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    sync_codebook: bool = False     # all-reduce EMA statistics across DDP ranks

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise ValueError(
                f"VQVAEConfig.channels={self.channels}: need 3 positive widths, one per "
                "stride-2 stage (8x downsampling), e.g. (32, 64, 128)"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"VQVAEConfig.mean={self.mean} / std={self.std}: need 3 values each (RGB) "
                "and std > 0"
            )
        for name in ("num_res_blocks", "res_channels", "code_dim", "num_codes"):
            check_int(f"VQVAEConfig.{name}", getattr(self, name), 0 if name == "num_res_blocks" else 1)
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"VQVAEConfig.decay={self.decay} must be in [0, 1), e.g. 0.99")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "VQVAEConfig":
        """A named configuration ("cogview" or "tiny"), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown VQ-VAE preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VQVAEConfig":
        """Inverse of `to_dict`; unknown keys raise a ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VQVAEConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    # CogView's released tokenizer (vqvae/api.py new_model(): channel=512, n_res_block=0,
    # embed_dim=256, n_embed=8192, stride=6, simple=True).
    "cogview": dict(
        channels=(512, 512, 512), num_res_blocks=0, res_channels=32, code_dim=256,
        num_codes=8192, mean=COGVIEW_MEAN, std=COGVIEW_STD,
        # CogView had no dead-code restart; re-seeding would change codes its transformer
        # knows. Set > 0 (e.g. 1.0) to train this layout from scratch.
        dead_code_threshold=0.0,
    ),
    # CPU model for 64x64 shapes-zh renders (0.8M parameters). Adam lr 2e-3, batch 32, bf16
    # autocast, 100 warmup steps + cosine: 10 min on one shared CPU thread (3.4k steps) gave
    # 37.0 dB PSNR and 76% of the codes used on held-out renders (29 dB after 2.5 min).
    # Narrow high-resolution stages keep it fast; the capacity sits at 1/8 and 1/4 scale.
    "tiny": dict(
        channels=(32, 64, 128), num_res_blocks=2, res_channels=64, code_dim=64,
        num_codes=1024,
    ),
}


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): CogView's residual block, without in-place ops."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Encoder(nn.Module):
    """Normalised images [B, 3, H, W] -> latents [B, code_dim, H/8, W/8].

    `blocks` indices for the cogview preset (no residual blocks), same as CogView's `enc_b.blocks`:
    0 conv(3,512,4,s2) 1 ReLU 2 conv(512,512,4,s2) 3 ReLU 4 conv(512,512,4,s2) 5 ReLU
    6 conv(512,256,1).
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        c1, c2, c3 = config.channels
        self.blocks = nn.Sequential(
            nn.Conv2d(3, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c3, 4, stride=2, padding=1),
            *[ResBlock(c3, config.res_channels) for _ in range(config.num_res_blocks)],
            nn.ReLU(),
            nn.Conv2d(c3, config.code_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Quantized latents [B, code_dim, h, w] -> normalised images [B, 3, 8h, 8w].

    `blocks` indices for the cogview preset, same as CogView's `dec.blocks`:
    0 convT(256,512,4,s2) 1 ReLU 2 convT(512,512,4,s2) 3 ReLU 4 convT(512,512,4,s2) 5 ReLU
    6 conv(512,3,1).
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        c1, c2, c3 = config.channels
        self.blocks = nn.Sequential(
            nn.ConvTranspose2d(config.code_dim, c3, 4, stride=2, padding=1),
            *[ResBlock(c3, config.res_channels) for _ in range(config.num_res_blocks)],
            nn.ReLU(),
            nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, 3, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


def codebook_usage(codes: torch.Tensor, num_codes: int) -> float:
    """Fraction of the `num_codes` codebook entries occurring in `codes` (any shape)."""
    return torch.unique(codes).numel() / num_codes


def codebook_perplexity(codes: torch.Tensor, num_codes: int) -> float:
    """exp(entropy) of the code histogram of `codes`: 1 = one code used, num_codes = uniform use."""
    counts = torch.bincount(codes.reshape(-1), minlength=num_codes).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-10))).sum()
    return math.exp(entropy.item())


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode -> float RGB tensor [3, H, W] in [0, 1].

    Alpha (RGBA, LA, P with transparency) is composited onto white; 16/32-bit integer modes
    ("I;16*", "I") are scaled from 0..65535 to 0..255 (an "I" image whose values all fit in
    0..255 is taken as 8-bit); "F" is clipped to 0..255; everything else (L, 1, P, CMYK,
    YCbCr, HSV, ...) goes through Pillow's `convert("RGB")`.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and gray.max(initial=0) > 255):
            gray = gray / 257.0  # 65535 -> 255
        gray = np.clip(gray, 0, 255).astype(np.float32) / 255.0
        return torch.from_numpy(gray)[None].expand(3, -1, -1).contiguous()
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or image.mode == "RGBA":
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def read_vqvae_config(directory: str | os.PathLike) -> VQVAEConfig:
    """The config of a VQ-VAE saved by ``VQVAE.save_pretrained`` (reads config.json only: the
    codebook size, say, without loading weights). FileNotFoundError / ValueError name the path
    when it is missing, not JSON, or not a VQ-VAE's."""
    config_path = Path(directory) / MODEL_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: expected a directory written by VQVAE.save_pretrained "
            "(cogview train task=vqvae writes one to <run>/vqvae)")
    try:
        values = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    kind = values.pop("kind", None) if isinstance(values, dict) else None
    if kind != CONFIG_KIND:
        raise ValueError(
            f"{config_path} has kind={kind!r}, not {CONFIG_KIND!r}: this directory does not "
            "hold a VQ-VAE (point to the tokenizer's directory, not e.g. a transformer's)"
        )
    try:
        return VQVAEConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from err


class VQVAE(nn.Module):
    """VQ-VAE tokenizer with an EMA codebook (see the module docstring).

    Key mapping from CogView's released VQ-VAE checkpoint (preset "cogview");
    `load_cogview_state_dict` applies it:

        enc_b.blocks.{0,2,4,6}.{weight,bias} -> encoder.blocks.{0,2,4,6}.{weight,bias}
        dec.blocks.{0,2,4,6}.{weight,bias}   -> decoder.blocks.{0,2,4,6}.{weight,bias}
        quantize_t.embed        [256, 8192] -> quantizer._codebook.embed        [1, 8192, 256] (.T)
        quantize_t.embed_avg    [256, 8192] -> quantizer._codebook.embed_avg    [1, 8192, 256] (.T)
        quantize_t.cluster_size [8192]      -> quantizer._codebook.cluster_size [1, 8192]

    The quantizer is vector-quantize-pytorch's `VectorQuantize` with the same EMA update as
    CogView's `Quantize` (Laplace-smoothed counts, eps 1e-5), so training can resume.
    """

    downsample = 8  # image side / code grid side

    def __init__(self, config: VQVAEConfig | None = None):
        super().__init__()
        self.config = config = config or VQVAEConfig()
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantize(
            dim=config.code_dim,
            codebook_size=config.num_codes,
            decay=config.decay,
            eps=1e-5,
            accept_image_fmap=True,           # takes and returns [B, D, h, w]
            rotation_trick=False,             # plain straight-through estimator
            commitment_weight=0.0,            # computed in `quantize` so eval reports it too
            threshold_ema_dead_code=config.dead_code_threshold,
            kmeans_init=False,                # dead-code restart seeds codes from the first batches
            sync_codebook=config.sync_codebook,
        )
        self.decoder = Decoder(config)
        mean = torch.tensor(config.mean).view(1, 3, 1, 1)
        std = torch.tensor(config.std).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)  # stored in the config instead
        self.register_buffer("pixel_std", std, persistent=False)

    # ---- properties -------------------------------------------------------------------

    @property
    def num_codes(self) -> int:
        """Codebook size K (image codes are ids in [0, K))."""
        return self.config.num_codes

    @property
    def codebook(self) -> torch.Tensor:
        """The codebook vectors, [num_codes, code_dim] (a view of the EMA buffer)."""
        return self.quantizer._codebook.embed[0]

    # ---- building blocks --------------------------------------------------------------

    def prepare_images(self, images: ImageInput) -> torch.Tensor:
        """Tensor(s) or PIL image(s) -> float [B, 3, H, W] in [0, 1] on the model's device.

        Accepts [B, C, H, W] or [C, H, W] tensors with C in {1, 3} (float in [0, 1], or uint8
        in 0..255), a PIL image, or a list of PIL images of one size. H and W must be
        multiples of 8.
        """
        if isinstance(images, Image.Image):
            images = pil_to_tensor(images)[None]
        elif isinstance(images, (list, tuple)):
            if not images or not all(isinstance(im, Image.Image) for im in images):
                raise TypeError("expected a non-empty list of PIL images")
            sizes = sorted({im.size for im in images})
            if len(sizes) > 1:
                raise ValueError(
                    f"PIL images in one call must share a size, got (W, H) sizes {sizes}; "
                    "resize or crop them to one size first"
                )
            images = torch.stack([pil_to_tensor(im) for im in images])
        elif not isinstance(images, torch.Tensor):
            raise TypeError(
                "expected a tensor, a PIL image or a list of PIL images, "
                f"got {type(images).__name__}"
            )
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"expected images of shape [B, 3, H, W] or [3, H, W], got {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif not images.is_floating_point():
            raise TypeError(f"expected float images in [0, 1] or uint8 images, got {images.dtype}")
        height, width = images.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"image size {height}x{width} (HxW) is not a multiple of {self.downsample}; "
                f"resize or crop it to a multiple of {self.downsample}, "
                f"e.g. {height // 8 * 8 or 8}x{width // 8 * 8 or 8}"
            )
        lo, hi = images.min().item(), images.max().item()
        if lo < -0.01 or hi > 1.01:
            raise ValueError(
                f"image values span [{lo:.3f}, {hi:.3f}] but must be in [0, 1]; pass raw "
                "pixels / 255, not normalised images (the model normalises internally)"
            )
        images = images.clamp(0, 1).expand(-1, 3, -1, -1)
        images = images.to(device=self.pixel_mean.device, dtype=torch.float32)
        # channels-last convs are faster on CPU (oneDNN, ~10% with bf16) and on tensor cores
        return images.contiguous(memory_format=torch.channels_last)

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest-code quantization of latents [B, D, h, w].

        Returns (quantized [B, D, h, w] with straight-through gradients, codes [B, h, w],
        commitment loss |latents - sg(quantized)|^2). In training mode this updates the
        EMA codebook and re-seeds dead codes; in eval mode the codebook is left alone.
        """
        # distances in fp32 even under autocast: bf16 would pick wrong nearest codes
        with torch.autocast(device_type=latents.device.type, enabled=False):
            latents = latents.float()
            quantized, codes, _ = self.quantizer(latents)  # [B, D, h, w], [B, h, w]
            commit_loss = F.mse_loss(latents, quantized.detach())
        return quantized, codes, commit_loss

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, D, h, w] -> unclamped pixels [B, 3, 8h, 8w] (about [0, 1])."""
        return self.decoder(quantized) * self.pixel_std + self.pixel_mean

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> codebook vectors [B, D, h, w]."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    # ---- public API -------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training / validation step on images [B, 3, H, W] in [0, 1].

        Returns a dict: recon [B, 3, H, W] (unclamped), loss = recon_loss + beta * commit_loss,
        recon_loss = MSE(recon, images) + l1_weight * L1 (in [0, 1] pixel units, so
        PSNR = -10 log10(MSE) when l1_weight = 0), commit_loss, codes [B, H/8, W/8], and
        (as 0-dim tensors, no gradient) perplexity and usage: exp(entropy) of this batch's code
        histogram and the fraction of the codebook it uses.
        """
        images = self.prepare_images(images)
        latents = self.encoder((images - self.pixel_mean) / self.pixel_std)  # [B, D, h, w]
        quantized, codes, commit_loss = self.quantize(latents)
        recon = self.decode_latents(quantized).float()  # [B, 3, H, W]
        recon_loss = F.mse_loss(recon, images)
        if self.config.l1_weight:
            recon_loss = recon_loss + self.config.l1_weight * F.l1_loss(recon, images)
        return dict(
            recon=recon,
            loss=recon_loss + self.config.beta * commit_loss,
            recon_loss=recon_loss,
            commit_loss=commit_loss,
            codes=codes,
            perplexity=torch.tensor(codebook_perplexity(codes, self.num_codes)),
            usage=torch.tensor(codebook_usage(codes, self.num_codes)),
        )

    @torch.no_grad()
    def encode(self, images: ImageInput) -> torch.Tensor:
        """Images -> codes LongTensor [B, H/8, W/8] (a single image gives B = 1).

        Deterministic and never changes the codebook, in train or eval mode. Inputs as in
        `prepare_images`: tensors in [0, 1], PIL images of any mode, lists of PIL images.
        """
        images = self.prepare_images(images)
        latents = self.encoder((images - self.pixel_mean) / self.pixel_std)
        with torch.autocast(device_type=latents.device.type, enabled=False):
            _, codes, _ = self.quantizer(latents.float(), freeze_codebook=True)
        return codes.long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] (or [h, w]) -> images float [B, 3, 8h, 8w] clamped to [0, 1]."""
        if codes.dim() == 2:
            codes = codes[None]
        if codes.dim() != 3:
            raise ValueError(
                f"expected codes of shape [B, h, w] or [h, w], got {tuple(codes.shape)}; "
                "reshape flat sequences to their grid first, e.g. codes.view(B, 8, 8)"
            )
        if codes.is_floating_point():
            raise TypeError(f"codes must be integer ids, got {codes.dtype}")
        lo, hi = codes.min().item(), codes.max().item()
        if lo < 0 or hi >= self.num_codes:
            raise ValueError(
                f"codes span [{lo}, {hi}] but this VQ-VAE has {self.num_codes} codes "
                f"([0, {self.num_codes})); strip vocabulary offsets / command tokens first"
            )
        codes = codes.to(self.pixel_mean.device).long()
        return self.decode_latents(self.lookup(codes)).float().clamp(0, 1)

    def codebook_usage(self, codes: torch.Tensor) -> float:
        """Fraction of this model's codebook used by `codes` (e.g. all codes of an eval set)."""
        return codebook_usage(codes, self.num_codes)

    def codebook_perplexity(self, codes: torch.Tensor) -> float:
        """Perplexity of the code histogram of `codes` w.r.t. this model's codebook."""
        return codebook_perplexity(codes, self.num_codes)

    # ---- CogView compatibility --------------------------------------------------------

    @torch.no_grad()
    def load_cogview_quantizer(
        self, embed: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor
    ) -> None:
        """Load CogView's `quantize_t.{embed, cluster_size, embed_avg}` buffers.

        CogView stores codes as columns: embed / embed_avg are [code_dim, num_codes],
        cluster_size [num_codes]. Column j of `embed` becomes code j (`self.codebook[j]`).
        """
        dim, k = self.config.code_dim, self.num_codes
        expected = {"embed": (dim, k), "cluster_size": (k,), "embed_avg": (dim, k)}
        given = {"embed": embed, "cluster_size": cluster_size, "embed_avg": embed_avg}
        for name, tensor in given.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"quantize_t.{name} has shape {tuple(tensor.shape)}, expected "
                    f"{expected[name]} for code_dim={dim}, num_codes={k}; build the model with "
                    "VQVAEConfig.preset('cogview') (or matching code_dim / num_codes)"
                )
        book = self.quantizer._codebook
        book.embed.copy_(embed.t()[None])               # [1, K, D]
        book.embed_avg.copy_(embed_avg.t()[None])       # [1, K, D]
        book.cluster_size.copy_(cluster_size[None])     # [1, K]
        book.initted.fill_(True)

    @torch.no_grad()
    def load_cogview_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a CogView VQ-VAE state dict (keys `enc_b.*`, `dec.*`, `quantize_t.*`).

        A leading "module." (DataParallel) is ignored. Raises ValueError naming missing,
        unexpected or mis-shaped keys.
        """
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        quant = {}
        renamed = {}
        for key, value in state_dict.items():
            if key.startswith("quantize_t."):
                quant[key.removeprefix("quantize_t.")] = value
            elif key.startswith("enc_b."):
                renamed["encoder." + key.removeprefix("enc_b.")] = value
            elif key.startswith("dec."):
                renamed["decoder." + key.removeprefix("dec.")] = value
            else:
                renamed[key] = value  # reported as unexpected below
        missing_quant = sorted({"embed", "cluster_size", "embed_avg"} - set(quant))
        if missing_quant:
            raise ValueError(f"CogView state dict lacks quantize_t.{missing_quant}")
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("quantizer.")}
        check_state_dict(own, renamed, "CogView state dict does not match the VQ-VAE config:",
                         "was it saved with a different config?")
        self.load_state_dict(renamed, strict=False)
        self.load_cogview_quantizer(quant["embed"], quant["cluster_size"], quant["embed_avg"])

    # ---- save / load ------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `model.safetensors` and `config.json` ({"kind": "vqvae", **config})."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / MODEL_WEIGHTS), metadata={"format": "pt"})
        config = {"kind": CONFIG_KIND, **self.config.to_dict()}
        (directory / MODEL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> "VQVAE":
        """Load a model written by `save_pretrained`; returned in eval mode.

        Raises FileNotFoundError / ValueError naming the path when the directory is missing,
        its config.json is not a VQ-VAE config, or the weights do not match the config.
        """
        directory = Path(directory)
        weights_path = directory / MODEL_WEIGHTS
        config = read_vqvae_config(directory)
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"{weights_path} not found: expected a directory written by VQVAE.save_pretrained"
            )
        model = cls(config)
        state = load_file(str(weights_path), device=str(map_location))
        check_state_dict(model.state_dict(), state,
                         f"{weights_path} does not match the VQ-VAE config:",
                         "was it saved with a different config?")
        check_finite(state, weights_path)
        model.load_state_dict(state)
        return model.to(map_location).eval()


