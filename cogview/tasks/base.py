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
        # max_steps when set: estimated_stepping_batches would build the train DataLoader now,
        # before a resumed run's loops are restored, and the stream could not continue from
        # the checkpoint's position (TokenDataModule.train_dataloader)
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = self.trainer.estimated_stepping_batches
        return build_optimizer(self.model, hp.lr, hp.weight_decay, hp.betas, hp.warmup_steps,
                               total, hp.min_lr_ratio)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TASK_KEY] = task_class_path(self)  # lets cogview.export rebuild the task
