"""python -m cogview.convert kind=transformer|vqvae src=... out=... [key=value ...]

Defaults and every key: cogview/conf/convert.yaml.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue

from cogview.config import CONF_DIR
from cogview.convert import convert_transformer, convert_vqvae

CONFIG = CONF_DIR / "convert.yaml"
KINDS = ("transformer", "vqvae")
TRANSFORMER_ONLY = ("vqvae", "tokenizer", "heads", "task", "image_tokens", "max_text_len",
                    "caption_end_token", "preset")


def parse_args(argv: list[str]) -> DictConfig:
    """cogview/conf/convert.yaml merged with ``key=value`` arguments; unknown keys are an error."""
    defaults = OmegaConf.load(CONFIG)
    OmegaConf.set_struct(defaults, True)
    malformed = [arg for arg in argv if "=" not in arg]
    if malformed:
        raise ValueError(f"arguments must be key=value, got {malformed}")
    try:
        cfg = OmegaConf.merge(defaults, OmegaConf.from_dotlist(argv))
    except ConfigKeyError as error:
        key = getattr(error, "key", None) or str(error).splitlines()[0]
        raise ValueError(f"unknown key {key!r}; known keys: {sorted(defaults)}") from None
    for key in ("kind", "src", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise ValueError(f"{key}= is required")
    if cfg.kind not in KINDS:
        raise ValueError(f"kind={cfg.kind!r} is not one of {list(KINDS)}")
    return cfg


def run(cfg: DictConfig) -> Path:
    """Runs the conversion ``cfg`` describes; returns the output directory."""
    src, out = str(cfg.src), str(cfg.out)  # a path like 1000 parses as an int
    if cfg.kind == "vqvae":
        return convert_vqvae(src, out, trust_pickle=cfg.trust_pickle)
    options = {key: cfg[key] for key in TRANSFORMER_ONLY}
    for key in ("vqvae", "tokenizer"):
        options[key] = None if options[key] is None else str(options[key])
    return convert_transformer(src, out, trust_pickle=cfg.trust_pickle, **options)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 on success, 1 on a conversion error, 2 on bad arguments."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except (ValueError, MissingMandatoryValue) as error:
        print(f"error: {error}\nusage: {__doc__.splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        out = run(cfg)
    except (ValueError, FileNotFoundError) as error:  # CheckpointError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"converted {cfg.src} ({cfg.kind}) to {out}")
    return 0


if __name__ == "__main__":
    from cogview.cli import run_command  # the same --help and exit codes as `cogview convert`

    sys.exit(run_command("convert", sys.argv[1:]))
