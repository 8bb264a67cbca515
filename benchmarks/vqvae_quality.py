"""Benchmark: quality of the tiny VQ-VAE trained by ``train.py task=vqvae`` on shapes-zh.

    python benchmarks/vqvae_quality.py                      # train for 10 minutes, then evaluate
    python benchmarks/vqvae_quality.py --ckpt DIR           # evaluate an exported VQ-VAE

Training runs ``train.py task=vqvae trainer.max_time=<budget>`` (wall time measured here).
Evaluation on ``--n`` held-out shapes-zh renders at 64 px (a split never seen in training):
PSNR, codebook usage (fraction of codes used by the whole set), and the oracle read-back:
the fraction of reconstructions from which the shapes-zh pixel oracle recovers the exact
scene (colour, shape, position and size of every object, no extra object). Targets:
PSNR >= 30 dB, usage >= 50 %, read-back >= 95 %. Writes JSON and a picture of originals
above reconstructions (worst read-backs first, then random).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS_DIR, machine_info, write_json  # noqa: E402
from cogview.data.shapes import ShapesZh  # noqa: E402
from cogview.eval.oracle import read_scene, score_scene  # noqa: E402
from cogview.modules.vqvae import VQVAE  # noqa: E402
from cogview.visualize import comparison_grid, psnr  # noqa: E402

TARGETS = {"psnr_db": 30.0, "codebook_usage": 0.5, "oracle_readback": 0.95}


def train(minutes: float, steps: int, run_dir: Path, extra: list[str]) -> float:
    """Runs train.py task=vqvae for ``steps`` steps or ``minutes`` of wall time, whichever
    ends first (the LR schedule decays over ``steps``); returns the seconds it took."""
    budget = f"00:00:{int(minutes):02d}:{int(round((minutes % 1) * 60)):02d}"
    command = [sys.executable, "train.py", "task=vqvae", f"hydra.run.dir={run_dir}",
               f"trainer.max_time={budget}", f"trainer.max_steps={steps}", *extra]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model: VQVAE, n: int, size: int, seed: int, batch_size: int = 64) -> dict:
    """PSNR, usage and oracle read-back of ``model`` on ``n`` held-out renders."""
    data = ShapesZh(split="heldout", size=size, length=n, seed=seed, as_tensor=True)
    psnrs, codes, matches, originals, recons = [], [], [], [], []
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([item["image"] for item in items])
        batch_codes = model.encode(images)
        batch_recons = model.decode(batch_codes)
        psnrs.append(psnr(images, batch_recons))
        codes.append(batch_codes)
        for item, recon in zip(items, batch_recons):
            matches.append(score_scene(read_scene(recon), item["scene"])["full_match"])
        originals.append(images)
        recons.append(batch_recons)
    codes = torch.cat(codes)
    return {
        "psnr_db": torch.cat(psnrs).mean().item(),
        "codebook_usage": model.codebook_usage(codes),
        "codebook_perplexity": model.codebook_perplexity(codes),
        "oracle_readback": sum(matches) / len(matches),
        "n_images": n,
        "_originals": torch.cat(originals),
        "_recons": torch.cat(recons),
        "_matches": matches,
    }


def picture(metrics: dict, count: int = 12):
    """Originals over reconstructions: failed read-backs first, then the first others."""
    order = sorted(range(len(metrics["_matches"])), key=lambda i: metrics["_matches"][i])
    failed = [i for i in order if not metrics["_matches"][i]][: count // 2]
    chosen = failed + [i for i in range(len(order)) if i not in failed][: count - len(failed)]
    index = torch.tensor(chosen)
    return comparison_grid([metrics["_originals"][index], metrics["_recons"][index]],
                           ["original", "recon"], scale=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="exported VQ-VAE directory (skip training)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-time budget")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (schedule length)")
    parser.add_argument("--run-dir", default=str(ROOT / "outputs" / "bench_vqvae"))
    parser.add_argument("--n", type=int, default=500, help="held-out images to evaluate")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", help="JSON path (default bench_results/vqvae_quality.json)")
    parser.add_argument("--picture", default=str(RESULTS_DIR / "vqvae_reconstructions.png"))
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_args()

    result = {"machine": machine_info(), "targets": TARGETS}
    ckpt = args.ckpt
    if ckpt is None:
        run_dir = Path(args.run_dir)
        result["train_wall_seconds"] = train(args.minutes, args.steps, run_dir, args.overrides)
        result["train_command"] = (f"python train.py task=vqvae trainer.max_steps={args.steps} "
                                   f"trainer.max_time=<{args.minutes} min> "
                                   + " ".join(args.overrides)).strip()
        ckpt = run_dir / "vqvae"
    model = VQVAE.from_pretrained(ckpt).eval()
    metrics = evaluate(model, args.n, args.size, args.seed)
    Path(args.picture).parent.mkdir(parents=True, exist_ok=True)
    picture(metrics).save(args.picture)
    result.update({k: v for k, v in metrics.items() if not k.startswith("_")})
    result["ckpt"] = str(ckpt)
    result["meets_targets"] = {k: result[k] >= v for k, v in TARGETS.items()}
    print(f"PSNR {result['psnr_db']:.2f} dB | codebook usage {result['codebook_usage']:.1%} | "
          f"oracle read-back {result['oracle_readback']:.1%} on {args.n} held-out renders")
    print(f"picture: {args.picture}")
    write_json(result, args.out, "vqvae_quality")


if __name__ == "__main__":
    main()
