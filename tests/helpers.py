"""Shared test utilities."""

from pathlib import Path
from cogview import config as cogview_config
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = cogview_config.CONF_DIR
# Hydra overrides for a 2-layer, 64-wide transformer: seconds per test run.
TINY_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=2"]


def make_vqvae(directory, num_codes: int = 64):
    """A small random VQ-VAE saved to ``directory`` (fast to run in tests)."""
    import torch

    from cogview.modules.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    config = VQVAEConfig.preset("tiny", channels=(16, 32, 32), res_channels=16, code_dim=16,
                                num_codes=num_codes, num_res_blocks=1)
    VQVAE(config).save_pretrained(directory)
    return directory


def make_token_shards(vqvae_dir, out, n: int = 64, size: int = 64, sr: bool = False,
                      shard_size: int = 32, split: str = "train"):
    """Pretokenized shapes-zh shards (the real pretokenizer) in ``out``."""
    from hydra import compose, initialize_config_dir

    from cogview.data.pretokenize import pretokenize

    overrides = [f"vqvae_dir={vqvae_dir}", f"out={out}", "progress=false", "num_workers=0",
                 "source.kind=shapes", f"source.shapes.length={n}", f"source.shapes.split={split}",
                 f"size={size}", f"sr={str(sr).lower()}", f"shard_size={shard_size}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        pretokenize(compose(config_name="pretokenize", overrides=overrides))
    return out


def make_run_assets(root, n: int, shard_size: int) -> dict:
    """A tiny VQ-VAE and t2i token shards of ``n`` 64-px shapes-zh samples under ``root``."""
    vqvae = make_vqvae(root / "vqvae")
    return {"vqvae": vqvae,
            "shards": make_token_shards(vqvae, root / "shards", n=n, size=64, shard_size=shard_size)}


def make_exports(root, t2i_text_len: int, caption_text_len: int):
    """Tiny random t2i and caption export directories (SequenceTask.export, no training)."""
    import torch

    from cogview.tasks.caption import CaptionTask
    from cogview.tasks.t2i import T2ITask

    model = dict(num_layers=2, hidden_size=64, num_heads=2)
    make_vqvae(root / "vq", num_codes=64)
    torch.manual_seed(0)
    T2ITask(model=model, vqvae_dir=str(root / "vq"), max_text_len=t2i_text_len).export(root / "t2i")
    caption = CaptionTask(model=model, vqvae_dir=str(root / "vq"), max_text_len=caption_text_len)
    # as task=caption's data (data.caption_end_token: "[SEP]")
    caption._trainer = SimpleNamespace(datamodule=SimpleNamespace(caption_end_token="[SEP]"))
    caption.export(root / "caption")
    return root


def make_sr_export(root, text_len: int = 8, hr_tokens: int = 64):
    """A tiny random sr export whose window is sqrt(hr_tokens)/2 low-res codes per side
    (64 -> 8x8 high-res codes from 4x4 low-res: 32 px in, 64 px out per window)."""
    import torch

    from cogview.tasks.sr import SRTask

    if not (root / "vq").exists():
        make_vqvae(root / "vq", num_codes=64)
    torch.manual_seed(0)
    task = SRTask(model=dict(num_layers=2, hidden_size=64, num_heads=2, max_positions=512),
                  vqvae_dir=str(root / "vq"), max_text_len=text_len)
    task.image_tokens = hr_tokens
    return task.export(root / "sr")


def read_wandb_records(run_file) -> list:
    """The protobuf Records of an offline W&B run file: a LevelDB-style log (32 KiB blocks of
    records with a 7-byte header: crc32, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:  # block trailer padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding up to the end of the block
            position += left_in_block
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment: a whole record
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def read_wandb_history(run_file) -> list[dict[str, str]]:
    """History rows of an offline W&B run: {key: JSON value}."""
    return [{item.key or "/".join(item.nested_key): item.value_json
             for item in record.history.item}
            for record in read_wandb_records(run_file)
            if record.WhichOneof("record_type") == "history"]


def read_wandb_config(run_file) -> dict[str, str]:
    """The config an offline W&B run recorded: {key: JSON value}, later updates winning."""
    config = {}
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") == "config":
            config.update({item.key or "/".join(item.nested_key): item.value_json
                           for item in record.config.update})
    return config
