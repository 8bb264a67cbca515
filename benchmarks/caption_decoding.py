"""Benchmark: caption exact match on shapes-zh by decoding (greedy vs beam search), per export.

    python benchmarks/caption_decoding.py --export 2400=<caption export> 4800=<export> ...
        [--images 256] [--beams 1,2,4,8]

For each caption export (labelled with its training steps), captions ``--images`` rendered
test scenes per split (seen single objects, held-out colour-shape pairs, two objects; the
caption benchmark's scenes, seed 1, so the first 64 are the benchmark's own) with each beam
count (1 = greedy), and reports exact match of the parsed attributes and the wall time
(after a warm-up call; time only compares settings of one run on one machine). A
second part asks whether greedy's misses are search errors: for each wrong greedy caption,
is some correct caption (any template, either clause order) more likely under the model?
Writes bench_results/caption_decoding.json and a plot of exact match against steps
(bench_results/caption_decoding.png; the README shows a copy, docs/caption_decoding.png).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import (RESULTS_DIR, machine_info, parse_exports,  # noqa: E402
                               save_figure, split_axes, write_json)
from cogview.data.shapes import TEMPLATES, eval_prompts, make_caption, render_scene  # noqa: E402
from cogview.eval.oracle import evaluate_captions, score_caption  # noqa: E402
from cogview.eval.shapes_bench import SPLIT_NAMES, SPLITS  # noqa: E402
from cogview.pipeline import Pipeline  # noqa: E402
from cogview.tokenization.layouts import caption_layout, collate_layouts  # noqa: E402


@torch.inference_mode()
def caption_logp(pipe: Pipeline, codes: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """log P(text + end token | image) of each text -> FloatTensor [len(texts)], over the
    distribution the decoders search: the text ids and the end token."""
    end = pipe.info.get("caption_end_token") or "[SEP]"
    layouts = [caption_layout(pipe.vocab, pipe.text_tokenizer.encode(t), codes, end_token=end,
                              text_slots=pipe.text_slots) for t in texts]
    batch = collate_layouts(layouts, pipe.vocab.pad_id, padding_side="right")
    with torch.autocast("cpu", torch.bfloat16, enabled=pipe.precision == "bf16-mixed"):
        logits = pipe.model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    lo, hi = pipe.vocab.text_range
    stop = pipe.vocab.command(end)
    columns = torch.cat([torch.arange(lo, hi), torch.tensor([stop])])  # what decoding can draw
    logp = F.log_softmax(logits[:, :-1, columns].float(), dim=-1)  # (B, T-1, V')
    target = batch["input_ids"][:, 1:]
    column = torch.where(target == stop, hi - lo, (target - lo).clamp(0, hi - lo - 1))
    token_logp = logp.gather(-1, column[..., None])[..., 0]
    scored = batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:]
    return (token_logp * scored).sum(1)


def search_errors(pipe: Pipeline, images, scenes, greedy: list[str]) -> dict:
    """Wrong greedy captions, and how many of them a correct caption outscores."""
    codes = pipe.encode_images(images).flatten(1)
    wrong = outscored = 0
    for i, (scene, caption) in enumerate(zip(scenes, greedy)):
        if score_caption(caption, scene):
            continue
        wrong += 1
        orders = itertools.permutations(range(len(scene["objects"])))
        correct = [make_caption(scene, t, list(o)) for o in orders for t in range(len(TEMPLATES))]
        scores = caption_logp(pipe, codes[i], [caption] + correct)
        outscored += bool(scores[1:].max() > scores[0])
    return {"wrong_greedy": wrong, "a_correct_caption_is_more_likely": outscored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", nargs="+", required=True, metavar="STEPS=EXPORT")
    parser.add_argument("--images", type=int, default=256, help="rendered scenes per split")
    parser.add_argument("--beams", default="1,2,4,8")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", help="JSON path (default bench_results/caption_decoding.json)")
    parser.add_argument("--picture", default=str(RESULTS_DIR / "caption_decoding.png"))
    args = parser.parse_args()
    beams = [int(b) for b in args.beams.split(",")]
    exports = parse_exports(parser, args.export, "4800=outputs/caption/export")

    data = {split: eval_prompts(split, args.images, seed=1) for split in SPLITS}
    images = {split: [render_scene(p["scene"], 64) for p in prompts]
              for split, prompts in data.items()}
    result = {"machine": machine_info(), "images_per_split": args.images, "beams": beams,
              "exports": []}
    for steps, path in exports:
        pipe = Pipeline.from_pretrained(path)
        pipe.caption(images["seen"][:4], progress=False, num_beams=max(beams))  # warm-up
        entry = {"steps": steps, "export": path, "splits": {}}
        for split, prompts in data.items():
            scenes = [p["scene"] for p in prompts]
            rows = {}
            for k in beams:
                start = time.perf_counter()
                captions = pipe.caption(images[split], greedy=True, num_beams=k, progress=False,
                                        max_inference_batch_size=args.batch_size)
                seconds = time.perf_counter() - start
                score = evaluate_captions(captions, scenes)
                rows[str(k)] = {"exact_match": score["exact_match"], "seconds": round(seconds, 2)}
                if k == 1:
                    rows[str(k)].update(search_errors(pipe, images[split], scenes, captions))
                print(f"{steps} steps, {split}, {k} beam(s): {score['exact_match']:.1%} "
                      f"({seconds:.1f} s)", flush=True)
            entry["splits"][split] = rows
        result["exports"].append(entry)
    path = write_json(result, args.out, "caption_decoding")
    plot(result, Path(args.picture))
    print(f"wrote {path} and {args.picture}")


def plot(result: dict, path: Path) -> None:
    fig, axes = split_axes(len(SPLITS))
    steps = [e["steps"] for e in result["exports"]]
    for ax, split in zip(axes, SPLITS):
        for k in result["beams"]:
            values = [100 * e["splits"][split][str(k)]["exact_match"] for e in result["exports"]]
            ax.plot(steps, values, marker="o", label="greedy" if k == 1 else f"{k} beams")
        ax.axhline(90, color="grey", linestyle="--", linewidth=1)
        ax.set_title(SPLIT_NAMES[split])
        ax.set_xlabel("caption fine-tuning steps")
    axes[0].set_ylabel(f"exact match, % ({result['images_per_split']} images)")
    axes[0].legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
