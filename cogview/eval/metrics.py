"""Image-set metrics: FID (and CogView's blurred FID-k), Inception Score, caption-score
summaries, super-resolution PSNR/SSIM beside bicubic, and the rerank gain.

FID and IS are computed by torchmetrics (`FrechetInceptionDistance`, `InceptionScore`) on
features we extract in batches with any extractor from `cogview.eval.features` (a spec
string or an nn.Module); the statistics are accumulated in float64.

Image sets: a tensor [N, 3, H, W] (float in [0, 1] or uint8), an array [N, H, W, 3], or a
list of PIL RGB images / [3, H, W] tensors / [H, W, 3] arrays of one size.

FID compares image statistics, not prompts: on shapes-zh, the demo t2i run's samples (192
canonical prompts, default extractor) sit at 19x the real-vs-real FID after 500 steps and
at about 2x from 1000 to 3000 steps, while oracle full match climbs from 27 % to 59 % over
those steps. Text alignment is the oracle's job.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageFilter
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from cogview.eval.features import (
    DEFAULT_CLASSIFIER,
    DEFAULT_FEATURES,
    make_classifier,
    make_feature_extractor,
)
from cogview.validate import check_int

FID_RADII = (0, 1, 2, 4, 8)  # CogView's FID-k blur radii
SSIM_WINDOW = 11  # torchmetrics' default Gaussian window; images must be at least this wide

# ----------------------------------------------------------------------------------------
# Image sets


def _one_image(image, name: str) -> torch.Tensor:
    """One image -> [3, H, W] (dtype kept: uint8 or float)."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"{name} is a PIL image in mode {image.mode!r}; metrics need RGB, "
                             "use image.convert('RGB')")
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"{name} is an array of shape {image.shape}; expected [H, W, 3]")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise ValueError(f"{name} is a tensor of shape {tuple(image.shape)}; "
                             "expected [3, H, W]")
        return image
    raise ValueError(f"{name} is a {type(image).__name__}; expected a PIL RGB image, a tensor "
                     "[3, H, W] or an array [H, W, 3]")


def image_batch(images, name: str = "images") -> torch.Tensor:
    """A set of RGB images (see the module docstring) -> float tensor [N, 3, H, W] in [0, 1].

    ValueError for an empty set, mixed sizes, a channel count other than 3, or float
    values outside [0, 1]; the message names `name` and the fix.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"{name} is a tensor of shape {tuple(images.shape)}; expected a set "
                             "[N, 3, H, W] (add a batch dimension with images[None])")
        batch = images
    elif isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"{name} is an array of shape {images.shape}; expected [N, H, W, 3]")
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{name} is empty; pass at least one image")
        tensors = [_one_image(im, f"{name}[{i}]") for i, im in enumerate(images)]
        shapes = sorted({tuple(t.shape) for t in tensors})
        if len(shapes) > 1:
            raise ValueError(f"{name} mixes image shapes (C, H, W) {shapes}; resize them to "
                             "one size")
        if len({t.dtype for t in tensors}) > 1:
            raise ValueError(f"{name} mixes dtypes {sorted({str(t.dtype) for t in tensors})}; "
                             "pass all uint8 or all float in [0, 1]")
        batch = torch.stack(tensors)
    else:
        raise ValueError(f"{name} is a {type(images).__name__}; expected a tensor [N, 3, H, W], "
                         "an array [N, H, W, 3] or a list of images")
    if batch.shape[0] == 0:
        raise ValueError(f"{name} is empty; pass at least one image")
    if batch.shape[1] != 3:
        raise ValueError(f"{name} has {batch.shape[1]} channels; metrics need 3 (RGB): convert "
                         "with PIL's .convert('RGB') or expand grayscale with "
                         ".expand(-1, 3, -1, -1)")
    if batch.dtype == torch.uint8:
        return batch.float() / 255.0
    if not batch.is_floating_point():
        raise ValueError(f"{name} has dtype {batch.dtype}; pass uint8 (0..255) or float in [0, 1]")
    lo, hi = batch.min().item(), batch.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name} values span [{lo:.3g}, {hi:.3g}]; float images must be in "
                         "[0, 1] (divide 0..255 pixels by 255)")
    return batch.float().clamp(0, 1)


def _same_size(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"{names[0]} images are {tuple(a.shape[1:])} (C, H, W) but {names[1]} "
                         f"images are {tuple(b.shape[1:])}; resize one set to the other's size")


def gaussian_blur(images: torch.Tensor, radius: float) -> torch.Tensor:
    """PIL Gaussian blur of `radius` pixels on every image: [N, 3, H, W] in [0, 1] ->
    [N, 3, H, W] (through uint8, as PIL works on 8-bit images). radius 0 returns the input."""
    if radius < 0:
        raise ValueError(f"blur radius={radius} must be >= 0")
    if radius == 0:
        return images
    pixels = images.mul(255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    blur = ImageFilter.GaussianBlur(radius)
    blurred = [np.asarray(Image.fromarray(p).filter(blur)) for p in pixels]  # N x (H, W, 3)
    return torch.from_numpy(np.stack(blurred)).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------------------------------
# Features


@torch.no_grad()
def extract_features(images: torch.Tensor, extractor: nn.Module, batch_size: int = 64,
                     name: str = "images") -> torch.Tensor:
    """Run `extractor` over images [N, 3, H, W] in batches, in eval mode (restored after):
    -> float64 features [N, D] on the CPU."""
    check_int("batch_size", batch_size)
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    was_training = extractor.training
    extractor.eval()
    try:
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(device)
            out = extractor(batch)
            ok = isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == len(batch)
            if not ok:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"{type(extractor).__name__} returned {shape} for {name} of shape "
                                 f"{tuple(batch.shape)}; a feature extractor must return [N, D] "
                                 "(flatten or pool its output)")
            chunks.append(out.detach().double().cpu())
    finally:
        extractor.train(was_training)
    features = torch.cat(chunks)  # (N, D)
    if not torch.isfinite(features).all():
        raise ValueError(f"{type(extractor).__name__} gave non-finite features for {name}")
    return features


class _Given(nn.Module):
    """Identity 'extractor': lets torchmetrics' metrics accumulate features we computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _as_features(features, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor)
                             else features).double()
    if tensor.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected [N, D]")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds NaN or inf values")
    return tensor


# ----------------------------------------------------------------------------------------
# FID


def frechet_distance(real_features, fake_features) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] and [M, D]:
    |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)), by torchmetrics in float64.

    ValueError when a set has fewer than 2 samples (no covariance), the dimensions differ,
    or a value is not finite. Warns when a set has fewer samples than dimensions (the
    covariance is then singular and the distance biased upward).
    """
    real = _as_features(real_features, "real features")
    fake = _as_features(fake_features, "fake features")
    for name, feats in (("real", real), ("fake", fake)):
        if feats.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 {name} samples to estimate a covariance, got "
                             f"{feats.shape[0]}; pass more images (ideally more than the "
                             f"feature dimension, {feats.shape[1]})")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have dimension {real.shape[1]} but fake features "
                         f"{fake.shape[1]}; extract both with the same extractor")
    dim = real.shape[1]
    for name, feats in (("real", real), ("fake", fake)):
        if feats.shape[0] <= dim:
            warnings.warn(f"FID from {feats.shape[0]} {name} samples of dimension {dim}: the "
                          "covariance is singular and the distance biased upward; compare only "
                          "FIDs computed from the same numbers of images", stacklevel=2)
    metric = FrechetInceptionDistance(feature=_Given(dim), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return max(float(metric.compute()), 0.0)  # round-off can leave -1e-12 for equal sets


def fid(real, fake, extractor: str | nn.Module = DEFAULT_FEATURES, blur_radius: float = 0,
        batch_size: int = 64) -> float:
    """FID between two image sets under `extractor` (a spec for `make_feature_extractor` or
    an nn.Module: images [N, 3, H, W] in [0, 1] -> [N, D]). blur_radius > 0 first blurs both
    sets with a Gaussian of that radius in pixels (CogView's FID-k). Both sets must share
    the image size and hold at least 2 images each."""
    real_images, fake_images = image_batch(real, "real"), image_batch(fake, "fake")
    _same_size(real_images, fake_images, ("real", "fake"))
    extractor = make_feature_extractor(extractor)
    return frechet_distance(
        extract_features(gaussian_blur(real_images, blur_radius), extractor, batch_size, "real"),
        extract_features(gaussian_blur(fake_images, blur_radius), extractor, batch_size, "fake"))


def blurred_fid(real, fake, extractor: str | nn.Module = DEFAULT_FEATURES,
                radii: Sequence[float] = FID_RADII, batch_size: int = 64) -> dict:
    """CogView's FID-k for each radius k in `radii`: both sets blurred by a Gaussian of radius
    k pixels, then `fid`. Returns {k: FID-k}. Blur hides fine detail, so the gap between
    FID-0 and FID-k tells how much of the distance is texture rather than layout."""
    if len(radii) == 0:
        raise ValueError("radii is empty; pass e.g. (0, 1, 2, 4, 8)")
    real_images, fake_images = image_batch(real, "real"), image_batch(fake, "fake")
    _same_size(real_images, fake_images, ("real", "fake"))
    extractor = make_feature_extractor(extractor)
    return {k: fid(real_images, fake_images, extractor, blur_radius=k, batch_size=batch_size)
            for k in radii}


# ----------------------------------------------------------------------------------------
# Inception Score


def inception_score_from_logits(logits, splits: int = 10, seed: int = 0) -> dict:
    """IS = exp(E_x KL(p(y|x) || p(y))) from class logits [N, C], by torchmetrics: the rows
    are shuffled (seeded) and cut into `splits` groups, IS per group. Returns
    {"mean", "std" (over groups; 0 for one group), "splits", "n"}."""
    logits = _as_features(logits, "logits")
    n = logits.shape[0]
    if n == 0:
        raise ValueError("IS got no images; pass at least one")
    if not 1 <= splits <= n:
        raise ValueError(f"splits={splits} must be between 1 and the number of images ({n}); "
                         "use fewer splits or more images")
    with warnings.catch_warnings():  # its "features are kept in memory" notice
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=_Given(logits.shape[1]), splits=splits)
    metric.update(logits)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # the shuffle into splits uses the global generator
        warnings.filterwarnings("ignore", message="std\\(\\): degrees of freedom")  # 1 split
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std) if splits > 1 else 0.0,
            "splits": splits, "n": n}


def inception_score(images, classifier: str | nn.Module = DEFAULT_CLASSIFIER, splits: int = 10,
                    seed: int = 0, batch_size: int = 64) -> dict:
    """Inception Score of an image set under `classifier` (a spec for `make_classifier`:
    "oracle" for shapes-zh, "inception:<weights>"; or an nn.Module returning logits [N, C]).
    Returns {"mean", "std", "splits", "n"} (see `inception_score_from_logits`)."""
    batch = image_batch(images, "images")
    logits = extract_features(batch, make_classifier(classifier), batch_size, "images")
    return inception_score_from_logits(logits, splits=splits, seed=seed)


# ----------------------------------------------------------------------------------------
# Caption score


def caption_score_summary(scores) -> dict:
    """Aggregates per-image caption scores (mean log P(text | image) under a caption model;
    see Pipeline.caption_scores): {"mean", "std" (population), "min", "max", "n",
    "per_image"}. ValueError for an empty list or a non-finite score."""
    values = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    if not values:
        raise ValueError("caption_score_summary got no scores; score at least one image")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"caption scores at indices {bad[:10]} are not finite "
                         f"({values[bad[0]]}); check those images and captions")
    array = np.asarray(values)
    return {"mean": float(array.mean()), "std": float(array.std()), "min": float(array.min()),
            "max": float(array.max()), "n": len(values), "per_image": values}


# ----------------------------------------------------------------------------------------
# Super-resolution


def bicubic_upsample(lowres: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL bicubic resize of [N, 3, h, w] in [0, 1] to size (H, W) -> [N, 3, H, W] (uint8
    steps, like a saved upsampled image)."""
    pixels = lowres.mul(255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, h, w, 3)
    up = [np.asarray(Image.fromarray(p).resize((size[1], size[0]), Image.Resampling.BICUBIC))
          for p in pixels]
    return torch.from_numpy(np.stack(up)).permute(0, 3, 1, 2).float() / 255.0


def sr_metrics(sr_images, targets, lowres) -> dict:
    """PSNR (dB) and SSIM of super-resolved images against their targets (the 128 px renders),
    beside bicubic upsampling of the low-res inputs (the 64 px decodes) to the target size.

    Each argument is an image set of the same length (PIL images or tensors). Returns
    {"psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "psnr_gain", "ssim_gain", "n",
    "per_image": [{"psnr", "ssim", "bicubic_psnr", "bicubic_ssim"}]} with means over images
    (identical images give PSNR inf and SSIM 1).
    """
    sr = image_batch(sr_images, "sr_images")
    target = image_batch(targets, "targets")
    low = image_batch(lowres, "lowres")
    if not len(sr) == len(target) == len(low):
        raise ValueError(f"sr_metrics got {len(sr)} sr_images, {len(target)} targets and "
                         f"{len(low)} lowres images; pass one of each per image")
    _same_size(sr, target, ("sr_images", "targets"))
    height, width = target.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"targets are {height}x{width}; SSIM needs images of at least "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} pixels")
    if low.shape[-2] > height or low.shape[-1] > width:
        raise ValueError(f"lowres images are {low.shape[-2]}x{low.shape[-1]}, larger than the "
                         f"targets ({height}x{width}); pass the low-resolution inputs")
    bicubic = bicubic_upsample(low, (height, width))

    def scores(images: torch.Tensor) -> tuple[list[float], list[float]]:
        psnr = peak_signal_noise_ratio(images.double(), target.double(), data_range=1.0,
                                       reduction="none", dim=(1, 2, 3))  # (N,)
        ssim = structural_similarity_index_measure(images.double(), target.double(),
                                                   data_range=1.0, reduction="none")  # (N,)
        return psnr.tolist(), ssim.tolist()

    sr_psnr, sr_ssim = scores(sr)
    bi_psnr, bi_ssim = scores(bicubic)
    result = {"psnr": float(np.mean(sr_psnr)), "ssim": float(np.mean(sr_ssim)),
              "bicubic_psnr": float(np.mean(bi_psnr)), "bicubic_ssim": float(np.mean(bi_ssim))}
    with np.errstate(invalid="ignore"):  # inf - inf when both are exact
        result["psnr_gain"] = float(result["psnr"] - result["bicubic_psnr"])
    result["ssim_gain"] = result["ssim"] - result["bicubic_ssim"]
    result["n"] = len(sr)
    result["per_image"] = [{"psnr": a, "ssim": b, "bicubic_psnr": c, "bicubic_ssim": d}
                           for a, b, c, d in zip(sr_psnr, sr_ssim, bi_psnr, bi_ssim)]
    return result


# ----------------------------------------------------------------------------------------
# Reranking


def rerank_gain(groups) -> dict:
    """Full match of the top-scored candidate vs. a random pick, over prompts.

    groups: one list per prompt of (score, full_match) per candidate image (higher score =
    ranked higher, e.g. the caption score). Per group, "top" is the full match of the
    highest-scored candidate (ties: their mean, i.e. a random tie-break in expectation) and
    "random" the mean full match of all candidates (the expected value of a random pick).
    Returns {"top_full_match", "random_full_match", "gain" (top - random, a fraction; x100
    for points), "n_groups", "n_candidates", "per_group": [{"top", "random"}]}.
    """
    if len(groups) == 0:
        raise ValueError("rerank_gain got no groups; pass one list of (score, full_match) "
                         "per prompt")
    per_group, n_candidates = [], 0
    for g, group in enumerate(groups):
        if len(group) == 0:
            raise ValueError(f"rerank group {g} is empty; each prompt needs at least one candidate")
        try:
            scores = [float(score) for score, _ in group]
            matches = [match for _, match in group]
        except (TypeError, ValueError):
            raise ValueError(f"rerank group {g} must be a list of (score, full_match) pairs, got "
                             f"{list(group)[:3]!r}") from None
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"rerank group {g} has a non-finite score: {scores}")
        if not all(isinstance(m, (bool, np.bool_)) or m in (0, 1) for m in matches):
            raise ValueError(f"rerank group {g}: full_match values must be bools (or 0/1), got "
                             f"{matches}")
        best = max(scores)
        top = [float(m) for s, m in zip(scores, matches) if s == best]
        per_group.append({"top": sum(top) / len(top),
                          "random": sum(float(m) for m in matches) / len(matches)})
        n_candidates += len(group)
    top_mean = float(np.mean([g["top"] for g in per_group]))
    random_mean = float(np.mean([g["random"] for g in per_group]))
    return {"top_full_match": top_mean, "random_full_match": random_mean,
            "gain": top_mean - random_mean, "n_groups": len(per_group),
            "n_candidates": n_candidates, "per_group": per_group}
