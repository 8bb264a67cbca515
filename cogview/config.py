"""Where cogview's Hydra configs live (inside the package, so an installed cogview finds them
from any directory), and composing one outside a Hydra app."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"
INFERENCE_CONF_DIR = CONF_DIR / "inference"


def register_resolvers() -> None:
    """Custom OmegaConf resolvers used in the configs (``${eq:a,b}``)."""
    if not OmegaConf.has_resolver("eq"):
        OmegaConf.register_new_resolver("eq", lambda a, b: str(a) == str(b))


def compose_config(name: str, overrides: list[str] | None = None,
                   config_dir: Path = CONF_DIR) -> DictConfig:
    """``<config_dir>/<name>.yaml`` with ``key=value`` overrides, as a Hydra app composes it."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=name, overrides=list(overrides or []))
