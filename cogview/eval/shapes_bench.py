"""The shapes-zh quality benchmark over exported models (``infer.py task=eval``, ``make demo``).

    t2i_benchmark(t2i_pipe, reranker=caption_pipe)   oracle accuracy per split (1 sample per
                                                      canonical prompt), best-of-N by caption
                                                      score vs a random pick, CapS, FID/FID-k, IS
    caption_benchmark(caption_pipe)                   exact match of parsed captions per split
    sr_benchmark(sr_pipe)                             PSNR/SSIM vs the 128 px render, beside bicubic

Each returns a JSON-able dict and, with ``out_dir``, writes image grids there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from cogview.data.shapes import eval_prompts, render_scene
from cogview.eval import metrics
from cogview.eval.oracle import evaluate, evaluate_captions, read_scene, score_scene
from cogview.eval.plots import plot_accuracy_bars
from cogview.validate import check_int
from cogview.visualize import comparison_grid, image_grid

SPLITS = ("seen", "heldout", "two")
# The t2i targets: full match with one sample per canonical prompt.
T2I_TARGETS = {"seen": 0.9, "heldout": 0.6, "two": 0.5}  # reference lines in the curves
SPLIT_NAMES = {"seen": "seen single objects", "heldout": "held-out colour-shape pairs",
               "two": "two objects"}


def _save(picture: Image.Image, out_dir: Path | None, name: str) -> str | None:
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    picture.save(out_dir / name)
    return name


def t2i_benchmark(pipe, reranker=None, splits=SPLITS, prompts_per_split: int = 64,
                  num_candidates: int = 8, seed: int = 0, top_k: int | None = 50,
                  temperature: float = 1.0, batch_size: int = 64, fid_features="random",
                  is_classifier="oracle", out_dir: str | Path | None = None,
                  progress: bool = True, rerank_temperature: float | None = None,
                  cfg_scale: float = 1.0) -> dict:
    """Per split: ``num_candidates`` images per canonical prompt (candidate i: seed + i).

    "one_sample": oracle scores of candidate 0 (the 1-sample accuracy); with a reranker,
    "rerank": full match of the best caption-scored candidate vs the mean over candidates
    (a random pick); "caps": caption scores of candidate 0 and of the real renders;
    "fid"/"fid_k": candidate 0 vs renders of the same scenes; "is": Inception Score under
    ``is_classifier`` (real renders' IS beside it).

    ``rerank_temperature`` (default: ``temperature``) draws the candidate pool at its own
    temperature, e.g. 1.0 for a diverse pool (CogView's post-selection) while the 1-sample
    score uses a sharper ``temperature``; the 1-sample images are then drawn separately
    (same seeds). ``cfg_scale`` (classifier-free guidance, 1: off) applies to every draw.
    """
    out_dir = Path(out_dir) if out_dir else None
    pool_temperature = temperature if rerank_temperature is None else rerank_temperature
    results = {}
    for split in splits:
        prompts = eval_prompts(split, prompts_per_split, seed=seed)
        captions = [p["caption"] for p in prompts]
        scenes = [p["scene"] for p in prompts]
        candidates = pipe(captions, num_images=num_candidates, seed=seed, top_k=top_k,
                          temperature=pool_temperature, cfg_scale=cfg_scale,
                          max_inference_batch_size=batch_size,
                          progress=progress).per_prompt  # [prompt][candidate]
        first = [group[0] for group in candidates]
        if pool_temperature != temperature:
            first = [group[0] for group in pipe(
                captions, num_images=1, seed=seed, top_k=top_k, temperature=temperature,
                cfg_scale=cfg_scale, max_inference_batch_size=batch_size,
                progress=progress).per_prompt]
        size = first[0].width
        real = [render_scene(scene, size) for scene in scenes]
        matches = [[bool(score_scene(read_scene(image), scene)["full_match"]) for image in group]
                   for group, scene in zip(candidates, scenes)]
        result = {"n_prompts": len(prompts), "num_candidates": num_candidates,
                  "temperature": temperature, "rerank_temperature": pool_temperature,
                  "cfg_scale": cfg_scale,
                  "one_sample": evaluate(first, scenes),
                  "random_pick_full_match": sum(map(sum, matches)) / sum(map(len, matches))}
        if reranker is not None:
            flat = [image for group in candidates for image in group]
            scores = reranker.caption_scores(flat, [c for c in captions for _ in range(num_candidates)],
                                             max_inference_batch_size=batch_size, progress=False)
            per_prompt = [scores[i * num_candidates:(i + 1) * num_candidates]
                          for i in range(len(prompts))]
            groups = [list(zip(s, m)) for s, m in zip(per_prompt, matches)]
            gain = metrics.rerank_gain(groups)
            result["rerank"] = {k: v for k, v in gain.items() if k != "per_group"}
            real_caps = reranker.caption_scores(real, captions, max_inference_batch_size=batch_size,
                                                progress=False)
            result["caps"] = {"generated": _summary(metrics.caption_score_summary(
                [s[0] for s in per_prompt])), "real": _summary(metrics.caption_score_summary(real_caps))}
            best = [group[max(range(num_candidates), key=lambda i: s[i])]
                    for group, s in zip(candidates, per_prompt)]
            result["pictures"] = {"reranked": _save(image_grid(best[:32], columns=8, scale=2),
                                                    out_dir, f"t2i_{split}_reranked.png")}
        if len(first) >= 2:
            result["fid"] = metrics.fid(real, first, fid_features)
            result["fid_k"] = {str(k): v for k, v in
                               metrics.blurred_fid(real, first, fid_features).items()}
            result["is"] = {"generated": _summary(metrics.inception_score(first, is_classifier,
                                                                          splits=1)),
                            "real": _summary(metrics.inception_score(real, is_classifier, splits=1))}
        result.setdefault("pictures", {})
        result["pictures"]["samples"] = _save(image_grid(first[:32], columns=8, scale=2), out_dir,
                                              f"t2i_{split}.png")
        if out_dir is not None:
            rows = [{"prompt": c, "read_back": read_scene(image)["objects"], "full_match": m[0]}
                    for c, image, m in zip(captions[:16], first[:16], matches[:16])]
            (out_dir / f"t2i_{split}.json").write_text(json.dumps(rows, ensure_ascii=False,
                                                                  indent=1))
        results[split] = result
    return results


CAPTION_NUM_BEAMS = 4
CAPTION_CANDIDATES = 16  # sampled captions per image beside the beam one, with a t2i reranker
SR_REFINE_SWEEPS = 2  # the pipeline's consistency refinement (0: the sampled codes alone)


def caption_benchmark(pipe, splits=SPLITS, images_per_split: int = 64, seed: int = 1,
                      batch_size: int = 64, out_dir: str | Path | None = None,
                      progress: bool = True, num_beams: int = CAPTION_NUM_BEAMS,
                      cfg_scale: float = 1.0, reranker=None,
                      num_candidates: int = CAPTION_CANDIDATES) -> dict:
    """Captions of rendered test scenes; exact match of the parsed attributes. The captions
    are the most likely of ``num_beams`` beams (4 by default: on a 4,800-step captioner, 91.4 %
    of two-object scenes against 87.9 % greedy, 256 images); with more than one beam the
    greedy captions' exact match is reported beside them (``greedy_exact_match``).
    ``cfg_scale`` != 1: captions decoded with classifier-free guidance (both searches).
    ``reranker`` (a t2i Pipeline): the beam caption and ``num_candidates`` sampled ones per
    image, the one the t2i model scores best kept (``Pipeline.caption(reranker=...)``); the
    beam captions' own score is reported beside (``decoded_exact_match``)."""
    out_dir = Path(out_dir) if out_dir else None
    size = 8 * int(round(pipe.image_tokens ** 0.5))
    rerank = {} if reranker is None else {"reranker": reranker, "num_candidates": num_candidates}
    results = {}
    for split in splits:
        prompts = eval_prompts(split, images_per_split, seed=seed)
        scenes = [p["scene"] for p in prompts]
        images = [render_scene(scene, size) for scene in scenes]
        captions = pipe.caption(images, greedy=True, max_inference_batch_size=batch_size,
                                progress=progress, num_beams=num_beams, cfg_scale=cfg_scale,
                                details=True, **rerank)
        result = evaluate_captions([c["caption"] for c in captions], scenes)
        result["num_beams"] = num_beams
        result["cfg_scale"] = cfg_scale
        if reranker is not None:
            result["num_candidates"] = num_candidates
            result["decoded_exact_match"] = evaluate_captions(
                [c["decoded"] for c in captions], scenes)["exact_match"]
        if num_beams > 1:
            greedy = pipe.caption(images, greedy=True, max_inference_batch_size=batch_size,
                                  progress=progress, cfg_scale=cfg_scale)
            result["greedy_exact_match"] = evaluate_captions(greedy, scenes)["exact_match"]
        result["examples"] = [{"caption": c["caption"], "truth": p["caption"]}
                              for c, p in zip(captions[:8], prompts[:8])]
        result["picture"] = _save(image_grid(images[:8], columns=8, scale=2), out_dir,
                                  f"caption_{split}.png")
        results[split] = result
    return results


def sr_benchmark(pipe, splits=("seen", "two"), images_per_split: int = 16, seed: int = 2,
                 batch_size: int = 16, out_dir: str | Path | None = None,
                 progress: bool = True, top_k: int | None = 1, temperature: float = 1.0,
                 refine_sweeps: int = SR_REFINE_SWEEPS, refine_candidates: int = 8) -> dict:
    """2x super-resolution of rendered scenes (input: the render resized to half the target
    side, as the sr shards were made): PSNR/SSIM against the full-size render, beside bicubic
    upsampling of the decoded low-res input (what the model's tokens hold) and of the input
    pixels themselves. Greedy (argmax) by default (``top_k=1``): PSNR rewards the most likely
    codes (on a 2500-step sr model greedy scored 1.2 dB above top-k 200 at temperature 1).

    With ``refine_sweeps`` > 0 (the pipeline's consistency refinement against the input
    pixels) the scores without it are reported too (``unrefined_psnr``, ``unrefined_ssim``).
    """
    out_dir = Path(out_dir) if out_dir else None
    target_side = 8 * int(round(pipe.image_tokens ** 0.5))
    results = {}
    for split in splits:
        prompts = eval_prompts(split, images_per_split, seed=seed)
        targets = [render_scene(p["scene"], target_side) for p in prompts]
        inputs = [t.resize((target_side // 2,) * 2, Image.Resampling.LANCZOS) for t in targets]
        captions = [p["caption"] for p in prompts]

        def upscale(sweeps: int) -> list[Image.Image]:
            return pipe.super_resolve(inputs, captions, seed=seed, top_k=top_k,
                                      temperature=temperature, greedy=top_k == 1,
                                      refine_sweeps=sweeps,
                                      refine_candidates=refine_candidates,
                                      max_inference_batch_size=batch_size, progress=progress).images

        outputs = upscale(refine_sweeps)
        decoded = pipe.decode_codes(pipe.encode_images(inputs))  # what the sr model saw
        result = metrics.sr_metrics(outputs, targets, decoded)
        result.pop("per_image")
        result["refine_sweeps"] = refine_sweeps
        result["bicubic_input_psnr"] = metrics.sr_metrics(outputs, targets, inputs)["bicubic_psnr"]
        columns, names = [outputs[:8]], ["sr"]
        if refine_sweeps:
            plain = upscale(0)
            unrefined = metrics.sr_metrics(plain, targets, decoded)
            result.update(unrefined_psnr=unrefined["psnr"], unrefined_ssim=unrefined["ssim"])
            columns, names = [plain[:8], outputs[:8]], ["sr sampled", "sr refined"]
        # The ceiling of sampling alone: the target itself through the VQ-VAE's encoder.
        ceiling = metrics.sr_metrics(pipe.decode_codes(pipe.encode_images(targets)), targets,
                                     decoded)
        result.update(vq_ceiling_psnr=ceiling["psnr"], vq_ceiling_ssim=ceiling["ssim"])
        bicubic = [d.resize((target_side,) * 2, Image.Resampling.BICUBIC) for d in decoded]
        result["picture"] = _save(comparison_grid([bicubic[:8], *columns, targets[:8]],
                                                  ["bicubic", *names, "target"], scale=1),
                                  out_dir, f"sr_{split}.png")
        results[split] = result
    return results


def _summary(values: dict) -> dict:
    """A metric summary without its per-item list."""
    return {k: v for k, v in values.items() if k not in ("per_image", "per_split")}


def markdown(results: dict) -> list[str]:
    """Tables of a benchmark result ({"t2i", "caption", "sr"} as available)."""
    lines = []
    if "t2i" in results:
        first = next(iter(results["t2i"].values()))
        lines += ["## Text-to-image, scored by the shapes-zh oracle", "",
                  f"One sample per canonical prompt (temperature {first.get('temperature', '?')}, "
                  f"classifier-free guidance {first.get('cfg_scale', 1.0)}); "
                  f"best-of-N by caption score vs a random pick of the same N (pool drawn at "
                  f"temperature {first.get('rerank_temperature', '?')}). "
                  "FID uses the configured feature extractor (default: a fixed random conv net, "
                  "16 features), so compare FIDs only between runs with the same extractor and "
                  "image count.", "", "| prompts | n | colour | shape | position | size | full match | "
                  "random of N | best of N (CapS) | FID | FID-4 | IS (real) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for split, r in results["t2i"].items():
            one = r["one_sample"]
            rerank = r.get("rerank", {})
            cells = [f"{one.get(a, float('nan')):.1%}" for a in ("color", "shape", "position",
                                                                  "size", "full_match")]
            cells.append(f"{r['random_pick_full_match']:.1%}")
            cells.append(f"{rerank['top_full_match']:.1%}" if rerank else "–")
            cells.append(f"{r['fid']:.3g}" if "fid" in r else "–")
            cells.append(f"{r['fid_k']['4']:.3g}" if "fid_k" in r else "–")
            cells.append(f"{r['is']['generated']['mean']:.2f} ({r['is']['real']['mean']:.2f})"
                         if "is" in r else "–")
            lines.append(f"| {SPLIT_NAMES[split]} | {r['n_prompts']} | " + " | ".join(cells) + " |")
        lines.append("")
        for split, r in results["t2i"].items():
            lines += [f"### {SPLIT_NAMES[split]}", "", f"![{split}]({r['pictures']['samples']})", ""]
            if r["pictures"].get("reranked"):
                lines += [f"Best of {r['num_candidates']} by caption score:", "",
                          f"![{split} reranked]({r['pictures']['reranked']})", ""]
    if "caption" in results:
        first = next(iter(results["caption"].values()))
        beams, scale = first.get("num_beams", 1), first.get("cfg_scale", 1.0)
        guided = (f" Decoded with classifier-free guidance {scale:g} against the caption "
                  "without its image." if scale != 1.0 else "")
        candidates = first.get("num_candidates")
        reranked = (f" Reranked: the beam caption and {candidates} sampled captions per image, "
                    "the one under which the t2i model finds the image most likely; the beam "
                    "caption's score beside it." if candidates else "")
        lines += ["## Captioning", "",
                  (f"The most likely caption of {beams} beams (beam search), and the greedy "
                   "caption's score beside it." if beams > 1 else "Greedy captions.") + guided
                  + reranked, "",
                  "| images | n | exact match | beam | greedy | parsed |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for split, r in results["caption"].items():
            greedy = r.get("greedy_exact_match", r["exact_match"])
            beam = r.get("decoded_exact_match", r["exact_match"])
            lines.append(f"| {SPLIT_NAMES[split]} | {r['n']} | {r['exact_match']:.1%} | "
                         f"{beam:.1%} | {greedy:.1%} | {r['parsed']:.1%} |")
        lines.append("")
        for split, r in results["caption"].items():
            lines += [f"![caption {split}]({r['picture']})", ""]
            lines += [f"- {e['caption'][:40]} (truth: {e['truth']})"
                      for e in r["examples"][:4]] + [""]
    if "sr" in results:
        lines += ["## Super-resolution", "",
                  "Against the full-size render. \"bicubic\" upsamples the decoded low-res input "
                  "(what the model's low-res tokens hold), \"bicubic (pixels)\" the input pixels "
                  "themselves. \"sampled\" is the model's codes alone; the PSNR column adds the "
                  "consistency refinement against the input pixels. The VQ-VAE ceiling is the "
                  "target through the VQ-VAE's encoder: the best the sampled codes can do "
                  "(the refinement picks codes by their pixels and can pass it).", "",
                  "| images | n | PSNR | sampled | bicubic | bicubic (pixels) | VQ-VAE ceiling "
                  "| SSIM | bicubic SSIM |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for split, r in results["sr"].items():
            plain = r.get("unrefined_psnr", r["psnr"])
            pixels = r.get("bicubic_input_psnr", float("nan"))
            lines.append(f"| {SPLIT_NAMES[split]} | {r['n']} | {r['psnr']:.2f} dB | "
                         f"{plain:.2f} dB | {r['bicubic_psnr']:.2f} dB | {pixels:.2f} dB | "
                         f"{r['vq_ceiling_psnr']:.2f} dB | "
                         f"{r['ssim']:.3f} | {r['bicubic_ssim']:.3f} |")
        lines.append("")
        for split, r in results["sr"].items():
            lines += [f"![sr {split}]({r['picture']})", ""]
    return lines


def caption_reranking(t2i, candidates: int) -> dict:
    """caption_benchmark's reranking arguments: ``candidates`` > 0 reranks captions with the
    t2i export (none given: ValueError); 0: the captioner alone."""
    check_int("caption_candidates", candidates, minimum=0, meaning="0 = the captioner alone")
    if not candidates:
        return {}
    if t2i is None:
        raise ValueError(f"caption_candidates={candidates} reranks captions with a t2i export; "
                         "evaluate a t2i export beside the caption one, or caption_candidates=0")
    return {"reranker": t2i, "num_candidates": candidates}


@torch.no_grad()
def run(t2i=None, caption=None, sr=None, out_dir: str | Path = "outputs/eval",
        write_report: bool = True, **settings) -> dict:
    """All benchmarks for the pipelines given; writes the pictures, the accuracy bars and
    (unless ``write_report=False``, for a caller writing its own) eval.json and report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    t2i_settings = {k: v for k, v in settings.items() if k in (
        "prompts_per_split", "num_candidates", "seed", "top_k", "temperature", "batch_size",
        "fid_features", "is_classifier", "rerank_temperature", "cfg_scale")}
    if t2i is not None:
        results["t2i"] = t2i_benchmark(t2i, reranker=caption, out_dir=out_dir, **t2i_settings)
    if caption is not None:
        results["caption"] = caption_benchmark(
            caption, images_per_split=settings.get("caption_images", 64), out_dir=out_dir,
            batch_size=settings.get("batch_size", 64),
            num_beams=settings.get("caption_num_beams", CAPTION_NUM_BEAMS),
            cfg_scale=settings.get("caption_cfg_scale", 1.0),
            **caption_reranking(t2i, settings.get("caption_candidates", 0)))
    if sr is not None:
        results["sr"] = sr_benchmark(sr, images_per_split=settings.get("sr_images", 16),
                                     out_dir=out_dir, top_k=settings.get("sr_top_k", 1),
                                     refine_sweeps=settings.get("sr_refine_sweeps",
                                                                SR_REFINE_SWEEPS))
    if "t2i" in results:
        bars = {SPLIT_NAMES[s]: {a: r["one_sample"][a] for a in
                                 ("color", "shape", "position", "size", "full_match")}
                for s, r in results["t2i"].items()}
        plot_accuracy_bars(bars, out_dir / "t2i_accuracy.png")
    if not write_report:
        return results
    lines = ["# shapes-zh benchmark", ""]
    if "t2i" in results:
        lines += ["![accuracy](t2i_accuracy.png)", ""]
    lines += markdown(results)
    (out_dir / "eval.json").write_text(json.dumps(results, ensure_ascii=False, indent=1))
    (out_dir / "report.md").write_text("\n".join(lines))
    return results
