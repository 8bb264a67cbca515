"""Benchmark: quality against training budget beyond the demo's, on the 2-core time scale.

    python benchmarks/quality_budget.py \
        --t2i 3000=artifacts/demo-3000/t2i 4000=outputs/t2i_more/export-4000 ... \
        --caption-run outputs/caption_long outputs/caption_more@2400 --sr-run outputs/sr_long \
        --step-seconds-from outputs/demo/runs

- t2i: each export (``<total steps>=<export dir>``) is scored like the benchmark's 1-sample
  column: the canonical prompts per split (``--prompts``, seed 0), one sample each at
  ``--temperature`` / ``--top-k``, read back by the shapes-zh oracle.
- caption / sr: the ``oracle_curve.json`` that ``callbacks=shapes`` wrote during a longer
  run (caption exact match; sr PSNR beside bicubic).

Runs made beside other jobs have distorted clocks, so every point's time is its step count
times the seconds per step the demo measured for that task on its own (the last point of
``<runs>/<task>/oracle_curve.json``: training time, evaluation excluded). Writes JSON and a
picture with one panel per task (``cogview.eval.plots.plot_quality_curves``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS_DIR, machine_info, write_json  # noqa: E402
from cogview.data.shapes import eval_prompts  # noqa: E402
from cogview.eval.oracle import evaluate  # noqa: E402
from cogview.eval.plots import plot_quality_curves  # noqa: E402
from cogview.eval.shapes_bench import SPLITS, T2I_TARGETS  # noqa: E402
from cogview.pipeline import Pipeline  # noqa: E402


def step_seconds(runs_dir: Path, task: str) -> float:
    """Seconds per training step of ``task`` in a demo run (its last curve point)."""
    path = runs_dir / task / "oracle_curve.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --step-seconds-from wants the demo's runs folder "
                         "(trained with callbacks=shapes)")
    last = json.loads(path.read_text())[-1]
    return last["train_seconds"] / last["step"]


def t2i_point(export: Path, steps: int, prompts: int, top_k: int, temperature: float) -> dict:
    pipe = Pipeline.from_pretrained(export)
    point = {"step": steps}
    for split in SPLITS:
        items = eval_prompts(split, prompts, seed=0)
        images = [group[0] for group in pipe(  # one image per prompt
            [p["caption"] for p in items], seed=0, top_k=top_k, temperature=temperature,
            max_inference_batch_size=64, progress=False).per_prompt]
        point[f"{split}_full_match"] = round(float(evaluate(images, [p["scene"] for p in items])
                                                   ["full_match"]), 4)
    print(f"t2i {steps} steps ({export}): " + ", ".join(
        f"{s} {point[f'{s}_full_match']:.1%}" for s in SPLITS), flush=True)
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t2i", nargs="*", default=[], metavar="STEPS=EXPORT",
                        help="t2i exports and the total training steps behind each")
    parser.add_argument("--caption-run", nargs="*", default=[], metavar="RUN[@STEPS]",
                        help="caption run folders with oracle_curve.json; @STEPS: a run that "
                             "continued another adds that many steps to its own")
    parser.add_argument("--sr-run", nargs="*", default=[], metavar="RUN[@STEPS]",
                        help="sr run folders, as --caption-run")
    parser.add_argument("--step-seconds-from", default=str(ROOT / "outputs" / "demo" / "runs"))
    parser.add_argument("--prompts", type=int, default=64, help="t2i prompts per split")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.55)
    parser.add_argument("--out", help="JSON path (default bench_results/quality_budget.json)")
    parser.add_argument("--picture", default=str(RESULTS_DIR / "quality_budget.png"))
    args = parser.parse_args()

    runs_dir = Path(args.step_seconds_from)
    curves, per_step = {}, {}
    t2i = []
    for item in args.t2i:
        steps, sep, export = item.partition("=")
        if not sep or not steps.isdigit():
            raise SystemExit(f"--t2i {item!r}: write <total steps>=<export dir>")
        t2i.append(t2i_point(Path(export), int(steps), args.prompts, args.top_k, args.temperature))
    if t2i:
        curves["t2i"] = sorted(t2i, key=lambda p: p["step"])
    for task, runs in (("caption", args.caption_run), ("sr", args.sr_run)):
        for item in runs:
            run, _, offset = item.partition("@")
            curve_file = Path(run) / "oracle_curve.json"
            if not curve_file.is_file() or (offset and not offset.isdigit()):
                raise SystemExit(f"--{task}-run {item}: want RUN[@STEPS] with RUN/oracle_curve.json "
                                 "(train with callbacks=shapes)")
            for point in json.loads(curve_file.read_text()):
                point["step"] += int(offset or 0)
                curves.setdefault(task, []).append(point)
    if not curves:
        raise SystemExit("nothing to measure: give --t2i, --caption-run or --sr-run")
    for task, points in curves.items():
        per_step[task] = step_seconds(runs_dir, task)
        for point in points:
            point["measured_train_seconds"] = point.get("train_seconds")
            point["train_seconds"] = round(point["step"] * per_step[task], 1)
    picture = plot_quality_curves(curves, args.picture, {"t2i": T2I_TARGETS})
    write_json({"machine": machine_info(), "seconds_per_step": per_step,
                "t2i_sampling": {"top_k": args.top_k, "temperature": args.temperature,
                                 "prompts_per_split": args.prompts},
                "curves": curves, "picture": str(picture)}, args.out, "quality_budget")
    print(f"picture: {picture}")


if __name__ == "__main__":
    main()
