"""The main job on shapes-zh, end to end: ``make demo`` (python -m cogview.demo).

Stages (each reused when its output exists from a run with the same settings, so a second
run is quick; a changed setting runs that stage and the ones after it again):
1. train the tiny VQ-VAE                     -> artifacts/demo/vqvae
2. pretokenize shapes-zh at 64 px            -> artifacts/demo/shards     (t2i and caption)
3. pretokenize shapes-zh at 128 px, sr=true  -> artifacts/demo/shards-sr
4. train t2i (oracle accuracy every N steps) -> artifacts/demo/t2i
5. fine-tune caption from t2i                -> artifacts/demo/caption
6. fine-tune sr from t2i (smaller budget)    -> artifacts/demo/sr
7. the shapes-zh benchmark (cogview.eval.shapes_bench): canonical prompts per split with
   best-of-N reranking by caption score, FID/IS/CapS, caption exact match, SR PSNR/SSIM;
   loss and accuracy plots; outputs/demo/report.md with the pictures.

Budgets come from cogview/conf/demo.yaml (``budget=smoke`` for a minute-scale run).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cogview.config import compose_config
from cogview.cpu import cpu_summary
from cogview.data.pretokenize import pretokenize
from cogview.eval.plots import plot_loss_curves, plot_quality_curves
from cogview.eval.shapes_bench import T2I_TARGETS, markdown, run
from cogview.exports import EXPORT_CONFIG, MODEL_WEIGHTS
from cogview.pipeline import Pipeline
from cogview.precision import auto_precision
from cogview.tokenization.layouts import TASKS
from cogview.training import train

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("cogview.demo")


def stage(name: str, done: Path, run, settings: dict, folders: tuple[Path, ...] = ()) -> float | None:
    """Runs a stage unless ``done`` exists from a run with the same ``settings``; returns its
    wall time, or the time recorded when it ran (``<done's folder>/demo_stage_seconds.json``,
    which also keeps the settings) when reused, None if never recorded.

    ``settings`` are everything the stage's output depends on, its inputs' settings included,
    so a changed budget value (``caption.steps=900``) runs that stage and the ones after it
    again. Before running again, ``folders`` (the stage's output and run folders) are moved
    to ``<folder>.previous`` (replacing an older one), so no model is overwritten in place."""
    record = done.parent / "demo_stage_seconds.json"
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    if done.exists():
        if "settings" not in recorded:
            print(f"[demo] {name}: reusing {done} (made before the demo recorded its settings: "
                  f"delete {done.parent} to run it again)")
            return recorded.get("seconds")
        if recorded["settings"] == settings:
            print(f"[demo] {name}: reusing {done}")
            return recorded.get("seconds")
        print(f"[demo] {name}: settings changed since {done.parent} was made "
              f"({changed_settings(recorded['settings'], settings)}): running it again; the "
              f"earlier output moves to {done.parent}.previous", flush=True)
        for folder in folders:
            if folder.exists():
                previous = folder.with_name(folder.name + ".previous")
                shutil.rmtree(previous, ignore_errors=True)
                folder.rename(previous)
    print(f"[demo] {name} ...", flush=True)
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    done.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"stage": name, "seconds": round(seconds, 1),
                                  "settings": settings}, ensure_ascii=False, indent=1))
    print(f"[demo] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def changed_settings(old: dict, new: dict, prefix: str = "") -> str:
    """``key: old -> new`` for every setting that differs (nested keys dotted)."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        before, after = old.get(key, "unset"), new.get(key, "unset")
        if isinstance(before, dict) and isinstance(after, dict):
            inner = changed_settings(before, after, f"{prefix}{key}.")
            changes += [inner] if inner else []
        elif before != after:
            changes.append(f"{prefix}{key}: {before} -> {after}")
    return ", ".join(changes)


def stage_settings(demo: DictConfig) -> dict[str, dict]:
    """What each stage's output depends on, its inputs' settings nested in it."""
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    vqvae = {"vqvae": plain(demo.vqvae), "seed": demo.seed}
    shards = {"samples": demo.data.samples, "shard_size": demo.data.shard_size,
              "seed": demo.seed, "vqvae": vqvae}
    sr_shards = {"samples": demo.data.sr_samples, "shard_size": demo.data.sr_shard_size,
                 "seed": demo.seed, "vqvae": vqvae}
    t2i = {"t2i": plain(demo.t2i), "seed": demo.seed,
           "fixed_image_positions": demo.fixed_image_positions, "shards": shards}
    return {"vqvae": vqvae, "shards": shards, "shards-sr": sr_shards, "t2i": t2i,
            "caption": {"caption": plain(demo.caption), "init_from": t2i},
            "sr": {"sr": plain(demo.sr), "init_from": t2i, "shards": sr_shards}}


def train_vqvae(demo: DictConfig, out: Path) -> None:
    cfg = compose_config("train", [
        "task=vqvae", "logger=csv", f"output_dir={demo.runs_dir}/vqvae", f"export_dir={out}",
        f"trainer.max_steps={demo.vqvae.steps}", f"trainer.val_check_interval={demo.vqvae.val_every}",
        f"data.val_length={demo.vqvae.val_images}", f"seed={demo.seed}"])
    train(cfg)


def pretokenize_shapes(demo: DictConfig, vqvae: Path, out: Path, size: int, samples: int,
                       shard_size: int, sr: bool = False) -> None:
    cfg = compose_config("pretokenize", [
        f"vqvae_dir={vqvae}", f"out={out}", "source.kind=shapes",
        f"source.shapes.length={samples}", f"source.shapes.seed={demo.seed}",
        f"size={size}", f"sr={str(sr).lower()}", f"shard_size={shard_size}",
        "num_workers=1"])
    pretokenize(cfg)


def train_sequence_task(demo: DictConfig, task: str, vqvae: Path, shards: Path, out: Path,
                        init_from: Path | None = None) -> None:
    """train.py task=<task> with the demo's budget for it (demo.<task>), scored on shapes-zh
    every ``eval_every`` steps (ShapesOracleEval: <run>/oracle_curve.json; 0: not while
    training, the benchmark scores the final model)."""
    budget = demo[task]
    curve_size = demo.eval.sr_curve_images if task == "sr" else demo.eval.curve_prompts
    overrides = [
        f"task={task}", "logger=csv", f"output_dir={demo.runs_dir}/{task}", f"export_dir={out}",
        f"vqvae_dir={vqvae}", f"data.train_shards={shards}", "data.resampled=true",
        f"data.fixed_image_positions={str(demo.fixed_image_positions).lower()}",
        f"data.batch_size={budget.batch_size}", f"trainer.max_steps={budget.steps}",
        f"trainer.val_check_interval={budget.val_every}", "trainer.limit_val_batches=4",
        f"task.sample_every_n_steps={budget.val_every}", f"task.lr={budget.lr}",
        f"task.warmup_steps={budget.warmup_steps}",
        *[f"model.{k}={v}" for k, v in demo.t2i.model.items()], f"seed={demo.seed}"]
    if budget.eval_every:
        overrides += [
            "callbacks=shapes", f"callbacks.shapes_eval.every_n_steps={budget.eval_every}",
            f"callbacks.shapes_eval.prompts_per_split={curve_size}",
            f"callbacks.shapes_eval.top_k={demo.eval.top_k}",
            f"callbacks.shapes_eval.temperature={demo.eval.temperature}",
            f"callbacks.shapes_eval.cfg_scale={demo.eval.cfg_scale}",
            f"callbacks.shapes_eval.caption_cfg_scale={demo.eval.caption_cfg_scale}"]
    # optional per-task settings of the budget (t2i: txt_loss_scale; caption: image_dropout)
    overrides += [f"task.{key}={budget[key]}" for key in ("txt_loss_scale", "image_dropout")
                  if key in budget]
    if init_from is not None:
        overrides.append(f"task.init_from={init_from}")
    train(compose_config("train", overrides))


def evaluate(demo: DictConfig, exports: dict[str, Path], report_dir: Path) -> dict:
    """The shapes-zh benchmark on the demo's exports (what ``infer.py task=eval`` runs)."""
    pipes = {task: Pipeline.from_pretrained(path) for task, path in exports.items()}
    ev = demo.eval
    return run(**pipes, out_dir=report_dir, write_report=False,
               prompts_per_split=ev.prompts_per_split, num_candidates=ev.num_candidates,
               seed=demo.seed, top_k=ev.top_k, temperature=ev.temperature,
               rerank_temperature=ev.rerank_temperature, cfg_scale=ev.cfg_scale,
               caption_images=ev.caption_images, sr_images=ev.sr_images,
               caption_num_beams=ev.caption_num_beams, caption_cfg_scale=ev.caption_cfg_scale,
               caption_candidates=ev.get("caption_candidates", 0))


def read_curves(runs_dir: Path) -> dict[str, list[dict]]:
    """{task: ShapesOracleEval points} for the demo's runs that wrote oracle_curve.json."""
    files = {task: runs_dir / task / "oracle_curve.json" for task in TASKS}
    return {task: json.loads(path.read_text()) for task, path in files.items() if path.is_file()}


def plots(runs_dir: Path, report_dir: Path, curves: dict[str, list[dict]]) -> dict:
    """Loss curves of the runs and quality against training time (the accuracy bars come
    with the benchmark)."""
    pictures = {}
    logs = {task: runs_dir / task / "logs" / "metrics.csv" for task in ("vqvae", *TASKS)}
    logs = {task: path for task, path in logs.items() if path.is_file()}
    if logs:
        plot_loss_curves(logs, report_dir / "loss_curves.png")
        pictures["loss"] = "loss_curves.png"
    if curves:
        plot_quality_curves(curves, report_dir / "quality_curves.png", {"t2i": T2I_TARGETS})
        pictures["curve"] = "quality_curves.png"
    return pictures


def curve_table(task: str, points: list[dict]) -> list[str]:
    """A markdown table of one task's ShapesOracleEval points."""
    keys = [k for k in points[0] if k not in ("step", "train_seconds")]
    percent = task != "sr"
    lines = ["| step | minutes | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for p in points:
        cells = [f"{p[k]:.1%}" if percent else f"{p[k]:.2f}" for k in keys]
        lines.append(f"| {p['step']} | {p['train_seconds'] / 60:.1f} | " + " | ".join(cells) + " |")
    return lines + [""]


def machine_summary() -> dict:
    """The CPU facts the stage times depend on, and the precision ``auto`` ran them in."""
    return {**cpu_summary(), "threads": torch.get_num_threads(),
            "precision": auto_precision("cpu")[0]}  # the demo trains and samples on the CPU


def write_report(report_dir: Path, timings: dict, results: dict, pictures: dict,
                 runs_dir: Path, curves: dict[str, list[dict]], artifacts_dir: Path) -> Path:
    machine = machine_summary()
    lines = ["# cogview demo on shapes-zh", "",
             f"Every stage on this machine: {machine['cpu']} ({machine['cpu_isa']}, native bf16: "
             f"{'yes' if machine['cpu_native_bf16'] else 'no'}), {machine['threads']} threads, "
             f"precision {machine['precision']}; models in `{artifacts_dir}/` "
             "(`Pipeline.from_pretrained`, `infer.py ckpt=...`).", "",
             "| stage | wall time |", "| --- | --- |"]
    lines += [f"| {name} | {'not recorded' if seconds is None else f'{seconds:.0f} s'} |"
              for name, seconds in timings.items()]
    known = [seconds for seconds in timings.values() if seconds is not None]
    lines += [f"| total | {sum(known):.0f} s{'' if len(known) == len(timings) else ' (recorded stages)'} |",
              "", "Stages reused from an earlier run show the time they took when they ran.", ""]
    if "t2i" in results:
        lines += ["![accuracy per attribute](t2i_accuracy.png)", ""]
    if "curve" in pictures:
        lines += ["## Quality against training time", "",
                  "Scored while training (ShapesOracleEval, `callbacks=shapes`) on fewer "
                  "prompts than the benchmark below; minutes exclude the evaluations.", "",
                  f"![quality curves]({pictures['curve']})", ""]
        for task, points in curves.items():
            lines += [f"### {task}", ""] + curve_table(task, points)
    lines += markdown(results)
    if "loss" in pictures:
        lines += ["## Training curves", "", f"![losses]({pictures['loss']})", ""]
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
    torch.manual_seed(demo.seed)
    artifacts, report_dir, runs_dir = Path(demo.artifacts_dir), Path(demo.report_dir), Path(demo.runs_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    vqvae, shards, sr_shards = artifacts / "vqvae", artifacts / "shards", artifacts / "shards-sr"
    exports = {task: artifacts / task for task in TASKS}
    settings = stage_settings(demo)
    runs = {task: runs_dir / task for task in ("vqvae", *TASKS)}
    timings = {
        "VQ-VAE": stage("train the VQ-VAE", vqvae / MODEL_WEIGHTS,
                        lambda: train_vqvae(demo, vqvae), settings["vqvae"],
                        (vqvae, runs["vqvae"])),
        "pretokenize 64 px": stage(
            "pretokenize shapes-zh (64 px)", shards / "manifest.json",
            lambda: pretokenize_shapes(demo, vqvae, shards, 64, demo.data.samples,
                                       demo.data.shard_size), settings["shards"], (shards,)),
        "pretokenize 128 px (sr)": stage(
            "pretokenize shapes-zh (128 px, sr)", sr_shards / "manifest.json",
            lambda: pretokenize_shapes(demo, vqvae, sr_shards, 128, demo.data.sr_samples,
                                       demo.data.sr_shard_size, sr=True),
            settings["shards-sr"], (sr_shards,)),
        "t2i": stage("train t2i", exports["t2i"] / EXPORT_CONFIG,
                     lambda: train_sequence_task(demo, "t2i", vqvae, shards, exports["t2i"]),
                     settings["t2i"], (exports["t2i"], runs["t2i"])),
        "caption": stage("fine-tune caption from t2i", exports["caption"] / EXPORT_CONFIG,
                         lambda: train_sequence_task(demo, "caption", vqvae, shards,
                                                     exports["caption"], exports["t2i"]),
                         settings["caption"], (exports["caption"], runs["caption"])),
        "sr": stage("fine-tune sr from t2i", exports["sr"] / EXPORT_CONFIG,
                    lambda: train_sequence_task(demo, "sr", vqvae, sr_shards, exports["sr"],
                                                exports["t2i"]),
                    settings["sr"], (exports["sr"], runs["sr"])),
    }
    start = time.perf_counter()
    print("[demo] evaluate ...", flush=True)
    results = evaluate(demo, exports, report_dir)
    timings["evaluate"] = time.perf_counter() - start
    curves = read_curves(runs_dir)
    pictures = plots(runs_dir, report_dir, curves)
    (report_dir / "scores.json").write_text(json.dumps(
        {"config": OmegaConf.to_container(demo), "machine": machine_summary(),
         "timings_s": timings, "curves": curves,
         **results}, ensure_ascii=False, indent=1))
    report = write_report(report_dir, timings, results, pictures, runs_dir, curves, artifacts)
    print(f"[demo] report: {report}")
    print(f"[demo] models: {vqvae} (VQ-VAE), " + ", ".join(
        f"{path} ({task})" for task, path in exports.items())
        + "; load with Pipeline.from_pretrained or infer.py ckpt=...")
    print("[demo] web app on these models: make app")
    for split, result in results["t2i"].items():
        line = f"[demo] t2i {split}: full match {result['one_sample']['full_match']:.1%}"
        if "rerank" in result:
            line += (f", best of {result['num_candidates']} by caption score "
                     f"{result['rerank']['top_full_match']:.1%} (random pick "
                     f"{result['rerank']['random_full_match']:.1%})")
        print(line)
    for split, result in results.get("caption", {}).items():
        greedy = result.get("greedy_exact_match", result["exact_match"])
        reranked = (f"the beam and {result['num_candidates']} samples reranked by the t2i "
                    f"model; beam alone {result['decoded_exact_match']:.1%}; "
                    if "num_candidates" in result else "")
        print(f"[demo] caption {split}: exact match {result['exact_match']:.1%} "
              f"({reranked}{result['num_beams']} beams; greedy {greedy:.1%}; guidance "
              f"{result.get('cfg_scale', 1.0):g})")
    for split, result in results.get("sr", {}).items():
        sampled = (f" (sampled codes {result['unrefined_psnr']:.2f} dB)"
                   if "unrefined_psnr" in result else "")
        print(f"[demo] sr {split}: PSNR {result['psnr']:.2f} dB{sampled} vs bicubic "
              f"{result['bicubic_psnr']:.2f} dB, bicubic of the input pixels "
              f"{result['bicubic_input_psnr']:.2f} dB")
    print(f"[demo] total {sum(t for t in timings.values() if t is not None):.0f} s "
          "(stages reused from an earlier run count the time they took then)")
    return 0


if __name__ == "__main__":
    from cogview.cli import run_command  # the same --help and exit codes as `cogview demo`

    sys.exit(run_command("demo", sys.argv[1:]))
