"""Benchmark: sr PSNR on shapes-zh with and without the consistency refinement, per export.

    python benchmarks/sr_refinement.py --export 150=artifacts/demo/sr 13500=<sr export> ...
        [--images 16] [--candidates 8] [--sweeps 3]

For each sr export (labelled with its training steps), super-resolves ``--images`` rendered
scenes per split (the sr benchmark's scenes: seed 2, 64 px inputs resized from the 128 px
render) with greedy codes, then refines them against the input pixels
(`cogview.generation.superres.refine_sr_codes`) among the model's ``--candidates`` most
likely codes, and reports PSNR/SSIM after each sweep. Beside it:

- bicubic upsampling of the decoded low-res codes (the benchmark's baseline) and of the input
  pixels themselves;
- the VQ-VAE ceiling of the sampled codes (the render through the encoder);
- an ablation without the transformer: the same refinement among the codebook entries
  nearest to the encoder's latents of the bicubic-upsampled input ("codebook candidates"),
  which says how much of the gain is the search and how much the model's proposals;
- both candidate sets together, from the sampled codes (``refine_codebook=--candidates``).

Times are per image, sampling (greedy codes and the candidates' teacher-forced pass) vs
refinement (all sweeps), on this machine only. Writes
bench_results/sr_refinement.json and a plot of PSNR against steps
(bench_results/sr_refinement.png; the README shows a copy, docs/sr_refinement.png).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import (RESULTS_DIR, machine_info, parse_exports,  # noqa: E402
                               save_figure, split_axes, write_json)
from cogview.data.shapes import eval_prompts, render_scene  # noqa: E402
from cogview.eval import metrics  # noqa: E402
from cogview.eval.shapes_bench import SPLIT_NAMES, SPLITS  # noqa: E402
from cogview.generation.superres import (SRSettings, codebook_candidates,  # noqa: E402
                                         refine_sr_codes, sr_proposals)
from cogview.modules.vqvae import pil_to_tensor  # noqa: E402
from cogview.pipeline import Pipeline  # noqa: E402


def scores(pipe: Pipeline, codes: torch.Tensor, targets, decoded) -> dict:
    result = metrics.sr_metrics(pipe.decode_codes(codes), targets, decoded)
    return {"psnr": round(result["psnr"], 3), "ssim": round(result["ssim"], 4)}


def refine_curve(pipe: Pipeline, start: torch.Tensor, candidates: torch.Tensor,
                 pixels: torch.Tensor, sweeps: int, targets, decoded) -> tuple[list, float]:
    """Scores after 0..sweeps sweeps (each sweep continues the previous) and the seconds."""
    codes, curve, seconds = start, [scores(pipe, start, targets, decoded)], 0.0
    decode = pipe.image_tokenizer.decode
    for _ in range(sweeps):
        begin = time.perf_counter()
        codes = refine_sr_codes(decode, codes, candidates, pixels, sweeps=1)
        seconds += time.perf_counter() - begin
        curve.append(scores(pipe, codes, targets, decoded))
    return curve, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", nargs="+", required=True, metavar="STEPS=EXPORT")
    parser.add_argument("--images", type=int, default=16, help="rendered scenes per split")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--sweeps", type=int, default=3)
    parser.add_argument("--out", help="JSON path (default bench_results/sr_refinement.json)")
    parser.add_argument("--picture", default=str(RESULTS_DIR / "sr_refinement.png"))
    args = parser.parse_args()
    exports = parse_exports(parser, args.export, "13500=outputs/sr/export")

    result = {"machine": machine_info(), "images_per_split": args.images,
              "candidates": args.candidates, "sweeps": args.sweeps, "exports": []}
    for steps, path in exports:
        pipe = Pipeline.from_pretrained(path)
        side = 8 * int(round(pipe.image_tokens ** 0.5))
        entry = {"steps": steps, "export": path, "splits": {}}
        for split in SPLITS:
            prompts = eval_prompts(split, args.images, seed=2)
            targets = [render_scene(p["scene"], side) for p in prompts]
            inputs = [t.resize((side // 2,) * 2, Image.Resampling.LANCZOS) for t in targets]
            pixels = torch.stack([pil_to_tensor(image) for image in inputs])
            texts = [pipe.encode_prompt(p["caption"]) for p in prompts]
            lowres = pipe.encode_images(inputs)
            decoded = pipe.decode_codes(lowres)
            with torch.inference_mode(), torch.autocast(pipe.device.type, torch.bfloat16,
                                                        enabled=pipe.precision == "bf16-mixed"):
                begin = time.perf_counter()
                # the algorithm Pipeline.super_resolve runs, stopped before its refinement
                sampled, proposals = sr_proposals(
                    pipe.model, pipe.vocab, pipe.image_tokenizer, texts, lowres, pixels,
                    pipe.sr_window, None, SRSettings(greedy=True, refine_sweeps=1,
                                                     refine_candidates=args.candidates),
                    max_text_len=pipe.max_text_len, text_slots=pipe.text_slots)
                sample_seconds = time.perf_counter() - begin
                model_curve, model_seconds = refine_curve(pipe, sampled, proposals, pixels,
                                                          args.sweeps, targets, decoded)
                nearest = codebook_candidates(pipe.image_tokenizer, pixels, args.candidates)
                book_curve, _ = refine_curve(pipe, nearest[..., 0], nearest, pixels,
                                             args.sweeps, targets, decoded)
                both_curve, _ = refine_curve(pipe, sampled, torch.cat([proposals, nearest], -1),
                                             pixels, args.sweeps, targets, decoded)
            # the baselines: bicubic upsampling of the decoded codes, and of the input pixels
            bicubic = metrics.sr_metrics(targets, targets, decoded)
            input_bicubic = metrics.sr_metrics(targets, targets, inputs)
            ceiling = scores(pipe, pipe.encode_images(targets), targets, decoded)
            row = {
                "bicubic_psnr": round(bicubic["bicubic_psnr"], 3),
                "bicubic_ssim": round(bicubic["bicubic_ssim"], 4),
                "bicubic_input_psnr": round(input_bicubic["bicubic_psnr"], 3),
                "vq_ceiling_psnr": ceiling["psnr"],
                "model": model_curve, "codebook": book_curve, "model_and_codebook": both_curve,
                "seconds_per_image": {"sampling": round(sample_seconds / len(inputs), 3),
                                      "refinement": round(model_seconds / len(inputs), 3)},
            }
            entry["splits"][split] = row
            print(f"{steps} steps, {split}: sampled {model_curve[0]['psnr']:.2f} dB, refined "
                  + " / ".join(f"{c['psnr']:.2f}" for c in model_curve[1:])
                  + f" dB; codebook candidates {book_curve[-1]['psnr']:.2f} dB, model + codebook "
                  f"{both_curve[-1]['psnr']:.2f} dB; bicubic "
                  f"{row['bicubic_psnr']:.2f} (pixels {row['bicubic_input_psnr']:.2f}) dB",
                  flush=True)
        result["exports"].append(entry)
    path = write_json(result, args.out, "sr_refinement")
    plot(result, Path(args.picture))
    print(f"wrote {path} and {args.picture}")


def plot(result: dict, path: Path) -> None:
    fig, axes = split_axes(len(SPLITS), height=3.4)
    steps = [e["steps"] for e in result["exports"]]
    sweeps = result["sweeps"]
    for ax, split in zip(axes, SPLITS):
        rows = [e["splits"][split] for e in result["exports"]]
        ax.plot(steps, [r["model"][0]["psnr"] for r in rows], marker="o", label="sampled codes")
        ax.plot(steps, [r["model"][min(2, sweeps)]["psnr"] for r in rows], marker="o",
                label=f"refined ({min(2, sweeps)} sweeps)")
        ax.plot(steps, [r["model_and_codebook"][min(2, sweeps)]["psnr"] for r in rows],
                marker="o", label="refined, model + codebook candidates")
        ax.plot(steps, [r["codebook"][min(2, sweeps)]["psnr"] for r in rows], marker="x",
                linestyle=":", label="codebook candidates, no model")
        bicubic = rows[-1]["bicubic_psnr"]
        ax.axhline(bicubic, color="grey", linestyle=":", linewidth=1, label="bicubic")
        ax.axhline(bicubic + 1, color="grey", linestyle="--", linewidth=1, label="bicubic + 1 dB")
        ax.axhline(rows[-1]["bicubic_input_psnr"], color="black", linestyle="-.", linewidth=1,
                   label="bicubic of the input pixels")
        ax.set_title(SPLIT_NAMES[split])
        ax.set_xlabel("sr training steps")
        ax.set_xscale("log")
    axes[0].set_ylabel(f"PSNR, dB ({result['images_per_split']} images)")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
