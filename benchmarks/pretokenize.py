"""Benchmark: pretokenizer throughput (samples/s) on shapes-zh at 64 px.

    python benchmarks/pretokenize.py [--samples 1024] [--size 64] [--workers 0 1]
        [--batch-size 64] [--threads 1] [--out bench_results/pretokenize.json]

Runs `cogview.data.pretokenize.pretokenize` end to end (render + resize + text tokenization
in `num_workers` processes, batched VQ-VAE encoding and shard writing in the main process) with
the "tiny" VQ-VAE preset (the demo's image tokenizer; random weights, which do not change its
speed), once per --workers value. Beside it, the two stages alone: shapes-zh rendering
(samples/s, one process) and batched VQ encoding (images/s), to show which one bounds the run.
Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_info, write_json  # noqa: E402
from cogview.data.pretokenize import pretokenize  # noqa: E402
from cogview.data.sources import ShapesSource  # noqa: E402
from cogview.modules.vqvae import VQVAE, VQVAEConfig  # noqa: E402


def config(out: Path, vqvae: Path, samples: int, size: int, workers: int, batch: int) -> dict:
    return {
        "out": str(out), "vqvae_dir": str(vqvae),
        "text_tokenizer": {"kind": "char", "model_file": None, "dir": None},
        "source": {"kind": "shapes", "shapes": {"split": "train", "length": samples, "seed": 0}},
        "size": size, "sr": False, "shard_size": 256, "shard_prefix": "tokens",
        "batch_size": batch, "num_workers": workers, "chunk_size": 16, "device": "cpu",
        "progress": False, "log_skipped": 10,
    }


def render_rate(samples: int, size: int) -> float:
    """shapes-zh render (the worker's job) alone, in one process."""
    source = ShapesSource(length=samples, size=size)
    start = time.perf_counter()
    for raw in source.items():
        np.asarray(source.load(raw).image)
    return samples / (time.perf_counter() - start)


def encode_rate(model: VQVAE, samples: int, size: int, batch: int) -> float:
    """Batched VQ-VAE encoding (the main process's job) alone."""
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    model.encode(images)
    count, start = 0, time.perf_counter()
    while count < samples:
        model.encode(images)
        count += batch
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the encoder")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench_results/pretokenize.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = VQVAE(VQVAEConfig.preset("tiny")).eval()
        model.save_pretrained(Path(tmp) / "vqvae")
        stages = {"render_samples_per_s": render_rate(min(args.samples, 256), args.size),
                  "vq_encode_images_per_s": encode_rate(model, min(args.samples, 512),
                                                        args.size, args.batch_size)}
        print(f"render only: {stages['render_samples_per_s']:.0f} samples/s, VQ encode only: "
              f"{stages['vq_encode_images_per_s']:.0f} images/s", flush=True)
        for workers in args.workers:
            out = Path(tmp) / f"tokens-{workers}"
            start = time.perf_counter()
            manifest = pretokenize(config(out, Path(tmp) / "vqvae", args.samples, args.size,
                                          workers, args.batch_size))
            elapsed = time.perf_counter() - start
            assert manifest["num_samples"] == args.samples
            runs.append({"num_workers": workers, "seconds": elapsed,
                         "samples_per_s": args.samples / elapsed,
                         "shards": len(manifest["shards"])})
            print(f"pretokenize workers={workers}: {args.samples / elapsed:.0f} samples/s",
                  flush=True)

    result = {
        "benchmark": "pretokenize",
        "machine": machine_info(),
        "config": {"samples": args.samples, "size": args.size, "batch_size": args.batch_size,
                   "encoder_threads": args.threads, "vqvae": "tiny preset (random weights)",
                   "source": "shapes-zh train"},
        "stages": stages,
        "runs": runs,
    }
    print(f"\n{'':28s}{'samples/s':>12s}{'seconds':>10s}")
    for row in runs:
        print(f"{'pretokenize, ' + str(row['num_workers']) + ' workers':28s}"
              f"{row['samples_per_s']:12.0f}{row['seconds']:10.1f}")
    print(f"{'render only (1 process)':28s}{stages['render_samples_per_s']:12.0f}")
    print(f"{'VQ encode only':28s}{stages['vq_encode_images_per_s']:12.0f}")
    write_json(result, args.out, "pretokenize")


if __name__ == "__main__":
    main()
