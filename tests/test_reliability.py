"""Safe loading (no foreign pickle runs, finite weights), resumed data streams, stale
checkpoint temporaries."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from cogview.callbacks.checkpoint import remove_stale_temporaries
from cogview.export import export_checkpoint
from cogview.export import main as export_main
from cogview.generation.drivers import generate_images
from cogview.generation.sampling import NonFiniteLogitsError
from cogview.modules.transformer import CogViewTransformer, TransformerConfig
from cogview.safe_load import NonFiniteWeightsError, UnsafeCheckpointError, load_torch_file
from cogview.tasks.sequence import checkpoint_state_dict
from cogview.tokenization.vocab import CogViewVocab
from cogview.training import (
    build_task,
    build_trainer,
    register_resolvers,
    resolve_ckpt_path,
    train,
)
from tests.helpers import CONF_DIR, TINY_MODEL, make_run_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("reliability"), n=48, shard_size=8)


def compose_train(overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="train", overrides=overrides)


def train_overrides(assets, out, *extra):
    return ["task=t2i", f"vqvae_dir={assets['vqvae']}", f"data.train_shards={assets['shards']}",
            "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8",
            "data.num_val_shards=0", f"output_dir={out}", "logger=none",
            "task.sample_every_n_steps=0", "precision=32-true",
            "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0",
            "~callbacks.monitor", *TINY_MODEL, *extra]


# ------------------------------------------------------------------------------------------------
# a planted pickle payload never runs


class Payload:
    """Unpickling it creates the directory ``marker``: proof that foreign code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path, marker, state_dict=None):
    """A checkpoint shaped like cogview's own, with the payload beside the weights."""
    torch.save({"state_dict": state_dict or {"model.w": torch.zeros(2)}, "global_step": 3,
                "cogview_task": "cogview.tasks.t2i.T2ITask", "payload": Payload(marker)}, path)
    return path


def test_a_planted_pickle_payload_is_refused_by_every_loader(assets, tmp_path, capsys):
    evil, marker = plant(tmp_path / "evil.ckpt", tmp_path / "PAYLOAD_RAN"), tmp_path / "PAYLOAD_RAN"
    refused = r"evil\.ckpt contains a pickled reference to posix\.mkdir.*trust_pickle=true"
    loaders = {
        "load_torch_file": lambda: load_torch_file(evil),
        "cogview.export": lambda: export_checkpoint(evil, tmp_path / "out"),
        "task.init_from": lambda: checkpoint_state_dict(evil),
        "ckpt_path resume": lambda: resolve_ckpt_path(str(evil), str(tmp_path)),
    }
    for name, load in loaders.items():
        with pytest.raises(UnsafeCheckpointError, match=refused):
            load()
        assert not marker.exists(), f"{name} ran the payload"
    # the command line: a clear message and exit code 1, no traceback
    assert export_main([f"ckpt={evil}", f"out={tmp_path / 'out'}"]) == 1
    assert "posix.mkdir" in capsys.readouterr().err and not marker.exists()
    # train.py task.init_from=evil.ckpt: refused while the task is built
    cfg = compose_train(train_overrides(assets, tmp_path / "run", f"task.init_from={evil}"))
    with pytest.raises(UnsafeCheckpointError, match=refused):
        build_task(cfg)
    assert not marker.exists()
    # the payload is real: trusting the file runs it
    load_torch_file(evil, trust_pickle=True)
    assert marker.is_dir()


def test_train_refuses_a_pickled_resume_checkpoint_before_building_anything(assets, tmp_path):
    evil, marker = plant(tmp_path / "evil.ckpt", tmp_path / "RAN"), tmp_path / "RAN"
    cfg = compose_train(train_overrides(assets, tmp_path / "run", f"ckpt_path={evil}"))
    with pytest.raises(UnsafeCheckpointError, match="trust_pickle=true"):
        train(cfg)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# weights and logits must be finite


def tiny_model():
    torch.manual_seed(0)
    vocab = CogViewVocab(num_image_codes=64, text_vocab_size=32)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_heads=2, vocab_size=vocab.size,
                               max_positions=128)
    return CogViewTransformer(config).eval(), vocab


def test_nan_weights_are_refused_naming_the_tensor(tmp_path):
    model, _ = tiny_model()
    with torch.no_grad():
        model.final_layernorm.weight[3] = float("nan")
    model.save_pretrained(tmp_path / "export")
    with pytest.raises(NonFiniteWeightsError, match=r"final_layernorm\.weight \(1 NaN, 0 inf"):
        CogViewTransformer.from_pretrained(tmp_path / "export")
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteWeightsError, match=r"init_from=.*final_layernorm\.weight"):
        checkpoint_state_dict(plant_plain(tmp_path / "nan.ckpt", state))
    with pytest.raises(NonFiniteWeightsError, match="final_layernorm"):
        resolve_ckpt_path(str(tmp_path / "nan.ckpt"), str(tmp_path))


def plant_plain(path, state_dict):
    torch.save({"state_dict": state_dict, "global_step": 1}, path)
    return path


def test_sampling_raises_when_logits_become_non_finite():
    model, vocab = tiny_model()
    prompt = [[5, 6, 7]]
    generate_images(model, vocab, prompt, image_tokens=4, seeds=[0], top_k=8)  # finite: fine
    with torch.no_grad():
        model.final_layernorm.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteLogitsError, match="NaN or infinite for 1 of 1 rows"):
        generate_images(model, vocab, prompt, image_tokens=4, seeds=[0], top_k=8)


# ------------------------------------------------------------------------------------------------
# checkpoint temporaries left by killed writes


def test_stale_checkpoint_temporaries_are_removed_live_writes_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last.ckpt.tmp{dead.pid}"
    live = tmp_path / f".last.ckpt.tmp{os.getppid()}"
    other = tmp_path / "notes.tmp1"  # not a checkpoint temporary
    for path in (stale, live, other):
        path.write_bytes(b"x" * 100)
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------------
# a resumed run does not replay batches


class RecordBatches(Callback):
    """Fingerprints of every training batch, in order."""

    def __init__(self):
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12])


def fit(assets, out, steps, *extra, ckpt_path=None):
    cfg = compose_train(train_overrides(assets, out, f"trainer.max_steps={steps}", *extra))
    trainer, recorder = build_trainer(cfg), RecordBatches()
    trainer.callbacks.append(recorder)
    trainer.fit(build_task(cfg), datamodule=instantiate(cfg.data), ckpt_path=ckpt_path,
                weights_only=True)
    return recorder.seen


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """Batches of a 20-step run per mode (checkpoints every step), computed once per mode."""
    runs = {}

    def get(resampled: bool):
        if resampled not in runs:
            out = tmp_path_factory.mktemp(f"full-resampled-{resampled}")
            runs[resampled] = out, fit(assets, out, 20, *stream_overrides(resampled))
        return runs[resampled]
    return get


def stream_overrides(resampled):
    return [f"data.resampled={str(resampled).lower()}", "callbacks.checkpoint.every_n_train_steps=1"]


@pytest.mark.parametrize("resampled, k", [
    (False, 7), (True, 7),
    pytest.param(False, 12, marks=pytest.mark.slow), pytest.param(False, 15, marks=pytest.mark.slow),
])
def test_resume_continues_the_data_stream(assets, uninterrupted, tmp_path, resampled, k):
    """48 samples in batches of 4: 12 batches an epoch. Kill points k=7 (mid-epoch 0), 12 (its
    last batch) and 15 (mid-epoch 1): the uninterrupted run writes a checkpoint every step, the
    resumed run starts from step k's. Per-epoch mode resumes with exactly the uninterrupted
    run's batches; resampled mode draws fresh batches, none of them among the run's first k."""
    out, full = uninterrupted(resampled)
    assert len(full) == 20
    ckpt, = (out / "checkpoints").glob(f"epoch=*-step={k}.ckpt")
    resumed = fit(assets, tmp_path, 20, *stream_overrides(resampled), ckpt_path=str(ckpt))
    assert len(resumed) == 20 - k
    if resampled:
        assert not set(resumed) & set(full[:k])
    else:
        assert resumed == full[k:]
