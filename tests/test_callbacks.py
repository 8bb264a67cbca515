"""Training monitoring: the NaN/overflow monitor, atomic checkpoints, and the W&B/CSV loggers."""

import copy
import csv
import logging
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from cogview.callbacks import AtomicCheckpointIO, NaNMonitor, StepCheckpoint
from cogview.modules.transformer import CogViewTransformer, TransformerConfig
from cogview.training import build_trainer, register_resolvers
from tests.helpers import CONF_DIR, ROOT, read_wandb_history


# ----------------------------------------------------------------- fixtures
class Regression(L.LightningModule):
    """Linear regression whose loss is made infinite on the optimiser steps in ``bad_steps``."""

    def __init__(self, bad_steps=(), lr: float = 0.05) -> None:
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                         torch.nn.Linear(16, 1))
        self.bad_steps = set(bad_steps)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = F.mse_loss(self.model(inputs), targets)
        if self.global_step in self.bad_steps:
            loss = loss * float("inf")
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TransformerLM(L.LightningModule):
    """A two-layer CogViewTransformer trained on random tokens (next-token loss)."""

    def __init__(self) -> None:
        super().__init__()
        config = TransformerConfig(num_layers=2, hidden_size=32, num_heads=2, max_positions=16,
                                   vocab_size=64, attention="eager")
        self.model = CogViewTransformer(config)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch  # (B, T)
        logits = self.model(tokens[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def regression_data(batches: int = 64) -> DataLoader:
    inputs = torch.randn(4 * batches, 8)
    targets = inputs.sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(inputs, targets), batch_size=4)


class StateRecorder(L.Callback):
    """Copies the weights and the optimiser state at the start of every optimiser step."""

    def __init__(self) -> None:
        self.before_step: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.before_step[trainer.global_step] = {
            "weights": copy.deepcopy(pl_module.state_dict()),
            "optimizer": copy.deepcopy(optimizer.state_dict()["state"]),
        }


def make_trainer(tmp_path, callbacks, logger=False, max_steps=8, **kwargs) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=logger,
                    callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, default_root_dir=tmp_path, log_every_n_steps=1,
                    plugins=[AtomicCheckpointIO()])
    settings.update(kwargs)
    return L.Trainer(**settings)


def same_tensors(a, b) -> bool:
    """Whether two (nested) state dicts hold equal tensors."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    return a == b


def read_csv_metrics(path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------ NaN monitor
def test_inf_loss_step_is_skipped_counted_and_logged_to_wandb_offline(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recorder = StateRecorder()
    monitor = NaNMonitor(log_every_n_steps=2)
    logger = WandbLogger(project="cogview", name="nan-test", save_dir=str(tmp_path), offline=True)
    trainer = make_trainer(tmp_path, [monitor, recorder], logger=logger)
    trainer.fit(Regression(bad_steps={3}), regression_data())
    wandb.finish()

    before, after, later = (recorder.before_step[s] for s in (3, 4, 5))
    assert same_tensors(before["weights"], after["weights"]), "the inf step changed the weights"
    assert same_tensors(before["optimizer"], after["optimizer"]), "the inf step changed AdamW state"
    assert not same_tensors(after["weights"], later["weights"]), "training did not continue"
    assert not same_tensors(recorder.before_step[2]["weights"], before["weights"])
    assert monitor.skipped_steps == 1 and trainer.global_step == 8

    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    # W&B's service process writes the run file on its own: under load the last records may
    # land after finish() returned, so read until all 8 steps are there (or a minute passed)
    deadline = time.time() + 60
    while True:
        try:
            history = read_wandb_history(run_files[0])
        except Exception:  # a record still being written
            history = []
        skipped = [float(row["train/skipped_steps"]) for row in history
                   if "train/skipped_steps" in row]
        if len(skipped) >= 8 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert skipped[:3] == [0.0, 0.0, 0.0] and skipped[-1] == 1.0 and len(skipped) == 8
    grad_norms = [float(row["train/grad_norm"]) for row in history if "train/grad_norm" in row]
    assert len(grad_norms) == 4  # every 2nd of 8 steps


def test_under_deepspeed_the_steps_deepspeed_skipped_are_counted(tmp_path, monkeypatch, caplog):
    """DeepSpeed keeps gradients in its own buffers: the monitor counts the steps its loss
    scaler skipped (engine.skipped_steps), and logs a non-finite loss it applied anyway.
    The engine here is a stand-in with DeepSpeed's attribute; step 2 is one its scaler skips,
    step 5's inf loss one it applies (bf16 has no loss scaler)."""
    from types import SimpleNamespace

    engine = SimpleNamespace(skipped_steps=0)
    monitor = NaNMonitor(max_consecutive_skips=3)

    class DeepSpeedScaler(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                engine.skipped_steps += 1

    trainer = make_trainer(tmp_path, [monitor, DeepSpeedScaler()], max_steps=8)
    monkeypatch.setattr(trainer.strategy, "deepspeed_engine", engine, raising=False)
    with caplog.at_level(logging.WARNING, logger="cogview.monitor"):
        trainer.fit(Regression(bad_steps={5}), regression_data())
    assert monitor.skipped_steps == 1 and trainer.global_step == 8
    assert caplog.text.count("non-finite loss, and DeepSpeed applied the step") == 1


def test_a_non_finite_verdict_from_another_rank_skips_the_step_here(tmp_path, monkeypatch):
    recorder = StateRecorder()
    trainer = make_trainer(tmp_path, [NaNMonitor(), recorder], max_steps=5)
    strategy_reduce = trainer.strategy.reduce

    def reduce_as_if_rank1_overflowed_at_step_2(tensor, *args, reduce_op="mean", **kwargs):
        result = strategy_reduce(tensor, *args, reduce_op=reduce_op, **kwargs)
        if reduce_op == "max" and trainer.global_step == 2 and tensor.dim() == 0:
            return torch.ones_like(result)  # rank 1 saw a non-finite value
        return result

    monkeypatch.setattr(trainer.strategy, "reduce", reduce_as_if_rank1_overflowed_at_step_2)
    trainer.fit(Regression(), regression_data())
    assert same_tensors(recorder.before_step[2]["weights"], recorder.before_step[3]["weights"])
    assert not same_tensors(recorder.before_step[3]["weights"], recorder.before_step[4]["weights"])


def test_consecutive_non_finite_steps_save_a_checkpoint_and_stop(tmp_path, caplog):
    recorder = StateRecorder()
    monitor = NaNMonitor(max_consecutive_skips=4, dirpath=str(tmp_path / "ckpt"))
    trainer = make_trainer(tmp_path, [monitor, recorder], max_steps=50)
    with caplog.at_level(logging.ERROR, logger="cogview.monitor"):
        trainer.fit(Regression(bad_steps=range(3, 100)), regression_data())

    assert trainer.global_step == 7  # steps 4..7 were the four non-finite ones
    path = tmp_path / "ckpt" / "nonfinite-step7.ckpt"
    assert path.is_file()
    message = monitor.stop_message
    assert "stopping at step 7" in message and "last finite step 3" in message
    assert "loss=" in message and "grad_norm=" in message and str(path) in message
    assert message in caplog.text
    checkpoint = torch.load(path, weights_only=False)
    weights = {k: v for k, v in checkpoint["state_dict"].items()}
    assert same_tensors(weights, recorder.before_step[3]["weights"])  # last finite weights
    state = next(v for k, v in checkpoint["callbacks"].items() if "NaNMonitor" in k)
    assert state["skipped_steps"] == 4 and state["last_finite"]["step"] == 3

    resumed = NaNMonitor(max_consecutive_skips=4)  # e.g. with the cause fixed: no more inf
    trainer = make_trainer(tmp_path, [resumed], max_steps=10)
    trainer.fit(Regression(), regression_data(), ckpt_path=path)
    assert trainer.global_step == 10 and resumed.skipped_steps == 4  # the count carried over
    assert resumed.consecutive_skips == 0 and resumed.stop_message is None


def test_grad_norm_before_clipping_and_layer_stats_on_logging_steps_only(tmp_path):
    class Probe(L.Callback):
        """Records the pre-clipping grad norm and whether layer tracking was on, per step."""

        def __init__(self):
            self.norms, self.tracked = {}, {}

        def on_before_backward(self, trainer, pl_module, loss):
            self.tracked[trainer.global_step] = pl_module.model.layers[0].attention.track_stats

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.norms[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))

    probe = Probe()
    logger = CSVLogger(tmp_path, name="logs", version="")
    trainer = make_trainer(tmp_path, [NaNMonitor(log_every_n_steps=2), probe], logger=logger,
                           max_steps=4, gradient_clip_val=1e-3)
    tokens = torch.randint(0, 64, (16, 12))
    trainer.fit(TransformerLM(), DataLoader(TensorDataset(tokens), batch_size=4))

    assert probe.tracked == {0: False, 1: True, 2: False, 3: True}
    model = trainer.lightning_module.model
    assert not any(layer.attention.track_stats or layer.mlp.track_stats for layer in model.layers)
    metrics = read_csv_metrics(tmp_path / "logs" / "metrics.csv")
    rows = [row for row in metrics if row.get("train/grad_norm")]
    assert [int(row["step"]) for row in rows] == [1, 3]
    for row in rows:
        step = int(row["step"])
        assert float(row["train/grad_norm"]) == pytest.approx(probe.norms[step], rel=1e-5)
        assert float(row["train/grad_norm"]) > 1e-3  # logged before clipping to 1e-3
        for layer in (0, 1):
            assert float(row[f"layer_stats/layer{layer}/max_attention_score"]) > 0
            assert float(row[f"layer_stats/layer{layer}/max_activation"]) > 0


def test_fp16_loss_scale_is_logged_and_a_scaler_skip_is_counted(tmp_path):
    recorder = StateRecorder()
    monitor = NaNMonitor(log_every_n_steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    logger = CSVLogger(tmp_path, name="logs", version="")
    trainer = make_trainer(tmp_path, [monitor, recorder], logger=logger, max_steps=5,
                           plugins=[AtomicCheckpointIO(),
                                    MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(Regression(bad_steps={2}), regression_data())

    assert monitor.skipped_steps == 1
    assert same_tensors(recorder.before_step[2]["weights"], recorder.before_step[3]["weights"])
    metrics = read_csv_metrics(tmp_path / "logs" / "metrics.csv")
    rows = [row for row in metrics if row.get("train/loss_scale")]
    scales = {int(row["step"]): float(row["train/loss_scale"]) for row in rows}
    assert scales[0] == scales[1] == 1024.0  # steps 1 and 2
    assert scales[2] == scales[4] == 512.0  # halved by the skipped step 3


def test_fp16_gradient_norm_above_the_fp16_range_is_finite():
    from cogview.callbacks.monitor import total_norm

    grads = [torch.full((1000,), 3000.0, dtype=torch.float16), torch.ones(4)]  # norm ~ 94868
    assert total_norm(grads).item() == pytest.approx((1000 * 3000.0**2 + 4) ** 0.5, rel=1e-4)
    assert not torch.isfinite(total_norm([torch.ones(3), torch.tensor([float("nan")])]))


def test_monitor_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_consecutive_skips=0"):
        NaNMonitor(max_consecutive_skips=0)
    with pytest.raises(ValueError, match="log_every_n_steps=0"):
        NaNMonitor(log_every_n_steps=0)


# --------------------------------------------------------- atomic checkpoints
def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.arange(1000.0)}, path)
    real_save = torch.save

    def save_half_then_die(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(handle.tell() // 2)  # a partial checkpoint on disk...
        raise OSError("disk full")  # ...and the writer dies

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)

    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left
    previous = torch.load(path)
    assert previous["step"] == 1 and torch.equal(previous["weights"], torch.arange(1000.0))


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    writer = (  # saves step 1, then dies (SIGKILL) halfway through writing step 2
        "import sys, time, torch\n"
        "from cogview.callbacks import atomic_torch_save\n"
        "atomic_torch_save({'step': 1, 'weights': torch.full((100_000,), 1.0)}, sys.argv[1])\n"
        "real_save = torch.save\n"
        "def half_save(obj, handle):\n"
        "    real_save(obj, handle)\n"
        "    handle.truncate(handle.tell() // 2)\n"
        "    handle.flush()\n"
        "    print('half written', flush=True)\n"
        "    time.sleep(60)\n"
        "torch.save = half_save\n"
        "atomic_torch_save({'step': 2, 'weights': torch.full((100_000,), 2.0)}, sys.argv[1])\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(path)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "half written"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    checkpoint = torch.load(path)
    assert checkpoint["step"] == 1 and torch.all(checkpoint["weights"] == 1.0)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.tmp")  # the partial one


def test_build_trainer_wires_atomic_checkpoints_monitor_and_final_checkpoint(tmp_path, monkeypatch):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=[
            f"output_dir={tmp_path}", "logger=csv", "trainer.max_steps=5",
            "trainer.precision=32-true",
            "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=2",
            "trainer.log_every_n_steps=1"])
    trainer = build_trainer(cfg)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, NaNMonitor) for c in trainer.callbacks)
    assert isinstance(trainer.checkpoint_callback, StepCheckpoint)

    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((str(src), str(dst))),
                                                         real_replace(src, dst))[1])
    trainer.fit(Regression(), regression_data())

    directory = tmp_path / "checkpoints"
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert not (directory / "last.ckpt").is_symlink()
    assert torch.load(directory / "last.ckpt", weights_only=False)["global_step"] == 5  # the end
    last_writes = [src for src, dst in renames if dst == str(directory / "last.ckpt")]
    assert len(last_writes) == 3  # at steps 2, 4 and the end: each a rename of a temp file
    assert all(os.path.dirname(src) == str(directory) and ".tmp" in src for src in last_writes)
    assert "train/skipped_steps" in (tmp_path / "logs" / "metrics.csv").read_text()


def test_wandb_logger_config_is_offline_under_the_run_directory(tmp_path):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train",
                      overrides=[f"output_dir={tmp_path / 'run7'}", "logger=wandb"])
    logger = build_trainer(cfg).logger
    assert isinstance(logger, WandbLogger)
    settings = logger._wandb_init  # what wandb.init will receive
    assert settings["name"] == f"{cfg.task.name}-run7" and settings["dir"] == str(tmp_path / "run7")
    assert settings["project"] == "cogview" and logger._offline
    assert logger._experiment is None  # W&B starts only when training logs


def test_shapes_eval_rejects_bad_settings():
    from cogview.callbacks import ShapesOracleEval

    with pytest.raises(ValueError, match="refine_sweeps=-1"):
        ShapesOracleEval(sr_refine_sweeps=-1)
    with pytest.raises(ValueError, match="splits"):
        ShapesOracleEval(splits=["nowhere"])
    assert ShapesOracleEval(sr_refine_sweeps=0).sr_refine_sweeps == 0
