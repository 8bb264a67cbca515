"""Benchmark: t2i full match on shapes-zh against the classifier-free guidance scale, per export.

    python benchmarks/guidance.py --export 1300=artifacts/demo/t2i 3500=artifacts/demo-long/t2i
        [--scales 1,1.5,2,2.5,3] [--prompts 128] [--temperature 0.55] [--top-k 50]

For each t2i export (labelled with its training steps), draws one sample per canonical prompt
(``--prompts`` per split: seen single objects, held-out colour-shape pairs, two objects) at
each guidance scale (1 = off) and scores it with the shapes-zh oracle. The prompts are
validation prompts (seed 100), not the benchmark's (seed 0), so a scale chosen here is not
tuned on the benchmark. Guidance needs a model trained with caption dropout (t2i's
``task.caption_dropout``, 0.1 by default), which learns the unconditional distribution it
subtracts. Writes bench_results/guidance.json and a plot of full match against the scale
(bench_results/guidance.png; docs/guidance.png is a copy).
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
from cogview.data.shapes import eval_prompts  # noqa: E402
from cogview.eval.oracle import evaluate  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", nargs="+", required=True, metavar="STEPS=DIR",
                        help="t2i exports labelled with their training steps")
    parser.add_argument("--scales", default="1,1.5,2,2.5,3")
    parser.add_argument("--prompts", type=int, default=128, help="validation prompts per split")
    parser.add_argument("--temperature", type=float, default=0.55)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", help="JSON path (default bench_results/guidance.json)")
    parser.add_argument("--picture", default=str(RESULTS_DIR / "guidance.png"))
    args = parser.parse_args()
    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        parser.error(f"--scales {args.scales!r}: expected numbers separated by commas, e.g. 1,2,3")
    exports = parse_exports(parser, args.export, "1300=artifacts/demo/t2i")
    prompts = {split: eval_prompts(split, args.prompts, seed=VALIDATION_SEED) for split in SPLITS}
    result = {"machine": machine_info(), "prompts_per_split": args.prompts,
              "prompt_seed": VALIDATION_SEED, "temperature": args.temperature,
              "top_k": args.top_k, "scales": scales, "exports": []}
    for steps, path in exports:
        print(f"{path} ({steps} steps)", flush=True)
        result["exports"].append({"steps": steps, "export": path,
                                  "splits": sweep(Pipeline.from_pretrained(path), prompts,
                                                  scales, args)})
    path = write_json(result, args.out, "guidance")
    plot(result, Path(args.picture))
    print(f"wrote {args.picture}")


def plot(result: dict, path: Path) -> None:
    fig, axes = split_axes(len(SPLITS))
    scales = result["scales"]
    for ax, split in zip(axes, SPLITS):
        for entry in result["exports"]:
            values = [100 * entry["splits"][split][str(s)]["full_match"] for s in scales]
            ax.plot(scales, values, marker="o", label=f"{entry['steps']} t2i steps")
        ax.set_title(SPLIT_NAMES[split])
        ax.set_xlabel("classifier-free guidance scale (1 = off)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"full match, % ({result['prompts_per_split']} validation prompts)")
    axes[0].legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
