"""cogview: CogView-style Chinese text-to-image models on Lightning + Hydra."""

__version__ = "0.1.0"
__all__ = ["Pipeline"]


def __getattr__(name: str):
    """Lazy exports: ``from cogview import Pipeline`` imports torch only when asked for."""
    if name == "Pipeline":
        from cogview.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'cogview' has no attribute {name!r}")
