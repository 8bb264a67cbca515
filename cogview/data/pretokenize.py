"""Pretokenize image-caption pairs once into WebDataset shards of token arrays.

    python -m cogview.data.pretokenize vqvae_dir=VQVAE_DIR out=OUT_DIR \\
        [source.kind=shapes|folder|shards ...] [size=64] [sr=true] [shard_size=1000]

(config: conf/pretokenize.yaml). Each output sample holds

    <key>.txt               the caption as given
    <key>.text_ids.npy      text tokenizer ids, int16 (int32 for vocabularies over 32768)
    <key>.image_codes.npy   VQ-VAE codes [size/8, size/8], int16 when the codebook has <= 32768
    <key>.lowres_codes.npy  with sr=true: codes of the image resized to size/2, [size/16, size/16]
    <key>.json              {"key": source key, "size", "original_size", "source", "scene"?}

where <key> is the input position, zero-padded. `OUT/manifest.json` records the samples of each
shard, the skipped inputs by reason, what broken input tars lost ("lost": bytes, members and
samples by reason, see cogview.data.sources.TarProblem), the input limits (`max_pixels`,
`max_member_bytes`) and the fingerprints of both tokenizers (the DataModule refuses shards whose
fingerprints differ from the model's tokenizers).

Resume design: the input is read in one deterministic order (see cogview.data.sources), and
shard i always covers input positions [i*N, (i+1)*N) (N = shard_size), however many of them
are skipped as bad input. A shard is written to `<name>.tar.tmp`, its stats to
`<name>.stats.json`, and only then renamed to `<name>.tar`; a final-named tar is therefore
complete. A rerun (same config) skips every completed shard without re-reading its inputs
(shapes-zh indices and folder rows are skipped by index; input tars are skipped up to the
position recorded in the last completed shard's stats), so a killed run resumes without redoing
or duplicating work. A rerun with a different config into the same directory is an error (the
input limits are not part of it: a rerun with other limits applies them to the shards it writes).

Work split: worker processes (`num_workers`, 0 = in the main process) decode, resize and
tokenize text; the main process encodes images with the VQ-VAE in batches of `batch_size` and
writes the shards in input order.

Dead workers: a worker killed mid-task (the OOM killer on a huge image, any SIGKILL, a crash in
a decoder) does not stall the run. The pool is rebuilt and the samples it lost are redone one at
a time; a sample that kills its worker each time it runs alone (`1 + worker_retries` times) is a
counted `worker_crashed` skip naming it. Every other input is written exactly once, and shards
stay atomic as above (see WorkerPool).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from cogview.data.fingerprint import image_tokenizer_fingerprint
from cogview.data.images import DEFAULT_MAX_PIXELS, resize_center_crop
from cogview.data.sources import (
    DEFAULT_MAX_MEMBER_BYTES,
    SKIP_REASONS,
    LoadedSample,
    RawSample,
    SkipSample,
    build_source,
    not_utf8_message,
)

log = logging.getLogger("cogview.pretokenize")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MANIFEST_NAME = "manifest.json"
FORMAT = "cogview-tokens"
FORMAT_VERSION = 1
DEFAULT_WORKER_RETRIES = 2  # conf/pretokenize.yaml's worker_retries, for configs without it


class NoUsableSamplesError(ValueError):
    """The input held no sample that could be tokenized."""


# ------------------------------------------------------------------------------------------------
# small helpers


def index_dtype(num_ids: int) -> np.dtype:
    """int16 when every id in [0, num_ids) fits (num_ids <= 32768), else int32."""
    return np.dtype(np.int16) if num_ids <= 32768 else np.dtype(np.int32)


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as the bytes of a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def shard_name(prefix: str, index: int) -> str:
    """File name of output shard `index`: '<prefix>-000042.tar'."""
    return f"{prefix}-{index:06d}.tar"


def _stats_path(out: Path, prefix: str, index: int) -> Path:
    return out / f"{prefix}-{index:06d}.stats.json"


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file and rename it over `path` (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def add_lost(lost: dict[str, Counter], reason: str, counts: dict[str, int]) -> None:
    """Adds the counts of what a broken input cost (TarProblem.lost) under its reason."""
    lost.setdefault(reason, Counter()).update(counts)


def sorted_lost(lost: dict[str, Counter]) -> dict[str, dict[str, int]]:
    """`lost` as it is written to the stats and the manifest: plain dicts, sorted keys."""
    return {reason: dict(sorted(counts.items())) for reason, counts in sorted(lost.items())}


def build_text_tokenizer_from_config(cfg: dict):
    """Text tokenizer from {kind, model_file} or {dir} (a directory written by tokenizer.save)."""
    from cogview.tokenization import build_text_tokenizer, load_text_tokenizer

    cfg = dict(cfg or {})
    if cfg.get("dir"):
        return load_text_tokenizer(cfg["dir"])
    return build_text_tokenizer(cfg.get("kind", "char"), cfg.get("model_file"))


# ------------------------------------------------------------------------------------------------
# worker side: decode, resize, tokenize text


@dataclass
class Prepared:
    """A sample ready for VQ encoding."""

    position: int
    key: str
    caption: str
    text_ids: np.ndarray  # (n,) int16/int32
    image: np.ndarray  # (S, S, 3) uint8
    lowres: np.ndarray | None  # (S/2, S/2, 3) uint8 with sr
    meta: dict
    cursor: tuple[int, int] | None


@dataclass
class Skipped:
    """An input position that gave no sample, and why."""

    position: int
    key: str
    reason: str
    message: str
    cursor: tuple[int, int] | None
    lost: dict[str, int] | None = None  # what a broken input tar cost (TarProblem.lost)


_WORKER: dict[str, Any] = {}


def _init_worker(source, text_tokenizer_cfg: dict, size: int, sr: bool) -> None:
    """Pool initializer: every worker builds its own text tokenizer once."""
    _WORKER.clear()
    tokenizer = build_text_tokenizer_from_config(text_tokenizer_cfg)
    _WORKER.update(source=source, tokenizer=tokenizer, size=size, sr=sr,
                   ids_dtype=index_dtype(tokenizer.vocab_size))


def _init_pool_worker(*init_args) -> None:
    """_init_worker in a pool process: an error is kept for the first task to raise, because a
    process whose initializer fails exits and would be taken for a worker that died."""
    try:
        _init_worker(*init_args)
    except Exception as error:
        _WORKER["init_error"] = f"{type(error).__name__}: {error}"


def prepare_sample(raw: RawSample) -> Prepared | Skipped:
    """Load one input (in a worker): decode + resize the image, tokenize the caption."""
    from cogview.tokenization import encode_caption

    def skipped(reason: str, message: str) -> Skipped:
        return Skipped(raw.position, raw.key, reason, message, raw.cursor)

    if raw.error is not None:
        return Skipped(raw.position, raw.key, *raw.error, raw.cursor, raw.lost)
    source, size = _WORKER["source"], _WORKER["size"]
    try:
        loaded: LoadedSample = source.load(raw)
    except SkipSample as skip:
        return skipped(skip.reason, skip.message)
    if loaded.caption is None:
        return skipped("missing_caption", f"sample {raw.key} has no caption")
    try:
        text_ids = encode_caption(_WORKER["tokenizer"], loaded.caption)
    except ValueError as error:
        return skipped("empty_caption", f"sample {raw.key}: {error}")
    original_size = list(loaded.image.size)
    try:
        image = resize_center_crop(loaded.image, size)
        lowres = None
        if _WORKER["sr"]:
            from PIL import Image

            lowres = np.asarray(image.resize((size // 2, size // 2), Image.Resampling.LANCZOS))
    except (OSError, ValueError, MemoryError) as error:  # PIL resamples lazily-decoded data
        return skipped("undecodable_image", f"sample {raw.key}: cannot resize its "
                       f"{original_size[0]}x{original_size[1]} image: {error}")
    meta = {"key": raw.key, "size": size, "original_size": original_size, **loaded.meta}
    try:
        json.dumps(meta, ensure_ascii=False).encode("utf-8")  # as _write_batch will
    except UnicodeEncodeError as error:  # a file or member name that is not UTF-8
        return skipped("unreadable_member", not_utf8_message(
            f"the name or metadata of sample {raw.key!r}", error))
    return Prepared(raw.position, raw.key, loaded.caption,
                    np.asarray(text_ids, dtype=_WORKER["ids_dtype"]), np.asarray(image), lowres,
                    meta, raw.cursor)


def _prepare_chunk(chunk: list[RawSample]) -> list[Prepared | Skipped]:
    if "init_error" in _WORKER:
        raise RuntimeError(f"a pretokenize worker process could not start: "
                           f"{_WORKER['init_error']}")
    return [prepare_sample(raw) for raw in chunk]


def _chunks(items: Iterable[RawSample], size: int) -> Iterator[list[RawSample]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class WorkerPool:
    """`num_workers` processes that prepare chunks of samples, surviving a worker's death.

    A worker that dies mid-task (SIGKILL from the OOM killer on a huge image, a crash in a
    decoder) breaks a ProcessPoolExecutor: every task in flight then fails with
    BrokenProcessPool, where multiprocessing.Pool would wait for the lost task forever. `results`
    then starts a fresh pool and, before anything else is submitted, redoes the samples of every
    chunk the broken pool lost one at a time with nothing else in flight, so the sample that
    kills its worker is known: it is tried `1 + retries` times alone, then given up as a counted
    `worker_crashed` skip naming it (a skip, not an error, as for any input that cannot be
    decoded: a rerun would meet the same sample again). Results come back in input order and
    each chunk's results come from exactly one run, so every input is prepared once.
    """

    def __init__(self, num_workers: int, init_args: tuple, retries: int) -> None:
        import multiprocessing as mp

        self.num_workers, self.init_args, self.retries = num_workers, init_args, retries
        self.context = mp.get_context("fork" if os.name == "posix" else "spawn")
        self.generation = 0  # counts the pools started; a future carries its pool's number
        self.executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.num_workers, mp_context=self.context,
                                   initializer=_init_pool_worker, initargs=self.init_args)

    def _restart(self, generation: int) -> None:
        """A fresh pool, unless the broken pool `generation` was already replaced."""
        if generation != self.generation:
            return
        self.executor.shutdown(wait=True)  # a broken pool has already ended its workers
        self.executor = self._start()
        self.generation += 1

    def submit(self, chunk: list[RawSample]) -> tuple[int, Future]:
        """(pool generation, future of the chunk's results)."""
        while True:
            generation = self.generation
            try:
                return generation, self.executor.submit(_prepare_chunk, chunk)
            except BrokenProcessPool:  # a worker died while the pool was idle
                self._restart(generation)

    def results(self, window: deque) -> list[Prepared | Skipped]:
        """Pops the oldest (chunk, generation, future) of `window` and returns its results. If
        its pool broke, the chunks that pool lost, this one and those behind it in the window,
        are redone now, and their entries replaced by futures that hold the results."""
        chunk, generation, future = window.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            pass
        self._restart(generation)
        results = self._redo(chunk)
        for index, (other, other_generation, other_future) in enumerate(window):
            if other_generation == generation:  # submitted to the pool that broke
                try:
                    redone = other_future.result()  # finished before the break
                except BrokenProcessPool:
                    redone = self._redo(other)
                done: Future = Future()
                done.set_result(redone)
                window[index] = (other, other_generation, done)
        return results

    def _redo(self, chunk: list[RawSample]) -> list[Prepared | Skipped]:
        log.warning("a worker process died (killed by a signal, e.g. the OOM killer, or "
                    "crashed) while preparing inputs %d-%d; redoing them one at a time",
                    chunk[0].position, chunk[-1].position)
        return [self._run_alone(raw) for raw in chunk]

    def _run_alone(self, raw: RawSample) -> Prepared | Skipped:
        for _ in range(1 + self.retries):
            generation, future = self.submit([raw])
            try:
                return future.result()[0]
            except BrokenProcessPool:
                self._restart(generation)
        return Skipped(raw.position, raw.key, "worker_crashed",
                       f"input {raw.position} ({raw.key}) killed its worker process each of the "
                       f"{1 + self.retries} times it was prepared alone (out of memory on a huge "
                       "image? see the kernel log); skipped. Lower max_pixels, or raise "
                       "worker_retries to try it more often", raw.cursor)

    def close(self) -> None:
        """Ends the workers, as multiprocessing.Pool.terminate did: after the last result they
        are idle, and after an error in the main process none is left running a task."""
        terminate = getattr(self.executor, "terminate_workers", None)  # Python >= 3.14
        if terminate is not None:
            terminate()
        else:
            for process in list((self.executor._processes or {}).values()):
                process.terminate()
        self.executor.shutdown(wait=True, cancel_futures=True)


def prepared_stream(items: Iterable[RawSample], pool: WorkerPool | None, chunk_size: int,
                    max_chunks_in_flight: int) -> Iterator[Prepared | Skipped]:
    """Prepared samples in input order; with a pool, at most `max_chunks_in_flight` chunks are
    queued at a time (Pool.imap would read the whole input into memory ahead of the encoder)."""
    if pool is None:
        for raw in items:
            yield prepare_sample(raw)
        return
    window: deque = deque()  # (chunk, pool generation, future of its results)
    for chunk in _chunks(items, chunk_size):
        window.append((chunk, *pool.submit(chunk)))
        if len(window) >= max_chunks_in_flight:
            yield from pool.results(window)
    while window:
        yield from pool.results(window)


# ------------------------------------------------------------------------------------------------
# main side: encode and write


class ShardWriter:
    """Writes output shard `index` to a temporary name; `finish` renames it when complete."""

    def __init__(self, out: Path, prefix: str, index: int, shard_size: int, signature: str) -> None:
        import webdataset as wds

        self.out, self.prefix, self.index = out, prefix, index
        self.path = out / shard_name(prefix, index)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        # an integer mtime keeps tarfile from adding a pax header to every member
        self.writer = wds.TarWriter(str(self.tmp), encoder=False, mtime=int(time.time()))
        self.first_position = index * shard_size
        self.last_position = self.first_position - 1
        self.end_cursor: tuple[int, int] | None = None
        self.samples = 0
        self.skipped: Counter = Counter()
        self.lost: dict[str, Counter] = {}  # reason -> what broken input tars cost
        self.signature = signature

    def write(self, sample: dict[str, Any]) -> None:
        self.writer.write(sample)
        self.samples += 1

    def finish(self) -> dict:
        """Close, write the stats, rename the tar to its final name; returns the stats."""
        self.writer.close()
        stats = {
            "shard": self.path.name, "index": self.index, "samples": self.samples,
            "skipped": dict(sorted(self.skipped.items())),
            "lost": sorted_lost(self.lost),
            "inputs": [self.first_position, self.last_position + 1],
            "end_cursor": list(self.end_cursor) if self.end_cursor is not None else None,
            "signature": self.signature,
        }
        write_json_atomic(_stats_path(self.out, self.prefix, self.index), stats)
        os.replace(self.tmp, self.path)
        return stats


class _SkipLog:
    """Logs the first `limit` skips of each reason, then only counts them."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, Counter()

    def __call__(self, skip: Skipped) -> None:
        self.seen[skip.reason] += 1
        n = self.seen[skip.reason]
        if n <= self.limit:
            log.warning("skipped input %d (%s) [%s]: %s", skip.position, skip.key, skip.reason,
                        skip.message)
        if n == self.limit:
            log.warning("further '%s' skips are counted in the manifest but not logged",
                        skip.reason)


def encode_images(vqvae, images: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """uint8 images [(S, S, 3)] -> codes [B, S/8, S/8] as `dtype`, one batched VQ-VAE pass."""
    import torch

    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
    codes = vqvae.encode(batch.to(vqvae.pixel_mean.device))  # (B, S/8, S/8) int64
    return codes.cpu().numpy().astype(dtype)


def _key_width(num_items: int | None) -> int:
    return max(9, len(str(num_items - 1))) if num_items else 9


def _write_batch(vqvae, batch: list[Prepared], shard: ShardWriter, codes_dtype: np.dtype,
                 key_width: int) -> None:
    if not batch:
        return
    codes = encode_images(vqvae, [p.image for p in batch], codes_dtype)
    lowres = None
    if batch[0].lowres is not None:
        lowres = encode_images(vqvae, [p.lowres for p in batch], codes_dtype)
    for i, p in enumerate(batch):
        sample = {
            "__key__": f"{p.position:0{key_width}d}",
            "txt": p.caption.encode("utf-8"),
            "text_ids.npy": npy_bytes(p.text_ids),
            "image_codes.npy": npy_bytes(codes[i]),
            "json": json.dumps(p.meta, ensure_ascii=False).encode("utf-8"),
        }
        if lowres is not None:
            sample["lowres_codes.npy"] = npy_bytes(lowres[i])
        shard.write(sample)
    batch.clear()


def _signature(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _completed_shards(out: Path, prefix: str, signature: str) -> dict[int, dict]:
    """Stats of the shards a previous run finished (final-named tar + stats, same signature)."""
    done = {}
    for stats_file in sorted(out.glob(f"{prefix}-*.stats.json")):
        try:
            stats = json.loads(stats_file.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if stats.get("signature") == signature and (out / stats["shard"]).is_file():
            done[int(stats["index"])] = stats
    return done


def _check_config(cfg) -> None:
    size = int(cfg.size)
    if size < 8 or size % 8:
        raise ValueError(f"size={size} must be a positive multiple of 8 (the VQ-VAE "
                         "downsamples 8x)")
    if cfg.sr and size % 16:
        raise ValueError(f"sr=true needs size={size} to be a multiple of 16, so that the "
                         f"low-res image ({size}/2 px) is a multiple of 8 too")
    for name in ("shard_size", "batch_size"):
        if int(cfg[name]) < 1:
            raise ValueError(f"{name}={cfg[name]} must be >= 1")
    if int(cfg.num_workers) < 0:
        raise ValueError(f"num_workers={cfg.num_workers} must be >= 0 (0 = in the main process)")
    if int(cfg.get("worker_retries", DEFAULT_WORKER_RETRIES)) < 0:
        raise ValueError(f"worker_retries={cfg.worker_retries} must be >= 0 (times a sample "
                         "whose worker died is retried alone before it is skipped)")
    max_pixels = cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    if max_pixels is not None and int(max_pixels) < 1:
        raise ValueError(f"max_pixels={max_pixels} must be >= 1 (pixels, width x height, of the "
                         "largest image to decode), or null for no limit")
    if int(cfg.get("max_member_bytes", DEFAULT_MAX_MEMBER_BYTES)) < 1:
        raise ValueError(f"max_member_bytes={cfg.max_member_bytes} must be >= 1 (bytes of the "
                         "largest input tar member to read)")
    if not cfg.out:
        raise ValueError("out=DIR is required: where the shards and manifest.json go")
    if not cfg.vqvae_dir:
        raise ValueError("vqvae_dir=DIR is required: the image tokenizer, a directory written "
                         "by VQVAE.save_pretrained (e.g. a task=vqvae run's export_dir)")


class Pretokenizer:
    """One pretokenize run: config checks, tokenizers and source in __init__, the work in run()."""

    def __init__(self, cfg) -> None:
        from omegaconf import OmegaConf

        from cogview.modules.vqvae import VQVAE

        if not isinstance(cfg, dict):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = OmegaConf.create(cfg)
        _check_config(cfg)
        self.cfg = cfg
        self.size, self.shard_size, self.sr = int(cfg.size), int(cfg.shard_size), bool(cfg.sr)
        self.out, self.prefix = Path(cfg.out), str(cfg.shard_prefix)
        kind = cfg.source.kind
        options = cfg.source.get(kind) if kind in cfg.source else None
        max_pixels = cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
        self.limits = {
            "max_pixels": int(max_pixels) if max_pixels is not None else None,
            "max_member_bytes": int(cfg.get("max_member_bytes", DEFAULT_MAX_MEMBER_BYTES))}
        self.source = build_source(kind, self.size,
                                   OmegaConf.to_container(options) if options is not None else {},
                                   **self.limits)
        self.num_items = self.source.num_items()
        if self.num_items == 0:
            raise NoUsableSamplesError(f"source {self.source.describe()} holds no input samples")
        self.tokenizer_cfg = OmegaConf.to_container(cfg.text_tokenizer)
        tokenizer = build_text_tokenizer_from_config(self.tokenizer_cfg)
        self.vqvae = VQVAE.from_pretrained(cfg.vqvae_dir, map_location=cfg.device)
        fingerprints = {"image_tokenizer": image_tokenizer_fingerprint(self.vqvae),
                        "text_tokenizer": tokenizer.fingerprint()}
        self.codes_dtype = index_dtype(self.vqvae.num_codes)
        self.signature = _signature({
            "format": FORMAT, "version": FORMAT_VERSION, "source": self.source.describe(),
            "size": self.size, "sr": self.sr, "shard_size": self.shard_size,
            "prefix": self.prefix, "fingerprints": fingerprints})
        grid = self.size // self.vqvae.downsample
        self.manifest: dict[str, Any] = {
            "format": FORMAT, "version": FORMAT_VERSION, "complete": False,
            "signature": self.signature, "fingerprints": fingerprints,
            "image_tokenizer": {"path": str(cfg.vqvae_dir), "num_codes": self.vqvae.num_codes,
                                "downsample": self.vqvae.downsample,
                                "codes_dtype": self.codes_dtype.name},
            "text_tokenizer": {**tokenizer.config(), "vocab_size": tokenizer.vocab_size,
                               "ids_dtype": index_dtype(tokenizer.vocab_size).name},
            "size": self.size, "code_shape": [grid, grid], "sr": self.sr,
            "lowres_size": self.size // 2 if self.sr else None,
            "lowres_code_shape": [grid // 2, grid // 2] if self.sr else None,
            "shard_size": self.shard_size, "shard_prefix": self.prefix,
            "source": self.source.describe(), "limits": self.limits,
        }
        self.manifest_path = self.out / MANIFEST_NAME

    # -- output directory and resume ---------------------------------------------------------
    def _previous_run(self) -> dict | None:
        """The manifest already in `out` (checked against this config), or None."""
        if not self.manifest_path.is_file():
            return None
        previous = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        if previous.get("signature") != self.signature:
            raise ValueError(
                f"{self.out} already holds shards written with a different configuration "
                f"(manifest signature {previous.get('signature')}, this run {self.signature}: "
                "source, size, sr, shard_size, shard_prefix or a tokenizer differ). Use a new "
                "out=DIR, or delete that directory to start over."
            )
        return previous

    def _items(self, done: dict[int, dict]) -> Iterator[RawSample]:
        """Inputs of the shards still to write; the finished prefix is not read again."""
        first_todo = 0
        while first_todo in done:
            first_todo += 1
        start, resume = first_todo * self.shard_size, None
        if first_todo > 0 and done[first_todo - 1].get("end_cursor") is not None:
            url_index, ordinal = done[first_todo - 1]["end_cursor"]
            resume = (url_index, ordinal + 1)
        if done:
            log.info("resuming: %d completed shards kept, starting at input %d", len(done), start)
        return (raw for raw in self.source.items(start, resume)
                if raw.position // self.shard_size not in done)

    # -- the work ----------------------------------------------------------------------------
    def run(self) -> dict:
        """Write every missing shard, then the manifest; returns the manifest."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        previous = self._previous_run()
        if previous is not None and previous.get("complete") and all(
                (self.out / s["name"]).is_file() for s in previous["shards"]):
            log.info("%s is already complete (%d samples in %d shards); nothing to do", self.out,
                     previous["num_samples"], len(previous["shards"]))
            return previous
        if previous is None:
            write_json_atomic(self.manifest_path, self.manifest)
        for stale in self.out.glob(f"{self.prefix}-*.tar.tmp"):  # left by a killed run
            stale.unlink()
        done = _completed_shards(self.out, self.prefix, self.signature)
        items = self._items(done)

        num_workers = int(cfg.num_workers)
        init_args = (self.source, self.tokenizer_cfg, self.size, self.sr)
        pool = None
        if num_workers > 0:
            pool = WorkerPool(num_workers, init_args,
                              int(cfg.get("worker_retries", DEFAULT_WORKER_RETRIES)))
        else:
            _init_worker(*init_args)
        from tqdm import tqdm

        remaining = None if self.num_items is None else self.num_items - sum(
            s["inputs"][1] - s["inputs"][0] for s in done.values())
        bar = tqdm(total=remaining, desc=f"pretokenize {cfg.source.kind}", unit="sample",
                   mininterval=1.0, disable=not cfg.progress, dynamic_ncols=True)
        started = time.perf_counter()
        try:
            results = prepared_stream(items, pool, int(cfg.chunk_size), max(2, 4 * num_workers))
            written = self._write_shards(results, done, bar)
        finally:
            bar.close()
            if pool is not None:
                pool.close()
        rate = written / max(time.perf_counter() - started, 1e-9)
        return self._finish(done, written, rate)

    def _write_shards(self, results: Iterable[Prepared | Skipped], done: dict[int, dict],
                      bar) -> int:
        """Encode and write results (in input order) shard by shard; returns samples written."""
        batch_size, key_width = int(self.cfg.batch_size), _key_width(self.num_items)
        skip_log = _SkipLog(int(self.cfg.log_skipped))
        shard: ShardWriter | None = None
        pending: list[Prepared] = []
        written = 0

        def finish_shard() -> None:
            _write_batch(self.vqvae, pending, shard, self.codes_dtype, key_width)
            done[shard.index] = shard.finish()

        try:
            for result in results:
                index = result.position // self.shard_size
                if shard is not None and index != shard.index:
                    finish_shard()
                    shard = None
                if shard is None:
                    shard = ShardWriter(self.out, self.prefix, index, self.shard_size,
                                        self.signature)
                shard.last_position, shard.end_cursor = result.position, result.cursor
                if isinstance(result, Skipped):
                    shard.skipped[result.reason] += 1
                    if result.lost:
                        add_lost(shard.lost, result.reason, result.lost)
                    skip_log(result)
                else:
                    pending.append(result)
                    written += 1
                    if len(pending) >= batch_size:
                        _write_batch(self.vqvae, pending, shard, self.codes_dtype, key_width)
                if result.position == (index + 1) * self.shard_size - 1:  # its last input
                    finish_shard()
                    shard = None
                bar.update(1)
                if bar.n % 256 == 0:
                    bar.set_postfix(skipped=sum(skip_log.seen.values()), refresh=False)
            if shard is not None:  # the input ended inside this shard
                finish_shard()
                shard = None
        finally:
            if shard is not None:  # an error stopped the run: leave no partial shard behind
                shard.writer.close()
                shard.tmp.unlink(missing_ok=True)
        return written

    def _finish(self, done: dict[int, dict], written: int, rate: float) -> dict:
        """Write the final manifest from the shards' stats; NoUsableSamplesError if empty."""
        shards = [done[i] for i in sorted(done)]
        skipped: Counter = Counter()
        lost: dict[str, Counter] = {}
        for stats in shards:
            skipped.update(stats["skipped"])
            for reason, counts in stats.get("lost", {}).items():  # none in older stats
                add_lost(lost, reason, counts)
        manifest = dict(
            self.manifest, complete=True,
            num_samples=sum(s["samples"] for s in shards),
            num_inputs=max((s["inputs"][1] for s in shards), default=0),
            skipped=dict(sorted(skipped.items())),
            skip_reasons={reason: SKIP_REASONS[reason] for reason in sorted(skipped)},
            lost=sorted_lost(lost),
            shards=[{"name": s["shard"], "samples": s["samples"], "skipped": s["skipped"],
                     "lost": s.get("lost", {}), "inputs": s["inputs"]} for s in shards],
        )
        write_json_atomic(self.manifest_path, manifest)
        log.info("wrote %d samples this run (%.1f samples/s); %s now holds %d samples in %d "
                 "shards", written, rate, self.out, manifest["num_samples"], len(shards))
        if skipped:
            log.warning("skipped %d inputs: %s", sum(skipped.values()),
                        ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items())))
        for reason, counts in manifest["lost"].items():
            log.warning("%s lost: %s", reason, ", ".join(f"{what}={n:,}" for what, n in
                                                         counts.items()))
        if manifest["num_samples"] == 0:
            raise NoUsableSamplesError(
                f"no usable sample in {self.source.describe()}: all {manifest['num_inputs']} "
                f"inputs were skipped ({dict(skipped) or 'no inputs were found'}); see "
                f"{self.manifest_path} and the log for the reasons"
            )
        return manifest


def pretokenize(cfg) -> dict:
    """Run the pretokenizer for a config shaped like conf/pretokenize.yaml; returns the manifest.

    Raises NoUsableSamplesError when the input yields no usable sample (the manifest with the
    skip counts is written first), ValueError for a bad config or an output directory that
    holds shards of a different config.
    """
    return Pretokenizer(cfg).run()


def main() -> None:
    """Hydra entry point: python -m cogview.data.pretokenize key=value ..."""
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="pretokenize", version_base=None)
    def _run(cfg) -> None:
        pretokenize(cfg)

    _run()


if __name__ == "__main__":
    main()
