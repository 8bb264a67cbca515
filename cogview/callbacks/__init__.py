"""Lightning callbacks and plugins for training runs: the NaN/overflow monitor and
checkpoints that a kill cannot corrupt."""

from cogview.callbacks.checkpoint import AtomicCheckpointIO, StepCheckpoint, atomic_torch_save
from cogview.callbacks.monitor import NaNMonitor

__all__ = ["AtomicCheckpointIO", "NaNMonitor", "StepCheckpoint", "atomic_torch_save"]
