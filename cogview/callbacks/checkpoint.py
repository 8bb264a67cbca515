"""Checkpoints that a kill at any moment cannot corrupt: atomic writes (temp file, fsync,
rename), and a ModelCheckpoint whose last.ckpt always holds the final step."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: the checkpoint is streamed into
    ``.<name>.tmp<pid>`` in the target's directory, fsynced, then ``os.replace``d onto the
    final name (and the directory fsynced). Readers, and a run resumed after a kill or power
    loss, see either the previous complete file or the new complete file, never a prefix.

    Remote paths (``s3://`` ...) go through Lightning's own writer: object stores publish
    whole objects only. Pass it as ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        """Writes ``checkpoint`` to ``path`` through a temporary file and a rename."""
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # and the rename itself survives a power loss
    return path


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Deletes the temporary files of checkpoint writes that were killed (``.<name>.tmp<pid>``
    whose writer process no longer runs on this machine); returns what was removed. A write
    in progress (its process alive) is left alone. train.py calls it before fitting."""
    directory = Path(directory)
    removed = []
    for temporary in directory.glob(".*.tmp*") if directory.is_dir() else ():
        found = re.fullmatch(r"\..+\.tmp(\d+)", temporary.name)
        if found is None or not temporary.is_file() or _process_alive(int(found.group(1))):
            continue
        size = temporary.stat().st_size
        temporary.unlink(missing_ok=True)
        removed.append(temporary)
        log.info("removed %s (%.1f MB), left by a checkpoint write that was killed",
                 temporary, size / 1e6)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose end-of-training state is always on disk: when training ends
    (``max_steps`` reached, a stop requested, time up) on a step not saved yet, it writes
    ``last.ckpt`` (with ``save_last``; otherwise a numbered checkpoint). Plain
    ``ModelCheckpoint`` would leave ``last.ckpt`` at the last multiple of
    ``every_n_train_steps`` and lose the steps after it.

    Writes are atomic when the trainer uses :class:`AtomicCheckpointIO` (``build_trainer``
    adds it); keep ``save_last: true`` (a full file) rather than ``"link"``, whose
    remove-then-symlink leaves a moment with no ``last.ckpt``.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if self.save_last:
                self._save_last_checkpoint(trainer, candidates)
            elif self.save_top_k != 0:
                self._save_topk_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
