"""What generation needs of a model, written down: ``GenerativeModel``.

``cogview.modules.transformer.CogViewTransformer`` has it; any model that does can be driven
by the sampling loop, beam search, caption scoring and super-resolution in this package
(``tests/test_generation_interface.py`` checks the transformer against it).
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

import torch


@runtime_checkable
class GenerativeModel(Protocol):
    """A decoder over the unified vocabulary with a preallocated, position-addressed KV cache.

    ``config``: has ``max_positions`` (the longest sequence) and ``vocab_size`` (ids the
    embedding holds, at least the vocabulary's used ids).
    """

    config: Any
    training: bool

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, start_pos: int | None = None,
                 logits_range: tuple[int, int] | None = None,
                 return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or over ``logits_range`` ids; or the hidden
        states [B, T, C] with ``return_hidden``). With ``start_pos`` the chunk's keys and values
        are written to the cache at that position and attend to everything cached before;
        ``attention_mask`` [B, Lk] is True for real tokens."""

    def logits(self, hidden: torch.Tensor,
               logits_range: tuple[int, int] | None = None) -> torch.Tensor:
        """The output head: hidden [B, T, C] -> logits over ids [lo, hi) (all ids if None)."""

    def setup_kv_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> None:
        """Preallocates the cache for ``batch_size`` rows of ``max_length`` positions."""

    def reorder_kv_cache(self, index: torch.Tensor, start: int | None = None,
                         end: int | None = None) -> None:
        """Keeps cache rows ``index`` in that order (beam search), optionally only positions
        [start, end)."""

    def clear_kv_cache(self) -> None:
        """Frees the cache."""

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Its weights (their dtype and device decide the cache's)."""

    def train(self, mode: bool = True) -> Any:
        """Switches training mode (generation runs in eval mode and restores it)."""

    def eval(self) -> Any:
        """Switches to eval mode."""
