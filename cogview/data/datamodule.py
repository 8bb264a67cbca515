"""Stream pretokenized shards (cogview.data.pretokenize) as task batches: t2i, caption or sr.

Pipeline per DataLoader worker (`TokenShardStream`):

    shard list --shuffle (seed, epoch; the same order on every rank)--> split by rank and worker
      --> read tars --> [sample-level split] --> shuffle buffer --> layout --> batch (padded)

Splitting. C = world_size x num_workers consumers read one epoch together. Every sample reaches
exactly one consumer, in every mode:
- "shard":  shard j goes to consumer j mod C (each consumer reads only its shards);
- "sample": every consumer reads every shard and keeps the samples whose ordinal is its own
            mod C (costs C times the reading, but works for any number of shards);
- "auto" (default): "shard" when the number of shards is a multiple of C; else shards by rank
  when it is a multiple of world_size, the workers of a rank then splitting that rank's samples;
  else "sample". Equal shard sizes keep ranks balanced; the pretokenizer writes them.
`resampled=true` instead draws shards with replacement, forever, independently per consumer
(the usual mode for long training runs; set trainer.max_steps).

Resuming (`ckpt_path=...`). The DataModule hands the stream the trainer's epoch and the batches
of that epoch already trained on (`resume_point`). Per-epoch mode then replays the epoch's order
and drops those batches unseen by the model, so the resumed run trains on exactly the batches an
uninterrupted run would have (each DataLoader worker drops the batches it had delivered: exact
while every worker still has data; resuming in an epoch's last `num_workers` batches, after a
worker ran dry, may repeat or drop up to num_workers - 1 of them). Resampled mode mixes the
resume point into its seeds: the resumed run draws fresh batches, never the run's first ones.

Layouts come from cogview.tokenization.layouts: `LayoutBatcher` calls the real layout function
once per distinct (text length, image length) and reuses that structure for every sample of
the same lengths, filling in only the ids; batches equal `collate_layouts` of the per-sample
layouts (tested), padded to the batch's longest sequence or to `pad_to`.

Tokenizer check: `setup()` compares the fingerprints in the shards' manifest with the model's
configured tokenizers (`vqvae_dir`, `text_tokenizer`, or fingerprints given directly) and raises
TokenizerMismatchError naming both before any training step.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cogview.data.fingerprint import (
    TokenizerMismatchError,
    check_fingerprints,
    image_tokenizer_fingerprint,
    image_tokenizer_num_codes,
)
from cogview.data.pretokenize import MANIFEST_NAME, build_text_tokenizer_from_config
from cogview.data.sources import TarProblem, expand_urls, read_tar
from cogview.tokenization import (
    CogViewVocab,
    caption_layout,
    sr_layout,
    t2i_layout,
    text_limit,
    text_slots_for,
)

log = logging.getLogger(__name__)

LAYOUT_TASKS = ("t2i", "caption", "sr")
SPLIT_MODES = ("auto", "shard", "sample")

__all__ = ["TokenDataModule", "TokenShardStream", "LayoutBatcher", "ShardSet", "resolve_shards",
           "load_manifest", "plan_split", "load_npy", "TokenizerMismatchError"]


# ------------------------------------------------------------------------------------------------
# shards and manifests


@dataclass
class ShardSet:
    """Shard URLs, their sample counts (when a manifest lists them) and the manifest."""

    urls: list[str]
    counts: list[int | None]
    manifest: dict | None = None
    manifest_path: str | None = None

    @property
    def num_samples(self) -> int | None:
        return None if any(c is None for c in self.counts) else sum(self.counts)

    def subset(self, indices: Sequence[int]) -> "ShardSet":
        return ShardSet([self.urls[i] for i in indices], [self.counts[i] for i in indices],
                        self.manifest, self.manifest_path)


def load_manifest(path: str) -> dict:
    """Read a manifest.json from a local path or any URL webdataset's gopen opens."""
    from webdataset.gopen import gopen

    if not str(path).startswith(("pipe:", "http:", "https:")) and not Path(path).is_file():
        raise FileNotFoundError(f"manifest {path} not found: pretokenize writes manifest.json "
                                "beside the shards; pass data.manifest=PATH if it lives elsewhere")
    with gopen(str(path), "rb") as stream:
        manifest = json.loads(stream.read().decode("utf-8"))
    if manifest.get("format") != "cogview-tokens":
        raise ValueError(f"{path} is not a cogview pretokenized-shard manifest "
                         f"(format={manifest.get('format')!r})")
    if not manifest.get("complete"):
        raise ValueError(f"{path} belongs to an unfinished pretokenize run: rerun the same "
                         "`python -m cogview.data.pretokenize ...` command to complete it")
    return manifest


def _shard_file_name(url: str) -> str:
    """The .tar file name in a shard URL, a pipe: command included ('pipe:aws s3 cp
    s3://b/tokens-000001.tar -' -> 'tokens-000001.tar')."""
    names = re.findall(r"[^/\s'\"]+\.tar\b", url)
    return names[-1] if names else url.rsplit("/", 1)[-1]


def resolve_shards(spec: str | Sequence[str], manifest: str | None = None) -> ShardSet:
    """Shards from a directory (its manifest.json lists them), a brace pattern, a URL list, or
    a URL template with `{name}` filled in with every shard name `manifest` lists (shards
    that pretokenize sent elsewhere with shard_url, e.g. 'pipe:aws s3 cp s3://b/t/{name} -').

    For a pattern or list of local files the manifest is looked up beside the first shard,
    unless `manifest` names it.
    """
    if isinstance(spec, (list, tuple)) or not isinstance(spec, str):
        spec = [str(s) for s in spec]
    if isinstance(spec, str) and "{name}" in spec:  # one URL per shard the manifest lists
        if manifest is None:
            raise ValueError(f"shard spec {spec!r} has a {{name}} placeholder: give the "
                             "manifest that lists the shard names (data.manifest=PATH)")
        data = load_manifest(manifest)
        return ShardSet([spec.replace("{name}", s["name"]) for s in data["shards"]],
                        [int(s["samples"]) for s in data["shards"]], data, manifest)
    if isinstance(spec, str) and Path(spec).is_dir():
        directory = Path(spec)
        manifest_path = manifest or str(directory / MANIFEST_NAME)
        if manifest is None and not Path(manifest_path).is_file():
            urls = sorted(str(p) for p in directory.glob("*.tar"))
            if not urls:
                raise FileNotFoundError(f"shard directory {directory} holds no manifest.json and "
                                        "no .tar shards")
            return ShardSet(urls, [None] * len(urls))
        data = load_manifest(manifest_path)
        urls = [str(directory / s["name"]) for s in data["shards"]]
        return ShardSet(urls, [int(s["samples"]) for s in data["shards"]], data, manifest_path)
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    if manifest is None:
        first = Path(urls[0])
        if not urls[0].startswith(("pipe:", "http:", "https:")) and \
                (first.parent / MANIFEST_NAME).is_file():
            manifest = str(first.parent / MANIFEST_NAME)
    if manifest is None:
        return ShardSet(urls, [None] * len(urls))
    data = load_manifest(manifest)
    by_name = {s["name"]: int(s["samples"]) for s in data["shards"]}
    counts = [by_name.get(_shard_file_name(url)) for url in urls]
    return ShardSet(urls, counts, data, manifest)


# ------------------------------------------------------------------------------------------------
# decoding samples

_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """Decode .npy bytes; the header of each distinct (dtype, shape) is parsed once."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file (bad magic)")
    header_len = int.from_bytes(data[8:10], "little") + 10 if data[6] == 1 else \
        int.from_bytes(data[8:12], "little") + 12
    header = data[:header_len]
    cached = _NPY_HEADERS.get(header)
    if cached is None:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype.hasobject or (array.ndim > 1 and not array.flags.c_contiguous):
            return array
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[header] = (array.dtype, array.shape)
        return array
    dtype, shape = cached
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)


@dataclass
class TokenSample:
    """One decoded shard sample."""

    key: str
    text_ids: np.ndarray  # (n,) tokenizer ids
    image_codes: np.ndarray  # (h, w) or (h*w,)
    lowres_codes: np.ndarray | None
    caption: str | None


class BadSample(ValueError):
    """A shard sample that cannot be used (missing member, corrupt array, ids out of range)."""


def decode_sample(members: Mapping[str, bytes], key: str, need_lowres: bool) -> TokenSample:
    """TarRecord members -> TokenSample; BadSample names what is wrong."""
    try:
        text_ids = load_npy(members["text_ids.npy"])
        image_codes = load_npy(members["image_codes.npy"])
        lowres = load_npy(members["lowres_codes.npy"]) if need_lowres else None
    except KeyError as error:
        hint = " (pretokenize with sr=true for the sr task)" if "lowres" in str(error) else ""
        raise BadSample(f"sample {key} has no {error.args[0]} member{hint}") from None
    except ValueError as error:
        raise BadSample(f"sample {key}: corrupt .npy member: {error}") from None
    caption = members["txt"].decode("utf-8", errors="replace") if "txt" in members else None
    return TokenSample(key, text_ids, image_codes, lowres, caption)


# ------------------------------------------------------------------------------------------------
# layouts and batches


@dataclass
class _Template:
    input_ids: np.ndarray  # (T,) int64, text/image positions hold placeholders
    position_ids: np.ndarray  # (T,) int64
    loss_mask: np.ndarray  # (T,) bool
    text_mask: np.ndarray  # (T,) bool
    text_slices: list[slice]
    image_slices: list[slice]  # in layout order: [image] or [low-res, high-res] (sr)


@dataclass
class _Row:
    ids: np.ndarray  # (T,) int64 vocabulary ids
    template: _Template
    truncated: int
    key: str
    caption: str | None


class LayoutBatcher:
    """Per-sample task layouts batched as `collate_layouts` would, without per-sample tensors.

    The structure of a layout (command tokens, loss and text masks, where text and image ids go)
    depends only on the task and the lengths of its parts, so it is taken from the real layout
    function once per distinct length and cached.
    """

    def __init__(self, vocab: CogViewVocab, task: str = "t2i", *, max_text_len: int | None = None,
                 pad_to: int | None = None, caption_end_token: str | None = None,
                 sr_window: int = 0, text_slots: int | None = None) -> None:
        if task not in LAYOUT_TASKS:
            raise ValueError(f"data.layout={task!r} is not a task layout; choose one of "
                             f"{list(LAYOUT_TASKS)}")
        if max_text_len is not None and max_text_len < 1:
            raise ValueError(f"data.max_text_len={max_text_len} must be >= 1 or null")
        self.vocab, self.task = vocab, task
        self.max_text_len, self.pad_to = max_text_len, pad_to
        self.caption_end_token, self.sr_window = caption_end_token, sr_window
        self.text_slots = text_slots
        self._templates: dict[tuple[int, ...], _Template] = {}

    def layout(self, text_ids, image_codes, lowres_codes=None):
        """The real Layout of one sample (reference path; batches use the cached structure)."""
        kw = {"max_text_len": self.max_text_len}
        kw["text_slots"] = self.text_slots
        if self.task == "caption":
            return caption_layout(self.vocab, text_ids, image_codes,
                                  end_token=self.caption_end_token, **kw)
        if self.task == "t2i":
            return t2i_layout(self.vocab, text_ids, image_codes, **kw)
        return sr_layout(self.vocab, text_ids, lowres_codes, image_codes, window=self.sr_window,
                         **kw)

    def _template(self, n_text: int, n_image: int, n_lowres: int) -> _Template:
        key = (n_text, n_image, n_lowres)
        template = self._templates.get(key)
        if template is None:
            lowres = np.zeros(n_lowres, dtype=np.int64) if self.task == "sr" else None
            layout = self.layout(np.zeros(n_text, dtype=np.int64),
                                 np.zeros(n_image, dtype=np.int64), lowres)
            spans = [slice(start, end) for start, end, _ in layout.spans]
            kinds = [kind for _, _, kind in layout.spans]
            template = _Template(
                layout.input_ids.numpy().copy(), layout.position_ids.numpy().copy(),
                layout.loss_mask.numpy().copy(),
                layout.text_mask.numpy().copy(),
                [s for s, k in zip(spans, kinds) if k == "text"],
                [s for s, k in zip(spans, kinds) if k == "image"])
            self._templates[key] = template
        return template

    def sequence_length(self, n_text: int, n_image: int, n_lowres: int = 0) -> int:
        """Tokens in one layout with these part lengths (text before truncation)."""
        limit = text_limit(self.max_text_len, self.text_slots)
        if limit is not None:
            n_text = min(n_text, limit)
        return len(self._template(n_text, n_image, n_lowres).input_ids)

    def prepare(self, sample: TokenSample) -> "_Row":
        """One sample's ids in its layout; BadSample when its ids do not fit the vocabulary."""
        vocab = self.vocab
        text = sample.text_ids.reshape(-1).astype(np.int64)
        truncated = 0
        limit = text_limit(self.max_text_len, self.text_slots)
        if limit is not None and text.size > limit:
            truncated = text.size - limit
            text = text[:limit]
        images = [sample.image_codes.reshape(-1)]
        if self.task == "sr":
            if sample.lowres_codes is None:
                raise BadSample(f"sample {sample.key} has no low-res codes for the sr layout")
            images.insert(0, sample.lowres_codes.reshape(-1))
        if text.size == 0:
            raise BadSample(f"sample {sample.key} has an empty caption (0 text ids)")
        if text.min() < 0 or text.max() >= vocab.text_vocab_size:
            raise BadSample(f"sample {sample.key}: text id outside [0, {vocab.text_vocab_size}); "
                            "were the shards made with another text tokenizer?")
        for codes in images:
            if codes.size == 0 or codes.min() < 0 or codes.max() >= vocab.num_image_codes:
                raise BadSample(f"sample {sample.key}: image code outside [0, "
                                f"{vocab.num_image_codes}); were the shards made with another "
                                "VQ-VAE?")
        n_lowres = images[0].size if self.task == "sr" else 0
        template = self._template(text.size, images[-1].size, n_lowres)
        ids = template.input_ids.copy()
        for span in template.text_slices:
            ids[span] = text + vocab.num_image_codes
        for span, codes in zip(template.image_slices, images):
            ids[span] = codes
        return _Row(ids, template, truncated, sample.key, sample.caption)

    def collate(self, samples: Sequence[TokenSample]) -> dict[str, Any]:
        """Batch of samples -> the `collate_layouts` dict ([B, L] tensors), plus keys/captions."""
        return self.collate_rows([self.prepare(s) for s in samples])

    def collate_rows(self, rows: Sequence["_Row"]) -> dict[str, Any]:
        """Batch of prepared rows -> [B, L] tensors padded to the longest row or `pad_to`."""
        if not rows:
            raise ValueError("collate needs at least one sample")
        longest = max(len(row.ids) for row in rows)
        length = longest if self.pad_to is None else self.pad_to
        if length < longest:
            raise ValueError(f"data.pad_to={self.pad_to} is shorter than a layout of {longest} "
                             "tokens; raise pad_to or lower data.max_text_len")
        B = len(rows)
        input_ids = np.full((B, length), self.vocab.pad_id, dtype=np.int64)
        position_ids = np.zeros((B, length), dtype=np.int64)
        loss_mask = np.zeros((B, length), dtype=bool)
        text_mask = np.zeros((B, length), dtype=bool)
        attention_mask = np.zeros((B, length), dtype=bool)
        for b, row in enumerate(rows):
            n = len(row.ids)
            input_ids[b, :n] = row.ids
            position_ids[b, :n] = row.template.position_ids
            loss_mask[b, :n] = row.template.loss_mask
            text_mask[b, :n] = row.template.text_mask
            attention_mask[b, :n] = True
        return {
            "input_ids": torch.from_numpy(input_ids),
            "position_ids": torch.from_numpy(position_ids),
            "loss_mask": torch.from_numpy(loss_mask),
            "text_mask": torch.from_numpy(text_mask),
            "attention_mask": torch.from_numpy(attention_mask),
            "text_truncated": torch.tensor([row.truncated for row in rows], dtype=torch.long),
            "key": [row.key for row in rows],
            "caption": [row.caption for row in rows],
        }


# ------------------------------------------------------------------------------------------------
# the stream


def plan_split(num_shards: int, world_size: int, num_workers: int, split_by: str = "auto"
               ) -> tuple[str, int, int]:
    """How C = world_size * num_workers consumers share `num_shards` shards.

    Returns (mode, shard_groups, members_per_group): shards are dealt round-robin to
    `shard_groups` groups, and the members of a group split their group's samples by ordinal.
    """
    if split_by not in SPLIT_MODES:
        raise ValueError(f"data.split_by={split_by!r}; choose one of {list(SPLIT_MODES)}")
    consumers = world_size * num_workers
    if split_by == "shard" or (split_by == "auto" and num_shards % consumers == 0):
        return "shard", consumers, 1
    if split_by == "auto" and num_shards % world_size == 0:
        return "rank-shard/worker-sample", world_size, num_workers
    return "sample", 1, consumers


class TokenShardStream(IterableDataset):
    """Batches from pretokenized shards for one rank; iterate it through a DataLoader.

    Yields dicts from `LayoutBatcher.collate`. Each `__iter__` is one epoch (its shard order
    comes from (seed, epoch), identical on every rank); `set_epoch` sets it explicitly.
    """

    def __init__(self, urls: Sequence[str], batcher: LayoutBatcher, batch_size: int, *,
                 shuffle_shards: bool = True, shuffle_buffer: int = 1000, resampled: bool = False,
                 split_by: str = "auto", seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, return_captions: bool = True) -> None:
        super().__init__()
        if not urls:
            raise ValueError("TokenShardStream needs at least one shard")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.urls, self.batcher, self.batch_size = list(urls), batcher, batch_size
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        self.resampled, self.split_by, self.seed = resampled, split_by, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.return_captions = drop_last, return_captions
        self.epoch = 0
        self.batches_done = 0
        plan_split(len(self.urls), world_size, 1, split_by)  # validates split_by early
        self.skipped: Counter = Counter()  # per process (each worker counts its own)

    def set_epoch(self, epoch: int, batches_done: int = 0) -> None:
        """Use `epoch` for the next iteration's shard order (then count up from it).

        batches_done: batches of that epoch already trained on (a resumed run): per-epoch mode
        drops them, resampled mode mixes the number into its seeds; later epochs start whole.
        """
        if epoch < 0 or batches_done < 0:
            raise ValueError(f"set_epoch(epoch={epoch}, batches_done={batches_done}): both >= 0")
        self.epoch, self.batches_done = epoch, batches_done

    # -- stages ----------------------------------------------------------------------------
    def _records(self, worker: int, num_workers: int, epoch: int, resume: str = "") -> Iterator:
        """TarRecords this consumer owns, in shard order."""
        select = {"txt", "text_ids.npy", "image_codes.npy", "lowres_codes.npy"}
        if self.resampled:
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}{resume}")
            empty_draws = 0
            while True:
                found = False
                for item in read_tar(rng.choice(self.urls), select):
                    found = found or not isinstance(item, TarProblem)
                    yield item
                empty_draws = 0 if found else empty_draws + 1
                if empty_draws > 2 * len(self.urls) + 10:
                    raise RuntimeError(f"{empty_draws} shards in a row held no sample; check "
                                       f"the shards {self.urls[:3]}... (see the warnings above)")
        order = list(range(len(self.urls)))
        if self.shuffle_shards:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        _, groups, members = plan_split(len(order), self.world_size, num_workers, self.split_by)
        consumer = self.rank * num_workers + worker
        group, member = consumer // members, consumer % members
        ordinal = 0
        for shard in order[group::groups]:
            for item in read_tar(self.urls[shard], select):
                if isinstance(item, TarProblem):
                    if member == 0:
                        yield item
                    continue
                if ordinal % members == member:
                    yield item
                ordinal += 1

    def _samples(self, records: Iterator) -> Iterator[TokenSample]:
        need_lowres = self.batcher.task == "sr"
        for item in records:
            if isinstance(item, TarProblem):
                self._skip(item.reason, item.message)
                continue
            if item.problem is not None:
                self._skip(*item.problem)
                continue
            try:
                sample = decode_sample(item.members, item.key, need_lowres)
            except BadSample as error:
                self._skip("bad_sample", f"{error} (in {item.url})")
                continue
            if not self.return_captions:
                sample.caption = None
            yield sample

    def _rows(self, samples: Iterator[TokenSample]) -> Iterator[_Row]:
        for sample in samples:
            try:
                yield self.batcher.prepare(sample)
            except BadSample as error:
                self._skip("bad_sample", str(error))

    def _skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        log.warning("skipped [%s]: %s", reason, message)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from webdataset.filters import shuffle

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, done = self.epoch, self.batches_done
        self.epoch, self.batches_done = epoch + 1, 0
        # resampled: fresh draws after a resume; per-epoch: drop what this worker had delivered
        # (the DataLoader takes batch n from worker n mod num_workers)
        resume = f"/resume{done}" if self.resampled and done else ""
        skip = 0 if self.resampled else len(range(worker, done, num_workers))
        samples: Iterator[TokenSample] = self._samples(
            self._records(worker, num_workers, epoch, resume))
        if self.shuffle_buffer > 1:
            seed = f"{self.seed}/{epoch}/{self.rank}/{worker}/buffer{resume}"
            samples = shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                              seed=seed)(samples)
        if skip:
            log.info("resuming epoch %d: dropping the %d batches worker %d had delivered",
                     epoch, skip, worker)
        batch: list[_Row] = []
        for row in self._rows(samples):
            batch.append(row)
            if len(batch) == self.batch_size:
                if skip:
                    skip -= 1
                else:
                    yield self.batcher.collate_rows(batch)
                batch = []
        if batch and not self.drop_last and not skip:
            yield self.batcher.collate_rows(batch)


# ------------------------------------------------------------------------------------------------
# the DataModule


def resume_point(trainer) -> tuple[int, int]:
    """(epoch, batches of it already trained on) of a trainer: (0, 0) for a fresh run, the
    checkpoint's position after ``ckpt_path`` restored it (Lightning restores the loops
    before it asks for the train DataLoader)."""
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None:  # no trainer (or a stand-in without loops)
        return 0, 0
    # epochs: ready > processed while one is in progress (a checkpoint from its last batch
    # has it processed, its end hooks not yet completed); batches: of that epoch, the batch
    # of a checkpoint written in on_train_batch_end counts as processed, not yet completed
    epochs = fit_loop.epoch_progress.current
    batches = fit_loop.epoch_loop.batch_progress.current
    in_progress = epochs.ready > epochs.processed
    return int(epochs.processed), int(batches.processed) if in_progress else 0


def _rank_and_world(trainer) -> tuple[int, int]:
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TokenDataModule(L.LightningDataModule):
    """Pretokenized shards -> task batches for t2i / caption / sr training (cogview/conf/data/shards.yaml).

    train_shards: a directory written by the pretokenizer, a brace pattern or a URL list.
    Validation: `val_shards` (same forms), or the last `num_val_shards` shards of train_shards.
    Tokenizers: `vqvae_dir` and `text_tokenizer` ({kind, model_file} or {dir}) of the model, or
    their fingerprints directly; setup() checks them against the manifest and builds `vocab`.
    rank / world_size: taken from the Trainer or torch.distributed unless given (tests).
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        num_val_shards: int = 1,
        manifest: str | None = None,
        layout: str = "t2i",
        batch_size: int = 32,
        num_workers: int = 1,
        pad_to: int | None = None,
        max_text_len: int | None = 64,
        fixed_image_positions: bool = False,
        caption_end_token: str | None = None,
        sr_window: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        split_by: str = "auto",
        drop_last: bool = False,
        seed: int = 0,
        vqvae_dir: str | None = None,
        text_tokenizer: Mapping[str, Any] | str | None = None,
        image_fingerprint: str | None = None,
        text_fingerprint: str | None = None,
        check_fingerprints: bool = True,
        return_captions: bool = True,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUT_TASKS:
            raise ValueError(f"data.layout={layout!r}; choose one of {list(LAYOUT_TASKS)}")
        if not train_shards:
            raise ValueError("data.train_shards is required: the pretokenizer's out= directory, "
                             "a brace pattern such as 'tokens/tokens-{000000..000009}.tar', or "
                             "a list of URLs")
        if num_val_shards < 0:
            raise ValueError(f"data.num_val_shards={num_val_shards} must be >= 0")
        if split_by not in SPLIT_MODES:
            raise ValueError(f"data.split_by={split_by!r}; choose one of {list(SPLIT_MODES)}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.num_val_shards, self.manifest = num_val_shards, manifest
        self.layout, self.batch_size, self.num_workers = layout, batch_size, num_workers
        self.pad_to, self.max_text_len = pad_to, max_text_len
        self.text_slots = text_slots_for(fixed_image_positions, max_text_len, "data")
        self.caption_end_token, self.sr_window = caption_end_token, sr_window
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        self.resampled, self.split_by, self.drop_last, self.seed = (resampled, split_by,
                                                                    drop_last, seed)
        self.vqvae_dir = vqvae_dir
        self.text_tokenizer_cfg = text_tokenizer
        self.image_fingerprint, self.text_fingerprint = image_fingerprint, text_fingerprint
        self.check_fingerprints = check_fingerprints
        self.return_captions, self.pin_memory = return_captions, pin_memory
        self.rank, self.world_size = rank, world_size
        self.vocab: CogViewVocab | None = None
        self.batcher: LayoutBatcher | None = None
        self.train_set: ShardSet | None = None
        self.val_set: ShardSet | None = None

    # -- setup -----------------------------------------------------------------------------
    def _text_tokenizer(self):
        cfg = self.text_tokenizer_cfg
        if cfg is None:
            return None
        if isinstance(cfg, str):
            cfg = {"dir": cfg}
        return build_text_tokenizer_from_config(dict(cfg))

    def expected_fingerprints(self) -> tuple[dict[str, str | None], dict[str, str]]:
        """The model's tokenizer fingerprints and where each came from."""
        expected: dict[str, str | None] = {"image_tokenizer": self.image_fingerprint,
                                           "text_tokenizer": self.text_fingerprint}
        origin = {}
        if self.image_fingerprint:
            origin["image_tokenizer"] = "data.image_fingerprint"
        elif self.vqvae_dir:
            expected["image_tokenizer"] = image_tokenizer_fingerprint(self.vqvae_dir)
            origin["image_tokenizer"] = f"vqvae_dir={self.vqvae_dir}"
        if self.text_fingerprint:
            origin["text_tokenizer"] = "data.text_fingerprint"
        else:
            tokenizer = self._text_tokenizer()
            if tokenizer is not None:
                expected["text_tokenizer"] = tokenizer.fingerprint()
                origin["text_tokenizer"] = f"text_tokenizer={dict(self._tokenizer_cfg_dict())}"
        return expected, origin

    def _tokenizer_cfg_dict(self) -> dict:
        cfg = self.text_tokenizer_cfg
        return {"dir": cfg} if isinstance(cfg, str) else {k: v for k, v in dict(cfg).items()
                                                          if v is not None}

    def _build_vocab(self, manifest: dict | None) -> CogViewVocab:
        num_codes = text_size = None
        if manifest is not None:
            num_codes = int(manifest["image_tokenizer"]["num_codes"])
            text_size = int(manifest["text_tokenizer"]["vocab_size"])
        if self.vqvae_dir:
            num_codes = image_tokenizer_num_codes(self.vqvae_dir)
        tokenizer = self._text_tokenizer()
        if tokenizer is not None:
            text_size = tokenizer.vocab_size
        if num_codes is None or text_size is None:
            raise ValueError("cannot build the vocabulary: the shards have no manifest.json and "
                             "data.vqvae_dir / data.text_tokenizer are not set")
        return CogViewVocab(num_codes, text_size)

    def setup(self, stage: str | None = None) -> None:
        """Resolve shards, check tokenizer fingerprints, split off validation, build the vocab."""
        if self.train_set is not None:
            return
        train = resolve_shards(self.train_shards, self.manifest)
        if self.val_shards:
            val = resolve_shards(self.val_shards)
        elif self.num_val_shards:
            if len(train.urls) <= self.num_val_shards:
                raise ValueError(
                    f"data.num_val_shards={self.num_val_shards} would leave no training shard: "
                    f"{self.train_shards} has {len(train.urls)} shard(s). Set "
                    "data.num_val_shards=0 (no validation), give data.val_shards=..., or "
                    "pretokenize with a smaller shard_size")
            cut = len(train.urls) - self.num_val_shards
            train, val = train.subset(range(cut)), train.subset(range(cut, len(train.urls)))
        else:
            val = None
        if self.check_fingerprints:
            expected, origin = self.expected_fingerprints()
            for shard_set in (train, val):
                if shard_set is None:
                    continue
                where = shard_set.manifest_path or str(shard_set.urls[0])
                if shard_set.manifest is None:
                    if any(expected.values()):
                        raise ValueError(
                            f"cannot check the tokenizer fingerprints of shards {where}: no "
                            "manifest.json beside them; pass data.manifest=PATH, or set "
                            "data.check_fingerprints=false to train without the check")
                    continue
                check_fingerprints(shard_set.manifest.get("fingerprints", {}), expected, where,
                                   origin)
        manifest = train.manifest
        if self.layout == "sr" and manifest is not None and not manifest.get("sr"):
            raise ValueError(f"data.layout=sr needs low-res codes, but the shards "
                             f"{train.manifest_path} were pretokenized without sr=true")
        if train.num_samples == 0:
            raise ValueError(f"the training shards {self.train_shards} hold no samples")
        self.vocab = self._build_vocab(manifest)
        self.batcher = LayoutBatcher(self.vocab, self.layout, max_text_len=self.max_text_len,
                                     pad_to=self.pad_to, caption_end_token=self.caption_end_token,
                                     sr_window=self.sr_window, text_slots=self.text_slots)
        self.train_set, self.val_set = train, val

    # -- info ------------------------------------------------------------------------------
    def max_sequence_length(self) -> int | None:
        """Longest layout the shards can give (needs a manifest and max_text_len), else None."""
        manifest = self.train_set.manifest if self.train_set else None
        if manifest is None or self.max_text_len is None or self.batcher is None:
            return None
        h, w = manifest["code_shape"]
        lowres = int(np.prod(manifest["lowres_code_shape"])) if self.layout == "sr" else 0
        return self.batcher.sequence_length(self.max_text_len, h * w, lowres)

    # -- loaders ---------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size
        return _rank_and_world(self.trainer)

    def _stream(self, shard_set: ShardSet, train: bool) -> TokenShardStream:
        rank, world = self._rank_world()
        workers = max(1, self.num_workers)
        mode, groups, members = plan_split(len(shard_set.urls), world, workers, self.split_by)
        resampled = self.resampled and train
        if not resampled:
            log.info("%s shards: %d shards for %d rank(s) x %d worker(s): split mode %s",
                     "train" if train else "val", len(shard_set.urls), world, workers, mode)
            if mode == "sample" and len(shard_set.urls) > 1:
                log.warning("every worker of every rank reads all %d shards (their number is "
                            "not a multiple of world_size=%d); pretokenize into a multiple of "
                            "world_size x num_workers shards to read each shard once",
                            len(shard_set.urls), world)
            if mode == "shard" and len(shard_set.urls) < groups:
                log.warning("only %d shards for %d consumers: some workers get no data",
                            len(shard_set.urls), groups)
            counts = [c for c in shard_set.counts if c is not None]
            if train and world > 1 and (len(set(counts)) > 1 or sum(counts) % world):
                log.warning("DDP without data.resampled: the ranks may see different numbers "
                            "of batches (shard sizes %s), and a rank that runs out first stalls "
                            "the others; use data.resampled=true with trainer.max_steps",
                            sorted(set(counts)))
        return TokenShardStream(
            shard_set.urls, self.batcher, self.batch_size,
            shuffle_shards=self.shuffle_shards and train,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            resampled=resampled, split_by=self.split_by, seed=self.seed, rank=rank,
            world_size=world, drop_last=self.drop_last and train,
            return_captions=self.return_captions)

    def _loader(self, dataset: TokenShardStream) -> DataLoader:
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        stream = self._stream(self.train_set, train=True)
        epoch, done = resume_point(self.trainer)
        if epoch or done:
            log.info("train stream resumes at epoch %d after %d batches of it (%s)", epoch, done,
                     "fresh draws: resampled" if stream.resampled else "the rest of the epoch")
        stream.set_epoch(epoch, done)
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_set is None:
            return []
        return self._loader(self._stream(self.val_set, train=False))
