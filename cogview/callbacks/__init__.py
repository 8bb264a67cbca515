"""Lightning callbacks and plugins for training runs: the NaN/overflow monitor, checkpoints
that a kill cannot corrupt, and shapes-zh oracle accuracy while training."""

from cogview.callbacks.checkpoint import AtomicCheckpointIO, StepCheckpoint, atomic_torch_save
from cogview.callbacks.monitor import NaNMonitor
from cogview.callbacks.shapes_eval import ShapesOracleEval

__all__ = ["AtomicCheckpointIO", "NaNMonitor", "ShapesOracleEval", "StepCheckpoint",
           "atomic_torch_save"]
