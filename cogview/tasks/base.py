"""What every cogview task shares: its optimiser and its checkpoint identity."""

from __future__ import annotations

import lightning as L

from cogview.export import TASK_KEY, task_class_path
from cogview.tasks.optim import build_optimizer


class CogViewTask(L.LightningModule):
    """A task owns ``self.model`` and hparams lr, weight_decay, betas, warmup_steps and
    min_lr_ratio; subclasses add the loss, samples and ``export``."""

    def configure_optimizers(self):
        hp = self.hparams
        return build_optimizer(self.model, hp.lr, hp.weight_decay, hp.betas, hp.warmup_steps,
                               self.trainer.estimated_stepping_batches, hp.min_lr_ratio)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TASK_KEY] = task_class_path(self)  # lets cogview.export rebuild the task
