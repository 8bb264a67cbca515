"""Train a cogview task: python train.py task=vqvae [trainer.max_steps=...] [-m sweeps]."""

import hydra
from omegaconf import DictConfig

from cogview.training import register_resolvers, train

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
