"""Next-token losses of the CogView backbone over its span's ids (``loss_vocab=span``) or the
whole vocabulary (``loss_vocab=full``, CogView's loss).

Span rule (the sampler's, ``cogview.generation.sampling``): an image target is scored only
against the image codes, a text target only against the text ids plus the command ids that
may end a text in this layout (t2i: ``[BASE]``; caption: its end token, if the data appends
one). Those end ids are targets of the text group too, so a captioner learns where to stop.
The remaining command targets (``[BOI1]`` after ``[BASE]``, ``[EOI1]``/``[EOI2]`` after the
last code) are fixed by the layout, never drawn, and have a single candidate: with ``span``
they leave the loss (and its normaliser).

``linear_cross_entropy`` scores final hidden states against a slice of the tied output
embedding in chunks of rows and computes the gradient in the same pass, so neither the
``[B, T, V]`` logits nor even a group's ``[N, V']`` logits are kept for backward: memory is
one chunk of logits plus the gradients of the hidden states and of the slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

LOSS_VOCABS = ("span", "full")
CHUNK_ELEMENTS = 1 << 21  # logits per chunk (8 MiB in fp32)


def check_loss_vocab(value: str) -> str:
    """``value`` if it names a loss vocabulary, else a ValueError naming the choices."""
    if value not in LOSS_VOCABS:
        raise ValueError(f"task.loss_vocab={value!r}: choose 'span' (each target against its "
                         "span's ids; the default for new training) or 'full' (the whole "
                         "vocabulary, CogView's loss, e.g. to fine-tune converted weights)")
    return value


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight^T, target_i) * scale, gradient computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, scale, compute_dtype, chunk_rows):
        rows = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        losses = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        grad_hidden = (torch.empty(rows, hidden.shape[1], dtype=torch.float32, device=hidden.device)
                       if want_hidden else None)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if want_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            for start in range(0, rows, chunk_rows):
                stop = min(start + chunk_rows, rows)
                h = hidden[start:stop].to(compute_dtype)  # (n, C)
                logits = (h @ w.t()).float()  # (n, V')
                target = targets[start:stop, None]
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
                losses[start:stop] = (lse - logits.gather(1, target)).squeeze(1)
                if not (want_hidden or want_weight):
                    continue
                # d CE / d logits = softmax - one_hot, weighted per row (weights of order 1,
                # so the half-precision matmuls below neither underflow nor overflow)
                grad = logits.sub_(lse).exp_()
                grad.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=grad.dtype))
                grad = (grad * row_weights[start:stop, None]).to(compute_dtype)
                if want_hidden:
                    grad_hidden[start:stop] = grad @ w
                if want_weight:
                    grad_weight += grad.t() @ h
        if want_hidden:
            grad_hidden *= scale
        if want_weight:
            grad_weight *= scale
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(losses)
        return (losses * row_weights).sum() * scale, losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        out_hidden = (grad_hidden * grad_total).to(hidden_dtype) if grad_hidden is not None else None
        out_weight = (grad_weight * grad_total).to(weight_dtype) if grad_weight is not None else None
        return out_hidden, out_weight, None, None, None, None, None


def compute_dtype_for(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the output head's matmuls run in: autocast's where autocast is on."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensor.dtype


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         row_weights: torch.Tensor | None = None, scale: float = 1.0,
                         chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of ``hidden @ weight.T`` against ``targets``, chunked over rows.

    hidden [N, C], weight [V', C], targets [N] in [0, V'), row_weights [N] (default ones).
    Returns (``scale * sum_i row_weights_i * CE_i``, a differentiable scalar; the per-row
    CE [N] in fp32, detached). The logits of one chunk of rows exist at a time (default:
    about 2M logits), in autocast's dtype when autocast is on, reduced in fp32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                         "[N, C] and [V', C]")
    if row_weights is None:
        row_weights = torch.ones(hidden.shape[0], device=hidden.device)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, targets.long(), row_weights.float(),
                                     float(scale), compute_dtype_for(hidden), int(chunk_rows))


@dataclass
class SpanGroups:
    """Which targets each span scores and against which ids.

    image, text: bool [B, T] masks of the targets scored against the image codes and
    against ``text_candidates`` (the text ids, then ``end_ids``).
    """

    image: torch.Tensor
    text: torch.Tensor
    text_candidates: torch.Tensor


def span_groups(vocab, targets: torch.Tensor, target_mask: torch.Tensor,
                end_ids: Sequence[int] = ()) -> SpanGroups:
    """Splits the targets [B, T] (``target_mask``: those in the loss) into the span groups."""
    end = torch.tensor(sorted(set(int(i) for i in end_ids)), dtype=torch.long,
                       device=targets.device)
    is_end = torch.isin(targets, end) if end.numel() else torch.zeros_like(target_mask)
    text = target_mask & (vocab.is_text(targets) | is_end)
    image = target_mask & vocab.is_image(targets)
    candidates = torch.cat([torch.arange(*vocab.text_range, device=targets.device), end])
    return SpanGroups(image=image, text=text, text_candidates=candidates)


def span_column(vocab, targets: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Text-group targets (vocabulary ids) -> their column among ``candidates``."""
    text_lo, text_hi = vocab.text_range
    column = targets - text_lo
    ends = candidates[text_hi - text_lo:]
    for offset, end_id in enumerate(ends.tolist()):
        column = torch.where(targets == end_id, text_hi - text_lo + offset, column)
    return column


def span_loss(model, hidden: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor,
              weights: torch.Tensor, vocab, end_ids: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """Weighted next-token loss of ``model`` (tied head ``model.word_embeddings``) over spans.

    hidden [B, T, C] final hidden states, targets [B, T], target_mask [B, T] (True: in the
    loss), weights [B, T] (each target's weight; 0 off the targets).
    Returns ``loss`` (sum of weighted CE / sum of weights, over the span-scored targets) and,
    where present, ``image_loss`` / ``text_loss`` (mean CE of image / text-id targets).
    """
    groups = span_groups(vocab, targets, target_mask, end_ids)
    denominator = (weights * (groups.image | groups.text)).sum().clamp_min(1.0)
    # targets of weight 0 (txt_loss_scale=0: those predicted from text positions) change
    # neither the loss nor its gradient: skip their rows
    groups.image &= weights > 0
    groups.text &= weights > 0
    embedding = model.word_embeddings.weight
    loss = hidden.new_zeros((), dtype=torch.float32)
    parts = {}
    image_lo, image_hi = vocab.image_range
    for name, mask, weight, columns in (
        ("image", groups.image, embedding[image_lo:image_hi], lambda t: t - image_lo),
        ("text", groups.text, embedding.index_select(0, groups.text_candidates),
         lambda t: span_column(vocab, t, groups.text_candidates)),
    ):
        if not bool(mask.any()):
            continue
        rows = mask.nonzero(as_tuple=True)
        group_targets = targets[rows]
        total, losses = linear_cross_entropy(hidden[rows], weight, columns(group_targets),
                                             weights[rows], scale=1.0 / float(denominator))
        loss = loss + total
        if name == "text":  # the text part: text-id targets only, as with the full vocabulary
            keep = vocab.is_text(group_targets)
            if bool(keep.any()):
                parts["text_loss"] = losses[keep].mean()
        else:
            parts["image_loss"] = losses.mean()
    return {"loss": loss, **parts}


def full_loss(logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor,
              weights: torch.Tensor, vocab) -> dict[str, torch.Tensor]:
    """CogView's loss: every target against the whole vocabulary (logits [B, T, V])."""
    token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                 reduction="none").view_as(targets)  # (B, T)
    loss = (token_loss * weights).sum() / weights.sum().clamp_min(1.0)
    parts = {}  # command-token targets ([BOI1], [EOI1], ...) count only in the total
    for name, mask in (("image", target_mask & vocab.is_image(targets)),
                       ("text", target_mask & vocab.is_text(targets))):
        if mask.any():
            parts[f"{name}_loss"] = token_loss[mask].mean().detach()
    return {"loss": loss, **parts}
