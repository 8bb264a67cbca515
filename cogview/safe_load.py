"""Loading files a user names without running code hidden in them, and weights checked finite.

- ``load_torch_file``: ``torch.load(mmap=True, weights_only=True)``. Tensors, plain containers
  and a small allowlist (``safe_globals``) load; any other pickled object is refused with
  ``UnsafeCheckpointError`` before it is built, unless the user passes ``trust_pickle=true``.
  Every loader of a user-named ``.pt``/``.ckpt`` goes through it: ``cogview.export``,
  ``task.init_from``, ``ckpt_path`` resume, ``cogview.convert``.
- ``check_finite``: NaN or infinite weights are an error naming the tensor, so a diverged run's
  export cannot silently sample one code everywhere.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

try:  # numpy's array-unpickling function (moved to numpy._core in numpy 2)
    from numpy._core.multiarray import _reconstruct as numpy_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as numpy_reconstruct

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be loaded or converted; the message says why."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs arbitrary pickled objects; only ``trust_pickle=true`` loads it."""


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or infinite values (a diverged or corrupted run)."""


def safe_globals() -> list:
    """What ``weights_only`` loading accepts beyond tensors and plain containers.

    Megatron, DeepSpeed and CogView's own ``save_ds_checkpoint`` store their command line as an
    ``argparse.Namespace`` ("args") and numpy's RNG state (an ndarray) next to the weights.
    Neither can run code when unpickled: a Namespace only receives attributes, an ndarray only
    raw bytes. Any other class is refused (see ``load_torch_file``). cogview's own Lightning
    checkpoints need none of these: they hold tensors, numbers, strings and containers only.
    """
    reconstruct = numpy_reconstruct
    return [
        argparse.Namespace,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # numpy 2 pickles the dtype's class (numpy.dtypes.UInt32DType)
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # name in numpy 1.x pickles
    ]


def load_torch_file(path: str | Path, trust_pickle: bool = False, mmap: bool = True) -> Any:
    """``torch.load`` of ``path`` on CPU, memory-mapped, with weights-only unpickling.

    Tensors stay backed by the file (mmap): nothing is read until used, and a converter that
    writes them out never holds a copy. Files from before PyTorch 1.6 (no zip format) cannot be
    mapped and are read into memory instead (with a warning).

    trust_pickle: False (default) accepts tensors, containers and ``safe_globals()``; a file
    needing anything else raises UnsafeCheckpointError and nothing in it runs. True unpickles
    arbitrary objects, which can execute code hidden in the file: use it only for files from a
    source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    kwargs = dict(map_location="cpu", weights_only=not trust_pickle)
    try:
        return _load(path, mmap=mmap, **kwargs)
    except RuntimeError as error:
        if not mmap or ("zip" not in str(error).lower() and "mmap" not in str(error).lower()):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint this version can read "
                                  f"({error}); is the file complete?") from None
        log.warning("%s is in PyTorch's legacy (pre-1.6) format and cannot be memory-mapped; "
                    "reading it into memory (peak memory about twice the file size)", path)
        return _load(path, mmap=False, **kwargs)


def _load(path: Path, mmap: bool, map_location: str, weights_only: bool) -> Any:
    if not weights_only:
        log.warning("trust_pickle=true: unpickling %s with arbitrary objects allowed", path)
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=False)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"a pickled reference to {found.group(1)}" if found else "pickled Python objects"
        raise UnsafeCheckpointError(
            f"{path} contains {what}, which weights-only loading refuses (it accepts tensors, "
            "numbers, strings, containers, argparse.Namespace and numpy arrays; nothing in the "
            "file was run). If you trust where the file came from, re-run with "
            "trust_pickle=true: that unpickles arbitrary objects, and a malicious file can run "
            "any code on your machine while loading") from None


def check_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                 source: str | Path) -> None:
    """Raises NonFiniteWeightsError naming every floating-point tensor of ``tensors`` (a state
    dict or ``named_parameters()``) that holds NaN or infinite values; one pass over the
    weights, no copy."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad = []
    for name, tensor in items:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan = int(torch.isnan(tensor).sum())
            bad.append(f"{name} ({nan:,} NaN, {int(torch.isinf(tensor).sum()):,} inf of "
                       f"{tensor.numel():,})")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... (+{len(bad) - 5} tensors)" if len(bad) > 5 else "")
        raise NonFiniteWeightsError(
            f"{source}: weights are not finite: {shown}. The run that wrote them diverged or the "
            "file is corrupted; export an earlier checkpoint (its checkpoints/ directory) or "
            "retrain with a lower learning rate")


def check_state_dict(expected: Mapping[str, Any], given: Mapping[str, torch.Tensor],
                     heading: str, hint: str | None = None,
                     error: type[Exception] = ValueError, shown: int = 10) -> None:
    """Raises ``error`` listing every missing, unexpected and mis-shaped key of ``given``
    against ``expected`` (a state dict, or key -> shape; a shape of None is not checked):

        <heading>
          missing keys (2): a, b
          unexpected keys (1): c
          shape mismatches (1): d: checkpoint (3,) vs model (4,)
          <hint>
    """
    def shape(value) -> tuple | None:
        return None if value is None else tuple(getattr(value, "shape", value))

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {shape(expected[k])}"
                  for k in sorted(set(expected) & set(given))
                  if shape(expected[k]) is not None and tuple(given[k].shape) != shape(expected[k])]
    if not (missing or unexpected or mismatched):
        return
    lines = [heading]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            more = f" ... (+{len(items) - shown})" if len(items) > shown else ""
            lines.append(f"  {title} ({len(items)}): {', '.join(items[:shown])}{more}")
    if hint:
        lines.append(f"  {hint}")
    raise error("\n".join(lines))
