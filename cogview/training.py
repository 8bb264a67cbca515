"""The training run behind train.py: Hydra config -> data, task, trainer -> fit -> export."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from cogview.callbacks import AtomicCheckpointIO
from cogview.callbacks.checkpoint import remove_stale_temporaries
from cogview.config import CONF_DIR, register_resolvers
from cogview.export import sharded_checkpoint_kind
from cogview.modules.transformer import Block, TransformerConfig
from cogview.precision import resolve_precision
from cogview.safe_load import CheckpointError, check_finite, load_torch_file

log = logging.getLogger("cogview.train")


@dataclass
class ModelSchema(TransformerConfig):
    """Typed schema of the ``model`` group: TransformerConfig plus the preset's name."""

    name: str = "custom"


def check_schemas(cfg: DictConfig) -> None:
    """Validates typed groups; a wrong type names the key, its value and the expected type."""
    if cfg.get("model") is not None:
        OmegaConf.merge(OmegaConf.structured(ModelSchema), cfg.model)


def build_task(cfg: DictConfig) -> L.LightningModule:
    """Instantiates ``cfg.task._target_`` with the task's settings (``name`` excluded)."""
    settings = OmegaConf.to_container(cfg.task, resolve=True)
    target = settings.pop("_target_")
    settings.pop("name", None)
    return get_class(target)(**settings)


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """Lightning Trainer from ``cfg.trainer`` plus the configured logger and callbacks;
    ``precision: auto`` is resolved for the accelerator (cogview.precision); checkpoints are
    written atomically (AtomicCheckpointIO)."""
    logger_cfg = cfg.get("logger")
    if logger_cfg and str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
        # One W&B run per job: a run left open by an earlier job of this process (Hydra -m)
        # would otherwise be reused; the default name is "<task>-<run directory name>".
        import wandb  # deferred on purpose: only logger=wandb needs it

        if wandb.run is not None:
            wandb.finish()
        if not logger_cfg.get("name"):
            run_name = f"{cfg.get('task', {}).get('name', 'run')}-{Path(cfg.output_dir).name}"
            logger_cfg = OmegaConf.merge(logger_cfg, {"name": run_name})
    logger = instantiate(logger_cfg) if logger_cfg else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not logger:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
    return instantiate(cfg.trainer, logger=logger, callbacks=callbacks, precision=precision,
                       plugins=[AtomicCheckpointIO()])


def log_resolved_config(trainer: L.Trainer, cfg: DictConfig) -> None:
    """The run's whole Hydra config, interpolations resolved, as the W&B run's config (the
    LightningModule's own hyperparameters are logged beside it by Lightning)."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # e.g. ${hydra:...} outside a Hydra app: log what can be read as it is
        resolved = OmegaConf.to_container(cfg, resolve=False)
    for logger in loggers:
        logger.log_hyperparams({"config": resolved})


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str,
                      trust_pickle: bool = False) -> str | None:
    """``last`` means ``<output_dir>/checkpoints/last.ckpt``; anything else must exist, load
    weights-only (unless ``trust_pickle``) and hold finite weights."""
    if not ckpt_path:
        return None
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if path.is_dir():  # FSDP (state_dict_type=sharded) and DeepSpeed write directories
        kind = sharded_checkpoint_kind(path)
        if kind is None:
            raise ValueError(f"ckpt_path={path} is a directory but not a sharded checkpoint")
        if not trust_pickle:
            raise CheckpointError(f"ckpt_path={path} is a {kind} sharded checkpoint, whose "
                                  "metadata is a Python pickle: resume with trust_pickle=true "
                                  "if your own run wrote it")
        return str(path)
    if not path.is_file():
        hint = (" (ckpt_path=last looks in this run's directory: rerun with "
                "hydra.run.dir=<the old run's directory>)") if ckpt_path == "last" else ""
        raise FileNotFoundError(f"checkpoint {path} not found{hint}")
    checkpoint = load_torch_file(path, trust_pickle=trust_pickle)  # memory-mapped: cheap
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path={path} is not a Lightning checkpoint (no state_dict entry)")
    check_finite(checkpoint["state_dict"], f"ckpt_path={path}")
    return str(path)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fits the configured task; exports it to ``cfg.export_dir`` when set."""
    check_schemas(cfg)
    trust_pickle = bool(cfg.get("trust_pickle", False))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.output_dir, trust_pickle)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    task = build_task(cfg)
    trainer = build_trainer(cfg)
    log_resolved_config(trainer, cfg)
    for directory in {Path(cfg.output_dir) / "checkpoints",
                      *([Path(ckpt_path).parent] if ckpt_path else [])}:
        remove_stale_temporaries(directory)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not trust_pickle)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("export_dir"):
        export_after_fit(trainer, task, cfg.export_dir, cfg.task.name)
    finish_wandb(trainer)
    if trainer.is_global_zero:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        log.info("run directory: %s", cfg.output_dir)
        log.info("final metrics: %s", summary)
    return metrics


def gather_model_state_dict(trainer: L.Trainer, task) -> dict | None:
    """The full weights of ``task.model`` on rank 0 (None on the other ranks) where the
    strategy shards them: FSDP's shards are gathered into a full state dict (every rank must
    call this), DeepSpeed ZeRO-3's partitioned parameters are gathered for the copy. Other
    strategies hold every weight on rank 0 already: None (export ``task.model`` itself)."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        full = get_model_state_dict(strategy.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not trainer.is_global_zero:
            return None
        return {name.removeprefix("model."): value for name, value in full.items()
                if name.startswith("model.")}
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed  # deferred on purpose: an optional install (trainer=deepspeed_*)

        with deepspeed.zero.GatheredParameters(list(task.model.parameters()), modifier_rank=None):
            if not trainer.is_global_zero:
                return None
            return {name: value.detach().to("cpu", copy=True)
                    for name, value in task.model.state_dict().items()}
    return None  # the model on rank 0 holds every weight: export it as it is


def export_after_fit(trainer: L.Trainer, task, directory: str, name: str) -> None:
    """Exports the trained model: every rank takes part in gathering the weights, rank 0
    writes the export, and the others wait for it (so none exits before the export exists)."""
    state = gather_model_state_dict(trainer, task)
    if trainer.is_global_zero:
        exported = task.export(directory) if state is None else \
            task.export(directory, state_dict=state)
        log.info("exported %s to %s", name, exported)
    trainer.strategy.barrier("export")


def finish_wandb(trainer: L.Trainer) -> None:
    """Closes the W&B run of this fit (a sweep's next job then starts its own)."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb  # deferred on purpose: only logger=wandb needs it

        wandb.finish()


def fsdp_strategy(**kwargs):
    """Lightning's FSDPStrategy wrapping each transformer block in its own FSDP unit."""
    return FSDPStrategy(auto_wrap_policy={Block}, **kwargs)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)
def main(cfg: DictConfig) -> float | None:
    """``cogview train`` / ``python train.py``: Hydra app over cogview/conf/train.yaml; returns
    the final validation loss (what a sweeper minimises)."""
    return train(cfg).get("val/loss")


register_resolvers()  # before Hydra composes: the configs use ${eq:...}
