"""Benchmark: loader throughput from pretokenized shards vs the tiny model's training rate.

    python benchmarks/data_loader.py [--samples 4096] [--size 64] [--batch-size 64]
        [--seconds 5] [--threads 2] [--shards DIR] [--out bench_results/data_loader.json]

1. Shards: shapes-zh pretokenized at --size px into 8 shards (a small random-weight VQ-VAE:
   code values do not change the loader's work), or an existing pretokenize out= --shards DIR.
2. Loader: TokenDataModule (t2i layout, resampled, shuffle buffer 1000) read through a
   DataLoader with 0 (in-process), 1 and 2 workers; samples/s over --seconds after warm-up,
   and per worker.
3. Consumption: CogViewTransformer(TransformerConfig(num_layers=4, hidden_size=128,
   num_heads=4)) trained on batches from the loader: forward + masked next-token loss +
   backward + AdamW step under bf16 autocast on CPU (--threads intra-op threads), samples/s.
Targets: loader >= 10x consumption and >= 5,000 samples/s per worker. Writes JSON, prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_info, write_json  # noqa: E402
from cogview.precision import resolve_precision  # noqa: E402
from cogview.data.datamodule import TokenDataModule  # noqa: E402
from cogview.data.pretokenize import pretokenize  # noqa: E402
from cogview.modules.transformer import CogViewTransformer, TransformerConfig  # noqa: E402
from cogview.modules.vqvae import VQVAE, VQVAEConfig  # noqa: E402

TARGET_RATIO = 10.0  # loader samples/s over training samples/s
TARGET_PER_WORKER = 5000.0  # samples/s per DataLoader worker
SHUFFLE_BUFFER = 1000


def make_shards(directory: Path, samples: int, size: int) -> Path:
    """Pretokenize shapes-zh into 8 shards with a small random VQ-VAE; returns the out dir."""
    torch.manual_seed(0)
    config = VQVAEConfig.preset("tiny", channels=(16, 32, 32), res_channels=16, code_dim=16,
                                num_res_blocks=1)
    VQVAE(config).save_pretrained(directory / "vqvae")
    pretokenize({
        "out": str(directory / "tokens"), "vqvae_dir": str(directory / "vqvae"),
        "text_tokenizer": {"kind": "char", "model_file": None, "dir": None},
        "source": {"kind": "shapes", "shapes": {"split": "train", "length": samples, "seed": 0}},
        "size": size, "sr": False, "shard_size": -(-samples // 8), "shard_prefix": "tokens",
        "batch_size": 64, "num_workers": 1, "chunk_size": 16, "device": "cpu",
        "progress": False, "log_skipped": 10,
    })
    return directory / "tokens"


def datamodule(shards: Path, batch_size: int, num_workers: int) -> TokenDataModule:
    dm = TokenDataModule(str(shards), num_val_shards=0, layout="t2i", batch_size=batch_size,
                         num_workers=num_workers, resampled=True, shuffle_buffer=SHUFFLE_BUFFER)
    dm.setup("fit")
    return dm


def loader_rate(shards: Path, batch_size: int, num_workers: int, seconds: float) -> float:
    """Samples/s a DataLoader over the shards delivers to the main process."""
    batches = iter(datamodule(shards, batch_size, num_workers).train_dataloader())
    for _ in range(5):  # warm-up: worker start, shuffle buffer fill
        next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)["key"])
    rate = count / (time.perf_counter() - start)
    del batches
    return rate


def training_rate(shards: Path, batch_size: int, seconds: float) -> dict:
    """Samples/s of forward + loss + backward + AdamW on the tiny model, autocast as
    ``precision: auto`` picks on this CPU (bf16 where native, else fp32)."""
    dm = datamodule(shards, batch_size, 0)
    batches = iter(dm.train_dataloader())
    cached = [next(batches) for _ in range(8)]  # the loader is timed separately
    max_len = dm.max_sequence_length()
    model = CogViewTransformer(TransformerConfig(num_layers=4, hidden_size=128, num_heads=4,
                                                 vocab_size=dm.vocab.size, max_positions=max_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bf16 = resolve_precision("auto", "cpu") == "bf16-mixed"

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
        targets = batch["input_ids"][:, 1:]  # (B, T-1)
        mask = batch["loss_mask"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), targets[mask])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in cached[:2]:
        step(batch)
    steps, count, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        batch = cached[steps % len(cached)]
        step(batch)
        steps += 1
        count += batch["input_ids"].shape[0]
    elapsed = time.perf_counter() - start
    lengths = [b["input_ids"].shape[1] for b in cached]
    return {"samples_per_s": count / elapsed, "steps": steps, "ms_per_step": 1e3 * elapsed / steps,
            "padded_length_mean": sum(lengths) / len(lengths), "max_positions": max_len,
            "parameters": sum(p.numel() for p in model.parameters()),
            "precision": "bf16-mixed" if bf16 else "32-true"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for training")
    parser.add_argument("--shards", type=Path, default=None, help="existing pretokenize out dir")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench_results/data_loader.json)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)  # the loader measurements: one core per worker
        shards = args.shards or make_shards(Path(tmp), args.samples, args.size)
        loader = []
        for workers in (0, 1, 2):
            rate = loader_rate(shards, args.batch_size, workers, args.seconds)
            loader.append({"num_workers": workers, "samples_per_s": rate,
                           "per_worker_samples_per_s": rate / max(1, workers)})
            print(f"loader  workers={workers}: {rate:10.0f} samples/s", flush=True)
        torch.set_num_threads(args.threads)
        training = training_rate(shards, args.batch_size, args.seconds)
        print(f"training (tiny model, {training['precision']}, {args.threads} threads): "
              f"{training['samples_per_s']:.0f} samples/s", flush=True)

    by_workers = {row["num_workers"]: row for row in loader}
    consumption = training["samples_per_s"]
    result = {
        "benchmark": "data_loader",
        "machine": machine_info(),
        "config": {"samples": args.samples, "size": args.size, "batch_size": args.batch_size,
                   "seconds": args.seconds, "training_threads": args.threads,
                   "layout": "t2i", "shuffle_buffer": SHUFFLE_BUFFER,
                   "shards": str(args.shards) if args.shards else "temporary (shapes-zh)"},
        "loader": loader,
        "training": training,
        "ratio_loader_over_training": {
            f"{w}_workers": by_workers[w]["samples_per_s"] / consumption for w in (1, 2)},
        "targets": {
            "ratio": TARGET_RATIO, "per_worker_samples_per_s": TARGET_PER_WORKER,
            "ratio_met": by_workers[1]["samples_per_s"] / consumption >= TARGET_RATIO,
            "per_worker_met": by_workers[1]["per_worker_samples_per_s"] >= TARGET_PER_WORKER,
        },
    }

    print(f"\n{'':24s}{'samples/s':>12s}{'per worker':>12s}{'x training':>12s}")
    for row in loader:
        print(f"{'loader, ' + str(row['num_workers']) + ' workers':24s}"
              f"{row['samples_per_s']:12.0f}{row['per_worker_samples_per_s']:12.0f}"
              f"{row['samples_per_s'] / consumption:12.1f}")
    print(f"{'training (tiny model)':24s}{consumption:12.0f}")
    print(f"targets: ratio >= {TARGET_RATIO:g}: {result['targets']['ratio_met']}, "
          f"per worker >= {TARGET_PER_WORKER:g}: {result['targets']['per_worker_met']}")
    write_json(result, args.out, "data_loader")


if __name__ == "__main__":
    main()
