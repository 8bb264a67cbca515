"""Super-resolution beyond the model's window: CogView's sliding 3x3 windows over the code grid.

An sr model is trained on one window: ``w x w`` low-res codes -> ``2w x 2w`` high-res codes.
A larger image (low-res grid ``L x L`` with w < L) is done in overlapping windows. Along each
axis the windows start at evenly spaced offsets from 0 to L - w, as many as needed for
neighbours to overlap by at least half a window (3 per axis when L = 2w, CogView's 3x3).
Windows run in row-major order; inside a window the high-res codes that earlier windows already
produced (its top and left overlap) are fed in as known tokens, and only the rest are sampled,
so every high-res code is generated exactly once and each new window continues the pixels
around it instead of starting a seam.

    plan = plan_sr_windows(lowres_side=16, window=8)    # 9 SRWindows
    hr = sliding_window_sr(model, vocab, texts, lowres_grids, window=8, seeds=[0, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cogview.generation.drivers import generate_sr
from cogview.generation.interface import GenerativeModel
from cogview.generation.sampling import generation_mode
from cogview.tokenization.layouts import collate_layouts, sr_layout
from cogview.tokenization.vocab import CogViewVocab
from cogview.validate import check_int


@dataclass(frozen=True)
class SRWindow:
    """One window: low-res codes [top:top+w, left:left+w] -> high-res [2top:2top+2w, 2left:...].

    ``new`` is a BoolTensor [2w, 2w]: the high-res codes this window samples (the others were
    sampled by an earlier window and are kept).
    """

    index: int
    top: int
    left: int
    size: int
    new: torch.Tensor

    @property
    def hr_box(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of the window in the high-res grid."""
        return 2 * self.top, 2 * self.left, 2 * (self.top + self.size), 2 * (self.left + self.size)


def window_offsets(side: int, window: int) -> list[int]:
    """Evenly spaced window starts from 0 to side - window, neighbours overlapping >= window/2."""
    check_int("window", window, meaning="low-res codes per side")
    if side < window:
        raise ValueError(f"the low-res grid ({side} codes per side) is smaller than the sr "
                         f"model's window ({window}); upscale the image or use a model trained "
                         "on smaller windows")
    if side == window:
        return [0]
    count = math.ceil((side - window) / max(1, window // 2)) + 1  # L = 2w -> 3 windows
    return sorted({round(i * (side - window) / (count - 1)) for i in range(count)})


def plan_sr_windows(lowres_side: int, window: int) -> list[SRWindow]:
    """The windows covering an ``L x L`` low-res grid, in generation order, with what each adds."""
    offsets = window_offsets(lowres_side, window)
    done = torch.zeros(2 * lowres_side, 2 * lowres_side, dtype=torch.bool)  # hr codes produced
    plan = []
    for top in offsets:
        for left in offsets:
            t, l, s = 2 * top, 2 * left, 2 * window
            new = ~done[t:t + s, l:l + s]
            done[t:t + s, l:l + s] = True
            plan.append(SRWindow(len(plan), top, left, window, new.clone()))
    return plan


def _square_grids(lowres_grids, text_ids_list: Sequence) -> tuple[torch.Tensor, int, int]:
    """Low-res code grids [B, L, L] with one caption each -> (grids as long, B, L)."""
    lowres_grids = torch.as_tensor(lowres_grids).long()
    if lowres_grids.dim() != 3 or lowres_grids.shape[1] != lowres_grids.shape[2]:
        raise ValueError(f"lowres_grids has shape {tuple(lowres_grids.shape)}; expected "
                         "[B, L, L] square code grids")
    batch, side = lowres_grids.shape[0], lowres_grids.shape[1]
    if len(text_ids_list) != batch:
        raise ValueError(f"got {len(text_ids_list)} captions for {batch} images; pass one each")
    return lowres_grids, batch, side


@torch.inference_mode()
def sliding_window_sr(model: GenerativeModel, vocab: CogViewVocab, text_ids_list: Sequence,
                      lowres_grids: torch.Tensor, window: int, seeds: Sequence[int] | None = None,
                      *, temperature: float = 1.0, top_k: int | None = 200, top_p: float = 1.0,
                      greedy: bool = False, max_text_len: int | None = None,
                      callback: Callable[[int, int], None] | None = None,
                      text_slots: int | None = None) -> torch.Tensor:
    """Low-res code grids [B, L, L] (+ a caption each) -> high-res code grids [B, 2L, 2L].

    ``window`` is the low-res side the sr model was trained on (its export's image_tokens is
    (2 * window)^2). Window k of sample b samples with seed ``seeds[b] * 1000 + k`` so that the
    windows of one image do not repeat each other's random numbers. ``callback(done, total)``
    counts high-res codes over all windows.
    """
    lowres_grids, batch, side = _square_grids(lowres_grids, text_ids_list)
    plan = plan_sr_windows(side, window)
    hr_side, hr_window = 2 * side, 2 * window
    highres = torch.full((batch, hr_side, hr_side), -1, dtype=torch.long)  # -1: not yet sampled
    per_window = hr_window * hr_window
    for win in plan:
        t, l, b, r = win.hr_box
        lowres = lowres_grids[:, win.top:win.top + window, win.left:win.left + window]
        known = highres[:, t:b, l:r].reshape(batch, per_window)  # -1 where this window samples
        window_seeds = None if seeds is None else [int(s) * 1000 + win.index for s in seeds]
        done_before = win.index * per_window

        def report(step: int, total: int, done_before=done_before) -> None:
            if callback is not None:
                callback(done_before + step, len(plan) * per_window)

        codes = generate_sr(model, vocab, text_ids_list, list(lowres.reshape(batch, -1)),
                            per_window, window_seeds, temperature=temperature, top_k=top_k,
                            top_p=top_p, greedy=greedy, max_text_len=max_text_len,
                            known_codes=known, callback=report, text_slots=text_slots)  # (B, (2w)^2)
        highres[:, t:b, l:r] = codes.cpu().view(batch, hr_window, hr_window)
    return highres


# ------------------------------------------------------------------------------------------------
# consistency refinement: the model proposes codes, the low-res input picks among them

@torch.inference_mode()
def sr_code_candidates(model: GenerativeModel, vocab: CogViewVocab, text_ids_list: Sequence,
                       lowres_grids: torch.Tensor, highres: torch.Tensor, window: int,
                       num_candidates: int, *, max_text_len: int | None = None,
                       text_slots: int | None = None) -> torch.Tensor:
    """The sr model's ``num_candidates`` most likely codes at every high-res position, each
    given the codes before it in ``highres`` (teacher forcing, window by window in the order
    `sliding_window_sr` generated them) -> LongTensor [B, 2L, 2L, num_candidates], best first.
    """
    lowres_grids, batch, side = _square_grids(lowres_grids, text_ids_list)
    if tuple(highres.shape) != (batch, 2 * side, 2 * side):
        raise ValueError(f"highres has shape {tuple(highres.shape)}; expected "
                         f"{(batch, 2 * side, 2 * side)} for low-res grids of {side} codes per side")
    check_candidate_count("num_candidates", num_candidates, vocab.num_image_codes)
    device = next(model.parameters()).device
    out = torch.empty(*highres.shape, num_candidates, dtype=torch.long)
    hr_window = 2 * window
    span = hr_window * hr_window  # a window's codes sit just before its final [EOI2]
    with generation_mode(model):
        for win in plan_sr_windows(side, window):
            t, l, b, r = win.hr_box
            lowres = lowres_grids[:, win.top:win.top + window, win.left:win.left + window]
            codes = highres[:, t:b, l:r]
            layouts = [sr_layout(vocab, text, low.reshape(-1), high.reshape(-1),
                                 max_text_len=max_text_len, text_slots=text_slots)
                       for text, low, high in zip(text_ids_list, lowres, codes)]
            ids = collate_layouts(layouts, vocab.pad_id, padding_side="left")  # rows end together
            logits = model(ids["input_ids"].to(device), ids["position_ids"].to(device),
                           ids["attention_mask"].to(device),
                           logits_range=vocab.image_range)  # image codes only: (B, T, K)
            image_logits = logits[:, -span - 2:-2].float()  # position t predicts t + 1
            top = image_logits.topk(num_candidates, dim=-1).indices.cpu()
            top = top.view(batch, hr_window, hr_window, num_candidates)
            out[:, t:b, l:r][:, win.new] = top[:, win.new]
    return out


def check_candidate_count(name: str, value, limit: int) -> None:
    """Candidates per position: an int in 1..limit (the codebook size)."""
    check_int(name, value, 1, limit, meaning="codebook entries")


@torch.inference_mode()
def codebook_candidates(vqvae: nn.Module, pixels: torch.Tensor, count: int) -> torch.Tensor:
    """Candidates without the model: the ``count`` codebook entries nearest to the VQ-VAE
    encoder's latents of the bicubic 2x upsample of ``pixels`` [B, 3, h, w] in [0, 1]
    -> LongTensor [B, h/4, w/4, count], nearest first (the first is the upsample's own code)."""
    check_candidate_count("count", count, vqvae.num_codes)
    device = vqvae.pixel_mean.device
    upsampled = F.interpolate(pixels.float().to(device), scale_factor=2, mode="bicubic",
                              align_corners=False).clamp(0, 1)
    latents = vqvae.encoder((upsampled - vqvae.pixel_mean) / vqvae.pixel_std).float()
    batch, dim, height, width = latents.shape
    flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*H*W, D)
    codebook = vqvae.codebook.float()
    rows = max(1, 2 ** 24 // codebook.shape[0])  # distance matrices of at most 16M entries
    nearest = torch.cat([torch.cdist(flat[i:i + rows], codebook).topk(count, -1,
                                                                       largest=False).indices
                         for i in range(0, len(flat), rows)])
    return nearest.view(batch, height, width, count).cpu()


def check_refine_args(sweeps, candidates: int = 1, codebook: int = 0,
                      num_codes: int | None = None) -> None:
    """Refuses refinement settings that are not ints in range, naming the value and the fix
    (``num_codes``: the codebook size, the most candidates there are)."""
    for name, value, low in (("refine_sweeps", sweeps, 0), ("refine_candidates", candidates, 1),
                             ("refine_codebook", codebook, 0)):
        check_int(name, value, low, meaning="0: no consistency refinement"
                  if name == "refine_sweeps" else "0: none" if low == 0 else None)
        if num_codes is not None and name != "refine_sweeps" and value > num_codes:
            raise ValueError(f"{name}={value} is more than the {num_codes} codebook entries; "
                             f"use at most {num_codes}")


def _neighbourhood_error(pixels: torch.Tensor, target: torch.Tensor, grid: int) -> torch.Tensor:
    """Squared error of pixels [N, 3, h, w] downsampled to target [N, 3, h', w'], summed over
    each code's 3x3 code neighbourhood -> [N, grid, grid]."""
    small = F.interpolate(pixels.float(), size=target.shape[-2:], mode="bicubic",
                          antialias=True, align_corners=False)
    error = (small - target).pow(2).sum(1, keepdim=True)  # (N, 1, h', w')
    per_code = F.adaptive_avg_pool2d(error, grid) * (error.shape[-1] // grid) ** 2
    return (F.avg_pool2d(F.pad(per_code, (1, 1, 1, 1)), 3, stride=1) * 9)[:, 0]


@torch.inference_mode()
def refine_sr_codes(decode: Callable[[torch.Tensor], torch.Tensor], codes: torch.Tensor,
                    candidates: torch.Tensor, lowres_pixels: torch.Tensor, sweeps: int = 2,
                    spacing: int = 3, max_decode_batch: int = 64,
                    callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Consistency refinement (back-projection in code space): each high-res code becomes the
    one of its candidates whose decoded pixels, downsampled to the input's size, best match the
    low-res input over its 3x3 code neighbourhood; the current code stays unless a candidate
    does better. Each candidate is scored with the group's other codes set to their candidate
    of the same rank, so the choice is approximate where a decoder's reach spans 3 codes.

    decode: code grids [N, H, W] -> pixels [N, 3, 8H, 8W] in [0, 1] (``VQVAE.decode``).
    codes [B, H, W]; candidates [B, H, W, k] (e.g. `sr_code_candidates`); lowres_pixels
    [B, 3, h, w] in [0, 1] with h and w multiples of H and W (the input image). Codes
    ``spacing`` apart change together (spacing^2 groups per sweep, a decode per candidate
    each); a sweep that changes nothing ends the search. ``callback(done, total)`` counts groups.
    Returns the refined codes [B, H, W].
    """
    if codes.dim() != 3 or tuple(candidates.shape[:3]) != tuple(codes.shape):
        raise ValueError(f"codes {tuple(codes.shape)} and candidates {tuple(candidates.shape)}: "
                         "expected [B, H, W] and [B, H, W, k]")
    batch, height, width = codes.shape
    if lowres_pixels.dim() != 4 or lowres_pixels.shape[0] != batch or \
            lowres_pixels.shape[-2] % height or lowres_pixels.shape[-1] % width or height != width:
        raise ValueError(f"lowres_pixels has shape {tuple(lowres_pixels.shape)} for a "
                         f"{height}x{width} code grid; expected [{batch}, 3, h, w] with h and w "
                         "multiples of a square code grid")
    check_int("sweeps", sweeps, 0, meaning="0: no refinement")
    current = codes.clone().cpu()
    candidates = candidates.cpu()
    count = candidates.shape[-1] + 1  # the current code, then the candidates
    targets = lowres_pixels.float().cpu().repeat_interleave(count, 0)  # one per variant
    check_int("spacing", spacing, meaning="3: codes whose 3x3 neighbourhoods do not overlap "
              "change together")
    groups = [(a, b) for a in range(spacing) for b in range(spacing)]
    total = sweeps * len(groups)
    for sweep in range(sweeps):
        changed = 0
        for g, (a, b) in enumerate(groups):
            group = (slice(None), slice(a, None, spacing), slice(b, None, spacing))
            options = torch.cat([current[..., None], candidates], -1)[group]  # (B, h_g, w_g, C)
            variants = current[:, None].repeat(1, count, 1, 1)  # (B, C, H, W)
            variants[:, :, a::spacing, b::spacing] = options.permute(0, 3, 1, 2)
            flat = variants.view(-1, height, width)
            errors = []
            for i in range(0, len(flat), max_decode_batch):
                pixels = decode(flat[i:i + max_decode_batch])  # compared where it was decoded
                errors.append(_neighbourhood_error(
                    pixels, targets[i:i + max_decode_batch].to(pixels.device), height).cpu())
            errors = torch.cat(errors).view(batch, count, height, width)
            best = errors[:, :, a::spacing, b::spacing].argmin(1)  # (B, h_g, w_g); ties: current
            chosen = options.gather(-1, best[..., None])[..., 0]
            changed += int((chosen != current[group]).sum())
            current[group] = chosen
            if callback is not None:
                callback(sweep * len(groups) + g + 1, total)
        if not changed:
            break
    if callback is not None:
        callback(total, total)
    return current


# ------------------------------------------------------------------------------------------------
# the whole algorithm: sample -> candidates -> refine (decoding is the caller's)


@dataclass
class SRSettings:
    """How to super-resolve: sampling (``greedy`` takes the most likely code) and refinement
    (``refine_sweeps`` 0 keeps the sampled codes; ``refine_candidates`` of the model's,
    ``refine_codebook`` nearest codebook entries)."""

    temperature: float = 1.0
    top_k: int | None = 200
    top_p: float = 1.0
    greedy: bool = False
    refine_sweeps: int = 2
    refine_candidates: int = 8
    refine_codebook: int = 0


def sr_proposals(model: GenerativeModel, vocab: CogViewVocab, vqvae: nn.Module,
                 text_ids_list: Sequence, lowres: torch.Tensor, pixels: torch.Tensor,
                 window: int, seeds: Sequence[int] | None, settings: SRSettings, *,
                 max_text_len: int | None = None, text_slots: int | None = None,
                 callback: Callable[[int, int], None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampled high-res codes [B, 2L, 2L] (sliding windows) and the refinement's candidates
    [B, 2L, 2L, K] (the model's most likely codes, then the codebook's nearest), or None when
    no refinement runs."""
    sampled = sliding_window_sr(model, vocab, text_ids_list, lowres, window, seeds,
                                temperature=settings.temperature, top_k=settings.top_k,
                                top_p=settings.top_p, greedy=settings.greedy,
                                max_text_len=max_text_len, callback=callback,
                                text_slots=text_slots)
    if not settings.refine_sweeps:
        return sampled, None
    candidates = sr_code_candidates(model, vocab, text_ids_list, lowres, sampled, window,
                                    settings.refine_candidates, max_text_len=max_text_len,
                                    text_slots=text_slots)
    if settings.refine_codebook:
        candidates = torch.cat([candidates, codebook_candidates(vqvae, pixels,
                                                                settings.refine_codebook)], -1)
    return sampled, candidates


def super_resolve_codes(model: GenerativeModel, vocab: CogViewVocab, vqvae: nn.Module,
                        text_ids_list: Sequence, lowres: torch.Tensor, pixels: torch.Tensor,
                        window: int, seeds: Sequence[int] | None, settings: SRSettings, *,
                        max_text_len: int | None = None, text_slots: int | None = None,
                        progress: Callable[[str], Callable[[int, int], None]] | None = None
                        ) -> torch.Tensor:
    """Token-space 2x super-resolution, the whole algorithm: low-res codes [B, L, L] of the
    input pixels [B, 3, 8L, 8L] (+ a caption each) -> high-res codes [B, 2L, 2L], sampled
    window by window and refined against the pixels. ``Pipeline.super_resolve`` (and through
    it ``cogview infer task=sr`` and the app) and the sr benchmarks run it.

    progress: called with "sample", then "refine", as each stage starts; it returns that
    stage's ``callback(done, total)``."""
    check_refine_args(settings.refine_sweeps, settings.refine_candidates,
                      settings.refine_codebook, num_codes=vocab.num_image_codes)
    sampled, candidates = sr_proposals(model, vocab, vqvae, text_ids_list, lowres, pixels,
                                       window, seeds, settings, max_text_len=max_text_len,
                                       text_slots=text_slots,
                                       callback=progress("sample") if progress else None)
    if candidates is None:
        return sampled
    return refine_sr_codes(vqvae.decode, sampled, candidates, pixels,  # decode moves the codes
                           sweeps=settings.refine_sweeps,
                           max_decode_batch=len(text_ids_list),  # as many as the final decode
                           callback=progress("refine") if progress else None)
