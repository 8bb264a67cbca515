"""Quality while training on shapes-zh, every N steps, kept as a curve against training time in
``<dirpath>/oracle_curve.json`` and logged as ``oracle/<metric>``:

- t2i: the model draws the canonical prompts and the oracle reads them back
  (``<split>_full_match``);
- caption: captions of rendered scenes (the most likely of 4 beams, and greedy), parsed back
  to attributes (``<split>_exact_match``, ``<split>_greedy_exact_match``);
- sr: 2x super-resolution of rendered scenes (``<split>_psnr`` with the consistency
  refinement, ``<split>_unrefined_psnr`` the sampled codes, beside ``<split>_bicubic_psnr``), as
  ``cogview.eval.shapes_bench`` scores them.

    callbacks.shapes_eval:
      _target_: cogview.callbacks.ShapesOracleEval
      every_n_steps: 500
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from cogview.data.shapes import eval_prompts
from cogview.eval.oracle import evaluate
from cogview.eval.shapes_bench import (
    CAPTION_NUM_BEAMS,
    SR_REFINE_SWEEPS,
    caption_benchmark,
    sr_benchmark,
)
from cogview.generation import generate_images
from cogview.generation.beam import check_num_beams
from cogview.generation.superres import check_refine_args
from cogview.tokenization.layouts import TASKS
from cogview.validate import check_int
from cogview.visualize import image_grid

SPLITS = ("seen", "heldout", "two")


class ShapesOracleEval(Callback):
    """Scores ``prompts_per_split`` canonical scenes per split every ``every_n_steps`` training
    steps (and at the end): t2i, caption and sr tasks. ``caption_num_beams``: beams for the
    captions (None: the caption benchmark's default, 4; greedy is scored beside them).
    ``sr_refine_sweeps``: the sr consistency refinement (None: the benchmark's 2, with the
    sampled codes' PSNR beside; 0: the sampled codes only, as ``<split>_psnr``).
    ``cfg_scale``: classifier-free guidance for the t2i samples, ``caption_cfg_scale`` for the
    captions (1: off)."""

    def __init__(self, every_n_steps: int = 500, prompts_per_split: int = 32,
                 splits: tuple[str, ...] | list[str] = SPLITS, seed: int = 0, top_k: int = 50,
                 temperature: float = 1.0, dirpath: str | None = None,
                 caption_num_beams: int | None = None, sr_refine_sweeps: int | None = None,
                 cfg_scale: float = 1.0, caption_cfg_scale: float = 1.0) -> None:
        if caption_num_beams is not None:
            check_num_beams(caption_num_beams)
        if sr_refine_sweeps is not None:
            check_refine_args(sr_refine_sweeps)
        check_int("shapes_eval.every_n_steps", every_n_steps)
        check_int("shapes_eval.prompts_per_split", prompts_per_split)
        unknown = set(splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"splits {sorted(unknown)} unknown; choose from {SPLITS}")
        self.every_n_steps, self.prompts_per_split = every_n_steps, prompts_per_split
        self.splits, self.seed, self.top_k, self.temperature = list(splits), seed, top_k, temperature
        self.dirpath = Path(dirpath) if dirpath else None
        self.caption_num_beams = caption_num_beams
        self.sr_refine_sweeps = sr_refine_sweeps
        self.cfg_scale = float(cfg_scale)
        self.caption_cfg_scale = float(caption_cfg_scale)
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self._grids: dict = {}  # split -> grid of the last t2i evaluation's samples
        self._started: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._clock()
        step = trainer.global_step
        if step % self.every_n_steps == 0 and (not self.history or self.history[-1]["step"] != step):
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._clock()
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self.run(trainer, pl_module)

    def _clock(self) -> None:
        """Adds the time since the last call to the training time (evaluation not counted)."""
        now = time.perf_counter()
        if self._started is not None:
            self.train_seconds += now - self._started
        self._started = now

    def run(self, trainer, pl_module) -> dict:
        layout = getattr(pl_module, "layout_name", None)
        if layout not in TASKS:
            raise ValueError(f"ShapesOracleEval scores the {'/'.join(TASKS)} tasks, not "
                             f"{layout!r}: drop callbacks=shapes for this task")
        point = {"step": trainer.global_step, "train_seconds": round(self.train_seconds, 1),
                 **self.evaluate(trainer, pl_module)}
        self.history.append(point)
        metrics = {f"oracle/{k}": float(v) for k, v in point.items()
                   if k not in ("step", "train_seconds")}
        if trainer.logger is not None and metrics:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self._log_to_wandb(trainer)
        self._write(trainer)
        self._started = time.perf_counter()  # the evaluation is not training time
        return point

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict:
        if trainer.global_rank != 0:
            return {}
        if pl_module.layout_name != "t2i":
            return self.evaluate_pipeline(trainer, pl_module)
        model, vocab = pl_module.model, pl_module.vocab
        tokenizer, vqvae = pl_module.text_tokenizer, pl_module.image_tokenizer
        side = int(round((pl_module.image_tokens or 64) ** 0.5))
        was_training = model.training
        scores = {}
        self._grids = {}
        try:
            with trainer.precision_plugin.forward_context():
                for split in self.splits:
                    prompts = eval_prompts(split, self.prompts_per_split, seed=self.seed)
                    codes = generate_images(
                        model, vocab, [tokenizer.encode(p["caption"]) for p in prompts],
                        side * side, [self.seed + i for i in range(len(prompts))],
                        top_k=self.top_k, temperature=self.temperature, cfg_scale=self.cfg_scale,
                        max_text_len=pl_module.hparams.max_text_len,
                        text_slots=pl_module.text_slots)
                    images = vqvae.decode(codes.view(-1, side, side).to(vqvae_device(vqvae)))
                    result = evaluate(images.float().cpu(), [p["scene"] for p in prompts])
                    self._grids[split] = image_grid(images.float().cpu(), columns=8)
                    scores[f"{split}_full_match"] = round(float(result["full_match"]), 4)
        finally:
            model.train(was_training)
        return scores

    def evaluate_pipeline(self, trainer, pl_module) -> dict:
        """caption / sr: the benchmark's own scoring on the model being trained."""
        precision = str(trainer.precision)
        precision = ("bf16-mixed" if precision.startswith("bf16") else
                     "16-mixed" if precision.startswith("16") else "32-true")
        was_training = pl_module.model.training
        try:
            pipe = pl_module.pipeline(precision)
            if pl_module.layout_name == "caption":
                results = caption_benchmark(pipe, splits=self.splits,
                                            images_per_split=self.prompts_per_split, progress=False,
                                            num_beams=self.caption_num_beams or CAPTION_NUM_BEAMS,
                                            cfg_scale=self.caption_cfg_scale)
                return {f"{split}_{name}": round(float(r[name]), 4)
                        for split, r in results.items()
                        for name in ("exact_match", "greedy_exact_match") if name in r}
            sweeps = SR_REFINE_SWEEPS if self.sr_refine_sweeps is None else self.sr_refine_sweeps
            results = sr_benchmark(pipe, splits=self.splits, images_per_split=self.prompts_per_split,
                                   progress=False, refine_sweeps=sweeps)
            return {f"{split}_{name}": round(float(r[name]), 3) for split, r in results.items()
                    for name in ("psnr", "unrefined_psnr", "bicubic_psnr") if name in r}
        finally:
            pl_module.model.train(was_training)

    @rank_zero_only
    def _log_to_wandb(self, trainer) -> None:
        """With a W&B logger: the curve so far as a table (one row per evaluation) and the
        t2i samples of this evaluation as one grid per split."""
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            columns = list(dict.fromkeys(k for point in self.history for k in point))
            logger.log_table("oracle/curve", columns=columns, step=trainer.global_step,
                             data=[[point.get(c) for c in columns] for point in self.history])
            if self._grids:
                logger.log_image("oracle/samples", images=list(self._grids.values()),
                                 caption=[f"{split} (step {trainer.global_step})"
                                          for split in self._grids], step=trainer.global_step)

    @rank_zero_only
    def _write(self, trainer) -> None:
        directory = self.dirpath or Path(trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "oracle_curve.json").write_text(json.dumps(self.history, indent=1))

    def state_dict(self) -> dict:
        return {"history": self.history, "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))


def vqvae_device(vqvae: torch.nn.Module) -> torch.device:
    return next(vqvae.parameters()).device
