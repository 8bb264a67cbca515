"""Benchmark: t2i full match and caption exact match on shapes-zh against the classifier-free
guidance scale, per export.

    python benchmarks/guidance.py --export 1300=artifacts/demo/t2i 3500=artifacts/demo-long/t2i
        [--scales 1,1.5,2,2.5,3] [--prompts 128] [--temperature 0.55] [--top-k 50]
    python benchmarks/guidance.py --caption-export 300=artifacts/demo/caption
        [--scales 1,1.25,1.5,2] [--prompts 128] [--beams 4]

For each t2i export (labelled with its training steps), draws one sample per canonical prompt
(``--prompts`` per split: seen single objects, held-out colour-shape pairs, two objects) at
each guidance scale (1 = off) and scores it with the shapes-zh oracle. The prompts are
validation prompts (seed 100), not the benchmark's (seed 0), so a scale chosen here is not
tuned on the benchmark. Guidance needs a model trained with caption dropout (t2i's
``task.caption_dropout``, 0.1 by default), which learns the unconditional distribution it
subtracts. Writes bench_results/guidance.json and a plot of full match against the scale
(bench_results/guidance.png; docs/guidance.png is a copy).

``--caption-export``: captions of rendered validation scenes (seed 100; the caption benchmark
renders seed 1) decoded with guidance against the caption without its image, the most likely
of ``--beams`` beams; exact match per split. Needs a captioner trained with
``task.image_dropout`` > 0. Writes bench_results/caption_guidance.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import (RESULTS_DIR, machine_info, parse_exports,  # noqa: E402
                               save_figure, split_axes, write_json)
from cogview.data.shapes import eval_prompts, render_scene  # noqa: E402
from cogview.eval.oracle import evaluate, evaluate_captions  # noqa: E402
from cogview.eval.shapes_bench import SPLIT_NAMES, SPLITS  # noqa: E402
from cogview.pipeline import Pipeline  # noqa: E402

VALIDATION_SEED = 100  # the benchmark draws its prompts with seed 0


def sweep(pipe: Pipeline, prompts: dict[str, list[dict]], scales: list[float], args) -> dict:
    """{split: {scale: {"full_match", "seconds"}}} for one export."""
    rows = {}
    for split, items in prompts.items():
        captions, scenes = [p["caption"] for p in items], [p["scene"] for p in items]
        rows[split] = {}
        for scale in scales:
            start = time.perf_counter()
            images = pipe(captions, num_images=1, seed=0, top_k=args.top_k,
                          temperature=args.temperature, cfg_scale=scale,
                          max_inference_batch_size=args.batch_size, progress=False).images
            seconds = time.perf_counter() - start
            score = evaluate(images, scenes)
            rows[split][str(scale)] = {"full_match": score["full_match"],
                                       "seconds": round(seconds, 2)}
            print(f"  {split}, guidance {scale}: full match {score['full_match']:.1%} "
                  f"({seconds:.1f} s)", flush=True)
    return rows


def caption_sweep(pipe: Pipeline, prompts: dict[str, list[dict]], scales: list[float],
                  args) -> dict:
    """{split: {scale: {"exact_match", "seconds"}}} for one caption export."""
    size = 8 * int(round(pipe.image_tokens ** 0.5))
    rows = {}
    for split, items in prompts.items():
        scenes = [p["scene"] for p in items]
        images = [render_scene(scene, size) for scene in scenes]
        rows[split] = {}
        for scale in scales:
            start = time.perf_counter()
            captions = pipe.caption(images, num_beams=args.beams, cfg_scale=scale,
                                    max_inference_batch_size=args.batch_size, progress=False)
            seconds = time.perf_counter() - start
            score = evaluate_captions(captions, scenes)["exact_match"]
            rows[split][str(scale)] = {"exact_match": score, "seconds": round(seconds, 2)}
            print(f"  {split}, caption guidance {scale}: exact match {score:.1%} "
                  f"({seconds:.1f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", nargs="+", default=[], metavar="STEPS=DIR",
                        help="t2i exports labelled with their training steps")
    parser.add_argument("--caption-export", nargs="+", default=[], metavar="STEPS=DIR",
                        help="caption exports (trained with task.image_dropout > 0)")
    parser.add_argument("--beams", type=int, default=4, help="caption beams (1 = greedy)")
    parser.add_argument("--scales", default="1,1.5,2,2.5,3")
    parser.add_argument("--prompts", type=int, default=128, help="validation prompts per split")
    parser.add_argument("--temperature", type=float, default=0.55)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", help="JSON path (default bench_results/guidance.json)")
    parser.add_argument("--picture", help="default bench_results/guidance.png "
                        "(caption_guidance.png with --caption-export)")
    args = parser.parse_args()
    if bool(args.export) == bool(args.caption_export):
        parser.error("give t2i exports (--export) or caption exports (--caption-export)")
    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        parser.error(f"--scales {args.scales!r}: expected numbers separated by commas, e.g. 1,2,3")
    captions = bool(args.caption_export)
    name = "caption_guidance" if captions else "guidance"
    exports = parse_exports(parser, args.caption_export or args.export,
                            "300=artifacts/demo/caption" if captions else "1300=artifacts/demo/t2i")
    prompts = {split: eval_prompts(split, args.prompts, seed=VALIDATION_SEED) for split in SPLITS}
    result = {"machine": machine_info(), "task": "caption" if captions else "t2i",
              "prompts_per_split": args.prompts, "prompt_seed": VALIDATION_SEED,
              "scales": scales, "exports": []}
    result.update({"beams": args.beams} if captions else
                  {"temperature": args.temperature, "top_k": args.top_k})
    for steps, path in exports:
        print(f"{path} ({steps} steps)", flush=True)
        run = caption_sweep if captions else sweep
        result["exports"].append({"steps": steps, "export": path,
                                  "splits": run(Pipeline.from_pretrained(path), prompts,
                                                scales, args)})
    write_json(result, args.out, name)
    picture = Path(args.picture or RESULTS_DIR / f"{name}.png")
    plot(result, picture)
    print(f"wrote {picture}")


def plot(result: dict, path: Path) -> None:
    fig, axes = split_axes(len(SPLITS))
    scales = result["scales"]
    captions = result.get("task") == "caption"
    metric = "exact_match" if captions else "full_match"
    for ax, split in zip(axes, SPLITS):
        for entry in result["exports"]:
            values = [100 * entry["splits"][split][str(s)][metric] for s in scales]
            ax.plot(scales, values, marker="o",
                    label=f"{entry['steps']} {'caption' if captions else 't2i'} steps")
        ax.set_title(SPLIT_NAMES[split])
        ax.set_xlabel("classifier-free guidance scale (1 = off)")
        ax.grid(alpha=0.3)
    what = "caption exact match" if captions else "full match"
    axes[0].set_ylabel(f"{what}, % ({result['prompts_per_split']} validation "
                       f"{'scenes' if captions else 'prompts'})")
    axes[0].legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
