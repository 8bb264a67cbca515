"""Stream pretokenized shards (cogview.data.pretokenize) as task batches: t2i, caption or sr
(plain torch; the Lightning DataModule over it is cogview.data.datamodule).

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

import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle

from cogview.data.shards import BadSample, TokenSample, decode_sample
from cogview.data.tar_reader import TarProblem, read_tar
from cogview.tokenization import CogViewVocab, caption_layout, sr_layout, t2i_layout, text_limit
from cogview.tokenization.layouts import TASKS
from cogview.validate import check_int

log = logging.getLogger(__name__)

SPLIT_MODES = ("auto", "shard", "sample")


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
        if task not in TASKS:
            raise ValueError(f"data.layout={task!r} is not a task layout; choose one of "
                             f"{list(TASKS)}")
        if max_text_len is not None:
            check_int("data.max_text_len", max_text_len, meaning="text tokens; null: no limit")
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


def log_split_plan(name: str, counts: Sequence[int | None], world_size: int, num_workers: int,
                   mode: str, groups: int, train: bool) -> None:
    """Logs how ``name``'s shards (``counts`` samples each, None: unknown) are shared, and warns
    where the plan reads shards more than once, leaves workers without data, or can stall DDP
    (ranks with different numbers of batches)."""
    num_shards = len(counts)
    log.info("%s shards: %d shards for %d rank(s) x %d worker(s): split mode %s",
             name, num_shards, world_size, num_workers, mode)
    if mode == "sample" and num_shards > 1:
        log.warning("every worker of every rank reads all %d shards (their number is not a "
                    "multiple of world_size=%d); pretokenize into a multiple of world_size x "
                    "num_workers shards to read each shard once", num_shards, world_size)
    if mode == "shard" and num_shards < groups:
        log.warning("only %d shards for %d consumers: some workers get no data",
                    num_shards, groups)
    known = [c for c in counts if c is not None]
    if train and world_size > 1 and (len(set(known)) > 1 or sum(known) % world_size):
        log.warning("DDP without data.resampled: the ranks may see different numbers of batches "
                    "(shard sizes %s), and a rank that runs out first stalls the others; use "
                    "data.resampled=true with trainer.max_steps", sorted(set(known)))


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
        check_int("data.batch_size", batch_size)
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
        check_int("set_epoch epoch", epoch, 0)
        check_int("set_epoch batches_done", batches_done, 0)
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
