"""cogview: CogView-style Chinese text-to-image models on Lightning + Hydra."""

__version__ = "0.1.0"
