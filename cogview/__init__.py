"""cogview: CogView-style Chinese text-to-image models on Lightning + Hydra."""

from cogview.cpu import check_aten_cpu_capability

__version__ = "0.1.0"
__all__ = ["Pipeline", "PipelineOutput"]

# Before any tensor operation: ATen reads ATEN_CPU_CAPABILITY at its first kernel call, and
# a level above the CPU's would make it execute instructions the CPU lacks (SIGILL).
check_aten_cpu_capability()


def __getattr__(name: str):
    """Lazy exports: ``from cogview import Pipeline`` imports torch only when asked for."""
    if name in ("Pipeline", "PipelineOutput"):
        from cogview import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'cogview' has no attribute {name!r}")
