"""Dynamic batch size for inference: run items in chunks, halve the chunk on out-of-memory.

    sizer = BatchSizer(12)
    images = run_in_batches(requests, generate_chunk, sizer=sizer, desc="sampling")
    sizer.size  # the batch size that worked (kept for the rest of the run)

A chunk that runs out of memory is retried at half the size (12 -> 6 -> 3 -> 1); the size that
worked is kept for every later chunk, so one OOM costs one retry, not one per chunk. Results come
back in input order, each item exactly once.
"""

from __future__ import annotations

import gc
import logging
from typing import Callable, Sequence, TypeVar

import torch
from tqdm import tqdm

from cogview.validate import check_int

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")

# What allocators say when they run out: CUDA ("CUDA out of memory"), MPS / XPU ("out of
# memory"), and the CPU allocator ("DefaultCPUAllocator: can't allocate memory").
OOM_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch.OutOfMemoryError and RuntimeErrors whose message says memory ran out."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(text in message for text in OOM_MESSAGES)


def free_memory() -> None:
    """Drops unreferenced tensors and returns cached CUDA blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchSizer:
    """The current batch size of a run: starts at ``max_size`` and only ever shrinks."""

    def __init__(self, max_size: int = 12) -> None:
        check_int("max_batch_size", max_size)
        self.max_size = max_size
        self.size = max_size
        self.backoffs = 0  # how many times the size was halved

    def shrink(self, failed_size: int) -> int:
        """Halves the size after a chunk of ``failed_size`` items ran out of memory."""
        self.size = max(1, min(self.size, failed_size // 2))
        self.backoffs += 1
        return self.size

    def __repr__(self) -> str:
        return f"BatchSizer(size={self.size}, max_size={self.max_size}, backoffs={self.backoffs})"


def run_in_batches(items: Sequence[Item], fn: Callable[[list[Item]], Sequence[Result]],
                   max_batch_size: int = 12, desc: str | None = None, progress: bool = True,
                   sizer: BatchSizer | None = None,
                   describe: Callable[[Item], str] = repr) -> list[Result]:
    """Calls ``fn(chunk)`` on consecutive chunks of ``items`` -> one result per item, in order.

    fn must return one result per item of its chunk. On an out-of-memory error the chunk is
    retried at half the size, down to 1; the size that worked is kept in ``sizer`` (pass one to
    read it afterwards or to share it between calls; it then overrides ``max_batch_size``).
    An item that does not fit even alone raises MemoryError naming it (``describe(item)``).
    """
    items = list(items)
    sizer = sizer if sizer is not None else BatchSizer(max_batch_size)
    results: list[Result] = []
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress)
    start = 0
    try:
        while start < len(items):
            chunk = items[start:start + sizer.size]
            try:
                outputs = list(fn(chunk))
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                if len(chunk) == 1:
                    raise MemoryError(
                        f"out of memory on item {describe(chunk[0])} even at batch size 1: "
                        "free memory on the device, use a smaller model or dtype=bf16, or run "
                        "on a device with more memory"
                    ) from error
                oom = str(error).splitlines()[0] if str(error) else type(error).__name__
            else:
                if len(outputs) != len(chunk):
                    raise ValueError(f"the batch function returned {len(outputs)} results for "
                                     f"{len(chunk)} items; it must return one per item")
                results.extend(outputs)
                start += len(chunk)
                bar.update(len(chunk))
                continue
            # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
            free_memory()
            new_size = sizer.shrink(len(chunk))
            log.warning("out of memory at batch size %d (%s); retrying at batch size %d",
                        len(chunk), oom, new_size)
            bar.set_postfix(batch_size=new_size)
    finally:
        bar.close()
    return results
