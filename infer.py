"""Run a trained cogview model: python infer.py task=vqvae ckpt=<dir> images=[...]."""

import hydra
from omegaconf import DictConfig

from cogview.inference import infer


@hydra.main(config_path="conf/inference", config_name="infer", version_base=None)
def main(cfg: DictConfig) -> None:
    infer(cfg)


if __name__ == "__main__":
    main()
