"""t2i, caption and sr: one LightningModule base over the shared CogView backbone.

Each task supplies only its layout name and its periodic-sample hook; the loss, the
optimiser, ``init_from`` and the export are shared.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cogview.exports import (
    IMAGE_TOKENIZER_DIR,
    MODEL_WEIGHTS,
    TEXT_TOKENIZER_DIR,
    is_export,
    read_export_info,
    write_export_info,
)
from cogview.model_card import write_model_card
from cogview.modules.losses import check_loss_vocab, full_loss, span_loss
from cogview.modules.transformer import CogViewTransformer, TransformerConfig
from cogview.modules.vqvae import VQVAE, read_vqvae_config
from cogview.pipeline import Pipeline
from cogview.safe_load import check_finite, check_state_dict, load_torch_file
from cogview.tasks.base import CogViewTask
from cogview.tokenization import build_text_tokenizer, load_text_tokenizer, text_slots_for
from cogview.tokenization.vocab import CogViewVocab

log = logging.getLogger(__name__)


def build_tokenizer(settings: dict[str, Any]):
    """A text tokenizer from ``{kind, model_file}`` or ``{dir}`` settings."""
    settings = dict(settings or {"kind": "char"})
    if settings.get("dir"):
        return load_text_tokenizer(settings["dir"])
    return build_text_tokenizer(settings.get("kind", "char"), settings.get("model_file"))


def checkpoint_state_dict(source: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Transformer weights from a Lightning checkpoint (read weights-only unless
    ``trust_pickle``) or an export directory; NaN or inf weights are an error."""
    source = Path(source)
    if source.is_dir():
        weights = source / MODEL_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"init_from={source}: no model.safetensors in that directory")
        state = load_file(str(weights))
    elif not source.is_file():
        raise FileNotFoundError(f"init_from={source}: no such checkpoint file or export directory")
    else:
        checkpoint = load_torch_file(source, trust_pickle=trust_pickle)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise ValueError(f"init_from={source} is not a Lightning checkpoint (no state_dict "
                             "entry): give a cogview .ckpt or an export directory")
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()
                 if k.startswith("model.")}
    check_finite(state, f"init_from={source}")
    return state


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads ``state`` into ``model``; every missing, unexpected or mis-shaped key is an error."""
    check_state_dict(model.state_dict(), state, f"init_from={source} does not fit this model:",
                     "use the same model preset, tokenizers and VQ-VAE as the source run")
    model.load_state_dict(state)


IMAGE_TOKENIZER_ATTR = "_image_tokenizer"


def training_data(datamodule) -> dict | None:
    """What an export records of its training data: the shards, their sample count and the
    tokenizer fingerprints of their manifest (None without a DataModule that has them)."""
    shard_set = getattr(datamodule, "train_set", None)
    if shard_set is None:
        return None
    manifest = shard_set.manifest or {}
    return {"train_shards": str(getattr(datamodule, "train_shards", "")),
            "num_samples": shard_set.num_samples,
            "fingerprints": manifest.get("fingerprints", {})}


def hide_tokens(batch: dict[str, torch.Tensor], hidden: torch.Tensor,
                keep_positions: bool = False) -> dict[str, torch.Tensor]:
    """The batch with its ``hidden`` tokens ([B, T] bool) taken out of the sequences.

    They are hidden from attention and the positions after them are compacted
    (``keep_positions``: left as they are, for layouts with reserved text slots), which is what
    the layout without them gives; targets at or predicted from a hidden token leave the loss.
    """
    attention = batch["attention_mask"].bool() & ~hidden
    positions = (batch["position_ids"] if keep_positions
                 else (attention.long().cumsum(-1) - 1).clamp_min(0))
    loss_mask = batch["loss_mask"].bool() & ~hidden
    loss_mask[:, 1:] &= ~hidden[:, :-1]  # a target predicted from a hidden position
    return {**batch, "attention_mask": attention, "position_ids": positions, "loss_mask": loss_mask}


class SequenceTask(CogViewTask):
    """Next-token training of the backbone on one task's layout.

    Loss: cross entropy on the layout's targets; a target predicted from a text position is
    weighted by ``txt_loss_scale`` (CogView keyed the weight on input positions and used 1
    to 5). ``loss_vocab``: ``span`` scores each target against its span's ids only (the ids
    the sampler draws from; ``cogview.modules.losses``), ``full`` against the whole
    vocabulary (CogView's loss). Image and text losses are logged separately, named after
    their vocabulary (``image_loss_span`` / ``image_loss``). Steps with a non-finite loss
    are handled by the NaN monitor callback.
    """

    layout_name = "t2i"

    def __init__(self, model: dict, vqvae_dir: str, tokenizer: dict | None = None,
                 lr: float = 3e-4, weight_decay: float = 0.1, betas=(0.9, 0.95),
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, txt_loss_scale: float = 1.0,
                 init_from: str | None = None, sample_every_n_steps: int = 0,
                 sample_dir: str | None = None, max_text_len: int = 64,
                 caption_dropout: float = 0.0, sample_prompts: list[str] | None = None,
                 sample_seed: int = 0, sample_top_k: int = 200, sample_temperature: float = 1.0,
                 fixed_image_positions: bool = False, loss_vocab: str = "span",
                 trust_pickle: bool = False) -> None:
        super().__init__()
        check_loss_vocab(loss_vocab)
        self.save_hyperparameters(ignore=["trust_pickle"])  # a run's choice, not the model's
        # image position ids independent of the caption's length (layouts.py)
        self.text_slots = text_slots_for(fixed_image_positions, max_text_len)
        self.text_tokenizer = build_tokenizer(tokenizer)
        self.vocab = CogViewVocab.for_tokenizer(self.text_tokenizer,
                                                 read_vqvae_config(vqvae_dir).num_codes)
        settings = {k: v for k, v in dict(model).items() if k != "name"}
        settings["vocab_size"] = self.vocab.size
        self.model = CogViewTransformer(TransformerConfig.from_dict(settings))
        if init_from:
            load_matching(self.model, checkpoint_state_dict(init_from, trust_pickle), init_from)
            log.info("initialised the %s model from %s", self.layout_name, init_from)
            self._warn_on_other_positions(Path(init_from))
        self.sample_dir = Path(sample_dir) if sample_dir else None
        self._image_tokenizer = None
        self.image_tokens: int | None = None  # codes per generated image, seen in the data

    def _warn_on_other_positions(self, source: Path) -> None:
        """An export trained with the other position scheme still loads, but its position
        embeddings mean other things here: say so."""
        if not is_export(source):
            return
        info = read_export_info(source)
        if info.get("text_slots") != self.text_slots:
            log.warning("init_from=%s was trained with text_slots=%s but this run uses %s: its "
                        "image position embeddings will be relearned; set "
                        "data.fixed_image_positions=%s to match it", source,
                        info.get("text_slots"), self.text_slots,
                        str(info.get("text_slots") is not None).lower())

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_vocab = getattr(datamodule, "vocab", None)
        if data_vocab is not None and data_vocab != self.vocab:
            raise ValueError(
                f"the data's vocabulary ({data_vocab.num_image_codes} codes, "
                f"{data_vocab.text_vocab_size} text ids) differs from the model's "
                f"({self.vocab.num_image_codes} codes, {self.vocab.text_vocab_size} text ids): "
                "give data and task the same tokenizer and vqvae_dir"
            )
        layout = getattr(datamodule, "layout", self.layout_name)
        if layout != self.layout_name:
            raise ValueError(f"data.layout={layout!r} but the task is {self.layout_name!r}")
        data_slots = getattr(datamodule, "text_slots", self.text_slots)
        if data_slots != self.text_slots:
            raise ValueError(
                f"the data reserves text_slots={data_slots} positions for the text but the task "
                f"{self.text_slots}: give data and task the same fixed_image_positions and "
                "max_text_len")

    # ------------------------------------------------------------------ loss
    def text_end_ids(self) -> list[int]:
        """Command ids that may end a text in this layout (scored with the text ids under
        ``loss_vocab=span``); none by default."""
        return []

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted next-token loss and its image / text parts, over ``loss_vocab``."""
        input_ids = batch["input_ids"]  # (B, T)
        span = self.hparams.loss_vocab == "span"
        out = self.model(input_ids[:, :-1], batch["position_ids"][:, :-1],
                         batch["attention_mask"][:, :-1], return_hidden=span)  # (B, T-1, C or V)
        targets = input_ids[:, 1:]
        target_mask = batch["loss_mask"][:, 1:].bool()
        weights = torch.where(batch["text_mask"][:, :-1].bool(),
                              self.hparams.txt_loss_scale, 1.0) * target_mask
        if span:
            return span_loss(self.model, out, targets, target_mask, weights, self.vocab,
                             self.text_end_ids())
        return full_loss(out, targets, target_mask, weights, self.vocab)

    @property
    def loss_part_names(self) -> tuple[str, str]:
        """The logged names of the image and text losses, saying their vocabulary."""
        suffix = "_span" if self.hparams.loss_vocab == "span" else ""
        return f"image_loss{suffix}", f"text_loss{suffix}"

    def log_losses(self, split: str, out: dict, size: int, **kwargs) -> None:
        self.log(f"{split}/loss", out["loss"], prog_bar=True, batch_size=size, **kwargs)
        for part, name in zip(("image_loss", "text_loss"), self.loss_part_names):
            if part in out:
                self.log(f"{split}/{name}", out[part], batch_size=size, **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.image_tokens is None:
            codes = int((batch["input_ids"][0] < self.vocab.num_image_codes).sum())
            self.image_tokens = codes * 4 // 5 if self.layout_name == "sr" else codes  # sr: hr part
        batch = self.maybe_drop_condition(batch)
        out = self.losses(batch)
        self.log_losses("train", out, batch["input_ids"].shape[0])
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.losses(batch)
        self.log_losses("val", out, batch["input_ids"].shape[0], sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["cogview_image_tokens"] = self.image_tokens

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.image_tokens = checkpoint.get("cogview_image_tokens")
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(f"{IMAGE_TOKENIZER_ATTR}.")]:
            del state[key]  # checkpoints written before the VQ-VAE was kept out of the tree

    # Classifier-free guidance training: a task with a condition to drop (t2i: the caption;
    # caption: the image) takes it out of ``condition_dropout`` of the training rows.
    condition_dropout = 0.0

    def condition_tokens(self, batch: dict) -> torch.Tensor:
        """BoolTensor [B, T]: the tokens ``maybe_drop_condition`` takes out of a dropped row."""
        raise NotImplementedError(f"{type(self).__name__} has no condition to drop")

    def maybe_drop_condition(self, batch: dict) -> dict:
        """Takes the condition out of each training row with probability ``condition_dropout``
        (``hide_tokens``: as the layout without it)."""
        p = self.condition_dropout
        if not p or not self.training:
            return batch
        rows = torch.rand(batch["input_ids"].shape[0], device=batch["input_ids"].device) < p
        if not rows.any():
            return batch
        return hide_tokens(batch, self.condition_tokens(batch) & rows[:, None],
                           keep_positions=self.text_slots is not None)

    # --------------------------------------------------------------- samples
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = self.hparams.sample_every_n_steps
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            self.log_samples(batch)

    def log_samples(self, batch: dict) -> None:
        """Task hook: generate a few samples and save/log them as pictures."""

    @property
    def image_tokenizer(self):
        """The VQ-VAE (loaded on first use, for decoding periodic samples)."""
        if self._image_tokenizer is None:
            # Not a submodule: the frozen VQ-VAE stays out of state_dict, checkpoints and the
            # optimiser (nn.Module.__setattr__ would register it).
            object.__setattr__(self, IMAGE_TOKENIZER_ATTR,
                               VQVAE.from_pretrained(self.hparams.vqvae_dir).eval())
        return self._image_tokenizer

    def save_picture(self, picture, name: str) -> None:
        """Writes a picture into sample_dir and to the logger when it takes images."""
        if self.sample_dir is not None:
            self.sample_dir.mkdir(parents=True, exist_ok=True)
            picture.save(self.sample_dir / f"{name}_step{self.global_step:06d}.png")
        log_image = getattr(self.logger, "log_image", None)
        if log_image is not None:
            log_image(key=f"samples/{name}", images=[picture], step=self.global_step)

    # ---------------------------------------------------------------- export
    def export(self, directory: str | Path, state_dict: dict | None = None) -> Path:
        """A self-contained inference directory: weights + config, text tokenizer files,
        a copy of the image tokenizer and ``cogview.json`` (task, vocabulary, layout).

        ``state_dict``: the model's full weights when ``self.model`` holds only a shard of
        them (FSDP, DeepSpeed ZeRO-3: see cogview.training.gather_model_state_dict)."""
        directory = Path(directory)
        model = self.model
        if state_dict is not None:
            with torch.device("meta"):
                model = CogViewTransformer(self.model.config)
            model.load_state_dict(state_dict, assign=True)
        model.save_pretrained(directory)
        self.text_tokenizer.save(directory / TEXT_TOKENIZER_DIR)
        vqvae_copy = directory / IMAGE_TOKENIZER_DIR
        if vqvae_copy.exists():
            shutil.rmtree(vqvae_copy)
        shutil.copytree(self.hparams.vqvae_dir, vqvae_copy)
        write_export_info(directory, self.export_info())
        write_model_card(directory)
        return directory

    def export_info(self) -> dict:
        """What ``cogview.json`` says of this model: task, vocabulary, layout settings."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        return {"task": self.layout_name, "vocab": self.vocab.to_dict(),
                "max_text_len": self.hparams.max_text_len, "text_slots": self.text_slots,
                "image_tokens": self.image_tokens,
                "caption_end_token": getattr(datamodule, "caption_end_token", None),
                "loss_vocab": self.hparams.loss_vocab,
                "text_tokenizer": TEXT_TOKENIZER_DIR, "image_tokenizer": IMAGE_TOKENIZER_DIR,
                **({"data": training_data(datamodule)} if training_data(datamodule) else {})}

    def pipeline(self, precision: str = "auto"):
        """The model being trained as an in-memory ``Pipeline`` (same weights, no copy), for
        evaluating while training. It puts the model in eval mode: restore train mode after."""
        return Pipeline(self.model, self.text_tokenizer, self.image_tokenizer.to(self.device), self.vocab,
                        self.export_info(), device=self.device, precision=precision)
