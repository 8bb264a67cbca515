"""Evaluation metrics: shapes-zh oracle, caption score, FID/IS, SR PSNR/SSIM.

The names below load their module on first use (`cogview.eval.fid` imports torchmetrics),
so `import cogview.eval.oracle` stays light. Report plots: `cogview.eval.plots`.
"""

import importlib

_EXPORTS = {
    "cogview.eval.features": (
        "DEFAULT_CLASSIFIER", "DEFAULT_FEATURES", "InceptionV3", "OracleClassifier",
        "RandomConvFeatures", "VQVAEFeatures", "make_classifier", "make_feature_extractor",
    ),
    "cogview.eval.metrics": (
        "blurred_fid", "caption_score_summary", "fid", "frechet_distance", "inception_score",
        "inception_score_from_logits", "rerank_gain", "sr_metrics",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    """Lazy exports (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'cogview.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
