"""The GPU check: everything in cogview that needs CUDA, in one run that fits in 8 minutes on
one H100/H200, written to one JSON with a printed summary.

    make gpu-check                                  # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out bench_results/gpu_check.json [--only STEP ...]

Steps (each timed, its figures or its error recorded; the exit status is 1 if any failed):

- ``extension``: cogview._C built with CUDA (``python setup.py build_ext --inplace`` first if
  it was not), and the fused kernel agrees with the reference on the GPU;
- ``pytest_cuda``: ``pytest -m cuda``; a skipped test counts as a failure here (on a GPU
  nothing may skip silently);
- ``kernel_bandwidth``: the CUDA section of benchmarks/pb_relax_softmax.py (achieved bandwidth
  against the GPU's data-sheet peak);
- ``strategy_<name>``: 20 t2i steps of the small preset with trainer=ddp, fsdp,
  deepspeed_zero2 and deepspeed_zero3 on one GPU (each in its own process): the loss stays
  finite, the export written at the end gives the trained model's logits, and the last
  checkpoint resumes for two more steps;
- ``overflow_16_mixed``: PB-relax on and off under 16-mixed, on a model whose attention
  scores exceed fp16's range (query/key weights scaled up): the steps whose loss is not
  finite, each way;
- ``cogview4b_sampling``: ``cogview-4b`` with random weights in fp16, t2i sampling with the
  KV cache at batch 1 and 8: seconds per image and peak memory.

Without a GPU (``--device cpu``, as the test suite runs it) the steps run on small sizes on
the CPU where they can (the ddp strategy check over gloo, the overflow demonstration, the
sampling step with ``--preset tiny``) and those that need CUDA are reported as
``"status": "needs_cuda"``, which fails the run only when a GPU is present.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import common  # noqa: E402
from benchmarks.pb_relax_softmax import bench_cuda  # noqa: E402
from benchmarks.sampling import VOCAB, preset_config, prompt_text_ids  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: E402

from cogview.config import compose_config  # noqa: E402
from cogview.data.pretokenize import pretokenize  # noqa: E402
from cogview.generation import generate_images  # noqa: E402
from cogview.modules import pb_relax  # noqa: E402
from cogview.modules.transformer import CogViewTransformer, TransformerConfig  # noqa: E402
from cogview.modules.vqvae import VQVAE, VQVAEConfig  # noqa: E402
from cogview.training import (  # noqa: E402
    build_task, build_trainer, export_after_fit, resolve_ckpt_path)

STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
STEPS = ("extension", "pytest_cuda", "kernel_bandwidth",
         *(f"strategy_{name}" for name in STRATEGIES), "overflow_16_mixed", "cogview4b_sampling")
FP16_MAX = torch.finfo(torch.float16).max


class NeedsCuda(Exception):
    """The step cannot run without a CUDA GPU (a failure only when one is present)."""


# ------------------------------------------------------------------------------------------------
# extension, pytest -m cuda, kernel bandwidth


def check_extension(args) -> dict:
    if args.device != "cuda":
        raise NeedsCuda("the CUDA kernel needs a GPU")
    built_now = False
    if not pb_relax.has_kernel("cuda"):
        done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                              cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building cogview._C with CUDA failed:\n{done.stderr[-3000:]}")
        built_now = True
        check = subprocess.run([sys.executable, "-c", "from cogview.modules.pb_relax import "
                                "has_kernel; assert has_kernel('cuda')"], cwd=ROOT)
        if check.returncode != 0:
            raise RuntimeError("cogview._C was rebuilt but still has no CUDA kernel: is nvcc on "
                               "PATH and torch a CUDA build?")
    scores = (torch.randn(8, 256, 256, device="cuda") / 8).requires_grad_(True)
    fused = pb_relax.pb_relax_softmax(scores, 32.0, True)
    reference = pb_relax.pb_relax_softmax_reference(scores, 32.0, True)
    error = float((fused - reference).abs().max())
    if error > 1e-5:
        raise RuntimeError(f"the CUDA kernel differs from the reference by {error:.3g}")
    return {"built_now": built_now, "max_abs_error_vs_reference": error,
            "kernel_in_process": pb_relax.has_kernel("cuda") or "rebuilt (next process)"}


def run_pytest_cuda(args) -> dict:
    if args.device != "cuda":
        raise NeedsCuda("the cuda-marked tests need a GPU")
    report = Path(tempfile.mkdtemp()) / "report.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p",
                           "no:cacheprovider", f"--junitxml={report}"], cwd=ROOT,
                          capture_output=True, text=True)
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    if done.returncode != 0 or counts["failures"] or counts["errors"] or counts["skipped"]:
        raise RuntimeError(f"pytest -m cuda: {counts}\n{done.stdout[-3000:]}")
    return counts


def kernel_bandwidth(args) -> dict:
    if args.device != "cuda":
        raise NeedsCuda("the CUDA kernel's bandwidth needs a GPU")
    result = bench_cuda(warmup=3, repeats=10)
    best = max(result["results"], key=lambda r: r["fwd_bandwidth_Bps"])
    return {**result, "best_fwd_GBps": best["fwd_bandwidth_Bps"] / 1e9,
            "best_fwd_fraction_of_peak": best.get("fwd_fraction_of_peak")}


# ------------------------------------------------------------------------------------------------
# strategies: 20 t2i steps, export == trained model


def make_assets(root: Path) -> dict:
    """A random VQ-VAE and 64-px shapes-zh token shards made here (nothing downloaded)."""
    torch.manual_seed(0)
    VQVAE(VQVAEConfig.preset("tiny", num_codes=256)).save_pretrained(root / "vqvae")
    pretokenize(compose_config("pretokenize", [
        f"vqvae_dir={root / 'vqvae'}", f"out={root / 'shards'}", "progress=false",
        "source.shapes.length=256", "shard_size=64", "size=64", "num_workers=0"]))
    return {"vqvae": root / "vqvae", "shards": root / "shards"}


def strategy_overrides(name: str, device: str, preset: str) -> list[str]:
    """train.py overrides for `name` on one device (ddp on the CPU runs over gloo)."""
    trainer = name if device == "cuda" or name != "ddp" else "ddp_cpu"
    overrides = [f"trainer={trainer}", "trainer.devices=1", f"model={preset}"]
    if device == "cuda":
        overrides += ["trainer.accelerator=gpu", "precision=bf16-mixed"]
    else:
        overrides += ["precision=32-true"]
    return overrides


def full_parameters(trainer, task):
    """A context in which ``task.model`` holds its full weights: FSDP's summon_full_params,
    DeepSpeed ZeRO-3's GatheredParameters, else nothing to do."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        return FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False)
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed  # deferred on purpose: an optional install (trainer=deepspeed_*)

        return deepspeed.zero.GatheredParameters(list(task.model.parameters()))
    return contextlib.nullcontext()


def train_and_compare(name: str, device: str, preset: str, root: Path, steps: int) -> dict:
    """In this process: fit `steps` t2i steps with strategy `name`, export, and compare the
    export's logits with the trained model's on a held-out batch."""
    assets = make_assets(root)

    def compose_run(max_steps: int):
        return compose_config("train", [*overrides, f"trainer.max_steps={max_steps}"])

    overrides = [
        "task=t2i", f"vqvae_dir={assets['vqvae']}", f"data.train_shards={assets['shards']}",
        "data.batch_size=8", "data.num_workers=0", "logger=csv", "task.sample_every_n_steps=0",
        f"trainer.val_check_interval={steps}",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={root / 'run'}",
        f"output_dir={root / 'run'}", f"export_dir={root / 'run' / 'export'}",
        *strategy_overrides(name, device, preset)]
    cfg = compose_run(steps)
    datamodule, task, trainer = instantiate(cfg.data), build_task(cfg), build_trainer(cfg)
    started = time.perf_counter()
    trainer.fit(task, datamodule=datamodule)
    seconds = time.perf_counter() - started
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    export_after_fit(trainer, task, cfg.export_dir, "t2i")
    batch = next(iter(datamodule.val_dataloader()))
    ids = batch["input_ids"][:4].to(task.device)
    task.model.eval()
    with torch.no_grad(), full_parameters(trainer, task):  # collective: every rank takes part
        trained = task.model(ids).float()
        dtype = next(task.model.parameters()).dtype  # DeepSpeed trains in bf16 weights
    difference = float("nan")
    if trainer.is_global_zero:
        exported = CogViewTransformer.from_pretrained(cfg.export_dir, dtype=dtype)
        with torch.no_grad():
            exported = exported.to(task.device).eval()(ids).float()
        difference = float((trained - exported).abs().max())
        if not math.isfinite(loss):
            raise RuntimeError(f"trainer={name}: the loss after {steps} steps is {loss}")
        if difference > 1e-3:
            raise RuntimeError(f"trainer={name}: the export's logits differ from the trained "
                               f"model's by {difference:.3g}")
    # the checkpoint written at the end resumes (every rank): two more steps from it
    resumed_cfg = compose_run(steps + 2)
    ckpt = resolve_ckpt_path("last", resumed_cfg.output_dir, trust_pickle=True)
    resumed = build_trainer(resumed_cfg)
    resumed.fit(build_task(resumed_cfg), datamodule=instantiate(resumed_cfg.data), ckpt_path=ckpt,
                weights_only=False)
    if resumed.global_step != steps + 2:
        raise RuntimeError(f"trainer={name}: resuming from {ckpt} ended at step "
                           f"{resumed.global_step}, not {steps + 2}")
    if not trainer.is_global_zero:
        return {}
    return {"steps": steps, "train_seconds": round(seconds, 2), "final_loss": round(loss, 4),
            "max_abs_logit_difference": difference, "resumed_to_step": resumed.global_step}


def check_strategy(args, name: str) -> dict:
    if args.device != "cuda" and name != "ddp":
        raise NeedsCuda(f"Lightning's {name} strategy needs CUDA")
    if name.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401  (deferred: optional; its absence is reported)
        except ImportError as error:
            raise RuntimeError(f"trainer={name} needs deepspeed: pip install deepspeed "
                               f"({error})") from None
    with tempfile.TemporaryDirectory() as root:
        done = subprocess.run(
            [sys.executable, __file__, "--strategy-run", name, "--device", args.device,
             "--strategy-preset", args.strategy_preset, "--train-steps", str(args.train_steps),
             "--root", root], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"trainer={name} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# the 16-mixed overflow demonstration


def overflow_demo(args) -> dict:
    """Per PB-relax setting: the steps (of `args.overflow_steps`) whose loss is not finite
    under 16-mixed autocast with a GradScaler, on one model whose query/key weights are scaled
    so that plain attention scores reach about 4x fp16's largest number."""
    device = args.device
    base = dict(num_layers=2, hidden_size=128, num_heads=4, max_positions=128, vocab_size=512)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 64), generator=generator).to(device)

    def model_for(pb_relax: bool, scale: float) -> CogViewTransformer:
        torch.manual_seed(0)
        attention = "pb_relax" if pb_relax else "eager"
        model = CogViewTransformer(TransformerConfig(**base, pb_relax=pb_relax,
                                                     attention=attention))
        with torch.no_grad():
            for layer in model.layers:  # the query and key thirds of the fused projection
                layer.attention.query_key_value.weight[:2 * base["hidden_size"]] *= scale
        return model.to(device)

    # the fp32 score peak at scale 1, then the scale that puts it at 4 x fp16's max
    probe = model_for(False, 1.0)
    probe.track_stats(True)
    with torch.no_grad():
        probe(ids)
    peak = max(float(layer.attention.last_max_score) for layer in probe.layers)
    scale = math.sqrt(4 * FP16_MAX / peak)
    rows = {}
    for relaxed in (True, False):
        model = model_for(relaxed, scale)
        model.track_stats(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
        nonfinite = 0
        for _ in range(args.overflow_steps):
            with torch.autocast(device, dtype=torch.float16):
                logits = model(ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                         ids[:, 1:].flatten())
            nonfinite += int(not torch.isfinite(loss))
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        rows["pb_relax_on" if relaxed else "pb_relax_off"] = {
            "nonfinite_steps": nonfinite, "steps": args.overflow_steps,
            "max_attention_score_fp32_equivalent": max(
                float(layer.attention.last_max_score) for layer in model.layers),
            "final_loss_scale": scaler.get_scale()}
    if rows["pb_relax_on"]["nonfinite_steps"]:
        raise RuntimeError(f"PB-relax on still overflowed in 16-mixed: {rows}")
    if not rows["pb_relax_off"]["nonfinite_steps"]:
        raise RuntimeError(f"the demonstration did not overflow without PB-relax: {rows}")
    return {"qk_weight_scale": round(scale, 3), "fp32_score_peak_at_scale_1": peak, **rows}


# ------------------------------------------------------------------------------------------------
# cogview-4b sampling


def sampling_speed(args) -> dict:
    """Seconds per image and peak memory of t2i sampling with the KV cache, batch 1 and 8."""
    if args.device != "cuda" and args.sampling_preset == "cogview-4b":
        raise NeedsCuda("cogview-4b sampling needs a GPU (run --sampling-preset tiny on a CPU)")
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    config = preset_config(args.sampling_preset)
    with torch.device("meta"):
        model = CogViewTransformer(config)
    model = model.to_empty(device=args.device)
    torch.manual_seed(0)
    model.reset_parameters()  # random weights, made where they run
    model = model.to(dtype).eval()
    image_tokens = args.image_tokens
    rows = []
    for batch in (1, 8):
        text_ids = prompt_text_ids(batch)
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        codes = generate_images(model, VOCAB, text_ids, image_tokens, list(range(batch)))
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if codes.shape != (batch, image_tokens):
            raise RuntimeError(f"sampling returned codes of shape {tuple(codes.shape)}")
        row = {"batch": batch, "seconds": round(seconds, 3),
               "seconds_per_image": round(seconds / batch, 3)}
        if args.device == "cuda":
            row["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
    return {"preset": args.sampling_preset, "parameters": model.num_parameters(),
            "dtype": str(dtype).split(".")[-1], "image_tokens": image_tokens, "batches": rows}


# ------------------------------------------------------------------------------------------------
# driver


def run_step(name: str, args) -> dict:
    functions = {"extension": check_extension, "pytest_cuda": run_pytest_cuda,
                 "kernel_bandwidth": kernel_bandwidth, "overflow_16_mixed": overflow_demo,
                 "cogview4b_sampling": sampling_speed}
    started = time.perf_counter()
    try:
        if name.startswith("strategy_"):
            figures = check_strategy(args, name.removeprefix("strategy_"))
        else:
            figures = functions[name](args)
        outcome = {"status": "ok", **figures}
    except NeedsCuda as reason:
        outcome = {"status": "needs_cuda", "reason": str(reason)}
    except Exception as error:  # recorded, and the run fails at the end
        outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc()[-4000:]}
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    return outcome


def summary_line(name: str, outcome: dict) -> str:
    status = outcome["status"]
    if status == "failed":
        detail = outcome["error"].splitlines()[0][:150]
    elif status == "needs_cuda":
        detail = outcome["reason"]
    elif name.startswith("strategy_"):
        detail = (f"loss {outcome['final_loss']}, export vs trained max |dlogit| "
                  f"{outcome['max_abs_logit_difference']:.2e}")
    elif name == "overflow_16_mixed":
        detail = (f"non-finite steps: PB-relax on {outcome['pb_relax_on']['nonfinite_steps']}, "
                  f"off {outcome['pb_relax_off']['nonfinite_steps']} "
                  f"of {outcome['pb_relax_on']['steps']}")
    elif name == "cogview4b_sampling":
        detail = ", ".join(f"batch {r['batch']}: {r['seconds_per_image']} s/image"
                           + (f", peak {r['peak_memory_GiB']} GiB" if "peak_memory_GiB" in r
                              else "") for r in outcome["batches"])
    elif name == "kernel_bandwidth":
        detail = f"best forward {outcome['best_fwd_GBps']:.0f} GB/s"
    else:
        detail = ", ".join(f"{k}={v}" for k, v in outcome.items()
                           if k not in ("status", "seconds"))[:150]
    return f"{name:<26} {status:<11} {outcome['seconds']:>7.1f} s  {detail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", choices=STEPS, help="run these steps only")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--strategy-preset", default="small",
                        help="model preset of the strategy checks (tiny on a CPU)")
    parser.add_argument("--sampling-preset", default="cogview-4b")
    parser.add_argument("--image-tokens", type=int, default=1024,
                        help="codes per sampled image (1024: 32x32, 256 px)")
    parser.add_argument("--overflow-steps", type=int, default=10)
    parser.add_argument("--out", help="JSON path (default bench_results/gpu_check.json)")
    parser.add_argument("--strategy-run", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.strategy_run:  # one strategy check, in its own process
        figures = train_and_compare(args.strategy_run, args.device, args.strategy_preset,
                                    Path(args.root), args.train_steps)
        if figures:
            print(json.dumps(figures))
        return 0
    gpu_present = torch.cuda.is_available()
    if args.device == "cuda" and not gpu_present:
        parser.error("--device cuda: torch sees no CUDA GPU")
    steps = {}
    for name in args.only or STEPS:
        steps[name] = run_step(name, args)
        print(summary_line(name, steps[name]), flush=True)
    failed = [n for n, s in steps.items()
              if s["status"] == "failed" or (s["status"] == "needs_cuda" and gpu_present)]
    result = {"benchmark": "gpu_check", "machine": common.machine_info(), "device": args.device,
              "gpu": torch.cuda.get_device_name() if gpu_present else None,
              "steps": steps, "failed": failed, "ok": not failed}
    common.write_json(result, args.out, "gpu_check")
    print("gpu check: " + ("all steps passed" if not failed else f"FAILED: {', '.join(failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
