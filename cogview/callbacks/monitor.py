"""NaN/overflow monitor: skips optimiser steps with a non-finite loss or gradient, logs
the numbers that predict divergence (grad norm, fp16 loss scale, per-layer maxima), and
stops a run that keeps producing non-finite steps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from cogview.validate import check_int

log = logging.getLogger("cogview.monitor")


class NaNMonitor(Callback):
    """Skips optimiser steps whose loss or gradients are not finite, on all ranks together.

    Every step: the loss (from ``on_before_backward``, every micro-batch of an accumulation
    window) and the total gradient L2 norm (before clipping) are checked; the verdict is
    all-reduced with ``max`` over ranks, so either every rank steps or none does. A skipped
    step sets every gradient to ``None``, which torch optimisers treat as "no update" for
    both the weights and their state (AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``).
    Under ``16-mixed`` the GradScaler skips such steps too and lowers its scale; they are
    counted here all the same. The cumulative count is logged as ``train/skipped_steps``.

    Every ``log_every_n_steps`` optimiser steps it logs ``train/grad_norm``,
    ``train/loss_scale`` (when a GradScaler is in use) and, when ``pl_module.model`` has
    ``track_stats``/``layer_stats`` (the transformer), ``layer_stats/layer{i}/...`` maxima:
    tracking is switched on only for the batches of those steps.

    After ``max_consecutive_skips`` non-finite steps in a row it saves
    ``<dirpath>/nonfinite-step<N>.ckpt`` (weights as of the last finite step: the skipped
    steps changed nothing) and stops training with a message naming the step and the last
    finite loss and grad norm (also kept in ``stop_message``).

    Args:
        log_every_n_steps: logging period in optimiser steps; ``None``: the trainer's.
        max_consecutive_skips: non-finite steps in a row that stop the run.
        layer_stats: log per-layer max |attention score| and max |activation|.
        dirpath: where the stop checkpoint goes; ``None``: the ModelCheckpoint's directory,
            else ``trainer.default_root_dir``.
    """

    def __init__(self, log_every_n_steps: int | None = None, max_consecutive_skips: int = 20,
                 layer_stats: bool = True, dirpath: str | None = None) -> None:
        super().__init__()
        if log_every_n_steps is not None:
            check_int("NaNMonitor log_every_n_steps", log_every_n_steps,
                      meaning="null: follow trainer.log_every_n_steps")
        check_int("NaNMonitor max_consecutive_skips", max_consecutive_skips,
                  meaning="non-finite steps in a row that stop training")
        self.log_every_n_steps = log_every_n_steps
        self.max_consecutive_skips = max_consecutive_skips
        self.layer_stats = layer_stats
        self.dirpath = dirpath
        # Saved in checkpoints, so the count survives a resume.
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_finite: dict[str, float] = {}  # step, loss, grad_norm of the last good step
        self.stop_message: str | None = None
        self._deepspeed_skipped: int | None = None  # DeepSpeed engine's skipped_steps seen last
        # Per-step scratch, reset after each optimiser step.
        self._loss_finite: torch.Tensor | None = None  # () bool, AND over micro-batches
        self._window_loss: torch.Tensor | None = None  # () summed (normalised) micro-batch losses
        self._grad_norm: torch.Tensor | None = None  # () fp32, before clipping
        self._step_skipped: bool | None = None  # set once the step of this batch was decided
        self._tracking = False

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            rank_zero_warn("NaNMonitor under DeepSpeed: gradients live in DeepSpeed's buffers, so "
                           "this monitor cannot drop a step; train/skipped_steps counts the steps "
                           "DeepSpeed's own fp16 loss scaler skipped (bf16 has no such skip: a "
                           "non-finite loss there is logged as applied)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loss_finite = self._window_loss = self._grad_norm = self._step_skipped = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        model = _stats_model(pl_module)
        if self.layer_stats and model is not None and self._is_log_step(trainer):
            model.track_stats(True)
            self._tracking = True

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        norm = total_norm(grads) if grads else torch.zeros((), device=pl_module.device)
        if _grads_are_sharded(trainer):  # each rank holds a shard: combine the squares
            norm = trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        # A norm beyond the fp32 range counts as non-finite: no such step is worth taking.
        bad = ~torch.isfinite(norm)
        if self._loss_finite is not None:
            bad = bad | ~self._loss_finite.to(bad.device)
        bad = trainer.strategy.reduce(bad.float(), reduce_op="max")  # one verdict for all ranks
        skip = bool(bad.item() > 0)
        if skip:
            for param in params:
                param.grad = None  # the optimiser leaves params without a gradient untouched
        self._grad_norm = norm.detach()
        self._step_skipped = bool(self._step_skipped) or skip
        self._loss_finite = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float()
            self._window_loss = loss if self._window_loss is None else self._window_loss + loss
        stats = self._collect_layer_stats(pl_module)
        if self._step_skipped is None:  # accumulating: no optimiser step in this batch
            return
        step = trainer.global_step
        engine = getattr(trainer.strategy, "deepspeed_engine", None)  # DeepSpeedStrategy only
        if engine is not None:
            self._step_skipped = self._deepspeed_verdict(engine, step, trainer.is_global_zero)
        if self._step_skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if trainer.is_global_zero:
                log.warning("step %d skipped: non-finite loss or gradient (%d skipped so far)",
                            step, self.skipped_steps)
        else:
            self.consecutive_skips = 0
            self.last_finite = {"step": step, "loss": self._window_loss,
                                "grad_norm": self._grad_norm}
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True,
                      on_epoch=False, batch_size=1)
        if self._is_logged_step(trainer, step):
            self._log_stats(trainer, stats)
        self._window_loss, self._step_skipped = None, None
        if self.consecutive_skips >= self.max_consecutive_skips:
            self._stop(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = _stats_model(pl_module)
        if self._tracking and model is not None:
            model.track_stats(False)
        self._tracking = False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "last_finite": {k: _as_float(v) for k, v in self.last_finite.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The streak is not restored: a run resumed from nonfinite-step<N>.ckpt (say with a
        # lower learning rate) gets a fresh allowance of max_consecutive_skips.
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.last_finite = dict(state_dict.get("last_finite", {}))

    # ---------------------------------------------------------------- helpers
    def _deepspeed_verdict(self, engine, step: int, is_global_zero: bool) -> bool:
        """Under DeepSpeed a step counts as skipped when DeepSpeed skipped it (its loss scaler's
        ``skipped_steps`` grew); a non-finite loss it applied anyway (bf16) is logged."""
        skipped_now = int(getattr(engine, "skipped_steps", 0) or 0)
        skipped = self._deepspeed_skipped is not None and skipped_now > self._deepspeed_skipped
        self._deepspeed_skipped = skipped_now
        if self._step_skipped and not skipped and is_global_zero:
            log.warning("step %d: non-finite loss, and DeepSpeed applied the step (it skips "
                        "only fp16 overflows: use precision=16-mixed, or trainer=fsdp)", step)
        return skipped

    def _every(self, trainer: L.Trainer) -> int:
        return self.log_every_n_steps or max(1, trainer.log_every_n_steps)

    def _is_log_step(self, trainer: L.Trainer) -> bool:
        """Whether the optimiser step the coming batch belongs to is a logging step."""
        return self._is_logged_step(trainer, trainer.global_step + 1)

    def _is_logged_step(self, trainer: L.Trainer, step: int) -> bool:
        # The step count alone decides (identical on all ranks: logging reduces layer stats).
        return step % self._every(trainer) == 0

    def _collect_layer_stats(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Reads and switches off the transformer's per-layer maxima after a tracked batch."""
        if not self._tracking:
            return {}
        model = _stats_model(pl_module)
        stats = model.layer_stats() if model is not None else {}
        if model is not None:
            model.track_stats(False)
        self._tracking = False
        return stats

    def _log_stats(self, trainer: L.Trainer, layer_stats: dict[str, float]) -> None:
        metrics: dict[str, float] = {}
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = float(self._grad_norm)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            metrics["train/loss_scale"] = float(scaler.get_scale())
        if layer_stats:
            names = sorted(layer_stats)
            values = torch.tensor([layer_stats[n] for n in names],
                                  device=trainer.strategy.root_device)
            values = trainer.strategy.reduce(values, reduce_op="max")  # the worst rank counts
            metrics.update({f"layer_stats/{n}": float(v) for n, v in zip(names, values.tolist())})
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs with
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _stop(self, trainer: L.Trainer, step: int) -> None:
        directory = Path(self.dirpath or _checkpoint_dir(trainer))
        path = directory / f"nonfinite-step{step}.ckpt"
        trainer.save_checkpoint(path)
        last = {k: _as_float(v) for k, v in self.last_finite.items()}
        if last:
            good = (f"last finite step {int(last['step'])}: loss={last['loss']:.6g}, "
                    f"grad_norm={last['grad_norm']:.6g}")
        else:
            good = "no finite step since the start of this run"
        self.stop_message = (
            f"NaNMonitor: stopping at step {step} after {self.consecutive_skips} consecutive "
            f"non-finite steps (max_consecutive_skips={self.max_consecutive_skips}); {good}. "
            f"Saved {path} (weights of the last finite step). Lower the learning rate, raise the "
            f"warmup or use precision=bf16-mixed, then resume with ckpt_path={path}")
        if trainer.is_global_zero:
            log.error(self.stop_message)
        trainer.should_stop = True


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradients as a () fp32 tensor (fp16 gradients are measured in fp32,
    so a norm above 65504 is not mistaken for an overflow)."""
    if any(g.dtype == torch.float16 for g in grads):
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        return torch.linalg.vector_norm(torch.stack(norms))
    return torch.nn.utils.get_total_norm(grads).float()


def _stats_model(pl_module: L.LightningModule):
    """``pl_module.model`` when it records per-layer maxima (``track_stats``/``layer_stats``)."""
    model = getattr(pl_module, "model", None)
    if all(callable(getattr(model, name, None)) for name in ("track_stats", "layer_stats")):
        return model
    return None


def _grads_are_sharded(trainer: L.Trainer) -> bool:
    """FSDP keeps a shard of each (flattened) gradient per rank; DDP keeps full copies."""
    return isinstance(trainer.strategy, FSDPStrategy)


def _checkpoint_dir(trainer: L.Trainer) -> str:
    callback = trainer.checkpoint_callback
    return getattr(callback, "dirpath", None) or trainer.default_root_dir


def _as_float(value: Any) -> float:
    if value is None:  # e.g. a training_step that returned no loss
        return float("nan")
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
