"""Benchmark: encode and decode throughput (images/s) of a VQ-VAE preset on this machine.

    python benchmarks/vqvae_throughput.py [--preset tiny] [--size 64] [--batch 64]

Times ``encode`` (pixels -> codes) and ``decode`` (codes -> pixels) in fp32 and, on CPUs
with native bf16 (or with ``--bf16``), under bf16 autocast, in one run so the two are
comparable. Writes JSON with the machine info.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_info, median_time, write_json  # noqa: E402
from cogview.modules.vqvae import VQVAE, VQVAEConfig  # noqa: E402
from cogview.precision import auto_precision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--ckpt", help="an exported VQ-VAE instead of a random preset")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16", action="store_true",
                        help="measure bf16 autocast even on a CPU without native bf16")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = VQVAE.from_pretrained(args.ckpt) if args.ckpt else VQVAE(VQVAEConfig.preset(args.preset))
    model.eval()
    images = torch.rand(args.batch, 3, args.size, args.size)
    codes = model.encode(images)
    result = {"machine": machine_info(), "preset": args.preset, "size": args.size,
              "batch": args.batch, "num_codes": model.num_codes}
    # bf16 beside fp32 only where precision auto would use it: emulated bf16 takes minutes here
    variants = [("fp32", None)]
    if args.bf16 or auto_precision("cpu")[0] == "bf16-mixed":
        variants.append(("bf16", torch.bfloat16))
    for label, dtype in variants:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            encode_s = median_time(lambda: model.encode(images), args.repeats)
            decode_s = median_time(lambda: model.decode(codes), args.repeats)
        result[label] = {"encode_images_per_s": args.batch / encode_s,
                         "decode_images_per_s": args.batch / decode_s}
        print(f"{args.preset} {args.size}px {label}: encode {args.batch / encode_s:8.1f} img/s, "
              f"decode {args.batch / decode_s:8.1f} img/s")
    write_json(result, args.out, "vqvae_throughput")


if __name__ == "__main__":
    main()
