"""Whole train.py runs: multirun, resume after SIGKILL, export from a checkpoint."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cogview.export import export_checkpoint
from cogview.modules.transformer import CogViewTransformer
from cogview.training import resolve_ckpt_path
from tests.helpers import (
    ROOT,
    TINY_MODEL,
    make_run_assets,
    make_token_shards,
    read_wandb_config,
    read_wandb_history,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("run-assets"), n=64, shard_size=16)


def base_command(assets, *extra):
    return [sys.executable, "train.py", "task=t2i", f"vqvae_dir={assets['vqvae']}",
            f"data.train_shards={assets['shards']}", "data.batch_size=4", "data.num_workers=0",
            "data.shuffle_buffer=8", "logger=csv", "task.sample_every_n_steps=0",
            "precision=32-true", "trainer.enable_progress_bar=false", *TINY_MODEL, *extra]


def last_step(path) -> int:
    """global_step of a checkpoint (written atomically, so always complete)."""
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def read_losses(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as handle:
        return [(int(row["step"]), float(row["train/loss"])) for row in csv.DictReader(handle)
                if row.get("train/loss")]


def test_multirun_runs_each_job_in_its_own_directory(assets, tmp_path):
    command = base_command(assets, "model.sandwich_ln=true,false", "trainer.max_steps=2",
                           "trainer.val_check_interval=2", f"hydra.sweep.dir={tmp_path}")
    command.insert(2, "-m")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    configs = [CogViewTransformer.from_pretrained(tmp_path / str(job) / "export").config
               for job in (0, 1)]
    assert [c.sandwich_ln for c in configs] == [True, False]


@pytest.mark.slow  # the data stream's resume is checked in the default suite (test_reliability)
def test_sigkill_then_resume_from_last(assets, tmp_path):
    run = tmp_path / "run"
    command = base_command(assets, f"hydra.run.dir={run}", "trainer.max_steps=30",
                           "trainer.val_check_interval=10", "trainer.log_every_n_steps=1",
                           "callbacks.checkpoint.every_n_train_steps=5", "task.lr=3e-3",
                           "task.warmup_steps=0")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, last = time.time() + 300, run / "checkpoints" / "last.ckpt"
    while time.time() < deadline and not (last.is_file() and last_step(last) >= 15):
        assert process.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 15 <= killed_at < 30
    before = read_losses(run)

    resumed = subprocess.run([*command, "ckpt_path=last"], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 30
    after = [(step, loss) for step, loss in read_losses(run) if step >= killed_at]
    initial = sum(loss for _, loss in before[:3]) / 3
    continued = sum(loss for _, loss in after[:3]) / 3
    assert after and continued < initial - 0.5, (initial, continued)  # no reset to the start


def test_export_any_checkpoint(assets, tmp_path):
    run = tmp_path / "run"
    command = base_command(assets, f"hydra.run.dir={run}", "trainer.max_steps=3",
                           "trainer.val_check_interval=3")
    assert subprocess.run(command, cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    out = export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "exported")
    assert json.loads((out / "cogview.json").read_text())["image_tokens"] == 64
    exported = CogViewTransformer.from_pretrained(out)
    reference = CogViewTransformer.from_pretrained(run / "export")
    # the model card of the run's export names its training data by fingerprint
    manifest = json.loads((assets["shards"] / "manifest.json").read_text())
    card = (run / "export" / "README.md").read_text(encoding="utf-8")
    assert f"image tokenizer fingerprint: `{manifest['fingerprints']['image_tokenizer']}`" in card
    assert "pipeline_tag: text-to-image" in card
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value)
    cli = subprocess.run([sys.executable, "-m", "cogview.export", "ckpt=missing.ckpt", "out=x"],
                         cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode != 0 and "missing.ckpt: no such checkpoint" in cli.stderr

    # The same checkpoint as FSDP's sharded format writes it (Lightning's FSDPStrategy with
    # state_dict_type=sharded): weights and optimiser state through torch.distributed.checkpoint,
    # everything else in meta.pt. It exports to the same weights, with trust_pickle only.
    sharded = tmp_path / "sharded.ckpt"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": checkpoint.pop("state_dict")}, checkpoint_id=sharded, no_dist=True)
    checkpoint.pop("optimizer_states")
    torch.save(checkpoint, sharded / "meta.pt")
    with pytest.raises(ValueError, match="FSDP sharded checkpoint.*trust_pickle=true"):
        export_checkpoint(sharded, tmp_path / "from-sharded")
    out = export_checkpoint(sharded, tmp_path / "from-sharded", trust_pickle=True)
    from_sharded = CogViewTransformer.from_pretrained(out)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(from_sharded.state_dict()[name], value)
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "nothing", trust_pickle=True)
    # resuming from it needs trust_pickle too (Lightning then reads it with its strategy)
    with pytest.raises(ValueError, match="sharded checkpoint.*trust_pickle=true"):
        resolve_ckpt_path(str(sharded), str(run))
    assert resolve_ckpt_path(str(sharded), str(run), trust_pickle=True) == str(sharded)


def test_wandb_run_holds_the_resolved_config_and_the_benchmark_table_and_grids(assets, tmp_path):
    run = tmp_path / "wandb-run"
    command = base_command(assets, f"hydra.run.dir={run}", "trainer.max_steps=2",
                           "trainer.val_check_interval=2", "callbacks=shapes",
                           "callbacks.shapes_eval.every_n_steps=2",
                           "callbacks.shapes_eval.prompts_per_split=2")
    command[command.index("logger=csv")] = "logger=wandb"
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_file, = (run / "wandb").glob("offline-run-*/run-*.wandb")
    config = json.loads(read_wandb_config(run_file)["config"])
    assert config["task"]["name"] == "t2i" and config["model"]["num_layers"] == 2
    assert config["output_dir"] == str(run)  # resolved, not ${hydra:runtime.output_dir}
    history = read_wandb_history(run_file)  # media are logged as nested keys
    table = next(row for row in history if "oracle/curve/_type" in row)
    assert json.loads(table["oracle/curve/_type"]) == "table-file"
    assert json.loads(table["oracle/curve/nrows"]) == 1  # one evaluation so far
    assert json.loads(table["oracle/curve/ncols"]) == 5  # step, seconds, three splits
    images = next(row for row in history if "oracle/samples/_type" in row)
    assert json.loads(images["oracle/samples/_type"]) == "images/separated"
    assert json.loads(images["oracle/samples/count"]) == 3  # a grid per split
    media = list((run_file.parent / "files" / "media").rglob("*.png"))
    assert len(media) == 3


# Lightning starts the second rank by re-running the command line: train.py, and the cogview
# command (which must find its subcommand again) as a module and as the installed script.
ENTRY_POINTS = {"train.py": [sys.executable, "train.py"],
                "python -m cogview train": [sys.executable, "-m", "cogview", "train"],
                "cogview train": [str(Path(sys.executable).parent / "cogview"), "train"]}


@pytest.mark.distributed
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_ddp_cpu_two_processes_over_gloo(assets, tmp_path, entry):
    run = tmp_path / "ddp"
    command = base_command(assets, "trainer=ddp_cpu", f"hydra.run.dir={run}",
                           "trainer.max_steps=4", "trainer.val_check_interval=2")
    command = [*ENTRY_POINTS[entry], *command[2:]]  # base_command: [python, train.py, ...]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size: 2" in result.stderr or "Initializing distributed: GLOBAL_RANK: 1" in result.stderr
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    CogViewTransformer.from_pretrained(run / "export")


@pytest.fixture(scope="module")
def sr_shards(assets, tmp_path_factory):
    return make_token_shards(assets["vqvae"], tmp_path_factory.mktemp("sr-shards") / "sr", n=32,
                             size=128, sr=True, shard_size=16)


@pytest.mark.slow  # the default suite runs the t2i evaluation in the W&B test below
@pytest.mark.parametrize("task", ["t2i", "caption", "sr"])
def test_shapes_eval_scores_each_task_against_training_time(assets, sr_shards, tmp_path, task):
    from cogview.eval.shapes_bench import sr_benchmark
    from cogview.pipeline import Pipeline

    run = tmp_path / task
    shards = sr_shards if task == "sr" else assets["shards"]
    command = base_command(assets, f"task={task}", f"data.train_shards={shards}",
                           f"hydra.run.dir={run}", "trainer.max_steps=4",
                           "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
                           "callbacks=shapes", "callbacks.shapes_eval.every_n_steps=2",
                           "callbacks.shapes_eval.prompts_per_split=2",
                           "callbacks.shapes_eval.sr_refine_sweeps=1")  # sr: one sweep is enough here
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = json.loads((run / "oracle_curve.json").read_text())
    assert [point["step"] for point in curve] == [2, 4]
    assert 0 < curve[0]["train_seconds"] <= curve[1]["train_seconds"]
    splits = ("seen", "heldout", "two")
    metrics = {"t2i": [f"{s}_full_match" for s in splits],
               "caption": [f"{s}_{m}" for s in splits for m in ("exact_match",
                                                                 "greedy_exact_match")],
               "sr": [f"{s}_{m}" for s in splits
                      for m in ("psnr", "unrefined_psnr", "bicubic_psnr")]}[task]
    for point in curve:
        assert set(point) == {"step", "train_seconds", *metrics}
        if task != "sr":
            assert all(0 <= point[k] <= 1 for k in metrics)
    with open(run / "logs" / "metrics.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get(f"oracle/{metrics[0]}")]
    assert [int(row["step"]) for row in logged] == [2, 4]
    # the VQ-VAE the evaluation loaded is not part of the checkpoint, which exports cleanly
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith("_image_tokenizer.")]
    export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "exported")
    if task == "sr":  # the in-training scores are the benchmark's on the exported model
        exported = sr_benchmark(Pipeline.from_pretrained(run / "export", precision="32-true"),
                                splits=("seen", "heldout", "two"), images_per_split=2,
                                progress=False, refine_sweeps=1)
        for split, scores in exported.items():
            for name in ("psnr", "unrefined_psnr"):
                assert curve[-1][f"{split}_{name}"] == pytest.approx(scores[name], abs=2e-3)
            assert curve[-1][f"{split}_bicubic_psnr"] == pytest.approx(scores["bicubic_psnr"],
                                                                      abs=2e-3)
