"""PB-relax masked softmax (CogView, section 2.4), backed by the fused kernel in cogview._C.

    probs = softmax((S - rowmax(S)) * alpha),    S = (Q / (alpha * sqrt(d))) K^T

The caller builds the scores with Q already divided by alpha * sqrt(d), so Q K^T stays
small enough for fp16; the row max is subtracted from those small scores, and only then
are they multiplied back by alpha (alpha = 32 in CogView), exponentiated and normalised,
always accumulating in fp32 (fp64 for double input).

Masking: `causal` lets query i see keys j <= i + (Lk - Lq) (with Lq < Lk the queries are
the last Lq positions, as when decoding with a KV cache); `key_mask` is a bool tensor
[..., Lk] (True = keep) broadcast over the batch dims and the query dim. A row that sees
no key at all gets zeros, not NaN, in the forward and the backward.

`pb_relax_softmax` runs the compiled kernel for CPU (float32/64, bfloat16, float16) and,
when built with CUDA, for CUDA tensors; without it, it warns once and runs
`pb_relax_softmax_reference`, the same math composed of eager PyTorch ops.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.autograd.function import once_differentiable

try:
    from cogview import _C
except ImportError as error:  # the extension has not been built
    _C = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_fallback_warned: set[str] = set()  # device types already warned about


def has_kernel(device: torch.device | str) -> bool:
    """True when cogview._C is built and has a kernel for tensors on `device`."""
    device = torch.device(device)
    if _C is None:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and bool(_C.with_cuda())


def pb_relax_softmax(scores: torch.Tensor, alpha: float = 32.0, causal: bool = True,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Masked PB-relax softmax over the last dim of scores [..., Lq, Lk] (fused kernel).

    scores: (Q / (alpha * sqrt(d))) @ K^T in the compute dtype. key_mask: bool [..., Lk],
    True = keep, broadcastable to scores.shape[:-2] + [Lk]. Returns probs in scores.dtype.
    """
    _check_arguments(scores, alpha)
    key_mask = _normalize_key_mask(key_mask, scores)
    if has_kernel(scores.device) and scores.dtype in KERNEL_DTYPES:
        return PBRelaxSoftmaxFunction.apply(scores, float(alpha), bool(causal), key_mask)
    _warn_fallback(scores)
    return _reference(scores, alpha, causal, key_mask)


def pb_relax_softmax_reference(scores: torch.Tensor, alpha: float = 32.0, causal: bool = True,
                               key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same math as `pb_relax_softmax` in eager PyTorch ops (the fallback and test oracle)."""
    _check_arguments(scores, alpha)
    return _reference(scores, alpha, causal, _normalize_key_mask(key_mask, scores))


def _reference(scores: torch.Tensor, alpha: float, causal: bool,
               key_mask: torch.Tensor | None) -> torch.Tensor:
    num_queries, num_keys = scores.shape[-2:]
    x = scores if scores.dtype == torch.float64 else scores.float()  # (..., Lq, Lk) in fp32
    keep = _keep_mask(num_queries, num_keys, causal, key_mask, scores.device)  # (..., Lq, Lk)|None
    if keep is not None:
        has_key = keep.any(-1, keepdim=True)  # (..., Lq, 1)
        x = x.masked_fill(~keep, float("-inf"))
        x = x.masked_fill(~has_key, 0.0)  # rows that see no key: finite here, zeroed below
    # Softmax is shift invariant, so no gradient flows through the max (as in the kernel).
    row_max = x.detach().amax(-1, keepdim=True)  # (..., Lq, 1)
    probs = torch.softmax((x - row_max) * alpha, dim=-1)
    if keep is not None:
        probs = probs.masked_fill(~has_key, 0.0)
    return probs.to(scores.dtype)


class PBRelaxSoftmaxFunction(torch.autograd.Function):
    """Autograd over the cogview._C kernel; the backward needs only the saved probs."""

    @staticmethod
    def forward(ctx, scores, alpha, causal, key_mask):
        probs = _C.pb_relax_softmax_forward(scores, alpha, causal, key_mask)
        ctx.save_for_backward(probs)
        ctx.alpha, ctx.causal = alpha, causal
        return probs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        # grad_scores = alpha * P * (dP - sum(dP * P)); 0 where masked.
        grad_scores = _C.pb_relax_softmax_backward(grad_probs.contiguous(), probs, ctx.alpha,
                                                   ctx.causal)
        return grad_scores, None, None, None


def _check_arguments(scores: torch.Tensor, alpha: float) -> None:
    if scores.dim() < 2:
        raise ValueError(f"pb_relax_softmax: scores must have shape [..., Lq, Lk], "
                         f"got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"pb_relax_softmax: scores must be a floating point tensor, "
                        f"got {scores.dtype}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"pb_relax_softmax: alpha must be a positive finite number, got {alpha} "
                         "(CogView uses 32; 1 gives a plain softmax)")


def _normalize_key_mask(key_mask: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor | None:
    """Checks key_mask against scores and returns it as bool [..., Lk] on the scores' device."""
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool:
        raise TypeError(f"pb_relax_softmax: key_mask must be a bool tensor (True = keep), "
                        f"got {key_mask.dtype}; pass key_mask.bool()")
    if key_mask.dim() == scores.dim() and key_mask.shape[-2] == 1:
        key_mask = key_mask.squeeze(-2)  # [..., 1, Lk] with a singleton query dim
    batch, num_keys = scores.shape[:-2], scores.shape[-1]
    leading = key_mask.shape[:-1]
    broadcasts = (
        1 <= key_mask.dim() <= len(batch) + 1
        and key_mask.shape[-1] == num_keys
        and all(m in (1, b) for m, b in zip(reversed(leading), reversed(batch)))
    )
    if not broadcasts:
        raise ValueError(
            f"pb_relax_softmax: key_mask of shape {tuple(key_mask.shape)} does not broadcast to "
            f"the scores' batch shape {tuple(batch)} + [Lk={num_keys}]; a per-sample mask [B, Lk] "
            "over scores [B, H, Lq, Lk] is passed as key_mask[:, None, :]")
    return key_mask.to(scores.device)


def _keep_mask(num_queries: int, num_keys: int, causal: bool, key_mask: torch.Tensor | None,
               device: torch.device) -> torch.Tensor | None:
    """Bool mask broadcastable to (..., Lq, Lk): True where query i may attend key j."""
    keep = None
    if causal:  # the queries are the last Lq of the Lk positions
        keep = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
        keep = keep.tril(num_keys - num_queries)  # (Lq, Lk)
    if key_mask is not None:
        keys = key_mask.unsqueeze(-2)  # (..., 1, Lk)
        keep = keys if keep is None else keep & keys
    return keep


def _warn_fallback(scores: torch.Tensor) -> None:
    device = scores.device
    if device.type in _fallback_warned:
        return
    _fallback_warned.add(device.type)
    if _C is None:
        reason = f"the extension cogview._C is not built ({_IMPORT_ERROR})"
    elif device.type == "cuda":
        reason = "cogview._C was built without CUDA (build it with a CUDA torch and nvcc on PATH)"
    else:
        reason = f"cogview._C has no kernel for {scores.dtype} tensors on {device.type}"
    warnings.warn(
        f"pb_relax_softmax: {reason}; falling back to the slower PyTorch reference "
        "implementation. Build the extension with `make install`.",
        RuntimeWarning,
        stacklevel=3,
    )
