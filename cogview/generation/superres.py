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
from torch import nn

from cogview.generation.sampling import generate_sr
from cogview.tokenization.vocab import CogViewVocab


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
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be a positive int (low-res codes per side)")
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


@torch.inference_mode()
def sliding_window_sr(model: nn.Module, vocab: CogViewVocab, text_ids_list: Sequence,
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
    lowres_grids = torch.as_tensor(lowres_grids).long()
    if lowres_grids.dim() != 3 or lowres_grids.shape[1] != lowres_grids.shape[2]:
        raise ValueError(f"lowres_grids has shape {tuple(lowres_grids.shape)}; expected "
                         "[B, L, L] square code grids")
    batch, side = lowres_grids.shape[0], lowres_grids.shape[1]
    if len(text_ids_list) != batch:
        raise ValueError(f"got {len(text_ids_list)} captions for {batch} images; pass one each")
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
