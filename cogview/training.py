"""The training run behind train.py: Hydra config -> data, task, trainer -> fit -> export."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("cogview.train")


def register_resolvers() -> None:
    """Custom OmegaConf resolvers used in conf/ (``${eq:a,b}``)."""
    if not OmegaConf.has_resolver("eq"):
        OmegaConf.register_new_resolver("eq", lambda a, b: str(a) == str(b))


def build_task(cfg: DictConfig) -> L.LightningModule:
    """Instantiates ``cfg.task._target_`` with the task's settings (``name`` excluded)."""
    settings = OmegaConf.to_container(cfg.task, resolve=True)
    target = settings.pop("_target_")
    settings.pop("name", None)
    return get_class(target)(**settings)


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """Lightning Trainer from ``cfg.trainer`` plus the configured logger and callbacks."""
    logger_cfg = cfg.get("logger")
    logger = instantiate(logger_cfg) if logger_cfg else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not logger:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return instantiate(cfg.trainer, logger=logger, callbacks=callbacks)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``last`` means ``<output_dir>/checkpoints/last.ckpt``; anything else must exist."""
    if not ckpt_path:
        return None
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        hint = (" (ckpt_path=last looks in this run's directory: rerun with "
                "hydra.run.dir=<the old run's directory>)") if ckpt_path == "last" else ""
        raise FileNotFoundError(f"checkpoint {path} not found{hint}")
    return str(path)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fits the configured task; exports it to ``cfg.export_dir`` when set."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    task = build_task(cfg)
    trainer = build_trainer(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.output_dir)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("export_dir") and trainer.is_global_zero:
        exported = task.export(cfg.export_dir)
        log.info("exported %s to %s", cfg.task.name, exported)
    if trainer.is_global_zero:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        log.info("run directory: %s", cfg.output_dir)
        log.info("final metrics: %s", summary)
    return metrics


def fsdp_strategy(**kwargs):
    """Lightning's FSDPStrategy wrapping each transformer block in its own FSDP unit."""
    from lightning.pytorch.strategies import FSDPStrategy

    from cogview.modules.transformer import Block

    return FSDPStrategy(auto_wrap_policy={Block}, **kwargs)
