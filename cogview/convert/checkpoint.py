"""Reading CogView's checkpoint files safely and writing safetensors without copies.

- ``find_model_states``: a Megatron/DeepSpeed (or SwissArmyTransformer) checkpoint directory
  -> the path of its ``<iteration>/mp_rank_00_model_states.pt``.
- ``load_torch_file`` (cogview.safe_load): ``torch.load(mmap=True, weights_only=True)`` with a
  small allowlist; anything else is refused unless the user passes ``trust_pickle=true``.
- ``write_safetensors``: streams tensors to a ``.safetensors`` file one at a time, straight from
  their (memory-mapped) storage, so converting never holds a second copy of the weights.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from cogview.safe_load import (  # noqa: F401  (re-exported: cogview.convert's API)
    CheckpointError,
    UnsafeCheckpointError,
    load_torch_file,
    safe_globals,
)

log = logging.getLogger(__name__)

# Megatron-LM / CogView name the iteration file latest_checkpointed_iteration.txt; DeepSpeed and
# SwissArmyTransformer name it latest. Either holds an iteration number (or "release").
ITERATION_FILES = ("latest_checkpointed_iteration.txt", "latest")
MODEL_STATES = "mp_rank_00_model_states.pt"


def find_model_states(src: str | Path) -> Path:
    """The model-states file of a checkpoint directory (or ``src`` itself when it is a file).

    The directory must hold an iteration file (``latest_checkpointed_iteration.txt`` or
    ``latest``) naming the subdirectory that holds ``mp_rank_00_model_states.pt``.
    """
    src = Path(src)
    if src.is_file():
        return src
    if not src.is_dir():
        raise FileNotFoundError(f"src={src}: no such checkpoint directory or file")
    iteration_file = next((src / name for name in ITERATION_FILES if (src / name).is_file()), None)
    if iteration_file is None:
        raise CheckpointError(
            f"src={src} has no iteration file ({' or '.join(ITERATION_FILES)}): point src at "
            "the checkpoint directory that holds it (e.g. the unpacked cogview-base/), or at the "
            f"{MODEL_STATES} file itself")
    iteration = iteration_file.read_text().strip()
    if not iteration:
        raise CheckpointError(f"{iteration_file} is empty; it should hold the iteration number "
                              "(the name of the subdirectory with the weights)")
    step_dir = src / iteration
    path = step_dir / MODEL_STATES
    if not path.is_file():
        raise FileNotFoundError(
            f"{iteration_file} names iteration {iteration!r} but {path} does not exist; "
            "is the checkpoint fully unpacked?")
    ranks = sorted(p.name for p in step_dir.glob("mp_rank_*_model_states.pt"))
    if len(ranks) > 1:
        raise CheckpointError(
            f"{step_dir} holds a model-parallel checkpoint ({', '.join(ranks)}); only single-rank "
            "checkpoints (model-parallel size 1, as CogView released them) can be converted: "
            "merge the ranks first")
    return path


def extract_state_dict(checkpoint: Any, path: str | Path,
                       entries: tuple[str, ...] = ("module",)) -> dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint: under the first of ``entries`` present, else the
    top-level mapping itself when it holds tensors. Non-tensor values are an error."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a dict of weights")
    state = next((checkpoint[name] for name in entries if name in checkpoint), None)
    if state is None:
        if not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise CheckpointError(
                f"{path} has no {' or '.join(repr(e) for e in entries)} entry with the weights "
                f"(top-level keys: {sorted(map(str, checkpoint))[:12]})")
        state = checkpoint
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: the weights entry is a {type(state).__name__}, not a dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors and state is not checkpoint:
        raise CheckpointError(f"{path}: weights entry {not_tensors[0]!r} is a "
                              f"{type(state[not_tensors[0]]).__name__}, not a tensor")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------------------
# safetensors, written tensor by tensor

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 array sharing its memory (a copy only if not contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)  # (N,)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Writes ``tensors`` (CPU) to ``path`` in the safetensors format, one tensor at a time.

    Unlike ``safetensors.torch.save_file``, which first gathers every tensor's bytes, each
    tensor is written straight from its storage, so the extra memory is at most one
    non-contiguous tensor. The file appears atomically (written as ``<path>.tmp``, renamed).
    """
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot "
                            f"store; supported: {sorted(map(str, SAFETENSORS_DTYPES))}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for tensor in tensors.values():
            handle.write(_raw_bytes(tensor))
    os.replace(tmp, path)
    return path
