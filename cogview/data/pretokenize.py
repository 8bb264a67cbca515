"""Pretokenize image-caption pairs once into WebDataset shards of token arrays.

    python -m cogview.data.pretokenize vqvae_dir=VQVAE_DIR out=OUT_DIR \\
        [source.kind=shapes|folder|shards ...] [size=64] [sr=true] [shard_size=1000]

(config: cogview/conf/pretokenize.yaml). Each output sample holds

    <key>.txt               the caption as given
    <key>.text_ids.npy      text tokenizer ids, int16 (int32 for vocabularies over 32768)
    <key>.image_codes.npy   VQ-VAE codes [size/8, size/8], int16 when the codebook has <= 32768
    <key>.lowres_codes.npy  with sr=true: codes of the image resized to size/2, [size/16, size/16]
    <key>.json              {"key": source key, "size", "original_size", "source", "scene"?}

where <key> is the input position, zero-padded (for a shards source: the input tar's index and
the position within it). `OUT/manifest.json` records the samples of each shard, the skipped
inputs by reason, what broken input tars lost ("lost": bytes, members and samples by reason, see
cogview.data.sources.TarProblem), the input limits (`max_pixels`, `max_member_bytes`) and the
fingerprints of both tokenizers (the DataModule refuses shards whose fingerprints differ from
the model's tokenizers).

Output layout and resume. Every output shard covers a fixed range of N = shard_size inputs,
however many of them are skipped as bad input:
- shapes and folder sources (inputs addressable by index): shard i, `<prefix>-<i>.tar`, holds
  input positions [i*N, (i+1)*N);
- shards sources: each input tar k has its own shards, `<prefix>-<k>-<j>.tar` holding its
  samples [j*N, (j+1)*N), so outputs are named from their input and any process can start at
  any input tar. When all of tar k's shards are written, `<prefix>-<k>.part.json` marks it done.
A shard is written to `<name>.tar.tmp`, its stats to `<name>.stats.json`, and only then renamed
to `<name>.tar`; a final-named tar is therefore complete. With `shard_url` (any URL
webdataset can write, e.g. 'pipe:aws s3 cp - s3://bucket/tokens/{name}') the finished tar is
streamed there instead, and its stats are written once the command succeeded. A rerun (same
config) keeps every completed shard without re-reading its inputs (indexed inputs are skipped
by index, input tars marked done are not opened), so a killed run resumes without redoing or
duplicating work. A rerun with a different config into the same directory is an error (the
input limits are not part of it: a rerun with other limits applies them to the shards it
writes).

Many processes and nodes (torchrun, SLURM, or rank=/world_size=): rank r of W takes the units
u with u % W == r (output shards of an indexed source, input tars of a shards source), encodes
on its own device (`device=cuda` means cuda:LOCAL_RANK) and writes into the same `out`, which
must be one directory all nodes see. Ranks do not talk to each other: the rank that finds every
unit done when it ends writes the manifest, and `merge=true` writes it from what `out` holds
(an error listing what is missing). Shards written with another configuration or tokenizer are
refused at the merge, naming their fingerprints. A dead rank or a lost node is redone by
rerunning the same command.

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
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import hydra
import numpy as np
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from cogview.config import CONF_DIR
from cogview.data.fingerprint import image_tokenizer_fingerprint
from cogview.data.images import DEFAULT_MAX_PIXELS, resize_center_crop
from cogview.data.shards import MANIFEST_NAME
from cogview.data.sources import (
    SKIP_REASONS,
    LoadedSample,
    RawSample,
    SkipSample,
    build_source,
    not_utf8_message,
)
from cogview.data.tar_reader import DEFAULT_MAX_MEMBER_BYTES
from cogview.modules.vqvae import VQVAE
from cogview.tokenization import build_text_tokenizer, encode_caption, load_text_tokenizer
from cogview.validate import check_int

log = logging.getLogger("cogview.pretokenize")

FORMAT = "cogview-tokens"
FORMAT_VERSION = 2  # 2: one output set per input tar for shards sources
DEFAULT_WORKER_RETRIES = 2  # cogview/conf/pretokenize.yaml's worker_retries, for configs without it


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


ShardId = tuple  # (i,): positions [i*N, (i+1)*N) of the input; (k, j): of input tar k


def shard_name(prefix: str, shard: int | ShardId) -> str:
    """File name of an output shard: '<prefix>-000042.tar' for shard 42 of an indexed source,
    '<prefix>-000007-000002.tar' for shard 2 of input tar 7 of a shards source."""
    return _shard_stem(prefix, shard) + ".tar"


def _shard_stem(prefix: str, shard: int | ShardId) -> str:
    numbers = shard if isinstance(shard, tuple) else (shard,)
    return f"{prefix}-" + "-".join(f"{n:06d}" for n in numbers)


def _shard_id_of(name: str, prefix: str, suffix: str) -> ShardId | None:
    """The ShardId in a file name written by this module, or None for any other name."""
    if not (name.startswith(prefix + "-") and name.endswith(suffix)):
        return None
    numbers = name[len(prefix) + 1:len(name) - len(suffix)].split("-")
    if not all(n.isdigit() for n in numbers) or len(numbers) > 2:
        return None
    return tuple(int(n) for n in numbers)


def _stats_path(out: Path, prefix: str, shard: ShardId) -> Path:
    return out / (_shard_stem(prefix, shard) + ".stats.json")


def _part_path(out: Path, prefix: str, part: int) -> Path:
    return out / f"{prefix}-{part:06d}.part.json"


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file and rename it over `path` (never a half-written file;
    the temporary name is per process, as ranks may write the same file at once)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
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
    part: int | None = None  # the input tar of a shards source (RawSample.part)


@dataclass
class Skipped:
    """An input position that gave no sample, and why."""

    position: int
    key: str
    reason: str
    message: str
    part: int | None = None  # the input tar of a shards source (RawSample.part)
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
    def skipped(reason: str, message: str) -> Skipped:
        return Skipped(raw.position, raw.key, reason, message, raw.part)

    if raw.error is not None:
        return Skipped(raw.position, raw.key, *raw.error, raw.part, raw.lost)
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
                    meta, raw.part)


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
                       "worker_retries to try it more often", raw.part)

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
    """Writes one output shard to a temporary name; `finish` puts it in place when complete.

    The shard is written to `<name>.tmp` in `out`. Without `url_template` `finish` writes its
    stats and renames it to `<name>` (a final-named tar is complete); with one (e.g.
    'pipe:aws s3 cp - s3://bucket/tokens/{name}') it streams the finished file to that URL
    through webdataset.gopen, and writes the stats only once the command exited with status 0
    (a shard whose stats are missing is written again by a rerun, replacing any partial copy).
    """

    def __init__(self, out: Path, prefix: str, shard: ShardId, shard_size: int, signature: str,
                 fingerprints: dict, url_template: str | None = None) -> None:
        self.out, self.prefix, self.shard = out, prefix, shard
        self.name = shard_name(prefix, shard)
        self.path = out / self.name
        self.url = url_template.format(name=self.name) if url_template else None
        self.tmp = self.path.with_name(self.name + ".tmp")
        # an integer mtime keeps tarfile from adding a pax header to every member
        self.writer = wds.TarWriter(str(self.tmp), encoder=False, mtime=int(time.time()))
        self.first_position = shard[-1] * shard_size
        self.last_position = self.first_position - 1
        self.samples = 0
        self.skipped: Counter = Counter()
        self.lost: dict[str, Counter] = {}  # reason -> what broken input tars cost
        self.signature, self.fingerprints = signature, fingerprints

    def write(self, sample: dict[str, Any]) -> None:
        self.writer.write(sample)
        self.samples += 1

    def finish(self) -> dict:
        """Close, put the tar in place, write the stats; returns the stats."""
        self.writer.close()
        stats = {
            "shard": self.name, "index": list(self.shard), "samples": self.samples,
            "skipped": dict(sorted(self.skipped.items())),
            "lost": sorted_lost(self.lost),
            "inputs": [self.first_position, self.last_position + 1],
            "signature": self.signature, "fingerprints": self.fingerprints,
        }
        if self.url is not None:
            with open(self.tmp, "rb") as source, wds.gopen(self.url, "wb") as target:
                while piece := source.read(1 << 20):
                    target.write(piece)
            self.tmp.unlink()
            write_json_atomic(_stats_path(self.out, self.prefix, self.shard),
                              {**stats, "url": self.url})
            return {**stats, "url": self.url}
        write_json_atomic(_stats_path(self.out, self.prefix, self.shard), stats)
        os.replace(self.tmp, self.path)
        return stats

    def abandon(self) -> None:
        """An error stopped the run: leave no partial shard behind."""
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


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
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
    codes = vqvae.encode(batch.to(vqvae.pixel_mean.device))  # (B, S/8, S/8) int64
    return codes.cpu().numpy().astype(dtype)


def _key_width(num_items: int | None) -> int:
    return max(9, len(str(num_items - 1))) if num_items else 9


def _sample_key(p: Prepared, key_width: int) -> str:
    """An output sample's key: its input position, after its input tar's index for shards."""
    if p.part is None:
        return f"{p.position:0{key_width}d}"
    return f"{p.part:06d}-{p.position:09d}"


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
            "__key__": _sample_key(p, key_width),
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


def _read_stats(out: Path, prefix: str) -> dict[ShardId, dict]:
    """The stats files in `out`, by shard (unreadable ones, from a killed write, left out)."""
    found = {}
    for path in sorted(out.glob(f"{prefix}-*.stats.json")):
        shard = _shard_id_of(path.name, prefix, ".stats.json")
        if shard is None:
            continue
        try:
            found[shard] = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            continue
    return found


def _shard_in_place(out: Path, stats: dict) -> bool:
    """A shard whose stats say it is complete is there: its tar in `out`, or sent to its URL."""
    return bool(stats.get("url")) or (out / stats["shard"]).is_file()


def _completed_shards(out: Path, prefix: str, signature: str) -> dict[ShardId, dict]:
    """Stats of the shards already finished (by any rank or run) with this configuration."""
    return {shard: stats for shard, stats in _read_stats(out, prefix).items()
            if stats.get("signature") == signature and _shard_in_place(out, stats)}


def _completed_parts(out: Path, prefix: str, signature: str) -> dict[int, dict]:
    """Input tars of a shards source whose every output shard is finished (their marker)."""
    parts = {}
    for path in sorted(out.glob(f"{prefix}-*.part.json")):
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            continue
        if marker.get("signature") == signature:
            parts[int(marker["part"])] = marker
    return parts


def distributed_position(cfg) -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process: `rank`/`world_size` from the config when
    set, else torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else SLURM's SLURM_PROCID /
    SLURM_NTASKS / SLURM_LOCALID, else a single process (0, 1, 0)."""
    env = os.environ
    rank, world = cfg.get("rank"), cfg.get("world_size")
    if rank is None and world is None:
        if "WORLD_SIZE" in env:
            rank, world = env.get("RANK", "0"), env["WORLD_SIZE"]
        elif "SLURM_NTASKS" in env:
            rank, world = env.get("SLURM_PROCID", "0"), env["SLURM_NTASKS"]
        else:
            rank, world = 0, 1
    elif rank is None or world is None:
        raise ValueError(f"rank={rank} and world_size={world}: set both, or neither (then "
                         "torchrun's or SLURM's environment decides)")
    rank, world = int(rank), int(world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank} with world_size={world}: the rank must be in "
                         f"[0, {world})")
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return rank, world, local


def _check_config(cfg) -> None:
    size = check_int("size", cfg.size, 8, meaning="image side in pixels")
    if size % 8:
        raise ValueError(f"size={size} must be a multiple of 8 (the VQ-VAE downsamples 8x)")
    if cfg.sr and size % 16:
        raise ValueError(f"sr=true needs size={size} to be a multiple of 16, so that the "
                         f"low-res image ({size}/2 px) is a multiple of 8 too")
    check_int("shard_size", cfg.shard_size, meaning="samples per output shard")
    check_int("batch_size", cfg.batch_size, meaning="images per VQ-VAE encoding pass")
    check_int("num_workers", cfg.num_workers, 0, meaning="0: in the main process")
    check_int("worker_retries", cfg.get("worker_retries", DEFAULT_WORKER_RETRIES), 0,
              meaning="times a sample whose worker died is retried alone before it is skipped")
    max_pixels = cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    if max_pixels is not None:
        check_int("max_pixels", max_pixels, meaning="pixels, width x height, of the largest "
                  "image to decode; null: no limit")
    check_int("max_member_bytes", cfg.get("max_member_bytes", DEFAULT_MAX_MEMBER_BYTES),
              meaning="bytes of the largest input tar member to read")
    if not cfg.out:
        raise ValueError("out=DIR is required: where the shards and manifest.json go")
    if not cfg.vqvae_dir:
        raise ValueError("vqvae_dir=DIR is required: the image tokenizer, a directory written "
                         "by VQVAE.save_pretrained (e.g. a task=vqvae run's export_dir)")


class Pretokenizer:
    """One pretokenize run: config checks, tokenizers and source in __init__, the work in run().

    With several ranks (torchrun, SLURM, or `rank`/`world_size`), each takes every
    world_size-th unit of work, starting at its rank: an output shard of an indexed source
    (shapes, folder), an input tar of a shards source. Ranks share `out` (one directory for
    all nodes) and need not talk to each other: the rank that finds every unit done when it
    ends writes the manifest (`merge=true` writes it from what is there).
    """

    def __init__(self, cfg) -> None:
        if not isinstance(cfg, dict):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = OmegaConf.create(cfg)
        _check_config(cfg)
        self.cfg = cfg
        self.size, self.shard_size, self.sr = int(cfg.size), int(cfg.shard_size), bool(cfg.sr)
        self.out, self.prefix = Path(cfg.out), str(cfg.shard_prefix)
        self.shard_url = cfg.get("shard_url") or None
        self.rank, self.world_size, local_rank = distributed_position(cfg)
        kind = cfg.source.kind
        options = cfg.source.get(kind) if kind in cfg.source else None
        max_pixels = cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
        self.limits = {
            "max_pixels": int(max_pixels) if max_pixels is not None else None,
            "max_member_bytes": int(cfg.get("max_member_bytes", DEFAULT_MAX_MEMBER_BYTES))}
        self.source = build_source(kind, self.size,
                                   OmegaConf.to_container(options) if options is not None else {},
                                   **self.limits)
        self.per_input = hasattr(self.source, "part_items")  # one output set per input tar
        self.num_items = self.source.num_items()
        if self.num_items == 0:
            raise NoUsableSamplesError(f"source {self.source.describe()} holds no input samples")
        self.tokenizer_cfg = OmegaConf.to_container(cfg.text_tokenizer)
        tokenizer = build_text_tokenizer_from_config(self.tokenizer_cfg)
        self.device = str(cfg.device)
        if self.device == "cuda":  # each rank encodes on its own GPU
            self.device = f"cuda:{local_rank}"
        self.vqvae = VQVAE.from_pretrained(cfg.vqvae_dir, map_location=self.device)
        self.fingerprints = {"image_tokenizer": image_tokenizer_fingerprint(self.vqvae),
                             "text_tokenizer": tokenizer.fingerprint()}
        self.codes_dtype = index_dtype(self.vqvae.num_codes)
        self.signature = _signature({
            "format": FORMAT, "version": FORMAT_VERSION, "source": self.source.describe(),
            "size": self.size, "sr": self.sr, "shard_size": self.shard_size,
            "prefix": self.prefix, "fingerprints": self.fingerprints})
        grid = self.size // self.vqvae.downsample
        self.manifest: dict[str, Any] = {
            "format": FORMAT, "version": FORMAT_VERSION, "complete": False,
            "signature": self.signature, "fingerprints": self.fingerprints,
            "image_tokenizer": {"path": str(cfg.vqvae_dir), "num_codes": self.vqvae.num_codes,
                                "downsample": self.vqvae.downsample,
                                "codes_dtype": self.codes_dtype.name},
            "text_tokenizer": {**tokenizer.config(), "vocab_size": tokenizer.vocab_size,
                               "ids_dtype": index_dtype(tokenizer.vocab_size).name},
            "size": self.size, "code_shape": [grid, grid], "sr": self.sr,
            "lowres_size": self.size // 2 if self.sr else None,
            "lowres_code_shape": [grid // 2, grid // 2] if self.sr else None,
            "shard_size": self.shard_size, "shard_prefix": self.prefix,
            "layout": "per_input_tar" if self.per_input else "positions",
            "source": self.source.describe(), "limits": self.limits,
        }
        self.manifest_path = self.out / MANIFEST_NAME

    # -- units of work and who does them -----------------------------------------------------
    def _num_units(self) -> int:
        """Input tars (shards source) or output shards (indexed sources) in all."""
        if self.per_input:
            return self.source.num_parts()
        return -(-self.num_items // self.shard_size)

    def _mine(self, unit: int) -> bool:
        return unit % self.world_size == self.rank

    def _shard_of(self, result: Prepared | Skipped) -> ShardId:
        if self.per_input:
            return result.part, result.position // self.shard_size
        return (result.position // self.shard_size,)

    # -- output directory and resume ---------------------------------------------------------
    def _previous_run(self) -> dict | None:
        """The manifest already in `out` (checked against this config), or None."""
        if not self.manifest_path.is_file():
            return None
        previous = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        if previous.get("signature") != self.signature:
            tokenizers = ""
            if previous.get("fingerprints") != self.fingerprints:
                tokenizers = (f"; the tokenizers differ: {previous.get('fingerprints')} there, "
                              f"{self.fingerprints} here")
            raise ValueError(
                f"{self.out} already holds shards written with a different configuration "
                f"(manifest signature {previous.get('signature')}, this run {self.signature}: "
                "source, size, sr, shard_size, shard_prefix or a tokenizer differ"
                f"{tokenizers}). Use a new out=DIR, or delete that directory to start over."
            )
        return previous

    def _remove_own_temporaries(self) -> None:
        """Partial shards a killed run of this rank left (other ranks' are theirs to handle)."""
        for stale in self.out.glob(f"{self.prefix}-*.tar.tmp"):
            shard = _shard_id_of(stale.name, self.prefix, ".tar.tmp")
            if shard is not None and self._mine(shard[0]):
                stale.unlink(missing_ok=True)

    def _indexed_items(self, done: dict[ShardId, dict]) -> Iterator[RawSample]:
        """Inputs of this rank's output shards still to write (finished ones are not read)."""
        for shard in range(self.rank, self._num_units(), self.world_size):
            if (shard,) not in done:
                yield from self.source.items(shard * self.shard_size,
                                             (shard + 1) * self.shard_size)

    # -- the work ----------------------------------------------------------------------------
    def run(self) -> dict:
        """Write this rank's missing shards, then, when every rank's are done, the manifest;
        returns the manifest (`complete` false while other ranks' shards are missing)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        previous = self._previous_run()
        if previous is not None and previous.get("complete") and all(
                _shard_in_place(self.out, {"shard": s["name"], "url": s.get("url")})
                for s in previous["shards"]):
            log.info("%s is already complete (%d samples in %d shards); nothing to do", self.out,
                     previous["num_samples"], len(previous["shards"]))
            return previous
        if cfg.get("merge"):
            return self._merge(required=True)
        if previous is None:
            write_json_atomic(self.manifest_path, self.manifest)
        self._remove_own_temporaries()
        done = _completed_shards(self.out, self.prefix, self.signature)
        parts_done = _completed_parts(self.out, self.prefix, self.signature) \
            if self.per_input else {}
        mine = [u for u in range(self.rank, self._num_units(), self.world_size)]
        kept = [s for s in done if self._mine(s[0])]
        if kept:
            log.info("resuming: %d completed shards kept", len(kept))
        if self.world_size > 1:
            log.info("rank %d of %d: %d of %d %s are this rank's", self.rank, self.world_size,
                     len(mine), self._num_units(), "input tars" if self.per_input else "shards")

        num_workers = int(cfg.num_workers)
        init_args = (self.source, self.tokenizer_cfg, self.size, self.sr)
        pool = None
        if num_workers > 0:
            pool = WorkerPool(num_workers, init_args,
                              int(cfg.get("worker_retries", DEFAULT_WORKER_RETRIES)))
        else:
            _init_worker(*init_args)
        remaining = None
        if not self.per_input:
            remaining = sum(min(self.num_items, (u + 1) * self.shard_size) - u * self.shard_size
                            for u in mine if (u,) not in done)
        desc = f"pretokenize {cfg.source.kind}"
        if self.world_size > 1:
            desc += f" (rank {self.rank}/{self.world_size})"
        bar = tqdm(total=remaining, desc=desc, unit="sample", mininterval=1.0,
                   disable=not cfg.progress, dynamic_ncols=True, position=self.rank)
        started, written = time.perf_counter(), 0
        in_flight = max(2, 4 * num_workers)
        try:
            if self.per_input:
                for part in mine:
                    if part in parts_done:
                        continue
                    items = self.source.part_items(
                        part, lambda position, part=part:
                        (part, position // self.shard_size) not in done)
                    results = prepared_stream(items, pool, int(cfg.chunk_size), in_flight)
                    written += self._write_shards(results, done, bar)
                    self._finish_part(part, done)
            else:
                results = prepared_stream(self._indexed_items(done), pool, int(cfg.chunk_size),
                                          in_flight)
                written = self._write_shards(results, done, bar)
        finally:
            bar.close()
            if pool is not None:
                pool.close()
        rate = written / max(time.perf_counter() - started, 1e-9)
        log.info("wrote %d samples (%.1f samples/s)%s", written, rate,
                 f" on rank {self.rank}" if self.world_size > 1 else "")
        return self._merge(required=self.world_size == 1)

    def _write_shards(self, results: Iterable[Prepared | Skipped], done: dict[ShardId, dict],
                      bar) -> int:
        """Encode and write results (in input order) shard by shard; returns samples written."""
        batch_size, key_width = int(self.cfg.batch_size), _key_width(self.num_items)
        skip_log = _SkipLog(int(self.cfg.log_skipped))
        shard: ShardWriter | None = None
        pending: list[Prepared] = []
        written = 0

        def finish_shard() -> None:
            _write_batch(self.vqvae, pending, shard, self.codes_dtype, key_width)
            done[shard.shard] = shard.finish()

        try:
            for result in results:
                shard_id = self._shard_of(result)
                if shard is not None and shard_id != shard.shard:
                    finish_shard()
                    shard = None
                if shard is None:
                    shard = ShardWriter(self.out, self.prefix, shard_id, self.shard_size,
                                        self.signature, self.fingerprints, self.shard_url)
                shard.last_position = result.position
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
                if result.position == (shard_id[-1] + 1) * self.shard_size - 1:  # its last input
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
                shard.abandon()
        return written

    def _finish_part(self, part: int, done: dict[ShardId, dict]) -> None:
        """Marks input tar `part` as done: a rerun does not open it again."""
        shards = [done[s] for s in sorted(done) if s[0] == part]
        write_json_atomic(_part_path(self.out, self.prefix, part), {
            "part": part, "url": self.source.urls[part], "signature": self.signature,
            "shards": [s["shard"] for s in shards],
            "inputs": sum(s["inputs"][1] - s["inputs"][0] for s in shards)})

    # -- the manifest ------------------------------------------------------------------------
    def _missing(self, done: dict[ShardId, dict]) -> list[str]:
        """What is not finished yet: input tars (shards source) or output shard names."""
        if self.per_input:
            parts = _completed_parts(self.out, self.prefix, self.signature)
            return [f"{url} (input tar {k}, rank {k % self.world_size})"
                    for k, url in enumerate(self.source.urls)
                    if k not in parts or any(_shard_id_of(name, self.prefix, ".tar") not in done
                                             for name in parts[k]["shards"])]
        return [shard_name(self.prefix, u) for u in range(self._num_units()) if (u,) not in done]

    def _check_foreign(self, found: dict[ShardId, dict]) -> None:
        """Refuses outputs of another configuration or tokenizer in the same directory."""
        foreign = {shard: s for shard, s in found.items()
                   if s.get("signature") != self.signature}
        if not foreign:
            return
        shard, stats = next(iter(sorted(foreign.items())))
        raise ValueError(
            f"{self.out} holds {len(foreign)} shard(s) written with another configuration or "
            f"tokenizer, e.g. {stats.get('shard')} (fingerprints "
            f"{stats.get('fingerprints', 'not recorded')}; this run's {self.fingerprints}): "
            "refusing to merge them into one manifest. Move them out (or delete them and their "
            ".stats.json files) and run again.")

    def _merge(self, required: bool) -> dict:
        """Writes the manifest from every finished shard in `out` once nothing is missing; with
        `required`, a missing part is an error, else (another rank is still at work) it returns
        the incomplete manifest."""
        found = _read_stats(self.out, self.prefix)
        self._check_foreign(found)
        done = {s: stats for s, stats in found.items() if _shard_in_place(self.out, stats)}
        missing = self._missing(done)
        if missing:
            message = (f"{len(missing)} of {self._num_units()} "
                       f"{'input tars' if self.per_input else 'shards'} are not done yet, e.g. "
                       f"{', '.join(missing[:3])}")
            if required:
                raise RuntimeError(f"cannot write {self.manifest_path}: {message}. Rerun the "
                                   "same command (on every rank) to finish them.")
            log.info("%s; the last rank to finish writes the manifest", message)
            return dict(self.manifest, complete=False)
        return self._finish(done)

    def _finish(self, done: dict[ShardId, dict]) -> dict:
        """Write the final manifest from the shards' stats; NoUsableSamplesError if empty."""
        shards = [done[s] for s in sorted(done)]
        skipped: Counter = Counter()
        lost: dict[str, Counter] = {}
        for stats in shards:
            skipped.update(stats["skipped"])
            for reason, counts in stats.get("lost", {}).items():
                add_lost(lost, reason, counts)
        manifest = dict(
            self.manifest, complete=True,
            num_samples=sum(s["samples"] for s in shards),
            num_inputs=sum(s["inputs"][1] - s["inputs"][0] for s in shards),
            skipped=dict(sorted(skipped.items())),
            skip_reasons={reason: SKIP_REASONS[reason] for reason in sorted(skipped)},
            lost=sorted_lost(lost),
            shards=[{"name": s["shard"], "samples": s["samples"], "skipped": s["skipped"],
                     "lost": s.get("lost", {}), "inputs": s["inputs"],
                     **({"url": s["url"]} if s.get("url") else {})} for s in shards],
        )
        write_json_atomic(self.manifest_path, manifest)
        log.info("%s now holds %d samples in %d shards", self.out, manifest["num_samples"],
                 len(shards))
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
    """Run the pretokenizer for a config shaped like cogview/conf/pretokenize.yaml; returns the manifest.

    Raises NoUsableSamplesError when the input yields no usable sample (the manifest with the
    skip counts is written first), ValueError for a bad config or an output directory that
    holds shards of a different config.
    """
    return Pretokenizer(cfg).run()


def main() -> None:
    """Hydra entry point: python -m cogview.data.pretokenize key=value ..."""
    @hydra.main(config_path=str(CONF_DIR), config_name="pretokenize", version_base=None)
    def _run(cfg) -> None:
        pretokenize(cfg)

    _run()


if __name__ == "__main__":
    main()
