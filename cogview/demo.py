"""The main job on shapes-zh, end to end: ``make demo`` (python -m cogview.demo).

Stages (each reused when its output already exists, so a second run is quick):
1. train the tiny VQ-VAE                -> artifacts/demo/vqvae
2. pretokenize shapes-zh                -> artifacts/demo/shards
3. train t2i                            -> artifacts/demo/t2i
4. sample canonical prompts (seen, held-out pairs, two objects) and score them with the
   shapes-zh oracle; write outputs/demo/report.md with the pictures and numbers.

Budgets come from conf/demo.yaml (``budget=smoke`` for a minute-scale run).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from cogview.training import register_resolvers, train

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
log = logging.getLogger("cogview.demo")


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """Composes conf/<name>.yaml with overrides, outside any Hydra app."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=name, overrides=overrides)


def stage(name: str, done: Path, run) -> float:
    """Runs a stage unless ``done`` exists; returns its wall time (0 when reused)."""
    if done.exists():
        print(f"[demo] {name}: reusing {done}")
        return 0.0
    print(f"[demo] {name} ...", flush=True)
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    print(f"[demo] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def train_vqvae(demo: DictConfig, out: Path) -> None:
    cfg = compose_config("train", [
        "task=vqvae", "logger=csv", f"output_dir={demo.runs_dir}/vqvae", f"export_dir={out}",
        f"trainer.max_steps={demo.vqvae.steps}", f"trainer.val_check_interval={demo.vqvae.val_every}",
        f"data.val_length={demo.vqvae.val_images}", f"seed={demo.seed}"])
    train(cfg)


def pretokenize_shapes(demo: DictConfig, vqvae: Path, out: Path) -> None:
    from cogview.data.pretokenize import pretokenize

    cfg = compose_config("pretokenize", [
        f"vqvae_dir={vqvae}", f"out={out}", "source.kind=shapes",
        f"source.shapes.length={demo.data.samples}", f"source.shapes.seed={demo.seed}",
        "size=64", f"shard_size={demo.data.shard_size}", "num_workers=1"])
    pretokenize(cfg)


def train_t2i(demo: DictConfig, vqvae: Path, shards: Path, out: Path) -> None:
    cfg = compose_config("train", [
        "task=t2i", "logger=csv", f"output_dir={demo.runs_dir}/t2i", f"export_dir={out}",
        f"vqvae_dir={vqvae}", f"data.train_shards={shards}", "data.resampled=true",
        f"data.batch_size={demo.t2i.batch_size}", f"trainer.max_steps={demo.t2i.steps}",
        f"trainer.val_check_interval={demo.t2i.val_every}", "trainer.limit_val_batches=4",
        f"task.sample_every_n_steps={demo.t2i.val_every}",
        *[f"model.{k}={v}" for k, v in demo.t2i.model.items()], f"seed={demo.seed}"])
    train(cfg)


@torch.no_grad()
def evaluate_t2i(demo: DictConfig, export: Path, report_dir: Path) -> dict:
    """Generates one image per canonical prompt per split; oracle scores + grids."""
    from cogview.data.shapes import eval_prompts
    from cogview.eval.oracle import evaluate, read_scene
    from cogview.generation import generate_images
    from cogview.modules.transformer import CogViewTransformer
    from cogview.modules.vqvae import VQVAE
    from cogview.tokenization import load_text_tokenizer
    from cogview.tokenization.vocab import CogViewVocab
    from cogview.visualize import image_grid

    model = CogViewTransformer.from_pretrained(export).eval()
    vqvae = VQVAE.from_pretrained(export / "vqvae").eval()
    tokenizer = load_text_tokenizer(export / "text_tokenizer")
    vocab = CogViewVocab.from_dict(json.loads((export / "cogview.json").read_text())["vocab"])
    results = {}
    for kind in ("seen", "heldout", "two"):
        prompts = eval_prompts(kind, demo.eval.prompts_per_split, seed=demo.seed)
        codes = []
        for start in range(0, len(prompts), 16):
            chunk = prompts[start:start + 16]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                codes.append(generate_images(
                    model, vocab, [tokenizer.encode(p["caption"]) for p in chunk], image_tokens=64,
                    seeds=[demo.seed + start + i for i in range(len(chunk))],
                    top_k=demo.eval.top_k, temperature=demo.eval.temperature))
        images = vqvae.decode(torch.cat(codes).view(-1, 8, 8))
        scores = evaluate(images, [p["scene"] for p in prompts])
        results[kind] = scores
        image_grid(images[:32], columns=8, scale=2).save(report_dir / f"t2i_{kind}.png")
        rows = [{"prompt": p["caption"], "read_back": read_scene(image)["objects"]}
                for p, image in zip(prompts[:8], images[:8])]
        (report_dir / f"t2i_{kind}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return results


def write_report(report_dir: Path, timings: dict, scores: dict, runs_dir: Path) -> Path:
    lines = ["# cogview demo on shapes-zh", "",
             "Every stage on this machine's CPU; models in `artifacts/demo/`.", "",
             "| stage | wall time |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.0f} s{' (reused)' if seconds == 0 else ''} |"
              for name, seconds in timings.items()]
    lines += ["", "## Text-to-image, scored by the shapes-zh oracle", "",
              "One sample per canonical prompt (`{position}有一个{size}的{color}{shape}`).", "",
              "| prompts | n | color | shape | position | size | full match |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    names = {"seen": "seen single objects", "heldout": "held-out colour-shape pairs",
             "two": "two objects"}
    for kind, result in scores.items():
        lines.append(f"| {names[kind]} | {result.get('n_images', '?')} | " + " | ".join(
            f"{result.get(a, float('nan')):.1%}" for a in ("color", "shape", "position", "size",
                                                            "full_match")) + " |")
    lines += [""]
    for kind in scores:
        lines += [f"### {names[kind]}", "", f"![{kind}](t2i_{kind}.png)", "",
                  f"Prompts and what the oracle read back: `t2i_{kind}.json`.", ""]
    vq_pictures = sorted((runs_dir / "vqvae" / "samples").glob("vqvae_step*.png"))
    if vq_pictures:
        target = report_dir / "vqvae_reconstructions.png"
        target.write_bytes(vq_pictures[-1].read_bytes())
        lines += ["## Image tokenizer", "", "Held-out originals above reconstructions:", "",
                  "![vqvae](vqvae_reconstructions.png)", ""]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    demo = compose_config("demo", list(argv if argv is not None else sys.argv[1:]))
    artifacts, report_dir = Path(demo.artifacts_dir), Path(demo.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    vqvae, shards, t2i = artifacts / "vqvae", artifacts / "shards", artifacts / "t2i"
    timings = {
        "VQ-VAE": stage("train the VQ-VAE", vqvae / "model.safetensors",
                        lambda: train_vqvae(demo, vqvae)),
        "pretokenize": stage("pretokenize shapes-zh", shards / "manifest.json",
                             lambda: pretokenize_shapes(demo, vqvae, shards)),
        "t2i": stage("train t2i", t2i / "cogview.json", lambda: train_t2i(demo, vqvae, shards, t2i)),
    }
    start = time.perf_counter()
    scores = evaluate_t2i(demo, t2i, report_dir)
    timings["sample + score"] = time.perf_counter() - start
    (report_dir / "scores.json").write_text(json.dumps(
        {"config": OmegaConf.to_container(demo), "timings_s": timings, "t2i": scores},
        ensure_ascii=False, indent=1))
    report = write_report(report_dir, timings, scores, Path(demo.runs_dir))
    print(f"[demo] report: {report}")
    print(f"[demo] models: {vqvae} (VQ-VAE), {t2i} (t2i; infer with Pipeline.from_pretrained)")
    for kind, result in scores.items():
        print(f"[demo] t2i {kind}: full match {result['full_match']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
